"""Per-image decoding and the paper's augmentation, as grain transforms.

The official code (`data/imagenet_base.py`) uses torchvision on PIL images:
train = Resize(R) on the shorter side (PIL bilinear) -> RandomCrop(R) ->
RandomHorizontalFlip(0.5) -> [-1, 1]; eval = Resize(R) -> CenterCrop(R). We
run the same PIL operations so the pixels match the official pipeline: PIL's
bilinear filter widens its support when shrinking, i.e. it is antialiased.

Images arrive as encoded bytes (TFDS `SkipDecoding`) and are decoded here with
PIL rather than by TFDS, for two reasons: decoding happens inside grain's
worker processes without TensorFlow, and an undecodable record becomes an
element with `valid=False` that the batcher skips and counts, instead of an
exception that kills training days into a run.

Elements leave these transforms as uint8 so that grain's inter-process queues
carry a quarter of the bytes; the batcher converts whole batches to float32.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from typing import Any, Mapping

import grain
import numpy as np
from PIL import Image

Element = dict[str, Any]


def decode_image(data: bytes | np.ndarray) -> Image.Image | None:
  """Decodes encoded bytes to an RGB PIL image; None when they are invalid."""
  if isinstance(data, np.ndarray):
    if data.dtype == np.uint8 and data.ndim == 3:  # Already decoded.
      return Image.fromarray(data).convert('RGB')
    data = data.item()
  try:
    with Image.open(io.BytesIO(data)) as img:
      return img.convert('RGB')  # Forces the full decode, inside the try.
  except (OSError, ValueError, SyntaxError, TypeError,
          Image.DecompressionBombError):
    return None


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
  """torchvision `Resize(size)` on a PIL image: shorter side to `size`.

  The longer side is `int(size * long / short)` (truncated), exactly as
  torchvision computes it, and an image already at size is left untouched.
  """
  w, h = img.size
  short, long = min(w, h), max(w, h)
  if short == size:
    return img
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
  """torchvision `CenterCrop(size)` offsets (rounded half-way)."""
  h, w = img.shape[:2]
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return img[top:top + size, left:left + size]


def random_crop_flip(img: np.ndarray, size: int,
                     rng: np.random.Generator) -> np.ndarray:
  """`RandomCrop(size)` then `RandomHorizontalFlip(0.5)`."""
  h, w = img.shape[:2]
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  img = img[top:top + size, left:left + size]
  if rng.random() < 0.5:
    img = img[:, ::-1]
  return np.ascontiguousarray(img)


def random_scale_crop_flip(img: Image.Image, size: int,
                           scale_range: tuple[float, float],
                           rng: np.random.Generator) -> np.ndarray:
  """A square crop of random side and place, resized to `size`, random flip.

  The side is log-uniform in `scale_range` times the shorter side, and never
  below `size` (a crop is shrunk, never enlarged: enlarged crops teach blur).
  Log-uniform gives each octave of scale the same share, so a few large
  photographs yield crops from whole-scene views down to pixel-level texture,
  at positions that differ every time: a decoder cannot memorise what sits
  where in the training images, as it can with a fixed set of crops.
  """
  w, h = img.size
  short = min(w, h)
  lo, hi = (min(max(s * short, size), short) for s in scale_range)
  side = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
  side = min(max(side, size), short)
  top = int(rng.integers(0, h - side + 1))
  left = int(rng.integers(0, w - side + 1))
  crop = img.crop((left, top, left + side, top + side))
  if side != size:
    crop = crop.resize((size, size), Image.BILINEAR)
  out = np.asarray(crop)
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def _label(element: Mapping[str, Any]) -> np.int32:
  return np.int32(int(element.get('label', 0)))


def _invalid(size: int, element: Mapping[str, Any]) -> Element:
  # Same structure as a valid element so that batching code stays uniform.
  return {'image': np.zeros((size, size, 3), np.uint8),
          'label': _label(element), 'valid': np.bool_(False)}


class DecodedCache:
  """Decoded images by content hash, for sources of a few large photographs.

  Multi-scale cropping draws every example from one of a handful of photos;
  decoding a 1-2 MP PNG each time (10-100 ms) would cost more CPU than the
  demo's training step. Thread-safe (grain reads with threads); each worker
  process holds its own. Bounded, oldest out first.
  """

  def __init__(self, max_items: int = 64):
    self._max = max_items
    self._items: dict[bytes, Image.Image] = {}
    self._lock = threading.Lock()

  def decode(self, data: bytes | np.ndarray) -> Image.Image | None:
    raw = data.item() if isinstance(data, np.ndarray) and data.ndim == 0 else (
        data)
    if not isinstance(raw, bytes):
      return decode_image(data)
    key = hashlib.blake2b(raw, digest_size=16).digest()
    with self._lock:
      img = self._items.get(key)
    if img is None:
      img = decode_image(raw)
      if img is not None:
        img.load()
        with self._lock:
          if len(self._items) >= self._max:
            self._items.pop(next(iter(self._items)))
          self._items[key] = img
    return img

  def __getstate__(self):  # Worker processes start with an empty cache.
    return {'max_items': self._max}

  def __setstate__(self, state):
    self.__init__(state['max_items'])


class TrainPreprocess(grain.transforms.RandomMap):
  """Decode, then the paper's crop or a multi-scale one, random flip.

  With `crop_scale` None: shorter side to R, random R x R crop (the official
  ImageNet pipeline). With `crop_scale` = (lo, hi): `random_scale_crop_flip`,
  for datasets of a few large photographs (the demo).
  """

  def __init__(self, resolution: int,
               crop_scale: tuple[float, float] | None = None):
    self.resolution = resolution
    self.crop_scale = None if crop_scale is None else tuple(crop_scale)
    self._cache = DecodedCache() if crop_scale is not None else None

  def random_map(self, element: Mapping[str, Any],
                 rng: np.random.Generator) -> Element:
    img = (self._cache.decode(element['image']) if self._cache is not None
           else decode_image(element['image']))
    if img is None:
      return _invalid(self.resolution, element)
    if self.crop_scale is not None:
      out = random_scale_crop_flip(img, self.resolution, self.crop_scale, rng)
    else:
      out = random_crop_flip(
          np.asarray(resize_shorter_side(img, self.resolution)),
          self.resolution, rng)
    return {'image': out, 'label': _label(element), 'valid': np.bool_(True)}


class EvalPreprocess(grain.transforms.Map):
  """Decode, shorter side to R, center R x R crop."""

  def __init__(self, resolution: int):
    self.resolution = resolution

  def map(self, element: Mapping[str, Any]) -> Element:
    img = decode_image(element['image'])
    if img is None:
      return _invalid(self.resolution, element)
    img = np.asarray(resize_shorter_side(img, self.resolution))
    return {'image': np.ascontiguousarray(center_crop(img, self.resolution)),
            'label': _label(element), 'valid': np.bool_(True)}


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], as ToTensor + Normalize(0.5, 0.5)."""
  return images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
