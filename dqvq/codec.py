r"""Images to bytes and back, with the DQ-Transformer as the entropy model.

  python -m dqvq.codec compress --bundle GENERATOR --in a.png [b.png ...] \
      --out DIR [--grain_ratios 0.5,0.5] [--class_label 3]
  python -m dqvq.codec decompress --bundle GENERATOR --in DIR/a.dqvq \
      [DIR/b.dqvq ...] --out DIR

`compress` resizes each image's shorter side to the generator's resolution
and crops its centre (the evaluation preprocessing), encodes it with the
generator's tokenizer (at `--grain_ratios`, coarse to fine, or the trained
budget), and writes DIR/NAME.dqvq: the coarse-to-fine token streams,
range-coded with the transformer's probabilities
(`dqvq.inference.stream_coder`), in the format of
`dqvq.inference.codec_format`. `decompress` writes DIR/NAME.png, the
tokenizer's decode of exactly the tokens that were coded: the image of
`tok.decode(tok.encode(x))`, up to the decoder's last float bits (which
differ between any two compiled programs). `compress` prints each file's
size in bits per pixel.
A class-conditional generator codes each image under a class label
(`--class_label`, cycled; default the null class where the model has one).

Library: `gen = dqvq.load_generator(B)`; `gen.compress(images)` returns one
bytes object per image, `gen.decompress(files)` the images (float32 in
[-1, 1], as `gen.sample`), both from `dqvq.inference.image_codec`, whose
`measure_bits` gives file sizes beside the model's cross-entropy and the
fixed-rate count. A damaged, truncated or foreign file, or one from another
generator, raises `CodecError` (the CLI prints its message alone and exits
with code 2).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from dqvq.cpu import tuning as cpu_tuning
from dqvq import distributed
from dqvq.inference import codec_format
from dqvq.inference import image_codec

USAGE_ERROR = 2
VERBS = ('compress', 'decompress')
FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags; only when run as a script (as `dqvq.sample`)."""
  flags.DEFINE_string('bundle', None, 'A generator bundle (dqvq.export).')
  flags.DEFINE_multi_string('in', [], 'Input files (more may follow as plain '
                            'arguments): images to compress, .dqvq files to '
                            'decompress.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_list('grain_ratios', None, 'compress: the code budget, shares '
                    'coarse to fine (e.g. 0.5,0.5); default: the trained one.')
  flags.DEFINE_multi_integer('class_label', [], 'compress: class ids (cycled) '
                             'for a class-conditional generator.')
  flags.DEFINE_integer('batch_size', 8, 'compress: images per tokenizer call.')


def _read_image(path: str, resolution: int) -> np.ndarray:
  """(R, R, 3) uint8: shorter side to R, centre crop (`data.transforms`)."""
  from dqvq.data import transforms  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    img = transforms.decode_image(f.read())
  if img is None:
    raise ValueError(f'{path} is not an image Pillow can read.')
  img = np.asarray(transforms.resize_shorter_side(img, resolution))
  return np.ascontiguousarray(transforms.center_crop(img, resolution))


def _outputs(paths: Sequence[str], out: str, suffix: str) -> list[str]:
  """out/STEM + suffix per input; refuses two inputs with one stem."""
  names = [os.path.splitext(os.path.basename(p))[0] + suffix for p in paths]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f'Several inputs would write {twice} in {out}; rename '
                     'them or compress them into separate directories.')
  return [os.path.join(out, n) for n in names]


def run(verb: str, bundle: str, inputs: Sequence[str], out: str,
        grain_ratios: Sequence[float] | None = None,
        class_labels: Sequence[int] = (), batch_size: int = 8) -> list[str]:
  """Compresses or decompresses `inputs` into `out`; returns what it wrote."""
  from dqvq.inference import generator  # pylint: disable=g-import-not-at-top
  from dqvq import visualize  # pylint: disable=g-import-not-at-top
  if verb not in VERBS:
    raise ValueError(f'Unknown verb {verb!r}; choose one of {VERBS}.')
  if not inputs:
    raise ValueError('No inputs: give files after --in.')
  if batch_size < 1:
    raise ValueError(f'--batch_size={batch_size}; give an int >= 1.')
  missing = [p for p in inputs if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'No such file: {", ".join(missing)}.')
  gen = generator.load_bundle(bundle)
  res = gen.config.data.resolution
  suffix = codec_format.SUFFIX if verb == 'compress' else '.png'
  written = _outputs(inputs, out, suffix)
  os.makedirs(out, exist_ok=True)
  if verb == 'compress':
    labels = image_codec.labels_for(gen, len(inputs), class_labels)
    for lo in range(0, len(inputs), batch_size):
      chunk = inputs[lo:lo + batch_size]
      images = np.stack([_read_image(p, res) for p in chunk])
      files = image_codec.compress(gen, images, labels[lo:lo + batch_size], grain_ratios)
      for path, src, data in zip(written[lo:], chunk, files):
        with open(path, 'wb') as f:
          f.write(data)
        print(f'{src} -> {path}: {len(data)} bytes, '
              f'{8 * len(data) / (res * res):.4f} bpp', flush=True)
    return written
  for path, src in zip(written, inputs):
    with open(src, 'rb') as f:
      image = image_codec.decompress(gen, [f.read()], [src])[0]
    visualize.save_png(path, visualize.to_uint8(image))
    print(f'{src} -> {path}', flush=True)
  return written


def _raised_by_dqvq(error: BaseException) -> bool:
  """Whether the innermost frame is dqvq's (as `dqvq.train`): our checks
  speak to the user; a ValueError from inside jax is a bug to trace."""
  frames = traceback.extract_tb(error.__traceback__)
  package = os.path.dirname(os.path.abspath(__file__))
  return bool(frames) and os.path.abspath(
      frames[-1].filename).startswith(package)


def main(argv: Sequence[str]) -> None:
  verb, *rest = list(argv[1:]) or ['']
  if verb not in VERBS:
    raise app.UsageError(f'Give a verb first: one of {VERBS} (got '
                         f'{verb or "none"}).', USAGE_ERROR)
  if not FLAGS.bundle or not FLAGS.out:
    raise app.UsageError('--bundle and --out are needed.', USAGE_ERROR)
  try:
    ratios = (None if FLAGS.grain_ratios is None
              else tuple(float(r) for r in FLAGS.grain_ratios))
  except ValueError as e:
    raise app.UsageError(
        f'--grain_ratios must be numbers, e.g. 0.5,0.5 ({e}).', USAGE_ERROR)
  cpu_tuning.prepare_process()  # CPU runs only; may restart once
  try:
    distributed.initialize()
    if jax.process_index() != 0:
      return  # one process codes; each image is one device's sequential walk
    run(verb, FLAGS.bundle, list(FLAGS['in'].value) + rest, FLAGS.out,
        grain_ratios=ratios, class_labels=FLAGS.class_label,
        batch_size=FLAGS.batch_size)
  except (ValueError, OSError) as e:
    if not _raised_by_dqvq(e):
      raise
    sys.stdout.flush()
    print(f'{type(e).__name__}: {e}', file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


if __name__ == '__main__':
  define_flags()
  app.run(main)
