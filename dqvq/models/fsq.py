"""Finite scalar quantisation (FSQ; Mentzer et al. 2023, arXiv:2309.15505).

Each of the d latent channels is bounded and rounded to its own L_i evenly
spaced levels; the code of a cell is the tuple of its levels, read as one
mixed-radix integer. The codebook is implicit: the product grid of the
levels, prod(L_i) codes, none of them learned. There is nothing to collapse
(every grid point stays reachable whatever the encoder does) and no
auxiliary loss: the rounding passes the gradient straight through, so the
encoder trains on the reconstruction loss alone.

The grid here is symmetric. Channel i is bounded to [-h_i, h_i] with
h_i = (L_i - 1) / 2 by h_i * tanh, shifted by h_i to [0, L_i - 1] and
rounded to the digit 0 ... L_i - 1; the decoder gets (digit - h_i) / h_i,
L_i levels from -1 to 1. One formula serves odd and even L_i (for even L_i
the levels are the half-integers of the bounded value), including L_i = 2,
a sign bit. The paper's own code shifts even-L_i channels so that zero is a
level (an asymmetric grid); the two differ by a constant offset per
channel, which post_quant_conv's bias absorbs.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dqvq.models import quantizer as quantizer_lib

Array = jax.Array


def validate_levels(levels: Sequence[int], codebook_size: int) -> None:
  """Clear errors for level tuples FSQ cannot use, naming the fields.

  The implicit codebook has prod(levels) codes and stage 2 sizes its
  vocabulary by `codebook_size`, so the two must agree exactly.
  """
  levels = tuple(levels)
  if not levels or any(isinstance(l, bool) or
                       not isinstance(l, numbers.Integral) or l < 2
                       for l in levels):
    raise ValueError(
        f'config.model.fsq_levels={levels!r}: give one integer >= 2 per '
        'latent channel, e.g. (8, 8, 4) for 256 codes or (8, 8, 4, 4) for '
        '1024.')
  size = math.prod(levels)
  if size != codebook_size:
    raise ValueError(
        f'config.model.codebook_size={codebook_size} does not match '
        f'config.model.fsq_levels={levels}, whose product (the number of FSQ '
        f'codes) is {size}; set codebook_size={size} or choose fsq_levels '
        f'whose product is {codebook_size}.')


def _half_widths(levels: Sequence[int]) -> np.ndarray:
  """h_i = (L_i - 1) / 2: the bounded channel spans [-h_i, h_i]."""
  return (np.asarray(levels, np.float32) - 1.0) / 2.0


def _radix(levels: Sequence[int]) -> np.ndarray:
  """Place values of the mixed-radix code; channel 0 is the least digit."""
  return np.cumprod((1,) + tuple(levels[:-1])).astype(np.int32)


def round_straight_through(x: Array) -> Array:
  """round(x) in the forward pass, the identity in the backward pass."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def quantize(z: Array, levels: Sequence[int]) -> tuple[Array, Array]:
  """(..., d) latents -> (values in [-1, 1], digits 0 ... L_i - 1).

  The values carry the straight-through gradient: d values / dz is that of
  the unrounded tanh(z), the rounding passes it unchanged.
  """
  h = _half_widths(levels)
  shifted = jnp.tanh(z.astype(jnp.float32)) * h + h   # [0, L_i - 1]
  rounded = round_straight_through(shifted)
  # The integers from round itself, not from the straight-through sum.
  digits = jax.lax.stop_gradient(jnp.round(shifted)).astype(jnp.int32)
  return (rounded - h) / h, digits


def digits_to_codes(digits: Array, levels: Sequence[int]) -> Array:
  """(..., d) digits -> (...) code ids in [0, prod(levels))."""
  return jnp.sum(digits * _radix(levels), axis=-1).astype(jnp.int32)


def codes_to_values(codes: Array, levels: Sequence[int]) -> Array:
  """(...) code ids -> (..., d) grid values in [-1, 1]; inverts `quantize`
  followed by `digits_to_codes`."""
  digits = (codes[..., None] // _radix(levels)) % np.asarray(levels, np.int32)
  h = _half_widths(levels)
  return (digits.astype(jnp.float32) - h) / h


class FiniteScalarQuantizer(nn.Module):
  """Quantizes (B, H, W, d) latents, d = len(levels), to the FSQ grid.

  Same interface as `quantizer.VectorQuantizer`: `__call__` returns the
  straight-through latents, the codes and the aux dict (its losses are zero:
  FSQ has none), and `lookup` / `nearest` serve `DQVAE.decode_codes` and the
  gain router target.

  The 'codebook' collection holds the level tuple (`levels`, int32), never
  updated: FSQ has no learned state, but every user of a DQ-VAE's variables
  (the stage-1 state, checkpoints, bundles, the tokenizer and its
  fingerprint) reads the pair {'params', 'codebook'}, and with the grid
  recorded there two tokenizers with different levels also have different
  fingerprints.

  Attributes:
    levels: L_i per channel; prod(levels) codes.
    axis_name: psum axis of the usage counts under shard_map/pmap; None
      under jit.
  """
  levels: tuple[int, ...] = (8, 8, 4)
  axis_name: str | None = None

  def setup(self):
    self.level_record = self.variable(
        'codebook', 'levels', lambda: jnp.asarray(self.levels, jnp.int32))

  @property
  def codebook_size(self) -> int:
    return math.prod(self.levels)

  def lookup(self, codes: Array) -> Array:
    """Code ids (any shape) -> grid values (..., d)."""
    return codes_to_values(codes, self.levels)

  def nearest(self, z: Array) -> Array:
    """The grid point of each latent (..., d); no gradient."""
    return jax.lax.stop_gradient(quantize(z, self.levels)[0])

  def __call__(self, z: Array, weight_mask: Array | None = None,
               train: bool = False) -> tuple[Array, Array, dict[str, Array]]:
    """Returns (straight-through quantized z, codes (B, H, W), aux).

    `weight_mask` and `train` are accepted for the common interface; FSQ has
    no loss to weigh and no state to update.
    """
    del weight_mask, train
    if z.shape[-1] != len(self.levels):
      raise ValueError(f'latent channels {z.shape[-1]} != len(fsq_levels) '
                       f'{len(self.levels)}.')
    values, digits = quantize(z, self.levels)
    codes = digits_to_codes(digits, self.levels)
    counts = jax.ops.segment_sum(
        jnp.ones(codes.size, jnp.float32), codes.reshape(-1),
        self.codebook_size)
    if self.axis_name is not None:
      counts = jax.lax.psum(counts, self.axis_name)
    zero = jnp.zeros((), jnp.float32)
    aux = {'q_loss': zero, 'commitment_loss': zero, 'codebook_loss': zero,
           **quantizer_lib.usage_stats(counts)}
    return values, codes, aux
