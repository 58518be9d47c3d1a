"""The PatchGAN discriminator of the official DQ-VAE training loss.

This is taming-transformers' `NLayerDiscriminator(3, ndf=64, n_layers=3,
use_actnorm=False)` (the pix2pix PatchGAN), which the official
`vqperceptual_multidisc.py` trains with a hinge loss. It maps an image to a
grid of per-patch real/fake logits: (B, 256, 256, 3) -> (B, 30, 30, 1).

Layout is NHWC. Submodules are named after the index of the layer in the
official `nn.Sequential` (`loss.discriminator.main.<i>`), so an importer maps
official keys by name:

  ===================================  ========================================
  official key                         Flax variable
  ===================================  ========================================
  main.0.weight (64,3,4,4)             params/main_0/conv/kernel (4,4,3,64)
  main.0.bias (64,)                    params/main_0/conv/bias
  main.2.weight (128,64,4,4)           params/main_2/conv/kernel (no bias)
  main.3.{weight,bias}                 params/main_3/{scale,bias}
  main.3.{running_mean,running_var}    batch_stats/main_3/{mean,var}
  main.5.weight                        params/main_5/conv/kernel
  main.6.*                             main_6 (BatchNorm, as main.3)
  main.8.weight                        params/main_8/conv/kernel
  main.9.*                             main_9 (BatchNorm, as main.3)
  main.11.{weight,bias} (1,512,4,4)    params/main_11/conv/{kernel,bias}
  ===================================  ========================================

Conv weights transpose (O, I, H, W) -> (H, W, I, O). `num_batches_tracked`
has no counterpart (it only matters for momentum=None in PyTorch). The
LeakyReLUs (main.1, 4, 7, 10) hold no parameters. With n_layers != 3 the
indices follow the same pattern (conv, BN, LReLU triples after main.1).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dqvq.models.layers import Conv

Array = jax.Array
Dtype = Any


def _conv_init(key, shape, dtype=jnp.float32):
  """Official `weights_init` for convs: N(0, 0.02).

  Drawn flat and reshaped: same distribution, but XLA:CPU compiles the
  partitionable-threefry sampler for a flat shape in well under a second,
  versus 5-10 s for each 4-D kernel shape (which made one discriminator init
  take ~45 s on a 2-core machine).
  """
  n = math.prod(shape)
  return 0.02 * jax.random.normal(key, (n,), dtype).reshape(shape)


def _bn_scale_init(key, shape, dtype=jnp.float32):
  """Official `weights_init` for BatchNorm weights: N(1, 0.02)."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class TorchBatchNorm(nn.Module):
  """BatchNorm2d with PyTorch's exact train/eval semantics, on NHWC inputs.

  Flax's `nn.BatchNorm` folds the *biased* batch variance into its running
  average; PyTorch folds the *unbiased* one (n / (n - 1)). The official
  training never reads the running stats (the discriminator stays in train
  mode), but imported running stats and eval-mode logits only agree with the
  official ones if the update rule is PyTorch's, hence this small module.

  Attributes:
    momentum: PyTorch convention: new = (1 - momentum) * old + momentum *
      batch. 0.1 here is Flax's momentum 0.9.
    epsilon: added to the variance, 1e-5 as in PyTorch.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = x.shape[-1]
    scale = self.param('scale', _bn_scale_init, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,),
                            jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axes)
      var = jnp.mean(jnp.square(x32 - mean), axes)  # Biased, to normalise.
      if not self.is_initializing():
        n = x32.size // c
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype or x.dtype)


class NLayerDiscriminator(nn.Module):
  """PatchGAN discriminator; returns per-patch logits (B, H', W', 1).

  Call as `apply(vars, x, train=True, mutable=['batch_stats'])` in training
  (batch statistics, running stats updated) and `apply(vars, x, train=False)`
  to use the running averages. The official loss always uses train mode, and
  runs real and fake batches through separate calls, so each gets its own
  batch statistics; callers should do the same to match it.

  Attributes:
    input_nc: input channels (checked against the input).
    ndf: width of the first conv; later widths are ndf * min(2**n, 8).
    n_layers: number of stride-2 convs.
    dtype: computation dtype of the convs (params are float32).
    cpu_kernels: XLA:CPU's fast weight gradients (see layers.Conv).
  """
  input_nc: int = 3
  ndf: int = 64
  n_layers: int = 3
  dtype: Dtype | None = None
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if x.shape[-1] != self.input_nc:
      raise ValueError(
          f'NLayerDiscriminator expects {self.input_nc} input channels (NHWC), '
          f'got input of shape {x.shape}.')

    def conv(features, stride, bias, idx):
      return Conv(features, 4, strides=stride, padding=1, use_bias=bias,
                  kernel_init=_conv_init, dtype=self.dtype,
                  cpu_kernels=self.cpu_kernels, name=f'main_{idx}')

    lrelu = lambda h: nn.leaky_relu(h, negative_slope=0.2)
    h = lrelu(conv(self.ndf, 2, True, 0)(x))
    idx = 2
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      h = conv(self.ndf * min(2**n, 8), stride, False, idx)(h)
      h = TorchBatchNorm(dtype=self.dtype, name=f'main_{idx + 1}')(h, train)
      h = lrelu(h)
      idx += 3
    return conv(1, 1, True, idx)(h)
