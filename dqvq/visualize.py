"""Pictures of what the tokenizer does: coding maps, error maps, grids.

The coding map is the picture that explains DQ-VAE (paper Fig. 5): every
region is tinted by the granularity the router gave it, and the code-cell grid
is drawn on top, so a coarse region shows one cell and a fine one 2x2 cells.
Next to the L1 error map it shows whether codes go where the error is.

Colours and blending follow the official `draw_dual_grain_256res_color` /
`draw_triple_grain_256res_color` (`modules/dynamic_modules/utils.py`):

* grain k of K gets the colour lerp(blue (5, 39, 175), red (255, 0, 0),
  k / (K - 1)), truncated to uint8 as the official `np.uint8(...)` does. With
  two grains that is blue = coarse, red = fine; with three the median grain is
  the midpoint (130, 19, 87), a dark magenta, as the official triple map.
* `PIL.Image.blend(image, colour, alpha)` with alpha = 0.7 at the call sites,
  i.e. out = (1 - alpha) * image + alpha * colour: alpha weighs the COLOUR.
* The grid lines follow `draw_dual_grain_256res` (`draw_triple_...`): each
  code cell's top row and left column are painted dark.

One deliberate difference: the official maps min-max normalise the whole
batch (`image_normalize`), so the tint of one image depends on the others.
Here images are mapped with the fixed [-1, 1] -> [0, 255] of `to_uint8`.

Everything is numpy + PIL on host arrays so that the training loop, the demo
and notebooks can call it on `jax.device_get` results without jax.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image

COARSE_COLOR = (5, 39, 175)   # official color_dict['blue']
FINE_COLOR = (255, 0, 0)      # official color_dict['red']
LINE_COLOR = (0, 0, 0)        # the official grid writes -1, i.e. black
OFFICIAL_ALPHA = 0.7          # `scaler` at the official call sites
# Grid lines on cells smaller than this would cover most of the cell.
_MIN_CELL_FOR_LINES = 4


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Float images in [-1, 1] -> uint8 in [0, 255], clipping outliers.

  Decoder outputs overshoot [-1, 1]; clipping (rather than min-max scaling)
  keeps colours comparable across images and steps.
  """
  x = np.asarray(images, dtype=np.float32)
  x = (np.clip(x, -1.0, 1.0) + 1.0) * 127.5
  return np.round(x).astype(np.uint8)


def grain_colors(num_grains: int) -> np.ndarray:
  """(K, 3) uint8 tint per grain, coarse to fine, as the official lerp."""
  low = np.asarray(COARSE_COLOR, np.float64)
  high = np.asarray(FINE_COLOR, np.float64)
  if num_grains == 1:
    return low.astype(np.uint8)[None]
  t = np.arange(num_grains, dtype=np.float64)[:, None] / (num_grains - 1)
  # astype truncates, as the official np.uint8(...) does.
  return (high * t + low * (1.0 - t)).astype(np.uint8)


def _cells_per_side(num_grains: int,
                    grain_factors: Sequence[int] | None) -> np.ndarray:
  """Code cells along one side of a region, per grain (1 for the coarsest).

  `grain_factors` are the downsampling factors coarse to fine (as in
  `DQVAE.grain_factors`); without them each finer grain halves the cell, as
  in the paper's {8, 16} and {8, 16, 32}.
  """
  if grain_factors is None:
    return 2 ** np.arange(num_grains)
  if len(grain_factors) != num_grains:
    raise ValueError(f'grain_factors {tuple(grain_factors)} has '
                     f'{len(grain_factors)} entries; num_grains={num_grains}.')
  return np.asarray([grain_factors[0] // f for f in grain_factors])


def coding_map_overlay(images: np.ndarray,
                       grain_map: np.ndarray,
                       num_grains: int,
                       alpha: float = OFFICIAL_ALPHA,
                       *,
                       grain_factors: Sequence[int] | None = None,
                       draw_grid: bool = True,
                       line_color: Sequence[int] = LINE_COLOR) -> np.ndarray:
  """Tints each region by its granularity and draws the code-cell grid.

  Args:
    images: (B, H, W, 3) floats in [-1, 1].
    grain_map: (B, h, w) ints, 0 = coarsest ... K-1 = finest; one entry per
      region of (H/h) x (W/w) pixels.
    num_grains: K, which fixes the colour scale even when a map happens to
      use only some grains.
    alpha: weight of the colour (official semantics, see module docstring).
    grain_factors: downsampling factors coarse to fine, to size the cells.
    draw_grid: draw each code cell's top and left edge in `line_color`.
    line_color: RGB of the grid lines.

  Returns:
    (B, H, W, 3) uint8.
  """
  images = np.asarray(images)
  grain_map = np.asarray(grain_map).astype(np.int64)
  if images.ndim != 4 or grain_map.ndim != 3:
    raise ValueError(f'Expected images (B, H, W, 3) and grain_map (B, h, w); '
                     f'got {images.shape} and {grain_map.shape}.')
  b, height, width, _ = images.shape
  if grain_map.shape[0] != b or height % grain_map.shape[1] or (
      width % grain_map.shape[2]):
    raise ValueError(f'grain_map {grain_map.shape} must tile images '
                     f'{images.shape}: same batch, H and W multiples of h, w.')
  if grain_map.min(initial=0) < 0 or grain_map.max(initial=0) >= num_grains:
    raise ValueError(f'grain_map values must lie in [0, {num_grains}).')
  ry, rx = height // grain_map.shape[1], width // grain_map.shape[2]
  pixel_grain = np.repeat(np.repeat(grain_map, ry, axis=1), rx, axis=2)

  tint = grain_colors(num_grains)[pixel_grain].astype(np.float32)
  base = to_uint8(images).astype(np.float32)
  out = np.round((1.0 - alpha) * base + alpha * tint).astype(np.uint8)

  if draw_grid:
    cps = _cells_per_side(num_grains, grain_factors)[pixel_grain]
    cell_y, cell_x = ry // cps, rx // cps
    ys = (np.arange(height) % ry)[None, :, None]
    xs = (np.arange(width) % rx)[None, None, :]
    on_line = (ys % np.maximum(cell_y, 1) == 0) | (
        xs % np.maximum(cell_x, 1) == 0)
    on_line &= np.minimum(cell_y, cell_x) >= _MIN_CELL_FOR_LINES
    out[on_line] = np.asarray(line_color, np.uint8)
  return out


def heat_colormap(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] -> uint8 RGB on black -> red -> yellow -> white.

  The classic 'hot' map: monotone in brightness, so zero error is black and
  larger errors are always brighter, also when printed in grey.
  """
  t = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
  rgb = np.clip(3.0 * t - np.asarray([0.0, 1.0, 2.0], np.float32), 0.0, 1.0)
  return np.round(rgb * 255.0).astype(np.uint8)


def error_map(images: np.ndarray,
              reconstructions: np.ndarray,
              *,
              vmax: float | None = None,
              region_size: int | None = None) -> np.ndarray:
  """Per-pixel L1 error |x - x_hat| (mean over channels) as a heat map.

  Args:
    images: (B, H, W, C) floats in [-1, 1].
    reconstructions: same shape.
    vmax: error shown as white-hot. None scales each image by its own maximum,
      which keeps the structure visible both early (large errors) and late
      (small errors) in training; pass a number to compare images.
    region_size: average the error over region_size^2 blocks first, as the
      paper's Fig. 5 error map (per 16x16 region).

  Returns:
    (B, H, W, 3) uint8; zero error is black.
  """
  x = np.asarray(images, np.float32)
  y = np.asarray(reconstructions, np.float32)
  if x.shape != y.shape:
    raise ValueError(f'images {x.shape} and reconstructions {y.shape} differ.')
  err = np.abs(x - y).mean(axis=-1)
  if region_size:
    b, h, w = err.shape
    s = region_size
    if h % s or w % s:
      raise ValueError(f'region_size {s} must divide the image size {(h, w)}.')
    block = err.reshape(b, h // s, s, w // s, s).mean(axis=(2, 4))
    err = np.repeat(np.repeat(block, s, axis=1), s, axis=2)
  if vmax is None:
    scale = err.reshape(err.shape[0], -1).max(axis=1)[:, None, None]
  else:
    scale = np.float32(vmax)
  return heat_colormap(err / np.maximum(scale, 1e-12))


def image_grid(images_uint8: np.ndarray,
               ncols: int | None = None,
               pad: int = 2,
               pad_value: int = 255) -> np.ndarray:
  """Tiles (N, H, W, C) images row by row into one (H', W', C) picture.

  ncols defaults to ceil(sqrt(N)); `pad` pixels of `pad_value` separate the
  tiles (none around the outside), and missing tiles of the last row are
  left as padding.
  """
  images = np.asarray(images_uint8)
  if images.ndim != 4:
    raise ValueError(f'Expected (N, H, W, C) images, got {images.shape}.')
  n, h, w, c = images.shape
  ncols = ncols or max(1, math.ceil(math.sqrt(n)))
  ncols = min(ncols, max(n, 1))
  nrows = max(1, math.ceil(n / ncols))
  grid = np.full((nrows * h + (nrows - 1) * pad,
                  ncols * w + (ncols - 1) * pad, c), pad_value, images.dtype)
  for i in range(n):
    r, q = divmod(i, ncols)
    y, x = r * (h + pad), q * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_png(path: str | os.PathLike[str], image_uint8: np.ndarray) -> None:
  """Writes an (H, W, 3), (H, W, 1) or (H, W) uint8 image as PNG.

  Creates missing parent directories. Paths with a scheme (gs://...) go
  through etils.epath, so workdirs on cloud storage work as local ones.
  """
  image = np.asarray(image_uint8)
  if image.dtype != np.uint8:
    raise ValueError(f'save_png wants uint8, got {image.dtype}; use to_uint8.')
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  pil = Image.fromarray(image)
  path_str = os.fspath(path)
  if '://' in path_str:
    from etils import epath  # pylint: disable=g-import-not-at-top
    target = epath.Path(path_str)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open('wb') as f:
      pil.save(f, format='PNG')
    return
  parent = os.path.dirname(path_str)
  if parent:
    os.makedirs(parent, exist_ok=True)
  pil.save(path_str, format='PNG')


def coding_panel(images: np.ndarray,
                 reconstructions: np.ndarray,
                 grain_map: np.ndarray,
                 num_grains: int,
                 *,
                 grain_factors: Sequence[int] | None = None,
                 alpha: float = OFFICIAL_ALPHA,
                 max_examples: int | None = None,
                 pad: int = 2,
                 min_size: int = 0,
                 extra: Sequence[np.ndarray] = ()) -> np.ndarray:
  """One picture, a row per example: input | reconstruction | coding | error,
  then one column per array in `extra` (stage 1 passes the coarse-only and
  the fine-only reconstructions, so a reader sees what the extra codes buy).

  The same uint8 array goes to TensorBoard (`write_images`) and to the
  demo's PNGs, so what one sees in both places is identical. Images smaller
  than `min_size` are enlarged (nearest, by an integer factor) so that code
  cells stay visible.
  """
  zoom = max(1, min_size // images.shape[1]) if min_size else 1
  up = lambda a: np.repeat(np.repeat(np.asarray(a), zoom, 1), zoom, 2)
  if zoom > 1:
    images, reconstructions = up(images), up(reconstructions)
    extra = [up(e) for e in extra]
    if grain_factors is not None:
      grain_factors = tuple(f * zoom for f in grain_factors)
  if max_examples is not None:
    images = images[:max_examples]
    reconstructions = reconstructions[:max_examples]
    grain_map = grain_map[:max_examples]
    extra = [e[:max_examples] for e in extra]
  columns = (
      to_uint8(images),
      to_uint8(reconstructions),
      coding_map_overlay(images, grain_map, num_grains, alpha,
                         grain_factors=grain_factors),
      error_map(images, reconstructions),
      *(to_uint8(e) for e in extra),
  )
  tiles = np.stack(columns, axis=1)  # (B, columns, H, W, 3): example-major
  return image_grid(tiles.reshape((-1,) + tiles.shape[2:]),
                    ncols=len(columns), pad=pad)
