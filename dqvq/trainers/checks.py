"""Every check of a run's config that can fail before compiling.

`validate_config` runs before a model is built, a dataset read or a step
compiled, and names the field to change (with a value that would work) for
each problem it finds. The layout-dependent stage-2 checks, which need the
tokenizer, run in `stage2.make_task`, still before compiling.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from dqvq import config_lib
from dqvq.models import dqvae
from dqvq.models import transformer as transformer_lib
from dqvq import sequence
from dqvq import sharding


def validate_config(c: ml_collections.ConfigDict,
                    num_devices: int | None = None,
                    tokenizer_ready: bool = True) -> None:
  """Every check that can fail before compiling, with the fix in the message.

  `tokenizer_ready=False` skips the stage-2 checks of the tokenizer run (for
  a two-stage run, whose tokenizer is trained first).
  """
  num_devices = num_devices or jax.device_count()
  if c.stage not in (1, 2):
    raise ValueError(f'config.stage={c.stage}; it must be 1 or 2.')
  if c.stage == 2:
    _validate_stage2(c, num_devices, tokenizer_ready)
  model = dqvae.from_config(c.model) if c.stage == 1 else None
  if model is not None:
    model.validate()
    res = c.data.resolution
    if res % model.grain_factors[0]:
      raise ValueError(
          f'config.data.resolution={res} is not a multiple of the largest '
          f'grain factor {model.grain_factors[0]}; use e.g. '
          f'{max(model.grain_factors[0], res - res % model.grain_factors[0])}.')
    if c.loss.perceptual_weight > 0 and not c.lpips_weights:
      raise ValueError(
          'config.lpips_weights is empty but loss.perceptual_weight > 0: set it '
          'to the directory made by `python -m dqvq.convert lpips --vgg16 ... '
          "--lin ... --out DIR`, or to 'random' for an untrained LPIPS, or set "
          'loss.perceptual_weight=0.')
    if (c.lpips_weights not in ('', 'random') and c.loss.perceptual_weight > 0
        and not os.path.isdir(c.lpips_weights)):
      raise FileNotFoundError(
          f'config.lpips_weights={c.lpips_weights!r} does not exist; create it '
          'with `python -m dqvq.convert lpips --vgg16 vgg16-397923af.pth --lin '
          'vgg.pth --out DIR`.')
  sharding.create_mesh(c.mesh.data, c.mesh.fsdp)  # raises on a bad shape
  for field in ('batch_size', 'eval_batch_size'):
    size = c[field]
    if size <= 0 or size % num_devices:
      raise ValueError(
          f'config.{field}={size} is not divisible by the {num_devices} '
          f'devices; use a multiple of {num_devices} (e.g. '
          f'{max(num_devices, size - size % num_devices)}).')
  for field in ('num_train_steps', 'log_every', 'checkpoint_every'):
    if c[field] <= 0:
      raise ValueError(f'config.{field} must be positive, got {c[field]}.')
  if c.get('steps_in_flight', 1) < 0:
    raise ValueError(f'config.steps_in_flight={c.steps_in_flight}; give the '
                     'steps the host may run ahead (1 is the default), or 0 '
                     'for no bound.')
  if c.get('resume_step', 0) < 0:
    raise ValueError(f'config.resume_step={c.resume_step}; give a saved step, '
                     'or 0 for the newest.')
  spike = c.get('loss_spike_factor', 0)
  if spike < 0 or 0 < spike <= 1:
    raise ValueError(
        f'config.loss_spike_factor={spike} would stop a healthy run; use a '
        'factor well above 1 (default 10), or 0 to turn the spike check off.')
  if not (c.stage == 2 and c.tokens_dir):
    # Imported here: TFDS is needed to check a dataset, not to build a step.
    from dqvq.data import sources as data_sources  # pylint: disable=g-import-not-at-top
    data_sources.validate_data_config(c.data)


def _validate_stage2(c: ml_collections.ConfigDict, num_devices: int,
                     tokenizer_ready: bool) -> None:
  """Stage-2 checks that need no tokenizer weights (the layout-dependent
  ones run in `stage2.make_task`, still before compiling)."""
  m = c.model
  workdir = c.tokenizer.workdir
  if c.tokenizer.get('stage1') is not None:
    validate_config(c.tokenizer.stage1, num_devices)
  if tokenizer_ready and not workdir:
    raise ValueError(
        'config.tokenizer.workdir is not set: point it at a trained stage-1 '
        'run, e.g. --config.tokenizer.workdir=/runs/dqvae.')
  if tokenizer_ready and not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(
        f'config.tokenizer.workdir={workdir!r} holds no checkpoints/; train '
        f'the tokenizer there first (python -m dqvq.train --config '
        f'configs/<name>_stage1.py --workdir {workdir}).')
  if c.tokens_dir and tokenizer_ready and not os.path.isdir(c.tokens_dir):
    raise FileNotFoundError(
        f'config.tokens_dir={c.tokens_dir!r} does not exist; write it with '
        f'`python -m dqvq.tokenize --stage1_workdir {workdir} --out '
        f"{c.tokens_dir}`, or set tokens_dir='' to encode on the fly.")
  if m.width % m.num_heads:
    raise ValueError(f'config.model.width={m.width} is not divisible by '
                     f'num_heads={m.num_heads}.')
  fsdp = c.mesh.fsdp if c.mesh.fsdp != -1 else num_devices // max(
      1, c.mesh.data)
  if fsdp > 1 and m.width % fsdp:
    raise ValueError(f'config.model.width={m.width} is not divisible by the '
                     f'fsdp mesh size {fsdp}; FSDP shards the width.')
  transformer_lib.check_input_layers(transformer_lib.input_layer_kwargs(m))
  if m.get('position_index', 'slot') not in sequence.POSITION_INDEX:
    raise ValueError(f'config.model.position_index={m.position_index!r}; '
                     f'choose one of {sequence.POSITION_INDEX}.')
  if not 0.0 <= m.label_dropout < 1.0:
    raise ValueError(f'config.model.label_dropout={m.label_dropout} must be '
                     'in [0, 1).')
  if m.label_dropout > 0 and not m.num_classes:
    raise ValueError('config.model.label_dropout > 0 needs a class-'
                     'conditional model (config.model.num_classes > 0).')
  labels = tuple(c.get('sample_class_labels', ()))
  if labels and not m.num_classes:
    raise ValueError('config.sample_class_labels needs a class-conditional '
                     'model (config.model.num_classes > 0); empty it.')
  bad = [l for l in labels if not 0 <= int(l) < m.num_classes]
  if bad:
    raise ValueError(f'config.sample_class_labels {bad} lie outside '
                     f'[0, {m.num_classes}) (config.model.num_classes).')
  config_lib.sampling_config(c)  # SamplingConfig refuses impossible settings itself.
