"""Hierarchical multi-grain encoder of DQ-VAE (paper Sec. 3.1, Fig. 3).

One downsampling trunk produces features at every factor 2^i; the feature for
granularity f is read at level log2(f), after that level's blocks and before
its downsample, and goes through its own head (mid block, GroupNorm, swish,
3x3 conv to `z_channels`). With the paper's settings this is exactly the
official `DualGrainEncoder` ({8, 16}) and `TripleGrainEncoder` ({8, 16, 32});
with a single granularity it is the plain VQGAN encoder, the fixed-length
baseline of every comparison in the paper.

Granularities are listed coarse to fine (`grain_factors=(16, 8)` is the
paper's F = {8, 16}); grain id k always means `grain_factors[k]`, so id 0 is
the coarsest, matching the official gate order.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax

from dqvq.models import granularity as grain_lib
from dqvq.models import layers

Array = jax.Array


def validate_grain_factors(grain_factors: Sequence[int],
                           num_levels: int | None = None) -> None:
  """Checks that factors are powers of two, strictly decreasing (coarse first)."""
  factors = tuple(grain_factors)
  if not factors:
    raise ValueError('grain_factors is empty; use e.g. (16, 8) for the '
                     "paper's dual-grain model or (16,) for plain VQGAN.")
  for f in factors:
    if f < 1 or f & (f - 1):
      raise ValueError(f'grain factor {f} is not a power of two; the encoder '
                       'halves resolution per level, so use 1, 2, 4, 8, ...')
  if any(a <= b for a, b in zip(factors, factors[1:])):
    raise ValueError(
        f'grain_factors={factors} must list granularities coarse to fine '
        f'(strictly decreasing), e.g. {tuple(sorted(set(factors), reverse=True))}.')
  if num_levels is not None and 2 ** (num_levels - 1) != factors[0]:
    raise ValueError(
        f'The encoder has {num_levels} levels (len(ch_mult)), reaching factor '
        f'{2 ** (num_levels - 1)}, but the coarsest grain factor is '
        f'{factors[0]}; use len(ch_mult) = {int(math.log2(factors[0])) + 1}.')


class HierarchicalEncoder(nn.Module):
  """Encodes NHWC images in [-1, 1] to one feature map per granularity.

  Attributes:
    grain_factors: downsampling factors, coarse to fine, e.g. (16, 8).
    ch: base width.
    ch_mult: width multiplier per level; level i works at factor 2^i.
    num_res_blocks: ResnetBlocks per level.
    attn_factors: factors (levels) where an AttnBlock follows each
      ResnetBlock; the official (8, 16) is its attn_resolutions [32, 16] at
      256 pixels, stated resolution-free.
    z_channels: output channels of every head.
  """
  grain_factors: tuple[int, ...] = (16, 8)
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_factors: tuple[int, ...] = (8, 16)
  z_channels: int = 256
  dropout: float = 0.0
  dtype: layers.Dtype | None = None
  norm_groups: int = 32
  cpu_kernels: bool = False  # see layers.Conv

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> list[Array]:
    num_levels = len(self.ch_mult)
    validate_grain_factors(self.grain_factors, num_levels)
    layers.check_divisible(x.shape[1:3], self.grain_factors[0], 'encoder')
    dt, cpu = self.dtype, self.cpu_kernels
    taps = {int(math.log2(f)): f for f in self.grain_factors}
    features = {}

    h = layers.Conv(self.ch * self.ch_mult[0], 3, name='conv_in', dtype=dt,
                    cpu_kernels=cpu)(x)
    for level in range(num_levels):
      width = self.ch * self.ch_mult[level]
      for j in range(self.num_res_blocks):
        h = layers.ResnetBlock(width, self.dropout, dt, self.norm_groups, cpu,
                               name=f'down_{level}_block_{j}')(h, train)
        if 2 ** level in self.attn_factors:
          h = layers.AttnBlock(dt, self.norm_groups,
                               name=f'down_{level}_attn_{j}')(h)
      if level in taps:
        features[taps[level]] = h
      if level != num_levels - 1:
        h = layers.Downsample(dt, cpu, name=f'down_{level}_downsample')(h)

    outputs = []
    for role, f in zip(grain_lib.grain_role_names(len(self.grain_factors)),
                       self.grain_factors):
      suffix = f'_{role}' if role else ''
      g = layers.MidBlock(self.dropout, dt, self.norm_groups, cpu,
                          name=f'mid{suffix}')(
          features[f], train)
      g = layers.swish(layers.GroupNorm(
          self.norm_groups, name=f'norm_out{suffix}', dtype=dt)(g))
      outputs.append(layers.Conv(self.z_channels, 3, name=f'conv_out{suffix}',
                                 dtype=dt, cpu_kernels=cpu)(g))
    return outputs
