"""Grain maps: merging multi-grain features onto the finest grid.

A *region* is f_coarsest x f_coarsest pixels; the router gives each region a
grain id (0 = coarsest ... K-1 = finest). Every granularity's feature map is
replicated (nearest neighbour) to the finest latent grid and the region's
choice is selected there, so the quantizer and decoder always see a regular
map. Because the 1x1 `quant_conv` runs after merging, replicated cells are
identical vectors and get one code: a coarse region is one code repeated
(f_k / f_finest)^2 times, which is why the commitment loss weights such cells
by the inverse of that count (the code weight mask).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from dqvq.models import layers

Array = jax.Array


def grain_role_names(num_grains: int) -> tuple[str, ...]:
  """Names of the per-grain heads, coarse to fine, as the official modules.

  Keeping the official names (`mid_coarse`, `conv_out_fine`, ...) makes the
  checkpoint importer a rename-free mapping.
  """
  if num_grains == 1:
    return ('',)
  if num_grains == 2:
    return ('coarse', 'fine')
  if num_grains == 3:
    return ('coarse', 'median', 'fine')
  return tuple(f'grain{k}' for k in range(num_grains))


def replicate_to_finest(grain_map: Array, grain_factors: Sequence[int]) -> Array:
  """(B, h, w) region map -> (B, h*r, w*r) map on the finest latent grid."""
  return layers.nearest_upsample(grain_map[..., None],
                                 grain_factors[0] // grain_factors[-1])[..., 0]


def merge_grains(features: Sequence[Array], grain_map: Array,
                 grain_factors: Sequence[int]) -> Array:
  """Selects, per region, the features of its granularity on the finest grid.

  Args:
    features: per-grain maps, coarse to fine, (B, H/f_k, W/f_k, C).
    grain_map: (B, H/f_0, W/f_0) int grain ids.
    grain_factors: the factors f_k, coarse to fine.

  Returns:
    (B, H/f_fine, W/f_fine, C) merged features.
  """
  fine = grain_factors[-1]
  grain_fine = replicate_to_finest(grain_map, grain_factors)[..., None]
  merged = features[-1]
  for k in range(len(features) - 2, -1, -1):
    rep = layers.nearest_upsample(features[k], grain_factors[k] // fine)
    merged = jnp.where(grain_fine == k, rep, merged)
  return merged


def mix_grains(features: Sequence[Array], gate: Array,
               grain_factors: Sequence[int]) -> Array:
  """sum_k gate_k * features_k on the finest grid.

  With the feature router's straight-through gate (one-hot forward, the
  Gumbel softmax's gradient) this is `merge_grains` in the forward pass, and
  its gradient on the gate compares the grains' features (DQVAE
  gate_gradient='mixture').

  Args:
    features: per-grain maps, coarse to fine, (B, H/f_k, W/f_k, C).
    gate: (B, H/f_0, W/f_0, K) per-region weights.
    grain_factors: the factors f_k, coarse to fine.
  """
  fine = grain_factors[-1]
  weights = layers.nearest_upsample(gate, grain_factors[0] // fine)
  merged = 0.0
  for k, feat in enumerate(features):
    rep = layers.nearest_upsample(feat, grain_factors[k] // fine)
    merged = merged + weights[..., k:k + 1].astype(rep.dtype) * rep
  return merged


def region_error(images: Array, reconstruction: Array, region_size: int,
                 power: int = 1) -> Array:
  """(B, h, w) mean |x - y|**power per region_size^2 region (and channel).

  Both images are clipped to [-1, 1] first. power=1 is the paper's Fig. 5
  error map (L1), power=2 the squared error the greedy oracle ranks by.
  """
  x = jnp.clip(jnp.asarray(images, jnp.float32), -1.0, 1.0)
  y = jnp.clip(jnp.asarray(reconstruction, jnp.float32), -1.0, 1.0)
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f'images {x.shape} and reconstructions {y.shape} must be '
                     'NHWC batches of the same shape.')
  b, h, w, c = x.shape
  s = int(region_size)
  if s <= 0 or h % s or w % s:
    raise ValueError(f'region_size {region_size} must divide the image size '
                     f'{(h, w)}; use the coarsest grain factor (e.g. 16).')
  err = jnp.abs(x - y) ** power
  return jnp.mean(err.reshape(b, h // s, s, w // s, s, c), axis=(2, 4, 5))


def region_gain(images: Array, coarse: Array, fine: Array,
                region_size: int) -> Array:
  """(B, h, w) per-region drop in mean squared error from coarse to fine.

  `coarse` and `fine` are reconstructions of `images` with every region at a
  coarser and a finer grain; all three are clipped to [-1, 1] first.
  """
  return (region_error(images, coarse, region_size, 2) -
          region_error(images, fine, region_size, 2))


def code_weight_mask(grain_map: Array, grain_factors: Sequence[int]) -> Array:
  """Per finest-grid cell, 1 / (number of cells sharing its code).

  With F = {8, 16} that is 1/4 on coarse cells and 1 on fine ones (1/16, 1/4,
  1 for {8, 16, 32}), so every region weighs the same in the commitment loss
  whatever its granularity, as in the official `codebook_mask`.
  """
  fine = grain_factors[-1]
  weights = jnp.asarray([(fine / f) ** 2 for f in grain_factors], jnp.float32)
  return weights[replicate_to_finest(grain_map, grain_factors)]


def codes_per_region(grain_factors: Sequence[int]) -> tuple[int, ...]:
  """How many codes a region takes at each granularity (1, 4, 16, ...)."""
  return tuple((grain_factors[0] // f) ** 2 for f in grain_factors)


def code_length(grain_map: Array, grain_factors: Sequence[int]) -> Array:
  """Number of distinct codes per image: sum over regions of codes_per_region."""
  per = jnp.asarray(codes_per_region(grain_factors), jnp.int32)
  return per[grain_map].sum(axis=(1, 2))


def validate_grain_ratios(ratios: Sequence[float], num_grains: int) -> None:
  """Ratios are per grain, coarse to fine, and must sum to one."""
  if len(ratios) != num_grains:
    raise ValueError(
        f'grain_ratios has {len(ratios)} entries but there are {num_grains} '
        'granularities; give one share per grain, coarse to fine.')
  if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
    raise ValueError(
        f'grain_ratios={tuple(ratios)} must be non-negative and sum to 1 '
        f'(they sum to {sum(ratios):.6g}); e.g. (0.5, 0.5) for r_fine = 0.5.')
