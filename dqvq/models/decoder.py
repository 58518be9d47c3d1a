"""DQ-VAE decoder with Fourier + learned 2-D position embeddings.

The official decoder (`DecoderPositional.py`) always sees a regular map on
the finest latent grid (coarse codes are already replicated), adds a fixed
Fourier-feature embedding and learned row/column tables to it, and upsamples
back to pixels with the taming-transformers blocks. It is not symmetric with
the encoder: it has log2(f_finest) upsamplings and 3 ResnetBlocks per level.
None of the position embedding is in the paper; it is what the released
checkpoint uses, so it is the default here ('none' turns it off).

The learned tables have one row per latent row/column, so the parameters fix
the latent grid size (32 x 32 for the paper's 256-pixel, f=8 model).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dqvq.models import layers

Array = jax.Array

POSITION_EMBEDDINGS = ('fourier+learned', 'learned', 'fourier', 'none')


class FourierPositionEmbedding(nn.Module):
  """sin(W [x, y] + b) on fixed coordinates in [-1, 1] (x along width).

  W ~ U(+-sqrt(9/2)) as the official `FourierPositionEmbedding`: a wide
  frequency range so that neighbouring latent cells get distinct codes.
  """
  features: int

  @nn.compact
  def __call__(self, height: int, width: int) -> Array:
    ys = jnp.linspace(-1.0, 1.0, height)
    xs = jnp.linspace(-1.0, 1.0, width)
    yy, xx = jnp.meshgrid(ys, xs, indexing='ij')
    coords = jnp.stack([xx, yy], axis=-1)  # channel 0 is x, as official.
    bound = math.sqrt(9.0 / 2.0)
    proj = nn.Dense(
        self.features,
        kernel_init=lambda k, s, d=jnp.float32: jax.random.uniform(
            k, s, d, -bound, bound),
        bias_init=layers.torch_bias_init(2), name='conv')(coords)
    return jnp.sin(proj)


class LearnedPositionEmbedding2D(nn.Module):
  """row_embed[y] + col_embed[x], truncated-normal(std 1) init as official."""
  features: int

  @nn.compact
  def __call__(self, height: int, width: int) -> Array:
    init = nn.initializers.truncated_normal(stddev=1.0, lower=-2.0, upper=2.0)
    row = self.param('row_embed', init, (height, self.features))
    col = self.param('col_embed', init, (width, self.features))
    return row[:, None, :] + col[None, :, :]


class Decoder(nn.Module):
  """Maps a quantized latent map (B, h, w, z) to images (B, h*f, w*f, 3).

  Attributes:
    ch, ch_mult: base width and per-level multipliers; len(ch_mult) - 1
      upsamplings, so the decoder's factor is 2^(len(ch_mult) - 1).
    num_res_blocks: the decoder uses num_res_blocks + 1 blocks per level.
    attn_factors: factors (relative to the image) where AttnBlocks follow
      each ResnetBlock; the official (8,) is attn_resolutions [32] at 256 px.
    position_embedding: one of POSITION_EMBEDDINGS.
  """
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2)
  num_res_blocks: int = 2
  attn_factors: tuple[int, ...] = (8,)
  out_channels: int = 3
  position_embedding: str = 'fourier+learned'
  dropout: float = 0.0
  dtype: layers.Dtype | None = None
  norm_groups: int = 32
  cpu_kernels: bool = False  # see layers.Conv

  @nn.compact
  def __call__(self, z: Array, train: bool = False) -> tuple[Array, Array]:
    """Returns (image, input of conv_out).

    The second output is what the adaptive GAN weight needs: gradients with
    respect to conv_out's kernel are cheap to form from it (see losses.py).
    """
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise ValueError(f'Unknown position_embedding {self.position_embedding!r};'
                       f' choose one of {POSITION_EMBEDDINGS}.')
    dt, cpu = self.dtype, self.cpu_kernels
    _, height, width, zc = z.shape
    if 'fourier' in self.position_embedding:
      z = z + FourierPositionEmbedding(zc, name='position_bias_fourier')(
          height, width).astype(z.dtype)
    if 'learned' in self.position_embedding:
      z = z + LearnedPositionEmbedding2D(zc, name='position_bias_learned')(
          height, width).astype(z.dtype)

    num_levels = len(self.ch_mult)
    h = layers.Conv(self.ch * self.ch_mult[-1], 3, name='conv_in', dtype=dt,
                    cpu_kernels=cpu)(z)
    h = layers.MidBlock(self.dropout, dt, self.norm_groups, cpu, name='mid')(
        h, train)
    for level in reversed(range(num_levels)):
      width_l = self.ch * self.ch_mult[level]
      for j in range(self.num_res_blocks + 1):
        h = layers.ResnetBlock(width_l, self.dropout, dt, self.norm_groups,
                               cpu, name=f'up_{level}_block_{j}')(h, train)
        if 2 ** level in self.attn_factors:
          h = layers.AttnBlock(dt, self.norm_groups,
                               name=f'up_{level}_attn_{j}')(h)
      if level != 0:
        h = layers.Upsample(dt, cpu, name=f'up_{level}_upsample')(h)
    h = layers.swish(layers.GroupNorm(self.norm_groups, name='norm_out',
                                      dtype=dt)(h))
    out = layers.Conv(self.out_channels, 3, name='conv_out', dtype=dt,
                      cpu_kernels=cpu)(h)
    return out, h
