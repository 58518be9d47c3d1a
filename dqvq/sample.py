r"""Samples images from a trained stage-2 run (DQ-Transformer + its DQ-VAE).

  python -m dqvq.sample --workdir /runs/stage2 --num_images 50 --out /tmp/s \
      [--checkpoint /runs/stage2/checkpoints/STEP] [--class_label 1 ...] \
      [--temperature 1 --top_k 300 --top_k_position 100 --top_p 1 \
       --cfg_scale 1.5 --max_codes 128,1024 --greedy --seed 0]

The run's config comes from its checkpoint metadata and names the frozen
tokenizer run (`config.tokenizer.workdir`). Batches are sharded over every
device. Written to --out: images/NNNNN.png, previews/NNNNN.png (the image
after the coarse granularity alone, `sampling.preview_codes`), grid.png,
preview_grid.png and tokens.npz (streams, labels, code maps, writes).
Class labels cycle through --class_label, or through every class when none
is given for a class-conditional model.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from dqvq import checkpoint as ckpt_lib
from dqvq import sampling
from dqvq import sequence
from dqvq import sharding
from dqvq import tokenizer as tokenizer_lib
from dqvq import visualize
from dqvq.trainers import stage2


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags; defined only when run as a script.

  Importing this module (tests, notebooks) must not define --workdir, which
  dqvq.train defines too: absl refuses a second definition in one process.
  """
  flags.DEFINE_string('workdir', None, 'The stage-2 run directory.')
  flags.DEFINE_string(
      'checkpoint', None, 'A checkpoint step directory (<workdir>/checkpoints/'
      'STEP) instead of the newest step of --workdir.')
  flags.DEFINE_integer('num_images', 16, 'Images to sample.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_multi_integer('class_label', [], 'Class ids.')
  flags.DEFINE_integer('batch_size', 0, 'Images per sampler call; 0: 4 per '
                       'device. Rounded up to the devices.')
  flags.DEFINE_float('temperature', 1.0, 'Contents.')
  flags.DEFINE_float('temperature_position', None,
                     'Positions (default --temperature).')
  flags.DEFINE_integer('top_k', 0, 'Contents; 0 = off.')
  flags.DEFINE_integer('top_k_position', 0, 'Positions.')
  flags.DEFINE_float('top_p', 1.0, 'Contents; 1 = off.')
  flags.DEFINE_float('top_p_position', 1.0, 'Positions.')
  flags.DEFINE_float('cfg_scale', 1.0, 'Guidance on contents (1 = off).')
  flags.DEFINE_float('cfg_scale_position', None,
                     'Guidance on positions (default --cfg_scale).')
  flags.DEFINE_bool('greedy', False, 'Argmax instead of sampling.')
  flags.DEFINE_list('min_codes', None, 'Floor per granularity.')
  flags.DEFINE_list('max_codes', None, 'Cap per granularity.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def load_stage2(workdir: str | None = None, checkpoint: str | None = None,
                mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Model, params (replicated), layout, tokenizer and config of a run."""
  step = None
  if checkpoint:
    checkpoint = os.path.abspath(checkpoint.rstrip('/'))
    workdir, step = os.path.dirname(os.path.dirname(checkpoint)), int(
        os.path.basename(checkpoint))
  if not workdir:
    raise ValueError('Give --workdir or --checkpoint.')
  mesh = mesh or sharding.create_mesh()
  ckpt = ckpt_lib.Checkpointer(workdir, save_every=0)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir} holds no finished checkpoint.')
  if step not in ckpt.all_steps():
    raise FileNotFoundError(
        f'No finished checkpoint {step} in {workdir}/checkpoints; it has '
        f'steps {ckpt.all_steps()} (use --workdir for the newest).')
  config = ml_collections.ConfigDict(ckpt.read_meta(step).get('config') or {})
  if config.get('stage') != 2:
    raise ValueError(f'{workdir} step {step} is not a stage-2 run.')
  tok = tokenizer_lib.load_stage1(config.tokenizer.workdir, mesh)
  layout = stage2.build_layout(config, tok)
  models = stage2.build_models(config, layout)
  abstract = jax.eval_shape(lambda r: stage2.init_state(models, r),
                            jax.random.key(0))
  replicated = sharding.replicated(mesh)
  target = sharding.with_shardings(
      abstract, jax.tree.map(lambda _: replicated, abstract))
  if checkpoint:
    # A named step, not the newest: the restore of that one step.
    state, _ = ckpt.restore_step(step, target)
  else:
    state, step, _ = ckpt.restore_latest(target)
  ckpt.close()
  return dict(model=models.model, params=state.params, layout=layout,
              tokenizer=tok, config=config, step=step, mesh=mesh)


def _labels_for(layout: sequence.StreamLayout, n: int,
                class_labels: Sequence[int]) -> np.ndarray:
  if not layout.num_classes:
    return np.zeros((n,), np.int32)
  pool = list(class_labels) or list(range(layout.num_classes))
  if any(not 0 <= c < layout.num_classes for c in pool):
    raise ValueError(f'class labels {pool} outside 0..{layout.num_classes}.')
  return np.array([pool[i % len(pool)] for i in range(n)], np.int32)


def run(*, out: str, num_images: int, config: sampling.SamplingConfig,
        workdir: str | None = None, checkpoint: str | None = None,
        class_labels: Sequence[int] = (), batch_size: int = 0) -> None:
  """Samples `num_images` and writes them (see the module docstring)."""
  run_ = load_stage2(workdir, checkpoint)
  layout, tok, mesh = run_['layout'], run_['tokenizer'], run_['mesh']
  n_dev = jax.device_count()
  batch = -(-(batch_size or 4 * n_dev) // n_dev) * n_dev
  sampler = sampling.make_sampler(run_['model'], config)

  @jax.jit
  def pictures(content, position):
    codes, writes = sequence.decode(content, position, layout)
    preview = sampling.preview_codes(content, position, layout)
    return tok.decode(codes), tok.decode(preview), codes, writes

  labels = _labels_for(layout, num_images, class_labels)
  key = jax.random.key(config.seed)
  batch_sharding = sharding.batch_sharding(mesh)
  results: dict[str, list[np.ndarray]] = {}
  start = time.time()
  with tqdm.tqdm(total=num_images, unit='img', desc='sampling') as bar:
    for i, lo in enumerate(range(0, num_images, batch)):
      chunk = labels[lo:lo + batch]
      padded = np.resize(chunk, (batch,))  # static shape; extras dropped
      out_ = sampler(run_['params'],
                     jax.device_put(jnp.asarray(padded), batch_sharding),
                     jax.random.fold_in(key, i))
      images, previews, codes, writes = pictures(out_['content'],
                                                 out_['position'])
      host = jax.device_get(dict(
          content=out_['content'], position=out_['position'],
          num_codes=out_['num_codes'], codes=codes, writes=writes,
          image=images, preview=previews))
      for name, value in host.items():
        results.setdefault(name, []).append(np.asarray(value)[:len(chunk)])
      bar.update(len(chunk))
  seconds = time.time() - start
  res = {name: np.concatenate(v) for name, v in results.items()}
  res['label'] = labels
  images = visualize.to_uint8(res.pop('image'))
  previews = visualize.to_uint8(res.pop('preview'))
  for i in range(num_images):
    visualize.save_png(os.path.join(out, 'images', f'{i:05d}.png'), images[i])
    visualize.save_png(os.path.join(out, 'previews', f'{i:05d}.png'),
                       previews[i])
  visualize.save_png(os.path.join(out, 'grid.png'),
                     visualize.image_grid(images))
  visualize.save_png(os.path.join(out, 'preview_grid.png'),
                     visualize.image_grid(previews))
  np.savez(os.path.join(out, 'tokens.npz'), **res)
  logging.info('%d images in %.1fs (%.2f images/s, %.1f codes/image; '
               'complete: %s) -> %s', num_images, seconds,
               num_images / seconds, float(np.mean(res['num_codes'])),
               bool(np.all(res['writes'] == 1)), out)


def _ints(values: Sequence[str] | None) -> tuple[int, ...] | None:
  return tuple(int(v) for v in values) if values else None


def main(argv: Sequence[str]) -> None:
  del argv
  if not FLAGS.out or not (FLAGS.workdir or FLAGS.checkpoint):
    raise app.UsageError('--out and one of --workdir/--checkpoint are needed.')
  config = sampling.SamplingConfig(
      temperature_content=FLAGS.temperature,
      temperature_position=(FLAGS.temperature
                            if FLAGS.temperature_position is None
                            else FLAGS.temperature_position),
      top_k_content=FLAGS.top_k, top_k_position=FLAGS.top_k_position,
      top_p_content=FLAGS.top_p, top_p_position=FLAGS.top_p_position,
      greedy=FLAGS.greedy, cfg_scale_content=FLAGS.cfg_scale,
      cfg_scale_position=FLAGS.cfg_scale if FLAGS.cfg_scale_position is None
      else FLAGS.cfg_scale_position,
      min_codes=_ints(FLAGS.min_codes), max_codes=_ints(FLAGS.max_codes),
      seed=FLAGS.seed)
  run(out=FLAGS.out, num_images=FLAGS.num_images, config=config,
      workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
      class_labels=FLAGS.class_label, batch_size=FLAGS.batch_size)


if __name__ == '__main__':
  define_flags()
  app.run(main)
