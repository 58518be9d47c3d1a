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

from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from dqvq.cpu import tuning as cpu_tuning
from dqvq import distributed
from dqvq.inference import generator as generator_lib
from dqvq import sampling
from dqvq import sampling_flags


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
  sampling_flags.define_flags()
  flags.adopt_module_key_flags(sampling_flags)  # listed in --help


def run(*, out: str, num_images: int, config: sampling.SamplingConfig,
        workdir: str | None = None, checkpoint: str | None = None,
        bundle: str | None = None, class_labels: Sequence[int] = (),
        batch_size: int = 0) -> dict[str, np.ndarray]:
  """Samples `num_images` and writes them (see the module docstring)."""
  if bundle:
    gen = generator_lib.load_bundle(bundle)
  else:
    gen = generator_lib.load_run(workdir, checkpoint)
  return generator_lib.sample_to_dir(gen, out, num_images, config=config,
                                     class_labels=class_labels,
                                     batch_size=batch_size)


def main(argv: Sequence[str]) -> None:
  del argv
  cpu_tuning.prepare_process()  # CPU runs only; may restart once
  distributed.initialize()
  sources = [f for f in ('workdir', 'checkpoint', 'bundle') if FLAGS[f].value]
  if not FLAGS.out or len(sources) != 1:
    raise app.UsageError('--out and exactly one of --workdir, --checkpoint or '
                         '--bundle are needed.')
  run(out=FLAGS.out, num_images=FLAGS.num_images,
      config=sampling_flags.from_flags(),
      workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint, bundle=FLAGS.bundle,
      class_labels=FLAGS.class_label, batch_size=FLAGS.batch_size)


if __name__ == '__main__':
  define_flags()
  app.run(main)
