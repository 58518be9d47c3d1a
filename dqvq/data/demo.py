"""`dqvq_demo`: a small TFDS dataset cut from photographs shipped with skimage.

The demo and the CPU tests need real images (a tokenizer trained on noise
teaches nothing) but may not download anything. scikit-image installs a
handful of real photographs inside its wheel (`skimage/data/*.png|jpg`); this
builder cuts deterministic multi-scale crops out of them.

Decision notes:

* Photos. Only files present in the installed package are used, read straight
  from the package directory, never through `skimage.data.<name>()`: those
  functions fall back to a pooch download for files that a wheel may omit.
  Synthetic or binary images (chessboard, color, logo, phantom, horse,
  clock_motion, microaneurysms) are left out; so is motorcycle_right, which is
  a near-duplicate of motorcycle_left. Gray photos are converted to RGB by
  replicating the channel.
* Train split: the full-resolution photographs themselves (14 of them, as
  lossless PNG at their native size). The training pipeline draws a fresh
  square crop of random scale and place from one of them for every example
  (`config.data.crop_scale`, `transforms.random_scale_crop_flip`), with
  flips. An earlier version stored 681 fixed crops; a decoder trained on
  those learned what sits where in them and pasted it into other images (a
  rocket's streak in the reconstructions of the moon and of a wall).
* Validation split: fixed crops of the held-out photographs, so that a
  validation figure is the same pass every time. For each held-out photo
  with shorter side `s` and each scale in `CROP_SCALES = (0.35, 0.5, 0.7,
  1.0)`, square crops of side `round(scale*s)` on a grid with 50% overlap
  along each axis (first and last crop flush with the borders), skipping
  crops below 64 px, each resized to `STORED_SIZE` = 128 px with Lanczos
  (antialiased).
* Split. Fixed by source photo: chelsea (RGB animal), coffee (RGB objects on
  smooth surfaces) and coins (gray objects) are held out entirely for
  `validation`, so validation loss measures generalisation to unseen photos
  rather than to unseen crops of seen photos. The textures (brick, grass,
  gravel) all train: a held-out texture made the validation split far more
  detailed than the train split, and its fine-grain share (which the
  thresholds fix on the train split) unrepresentative.
* Size: 14 photographs to train on, 192 validation crops; builds in a few
  seconds. `label` is the index of the source photo in `PHOTOS`, which gives a
  tiny class-conditional task for stage 2.

The builder writes ArrayRecord so that grain can read it with random access.
`load_demo` prepares it on first use.
"""

from __future__ import annotations

import io
import math
import os
from typing import Iterator

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from dqvq.data import tfds_compat

# (name, file inside skimage/data). Order fixes the label indices: append only.
PHOTOS: tuple[tuple[str, str], ...] = (
    ('astronaut', 'astronaut.png'),
    ('brick', 'brick.png'),
    ('camera', 'camera.png'),
    ('cell', 'cell.png'),
    ('chelsea', 'chelsea.png'),
    ('coffee', 'coffee.png'),
    ('coins', 'coins.png'),
    ('grass', 'grass.png'),
    ('gravel', 'gravel.png'),
    ('hubble_deep_field', 'hubble_deep_field.jpg'),
    ('immunohistochemistry', 'ihc.png'),
    ('moon', 'moon.png'),
    ('motorcycle_left', 'motorcycle_left.png'),
    ('page', 'page.png'),
    ('retina', 'retina.jpg'),
    ('rocket', 'rocket.jpg'),
    ('text', 'text.png'),
)
VALIDATION_PHOTOS: frozenset[str] = frozenset({'chelsea', 'coffee', 'coins'})
CROP_SCALES: tuple[float, ...] = (0.35, 0.5, 0.7, 1.0)
STORED_SIZE = 128
MIN_CROP = STORED_SIZE // 2
DATASET_NAME = 'dqvq_demo'


def skimage_data_dir() -> str:
  """Directory of the photographs inside the installed scikit-image."""
  try:
    import skimage.data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'The dqvq_demo dataset is cut from the photographs shipped with '
        'scikit-image; install it with `pip install scikit-image`.') from e
  return os.path.dirname(skimage.data.__file__)


def load_photo(file_name: str) -> np.ndarray:
  """Reads one shipped photograph as uint8 RGB (H, W, 3)."""
  path = os.path.join(skimage_data_dir(), file_name)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} is missing from the installed scikit-image; dqvq_demo needs '
        'the photographs bundled in its wheel (reinstall scikit-image).')
  with Image.open(path) as img:
    return np.asarray(img.convert('RGB'))


def _grid(length: int, crop: int) -> list[int]:
  """Crop offsets along one axis: 50% overlap, first and last flush."""
  n = 1 + math.ceil((length - crop) / (crop / 2))
  if n == 1:
    return [(length - crop) // 2]
  return [round(i * (length - crop) / (n - 1)) for i in range(n)]


def crop_boxes(height: int, width: int) -> list[tuple[float, int, int, int]]:
  """All (scale, top, left, side) crops of one photo, in a fixed order."""
  boxes = []
  short = min(height, width)
  for scale in CROP_SCALES:
    side = round(scale * short)
    if side < MIN_CROP:
      continue
    for top in _grid(height, side):
      for left in _grid(width, side):
        boxes.append((scale, top, left, side))
  return boxes


def iter_crops(photo_names: frozenset[str] | None = None,
               ) -> Iterator[tuple[str, int, np.ndarray]]:
  """Yields (key, label, uint8 crop of STORED_SIZE) deterministically."""
  for label, (name, file_name) in enumerate(PHOTOS):
    if photo_names is not None and name not in photo_names:
      continue
    photo = Image.fromarray(load_photo(file_name))
    for scale, top, left, side in crop_boxes(photo.height, photo.width):
      crop = photo.crop((left, top, left + side, top + side)).resize(
          (STORED_SIZE, STORED_SIZE), Image.LANCZOS)
      key = f'{name}/s{scale:.2f}_y{top:04d}_x{left:04d}.png'
      yield key, label, np.asarray(crop)


def iter_photos(photo_names: frozenset[str]
                ) -> Iterator[tuple[str, int, np.ndarray]]:
  """Yields (name, label, uint8 RGB photo at full resolution)."""
  for label, (name, file_name) in enumerate(PHOTOS):
    if name in photo_names:
      yield name, label, load_photo(file_name)


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  # Level 1: the crops are small and 6 (PIL's default) is twice as slow for
  # files only 3% smaller.
  Image.fromarray(image).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


class DqvqDemo(tfds_compat.ModuleCodePath, tfds.core.GeneratorBasedBuilder):
  """Multi-scale crops of the photographs shipped with scikit-image."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '2.0.0': 'train = the 14 training photographs at full resolution (the '
               'pipeline crops them at random scales and places); '
               'validation unchanged; images of any size.',
      '1.1.0': 'validation = chelsea, coffee, coins: all three textures '
               '(brick, grass, gravel) train, so the held-out mix of smooth '
               'and detailed regions is closer to the train split.',
      '1.0.0': '17 photos, scales (0.35, 0.5, 0.7, 1.0), 128 px PNG, '
               'validation = chelsea, coins, gravel.',
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(None, None, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(
                names=[name for name, _ in PHOTOS]),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: the photos are installed.
    train = frozenset(n for n, _ in PHOTOS) - VALIDATION_PHOTOS
    return {
        'train': self._generate_examples(iter_photos(train)),
        'validation': self._generate_examples(iter_crops(VALIDATION_PHOTOS)),
    }

  def _generate_examples(self, examples: Iterator[tuple[str, int, np.ndarray]]):
    for key, label, image in examples:
      # Encode here rather than handing TFDS the array: PIL's PNG encoder is
      # faster than TFDS's TF-based one and keeps TF out of the hot loop.
      yield key, {'image': _png(image), 'label': label, 'file_name': key}


def demo_builder(data_dir: str) -> DqvqDemo:
  """The demo builder for `data_dir`, storing ArrayRecord for grain."""
  return DqvqDemo(data_dir=data_dir, file_format='array_record')


def load_demo(data_dir: str) -> DqvqDemo:
  """Returns the demo builder, preparing the dataset first if needed.

  Preparation is local and takes seconds, so the demo config needs no setup
  step.
  """
  builder = demo_builder(data_dir)
  tfds_compat.prepare_if_needed(builder)
  return builder
