r"""Samples images from a trained stage-2 run (DQ-Transformer + its DQ-VAE).

  python -m dqvq.sample --workdir /runs/stage2 --num_images 50 --out /tmp/s \
      [--checkpoint /runs/stage2/checkpoints/STEP | --bundle BUNDLE] \
      [--class_label 1 ...] \
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
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
import tqdm

from dqvq.cpu import tuning as cpu_tuning
from dqvq import distributed
from dqvq.inference import generator as generator_lib
from dqvq import sampling
from dqvq import visualize


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags; defined only when run as a script.

  Importing this module (tests, notebooks) must not define --workdir, which
  dqvq.train defines too: absl refuses a second definition in one process.
  """
  flags.DEFINE_string('workdir', None, 'The stage-2 run directory.')
  flags.DEFINE_string('bundle', None, 'A generator bundle (dqvq.export).')
  flags.DEFINE_string(
      'checkpoint', None, 'A checkpoint step directory (<workdir>/checkpoints/'
      'STEP) instead of the newest step of --workdir.')
  flags.DEFINE_integer('num_images', 16, 'Images to sample.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_integer('batch_size', 0, 'Images per sampler call; 0: 4 per '
                       'device. Rounded up to the devices.')
  define_sampling_flags()


def define_sampling_flags() -> None:
  """Flags of `sampling.SamplingConfig` and class labels (sample, evaluate)."""
  flags.DEFINE_multi_integer('class_label', [], 'Class ids (cycled); default: '
                             'every class in turn.')
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


def run(*, out: str, num_images: int, config: sampling.SamplingConfig,
        workdir: str | None = None, checkpoint: str | None = None,
        bundle: str | None = None, class_labels: Sequence[int] = (),
        batch_size: int = 0) -> dict[str, np.ndarray]:
  """Samples `num_images` and writes them (see the module docstring)."""
  if bundle:
    gen = generator_lib.load_bundle(bundle)
  else:
    gen = generator_lib.load_run(workdir, checkpoint)
  start = time.time()
  with tqdm.tqdm(total=num_images, unit='img', desc='sampling') as bar:
    res = gen.sample(num_images, class_labels=class_labels, config=config,
                     batch_size=batch_size, on_batch=bar.update)
  seconds = time.time() - start
  if jax.process_index() != 0:
    return res  # every process samples its shard; process 0 writes
  images = visualize.to_uint8(res['image'])
  previews = visualize.to_uint8(res['preview'])
  for i in range(num_images):
    visualize.save_png(os.path.join(out, 'images', f'{i:05d}.png'), images[i])
    visualize.save_png(os.path.join(out, 'previews', f'{i:05d}.png'),
                       previews[i])
  visualize.save_png(os.path.join(out, 'grid.png'),
                     visualize.image_grid(images))
  visualize.save_png(os.path.join(out, 'preview_grid.png'),
                     visualize.image_grid(previews))
  np.savez(os.path.join(out, 'tokens.npz'),
           **{k: v for k, v in res.items() if k not in ('image', 'preview')})
  logging.info('%d images in %.1fs (%.2f images/s, %.1f codes/image; '
               'complete: %s) -> %s', num_images, seconds,
               num_images / seconds, float(np.mean(res['num_codes'])),
               bool(np.all(res['writes'] == 1)), out)
  return res


def _ints(values: Sequence[str] | None) -> tuple[int, ...] | None:
  return tuple(int(v) for v in values) if values else None


def sampling_config_from_flags() -> sampling.SamplingConfig:
  """The SamplingConfig the parsed `define_sampling_flags` flags name."""
  return sampling.SamplingConfig(
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


def main(argv: Sequence[str]) -> None:
  del argv
  cpu_tuning.prepare_process()  # CPU runs only; may restart once
  distributed.initialize()
  sources = [f for f in ('workdir', 'checkpoint', 'bundle') if FLAGS[f].value]
  if not FLAGS.out or len(sources) != 1:
    raise app.UsageError('--out and exactly one of --workdir, --checkpoint or '
                         '--bundle are needed.')
  run(out=FLAGS.out, num_images=FLAGS.num_images,
      config=sampling_config_from_flags(),
      workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, bundle=FLAGS.bundle,
      class_labels=FLAGS.class_label, batch_size=FLAGS.batch_size)


if __name__ == '__main__':
  define_flags()
  app.run(main)
