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

import io
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


def _label(element: Mapping[str, Any]) -> np.int32:
  return np.int32(int(element.get('label', 0)))


def _invalid(size: int, element: Mapping[str, Any]) -> Element:
  # Same structure as a valid element so that batching code stays uniform.
  return {'image': np.zeros((size, size, 3), np.uint8),
          'label': _label(element), 'valid': np.bool_(False)}


class TrainPreprocess(grain.transforms.RandomMap):
  """Decode, shorter side to R, random R x R crop, random flip."""

  def __init__(self, resolution: int):
    self.resolution = resolution

  def random_map(self, element: Mapping[str, Any],
                 rng: np.random.Generator) -> Element:
    img = decode_image(element['image'])
    if img is None:
      return _invalid(self.resolution, element)
    img = np.asarray(resize_shorter_side(img, self.resolution))
    return {'image': random_crop_flip(img, self.resolution, rng),
            'label': _label(element), 'valid': np.bool_(True)}


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
