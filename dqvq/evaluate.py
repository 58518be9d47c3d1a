r"""Evaluates a tokenizer or generator: every figure of the paper's tables.

  python -m dqvq.evaluate --workdir RUN (or --bundle B) --split validation \
      [--num_images N] [--what tokenizer|generator] [--batch_size B] \
      [--inception_weights DIR|random] [--lpips_weights DIR|random] \
      [--ratios 0.3,0.5,0.7] [--data_dir D] [--out OUT] [--stats_cache DIR] \
      [--num_samples N --class_label C --top_k 300 --cfg_scale 1.5 ...] \
      [--codec_images 32]

What is measured is in `dqvq.eval.tokenizer_eval` (PSNR / SSIM / LPIPS,
rFID, usage, code lengths, coding-map AUROC, rate-distortion budgets) and
`dqvq.eval.generator_eval` (FID / IS, sampled vs data code lengths and, for
the first --codec_images held-out images, the measured bits per pixel of
.dqvq files beside the fixed-rate count and the model's cross-entropy). This
module checks the input (before anything is compiled), reads the split once
and writes OUT/metrics.json (default OUT: RUN/eval/<what>-<split>-step<N>)
with every figure, the config, checkpoint step, data hash and weights used,
the pictures (`dqvq.eval.plots`) and, with --workdir, the scalars to the
run's TensorBoard as eval/<what>/<name> at the checkpoint step. Every process
computes; process 0 writes. LPIPS defaults to the stage-1 config's
`lpips_weights`; FID needs --inception_weights; 'random' weights are for
tests and flagged as not comparable. Real-image FID statistics are cached in
--stats_cache (default OUT) under a hash of what they depend on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from dqvq.cpu import tuning as cpu_tuning
from dqvq.data import pipeline
from dqvq import distributed
from dqvq.eval import codec_eval
from dqvq.eval import generator_eval
from dqvq.eval import plots
from dqvq.eval import source as source_lib
from dqvq.eval import tokenizer_eval
from dqvq import metrics as metrics_lib
from dqvq import sampling
from dqvq import sampling_flags
from dqvq import sharding

FLAGS = flags.FLAGS
WHATS = ('tokenizer', 'generator')
# Logged and printed at the end; the JSON has everything.
HEADLINE = ('psnr', 'ssim', 'lpips', 'rfid', 'codebook_usage', 'perplexity',
            'code_length_mean', 'code_length_var', 'coding_map_auroc',
            'bits_per_image', 'fid', 'inception_score',
            'sample_code_length_mean', 'data_code_length_mean',
            'code_length_wasserstein', 'codec_bpp', 'codec_cross_entropy_bpp',
            'codec_fixed_rate_bpp', 'codec_payload_over_cross_entropy')


@dataclasses.dataclass
class EvalOptions:
  """Everything the CLI takes; `run` evaluates with these."""
  workdir: str | None = None
  bundle: str | None = None
  what: str | None = None             # None: by the run's stage
  split: str | None = None            # None: the config's eval_split
  num_images: int = 0                 # 0: the whole split
  num_samples: int = 0                # generator; 0: as many as num_images
  batch_size: int = 0                 # 0: the config's eval_batch_size
  inception_weights: str = ''         # '' skips FID / IS / rFID
  lpips_weights: str | None = None    # None: the stage-1 config's; '' skips
  ratios: tuple[float, ...] = ()
  data_dir: str | None = None
  out: str | None = None
  stats_cache: str | None = None
  num_pictures: int = 8
  class_labels: tuple[int, ...] = ()
  sampling: sampling.SamplingConfig = dataclasses.field(
      default_factory=sampling.SamplingConfig)
  tensorboard: bool = True
  codec_images: int = 32              # generator; 0: no codec figures


def _json_clean(value: Any) -> Any:
  """JSON-safe copy: numpy to Python, tuples to lists, inf / NaN to null."""
  if isinstance(value, dict):
    return {str(k): _json_clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_clean(v) for v in value]
  if isinstance(value, np.ndarray):
    return _json_clean(value.tolist())
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else None
  return value


def _weights_entry(path: str) -> dict[str, Any] | None:
  if not path:
    return None
  return {'path': path if path == 'random' else os.path.abspath(path),
          'comparable': path != 'random'}


def _split_name(split: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', split).strip('_') or 'split'


def _batch_size(options: EvalOptions, config: ml_collections.ConfigDict
                ) -> int:
  n = jax.device_count()
  if options.batch_size:
    if options.batch_size < 0 or options.batch_size % n:
      raise ValueError(f'--batch_size={options.batch_size} must be a positive '
                       f'multiple of the {n} devices (e.g. '
                       f'{max(n, options.batch_size - options.batch_size % n)}'
                       ').')
    return options.batch_size
  return -(-int(config.get('eval_batch_size', 0) or 8 * n) // n) * n


def _scalars(figures: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in figures.items()
          if isinstance(v, (int, float, np.floating)) and not isinstance(
              v, bool) and math.isfinite(float(v))}


def _global_batches(datasets: pipeline.Datasets, mesh: jax.sharding.Mesh,
                    held_out: codec_eval.HeldOut | None = None):
  """The split's global batches; `held_out` keeps its first host images."""
  for host_batch in datasets.eval:
    if held_out is not None:
      held_out.add(host_batch)
    yield pipeline.make_global_batch(
        {'image': host_batch['image'], 'mask': host_batch['mask']}, mesh)


@dataclasses.dataclass
class _Plan:
  """What `run` evaluates, resolved and checked before any model loads."""
  src: Any
  what: str
  inception: str
  lpips_path: str
  data: Any
  data_info: dict[str, Any]
  num_samples: int
  own: bool  # False: the tokenizer of a stage-2 run
  config: Any
  step: int
  batch: int
  out: str


def _plan(options: EvalOptions) -> _Plan:
  """Every check of the options (source, --what, split, image count, weights
  paths, budgets), with the fix in the message; nothing is loaded."""
  src = source_lib.describe(options.workdir, options.bundle)
  what = options.what or ('tokenizer' if src.stage == 1 else 'generator')
  if what not in WHATS:
    raise ValueError(f'--what={what!r}; choose one of {WHATS}.')
  if what == 'generator' and src.stage != 2:
    raise ValueError(
        f'--what=generator needs a stage-2 run or a generator bundle; '
        f'{src.where} is a tokenizer (stage 1). Evaluate it with '
        '--what=tokenizer, or point --workdir at the DQ-Transformer run.')
  tok_cfg = src.tokenizer_config
  tokenizer_eval.validate_ratios(options.ratios, tok_cfg.model)
  if what == 'generator' and options.ratios:
    raise ValueError('--ratios sets tokenizer budgets; it has no meaning for '
                     '--what=generator.')
  inception = tokenizer_eval.check_weights(options.inception_weights,
                                           'inception')
  lpips_path = (tok_cfg.get('lpips_weights', '') or ''
                if options.lpips_weights is None else options.lpips_weights)
  lpips_path = tokenizer_eval.check_weights(lpips_path, 'lpips') \
      if what == 'tokenizer' else ''
  if options.num_images < 0 or options.num_samples < 0:
    raise ValueError('--num_images and --num_samples must be >= 0 '
                     '(0: the whole split / as many as the images).')
  if options.codec_images < 0:
    raise ValueError(f'--codec_images={options.codec_images} must be >= 0 '
                     '(0: no codec figures).')
  data_cfg = (tok_cfg if what == 'tokenizer' else src.config).data
  data, data_info = tokenizer_eval.resolve_data(
      data_cfg, split=options.split, num_images=options.num_images,
      data_dir=options.data_dir, resolution=tok_cfg.data.resolution)
  num_samples = options.num_samples or data_info['num_images']
  if what == 'generator' and inception and num_samples < 2:
    raise ValueError('FID and IS need at least 2 samples; raise --num_samples.')
  own = what == WHATS[src.stage - 1]
  config = src.config if own else tok_cfg
  step = src.step if own else src.tokenizer_step
  out = options.out or os.path.join(
      src.where, 'eval', f'{what}-{_split_name(data_info["split"])}-step'
      f'{step}')
  return _Plan(src, what, inception, lpips_path, data, data_info,
               num_samples, own, config, step, _batch_size(options, config),
               out)


def _measure(plan: _Plan, options: EvalOptions, notes: list[str]
             ) -> tuple[dict[str, Any], Any]:
  """Loads the model, reads the split once; (results, the tokenizer)."""
  mesh = sharding.create_mesh()
  datasets = pipeline.create_datasets(
      plan.data, global_batch_size=plan.batch, eval_batch_size=plan.batch,
      seed=0, mesh=mesh)
  fid = generator_eval.fid_setup(
      plan.inception, mesh, plan.data_info['hash'],
      options.stats_cache or plan.out, notes,
      min(plan.data_info['num_images'], plan.num_samples))
  bar = tqdm.tqdm(unit='img', desc=f'evaluating {plan.what}',
                  disable=jax.process_index() != 0)
  held_out = (codec_eval.HeldOut(options.codec_images)
              if plan.what == 'generator' and options.codec_images else None)
  batches = _global_batches(datasets, mesh, held_out)
  if plan.what == 'tokenizer':
    tok = source_lib.load_tokenizer(plan.src, mesh)
    res = tokenizer_eval.evaluate_tokenizer(
        tok, batches, fine_ratios=options.ratios,
        lpips=tokenizer_eval.lpips_setup(plan.lpips_path, mesh, notes),
        fid=fid, num_pictures=options.num_pictures, on_batch=bar.update)
  else:
    gen = generator_eval.load(plan.src.workdir, plan.src.bundle, mesh)
    tok = gen.tokenizer
    res = generator_eval.evaluate_generator(
        gen, batches, num_samples=plan.num_samples,
        sampling_config=options.sampling, class_labels=options.class_labels,
        batch_size=plan.batch, fid=fid, num_pictures=options.num_pictures,
        on_batch=bar.update)
  bar.close()
  if held_out is not None and held_out.count and jax.process_index() == 0:
    # One process codes: each image is one device's sequential walk.
    codec_start = time.time()
    res['figures'].update(codec_eval.codec_figures(gen, *held_out.arrays()))
    logging.info('Codec figures of %d held-out images in %.1f s.',
                 held_out.count, time.time() - codec_start)
  return res, tok


def _write(plan: _Plan, options: EvalOptions, res: dict[str, Any], tok: Any,
           notes: list[str], seconds: float) -> dict[str, Any]:
  """metrics.json, the report pictures and the run's TensorBoard."""
  pictures = []
  if jax.process_index() == 0:
    factors = tuple(tok.vae.grain_factors)
    pictures = (
        plots.tokenizer_report(plan.out, res, tok.vae.num_grains, factors)
        if plan.what == 'tokenizer' else plots.generator_report(
            plan.out, res, tok.vae.num_grains, factors,
            options.num_pictures))
  src = plan.src
  payload = _json_clean({
      'what': plan.what, 'split': plan.data_info['split'], 'step': plan.step,
      'source': {'workdir': src.workdir, 'bundle': src.bundle,
                 'tokenizer_fingerprint': tok.fingerprint},
      'data': plan.data_info,
      'weights': {'inception': _weights_entry(plan.inception),
                  'lpips': _weights_entry(plan.lpips_path)},
      'metrics': res['figures'],
      'rate_distortion': res.get('rate_distortion', []),
      'histograms': res['histograms'], 'notes': notes, 'pictures': pictures,
      'config': plan.config.to_dict(),
      'options': dataclasses.asdict(options),
      'seconds': seconds})
  if jax.process_index() == 0:
    os.makedirs(plan.out, exist_ok=True)
    with open(os.path.join(plan.out, 'metrics.json'), 'w') as f:
      json.dump(payload, f, indent=1, sort_keys=True, allow_nan=False)
  # TensorBoard of the run that made the evaluated model.
  tb_dir = src.workdir if plan.own else src.tokenizer_workdir
  if options.tensorboard and options.workdir and tb_dir:
    writer = metrics_lib.create_writer(tb_dir)
    metrics_lib.write_scalars(writer, plan.step, {
        f'eval/{plan.what}/{k}': v
        for k, v in _scalars(payload['metrics']).items()})
    writer.flush()
    writer.close()
  return payload


def run(options: EvalOptions) -> dict[str, Any]:
  """Evaluates and writes everything (see the module docstring).

  All checks run first (`_plan`); then models load and the split is read
  once. Returns the metrics.json payload (on every process).
  """
  start = time.time()
  plan = _plan(options)
  notes: list[str] = []
  res, tok = _measure(plan, options, notes)
  payload = _write(plan, options, res, tok, notes, time.time() - start)
  logging.info('%s evaluation -> %s: %s', plan.what, plan.out, ', '.join(
      f'{k}={v:.4g}' for k, v in sorted(_scalars(payload['metrics']).items())
      if k in HEADLINE))
  return payload


def define_flags() -> None:
  """The CLI's flags; only when run as a script (dqvq.train has --workdir)."""
  flags.DEFINE_string('workdir', None, 'A stage-1 or stage-2 run directory.')
  flags.DEFINE_string('bundle', None, 'A tokenizer or generator bundle.')
  flags.DEFINE_enum('what', None, WHATS, 'Default: by the run\'s stage.')
  flags.DEFINE_string('split', None, 'TFDS split; default: config eval_split.')
  flags.DEFINE_integer('num_images', 0, 'Images of the split; 0 = all.')
  flags.DEFINE_integer('num_samples', 0, 'Generator samples; 0: num_images.')
  flags.DEFINE_integer('batch_size', 0, 'Global batch (multiple of the '
                       'devices); 0: the config\'s eval_batch_size.')
  flags.DEFINE_string('inception_weights', '', 'Directory from `python -m '
                      'dqvq.convert inception`, or random; empty: no FID.')
  flags.DEFINE_string('lpips_weights', None, 'Directory from `python -m '
                      'dqvq.convert lpips`, random, or empty to skip; '
                      'default: the stage-1 config\'s lpips_weights.')
  flags.DEFINE_list('ratios', [], 'Finest-grain budgets for a '
                    'rate-distortion curve, e.g. 0.3,0.5,0.7.')
  flags.DEFINE_string('data_dir', None, 'TFDS data dir; default: config\'s.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_string('stats_cache', None, 'FID reference statistics cache '
                      'directory; default: --out.')
  flags.DEFINE_integer('num_pictures', 8, 'Examples (or samples) pictured.')
  flags.DEFINE_bool('tensorboard', True, 'Also write the run\'s TensorBoard.')
  flags.DEFINE_integer('codec_images', 32, 'Generator: code the first N '
                       'held-out images as .dqvq files and report their '
                       'measured bits per pixel beside the fixed-rate count '
                       'and the model\'s cross-entropy; 0: skip.')
  sampling_flags.define_flags()
  flags.adopt_module_key_flags(sampling_flags)  # listed in --help


def options_from_flags() -> EvalOptions:
  """EvalOptions from the parsed flags (same sampling flags as dqvq.sample)."""
  try:
    ratios = tuple(float(r) for r in FLAGS.ratios)
  except ValueError as e:
    raise app.UsageError(f'--ratios must be numbers, e.g. 0.3,0.5,0.7 ({e}).')
  config = sampling_flags.from_flags()
  return EvalOptions(
      workdir=FLAGS.workdir, bundle=FLAGS.bundle, what=FLAGS.what,
      split=FLAGS.split, num_images=FLAGS.num_images,
      num_samples=FLAGS.num_samples, batch_size=FLAGS.batch_size,
      inception_weights=FLAGS.inception_weights,
      lpips_weights=FLAGS.lpips_weights, ratios=ratios,
      data_dir=FLAGS.data_dir, out=FLAGS.out, stats_cache=FLAGS.stats_cache,
      num_pictures=FLAGS.num_pictures,
      class_labels=tuple(FLAGS.class_label), sampling=config,
      tensorboard=FLAGS.tensorboard, codec_images=FLAGS.codec_images)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cpu_tuning.prepare_process()  # CPU runs only; may restart once
  distributed.initialize()
  payload = run(options_from_flags())
  if jax.process_index() == 0:
    print(json.dumps({k: payload['metrics'].get(k)
                      for k in HEADLINE
                      if k in payload['metrics']}, indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
