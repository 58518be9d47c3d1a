r"""Colour fidelity of trained tokenizers: flat colours, stripes, the flag.

  python benchmarks/colour_fidelity.py --run W/stage1 [--run W2/stage1] \
      [--png OUT.png]

Reconstructs, with each run's own routing, probes whose right answer is known:
flat colours (saturated navy and red, grays, white), red / white stripes 4 and
8 pixels wide, and crops of the astronaut photograph's flag (a training
photograph of the demo; `skimage.data`). For each it prints the input's and
the reconstruction's mean colour, the reconstruction's spatial spread (per
channel; 0 for a flat input reconstructed flat), the PSNR, and, for flat
inputs, the error on the outer 8-pixel ring against the interior (zero
padding is the decoder's only position signal, so a border effect shows
there). Why: the demo's pictures at 300 steps turn the flag's blue and red
dark; this says whether a run's colours follow its inputs, and whether they
improve with training (benchmarks/README.md, "What held the tokenizer back").
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq import visualize
from dqvq.cpu import tuning as cpu_tuning  # defines --cpu_tuning
from dqvq.data import transforms

_RUN = flags.DEFINE_multi_string('run', None, 'A stage-1 run directory.')
_PNG = flags.DEFINE_string('png', None, 'Write inputs and reconstructions '
                           '(a row per run) here.')

SIZE = 64
FLAT = {'navy': (40, 40, 110), 'red': (190, 30, 50), 'gray 51': (51,) * 3,
        'gray 128': (128,) * 3, 'gray 204': (204,) * 3, 'white': (235,) * 3}
# (top, left, side) in the 512 x 512 astronaut photograph.
FLAG_CROPS = {'flag 100 px': (0, 0, 100), 'flag 160 px': (0, 0, 160),
              'whole photograph': (0, 0, 512)}


def _unit(rgb) -> np.ndarray:
  return transforms.to_model_range(np.asarray(rgb, np.uint8))


def _rgb(image: np.ndarray) -> str:
  return ' '.join(f'{v:+.2f}' for v in image.mean(axis=(0, 1)))


def probes() -> dict[str, np.ndarray]:
  """{name: (SIZE, SIZE, 3) image in [-1, 1]}."""
  from PIL import Image
  import skimage.data
  rows = np.arange(SIZE)[:, None, None]
  out = {k: np.broadcast_to(_unit(v), (SIZE, SIZE, 3)) for k, v in FLAT.items()}
  for width in (4, 8):
    out[f'stripes {width} px'] = np.broadcast_to(
        np.where((rows // width) % 2 == 0, _unit(FLAT['red']),
                 _unit(FLAT['white'])), (SIZE, SIZE, 3))
  photo = skimage.data.astronaut()
  for k, (y, x, s) in FLAG_CROPS.items():
    crop = Image.fromarray(photo[y:y + s, x:x + s]).resize(
        (SIZE, SIZE), Image.Resampling.BICUBIC)
    out[k] = _unit(np.asarray(crop))
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def main(argv) -> None:
  del argv
  if not _RUN.value:
    raise app.UsageError('Give at least one --run (a stage-1 run directory).')
  cpu_tuning.prepare_process()
  import jax.numpy as jnp
  from dqvq.eval import study_eval
  from dqvq.inference import tokenizer
  images = probes()
  x = np.stack(list(images.values()))
  ring = np.ones((SIZE, SIZE), bool)
  ring[8:-8, 8:-8] = False
  panels = [x]
  print('| run, step | probe | input mean RGB | output mean RGB | spatial std '
        '| PSNR dB | flat: L1 error, ring / interior |')
  print('|---|---|---|---|---|---|---|')
  for run in _RUN.value:
    tok = tokenizer.load_stage1(run)
    y = np.asarray(tok.decode(tok.encode(jnp.asarray(x))['codes']))
    panels.append(y)
    for name, a, b, p in zip(images, x, y, study_eval.psnr(x, y)):
      err = np.abs(a - b).mean(-1)
      border = (f'{err[ring].mean():.3f} / {err[~ring].mean():.3f}'
                if name in FLAT else '—')
      print(f'| {os.path.basename(os.path.dirname(run.rstrip("/")))}'
            f'/{os.path.basename(run.rstrip("/"))}, {tok.step} | {name} | '
            f'{_rgb(a)} | {_rgb(b)} | '
            f'{b.std(axis=(0, 1)).mean():.3f} | '
            f'{p:.2f} | {border} |')
  if _PNG.value:
    visualize.save_png(_PNG.value, visualize.image_grid(
        visualize.to_uint8(np.concatenate(panels)), ncols=len(images), pad=0))
    print(f'png={_PNG.value}')


if __name__ == '__main__':
  app.run(main)
