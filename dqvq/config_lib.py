"""Shared config building blocks for `configs/*.py`.

Config files call `stage1_config()` and override what differs, so every field
exists (with a comment) in one place. The checks that run before anything is
compiled live in `dqvq.trainers.checks`.

Config arguments (`--config configs/x.py:ARG`) are comma-separated options:
`runlocal` (tiny model and data for CPU tests), a model variant name
(`triple`, `entropy`, `random`, `vqgan`), and `key=value` pairs such as
`ratio=0.3` (the fine share r_fine of a dual model).
"""

from __future__ import annotations

import ast
import dataclasses
import os
from typing import Any, Sequence

import jax.numpy as jnp
import ml_collections

from dqvq.models import dqvae
from dqvq.models import transformer as transformer_lib
from dqvq import sampling as sampling_lib

# config.compute_dtype -> the modules' dtype (None: float32 everywhere).
COMPUTE_DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}

VARIANTS = {'feature': 'feature_dual', 'dual': 'feature_dual',
            'entropy': 'entropy_dual', 'triple': 'triple', 'vqgan': 'vqgan',
            'random': 'feature_dual'}


def parse_arg(arg: str | None,
              extra: tuple[str, ...] = ()) -> dict[str, Any]:
  """'runlocal,triple,ratio=0.3' -> {'runlocal': True, 'variant': 'triple',
  'ratio': 0.3}; flags in `extra` (e.g. 'large') become booleans."""
  opts: dict[str, Any] = {'runlocal': False, 'variant': None}
  opts.update({name: False for name in extra})
  for part in filter(None, (p.strip() for p in (arg or '').split(','))):
    if '=' in part:
      k, v = part.split('=', 1)
      try:
        opts[k] = float(v) if '.' in v else int(v)
      except ValueError:
        opts[k] = v
    elif part == 'runlocal' or part in extra:
      opts[part] = True
    elif part in VARIANTS:
      opts['variant'] = part
    else:
      raise ValueError(f'Unknown config argument {part!r}; use runlocal, one of '
                       f'{sorted(VARIANTS)}, or key=value (e.g. ratio=0.3).')
  return opts


def model_config(variant: str | None, runlocal: bool,
                 ratio: float | None = None) -> ml_collections.ConfigDict:
  """`config.model`: the paper's model, or its toy-width twin for runlocal."""
  name = VARIANTS[variant or 'feature']
  kw = dqvae.tiny_kwargs(name) if runlocal else dqvae.paper_kwargs(name)
  if variant == 'random':
    kw['router'] = 'random'
  if ratio is not None:
    if len(kw['grain_factors']) != 2:
      raise ValueError('ratio= sets r_fine of a dual model; for the triple '
                       'model set config.model.grain_ratios directly.')
    kw['grain_ratios'] = (1.0 - ratio, ratio)
  # Every DQVAE field is present, so any of them can be overridden from the
  # command line (a locked ConfigDict rejects unknown keys).
  for field, spec in dqvae.DQVAE.__dataclass_fields__.items():
    if field in dqvae.NON_CONFIG_FIELDS or field in kw:
      continue
    kw[field] = spec.default
  if kw['entropy_thresholds'] is None:
    kw['entropy_thresholds'] = ml_collections.config_dict.placeholder(str)
  return ml_collections.ConfigDict(kw)


def _data_config() -> ml_collections.ConfigDict:
  """`config.data`; fields documented in `dqvq.data.pipeline`."""
  return ml_collections.ConfigDict(dict(
      name='imagenet2012', data_dir=os.path.expanduser('~/tensorflow_datasets'),
      image_folder_root='', image_folder_train_list='',
      image_folder_eval_list='', image_folder_val_fraction=0.05,
      image_folder_validate=True, resolution=256,
      crop_scale=ml_collections.config_dict.placeholder(tuple),
      train_split='train',
      eval_split='validation', num_workers=0, read_threads=8))


def _loop_config(c: ml_collections.ConfigDict) -> None:
  """Cadences of the shared loop (logging, validation, pictures, saving)."""
  c.log_every = 50
  c.eval_every = 5000
  c.image_every = 1000
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.best_metric = 'val/l1_loss'       # kept besides the last K; mode 'min'
  c.num_images = 8                    # examples in image summaries
  c.stop_at_step = 0                  # >0: checkpoint and exit after this
  #                                     step, as on preemption (time-boxed jobs)
  c.resume_step = 0                   # >0: resume from this saved step, not
  #                                     the newest (after a divergence; the
  #                                     newer steps are moved aside, so drop
  #                                     it once the run has saved past it)
  # Divergence: a run stops, before saving, when a metric or the state goes
  # NaN/inf, or when loss_spike_metric (a positive loss; its 'val/' twin,
  # measured on the state about to be saved, likewise) exceeds this factor
  # times its running mean. 10x is far beyond the noise of a healthy run and
  # well below what a blown-up step gives; 0 turns the spike check off.
  c.loss_spike_factor = 10.0
  c.loss_spike_metric = 'l1_loss'
  # Steps the host may dispatch ahead of the device. A stop (SIGTERM, Ctrl-C)
  # waits for them before it saves, so keep it small where a scheduler kills
  # the job seconds after its notice; 0 lets the host run ahead until the
  # next log_every sync (the loop's behaviour before this field).
  c.steps_in_flight = 1


def stage1_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Every stage-1 field, with the paper's ImageNet settings as defaults."""
  opts = parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.stage = 1
  c.seed = 2021                       # official seed_everything(2021)
  c.model = model_config(opts['variant'], opts['runlocal'], opts.get('ratio'))
  c.compute_dtype = 'float32'         # or 'bfloat16' (params stay float32)

  c.data = _data_config()
  c.batch_size = 240                  # global; official 30 per GPU x 8 GPUs
  c.eval_batch_size = 240
  c.num_train_steps = 266_912         # official: 50 epochs at batch 240
  c.num_eval_batches = 0              # 0: the whole eval split
  # model.entropy_thresholds='auto' builds its table from this many images
  # at the start of the train split; 0: all (hours on ImageNet's split).
  c.entropy_num_images = 0

  c.loss = ml_collections.ConfigDict(dict(
      perceptual_weight=1.0, lpips_dropout=0.0, codebook_weight=1.0,
      disc_weight=1.0, disc_weight_max=0.75, disc_start=0,
      budget_kind='official', budget_weight=10.0,
      # Weight of the feature router's 'router_loss' (config.model.
      # router_target 'gain' or 'error'); unused otherwise.
      router_weight=1.0))
  c.lpips_weights = ''                # dir from `python -m dqvq.convert lpips`,
  #                                     or 'random' (tests only)
  c.disc = ml_collections.ConfigDict(dict(ndf=64, n_layers=3))
  c.optim = ml_collections.ConfigDict(dict(
      base_learning_rate=4.5e-6, scale_lr_by_batch=True, b1=0.5, b2=0.9,
      eps=1e-8, warmup_steps=534, min_lr_multiplier=0.0, grad_clip_norm=0.0,
      # The feature router's step size relative to the rest of the DQ-VAE
      # (its Adam updates times this); 1 is the paper's single rate.
      router_lr_multiplier=1.0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

  _loop_config(c)
  if opts['runlocal']:
    runlocal(c)
  return c


def stage2_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Every stage-2 field, with the paper's ImageNet settings as defaults.

  Arguments: `runlocal`, `large` (6 + 42 layers), `uncond`.
  """
  opts = parse_arg(arg, extra=('large', 'uncond'))
  c = ml_collections.ConfigDict()
  c.stage = 2
  c.seed = 2021
  c.compute_dtype = 'float32'
  c.tokenizer = ml_collections.ConfigDict(dict(
      # The stage-1 run directory (its newest checkpoint is used, frozen).
      workdir=ml_collections.config_dict.placeholder(str),
      # A stage-1 config trained first into `workdir` (default
      # <workdir>/stage1) when set: how the demo trains both stages.
      stage1=None))
  # A token dataset from `python -m dqvq.tokenize` (fast: the encoder runs
  # once); empty: encode the images of config.data on the fly in each step.
  c.tokens_dir = ''
  size = 'large' if opts['large'] else 'base'
  kw = transformer_lib.tiny_kwargs() if opts['runlocal'] else (
      transformer_lib.paper_kwargs(size))
  c.model = ml_collections.ConfigDict(dict(
      **kw,
      num_classes=0 if opts['uncond'] else 1000,
      label_dropout=0.0,   # > 0: null-class training for CFG sampling
      # Recompute block activations in the backward pass: the paper's 30
      # sequences per device do not fit otherwise (python -m dqvq.tools.aot).
      remat=not opts['runlocal'],
      capacities=ml_collections.config_dict.placeholder(tuple),  # None: full
      # 'slot': a token's absolute position is its slot (each stream starts
      # at a fixed row); 'compact': only non-pad tokens count, as the
      # official does on every image (converted official generators).
      # Slot trained a little better on the demo (dqvq.sequence).
      position_index='slot',
      # The input layers, paper Table 7 (dqvq.models.transformer): content
      # table 'shared' by the granularities or 'non_shared'; position tables
      # 'non_shared' or 'shared'; the granularity (segment) and the absolute
      # position embeddings on or off. The defaults are the paper's choice
      # and the official parameters (official checkpoints load);
      # `python -m dqvq.eval.study_stage2` trains each ablation.
      **transformer_lib.input_layer_kwargs()))
  c.data = _data_config()
  c.batch_size = 240                  # official 30 per GPU x 8 GPUs
  c.eval_batch_size = 240
  c.num_train_steps = 533_800         # official: 100 epochs at batch 240
  c.num_eval_batches = 0
  c.loss = ml_collections.ConfigDict(dict(content_weight=1.0,
                                          position_weight=1.0))
  c.optim = ml_collections.ConfigDict(dict(
      base_learning_rate=5e-4, scale_lr_by_batch=False, b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.01, warmup_steps=0, min_lr_multiplier=0.0,
      grad_clip_norm=0.0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  _loop_config(c)
  c.best_metric = 'val/loss'
  c.loss_spike_metric = 'loss'        # content + position cross-entropy
  c.sample_images = 0                 # >0: `dqvq.train` samples this many
  #                                     images after training (the demo)
  # How those samples are drawn: `sampling.SamplingConfig`'s fields (its
  # seed is config.seed), and the class labels they cycle through (empty:
  # every class of a class-conditional model).
  c.sampling = sampling_defaults()
  c.sample_class_labels = ()
  if opts['runlocal']:
    runlocal(c)
  return c


def sampling_defaults() -> ml_collections.ConfigDict:
  """`sampling.SamplingConfig`'s defaults as config fields, less its seed."""
  fields = dataclasses.asdict(sampling_lib.SamplingConfig())
  del fields['seed']
  c = ml_collections.ConfigDict(fields)
  for name in ('min_codes', 'max_codes'):
    c[name] = ml_collections.config_dict.placeholder(tuple)
  return c


def sampling_config(c: ml_collections.ConfigDict) -> sampling_lib.SamplingConfig:
  """The SamplingConfig a stage-2 config's `sampling` fields name (it makes
  code counts given as lists hashable tuples itself)."""
  return sampling_lib.SamplingConfig(**dict(c.get('sampling', {})),
                                     seed=c.seed)


def runlocal(c: ml_collections.ConfigDict) -> None:
  """Tiny shapes and steps for CPU tests, on the embedded demo data."""
  c.data.name = 'dqvq_demo'
  c.data.data_dir = os.environ.get('DQVQ_DATA_DIR', c.data.data_dir)
  c.data.resolution = 32
  c.data.read_threads = 2
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_train_steps = 2
  c.num_eval_batches = 1
  if c.stage == 1:
    # LPIPS (full VGG16) dominates compile time at toy sizes; configs that
    # want it in their smoke run turn it back on with lpips_weights='random'.
    c.loss.perceptual_weight = 0.0
    c.lpips_weights = ''
    c.disc.ndf = 8
    c.disc.n_layers = 2
    c.optim.warmup_steps = 1
  c.log_every = 1
  c.eval_every = 2
  c.image_every = 2
  c.checkpoint_every = 1
  c.num_images = 2


def apply_overrides(config: ml_collections.ConfigDict,
                    items: Sequence[str]) -> None:
  """FIELD=VALUE strings on `config` (VALUE a Python literal, else a string).

  Refuses, naming the item, a field the config does not have: a typo must
  not start a run of the wrong model.
  """
  for item in items:
    field, sep, text = item.partition('=')
    if not sep:
      raise ValueError(f'{item!r}: write FIELD=VALUE.')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = field.split('.')
    node = config
    for name in parents:
      node = (node.get(name) if isinstance(node, ml_collections.ConfigDict)
              else None)
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ValueError(f'{item!r}: the config has no field {field!r}.')
    node[leaf] = value


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """The modules' dtype for `config.compute_dtype` (None: float32)."""
  name = config.get('compute_dtype', 'float32')
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'compute_dtype={name!r}; choose one of '
                     f'{tuple(COMPUTE_DTYPES)}.')
  return COMPUTE_DTYPES[name]
