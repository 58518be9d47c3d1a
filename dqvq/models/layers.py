"""Convolutional building blocks shared by the DQ-VAE encoder and decoder.

These follow the taming-transformers blocks that the official DQ-VAE uses
(`modules/diffusionmodules/model.py`), in NHWC layout. Initialisers reproduce
PyTorch's defaults (kaiming-uniform with a=sqrt(5), i.e. U(+-1/sqrt(fan_in))
for weights and biases) so that training dynamics, and the learning rates the
paper reports, carry over from the official code.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dqvq.cpu import fast_conv

Array = jax.Array
Dtype = Any


def torch_kernel_init(key: Array, shape: Sequence[int],
                      dtype: Dtype = jnp.float32) -> Array:
  """kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)), fan_in = prod(shape[:-1]).

  Drawn flat and reshaped: the same distribution, but XLA on CPU compiles one
  1-D threefry far faster than a 4-D one (seconds per shape), which dominated
  model init time.
  """
  bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
  flat = jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound)
  return flat.reshape(shape)



def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default bias init, U(+-1/sqrt(fan_in)); needs the layer's fan-in."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def swish(x: Array) -> Array:
  """x * sigmoid(x), the official `nonlinearity`."""
  return nn.swish(x)


def group_norm(x: Array, scale: Array, bias: Array, num_groups: int,
               epsilon: float) -> Array:
  """GroupNorm over all axes but the first and last, in float32.

  The same statistics as PyTorch's and Flax's GroupNorm (biased variance as
  E[x^2] - E[x]^2, clipped at 0, as Flax's default fast variance), summed in
  a different order: per channel over the pixels first (a reduction over a
  major axis of a (B, pixels, C) array, which XLA:CPU's YNNPACK reductions
  run ~3x faster than Flax's reduction over a (B, pixels, G, C/G) reshape;
  `benchmarks/stage1_profile.py --part norm`), then per group over the
  (B, C) sums. Normalisation is one multiply-add per element with per-(B, C)
  coefficients, which XLA fuses with what follows (swish).
  """
  b, c = x.shape[0], x.shape[-1]
  xf = x.astype(jnp.float32).reshape(b, -1, c)
  count = xf.shape[1] * (c // num_groups)
  sums = jnp.sum(xf, axis=1).reshape(b, num_groups, -1).sum(-1)
  squares = jnp.sum(jnp.square(xf), axis=1).reshape(b, num_groups, -1).sum(-1)
  mean = sums / count
  var = jnp.maximum(squares / count - jnp.square(mean), 0.0)
  inv = jnp.repeat(jax.lax.rsqrt(var + epsilon), c // num_groups, axis=1)
  mean = jnp.repeat(mean, c // num_groups, axis=1)
  mul = inv * scale.astype(jnp.float32)
  add = bias.astype(jnp.float32) - mean * mul
  shape = (b,) + (1,) * (x.ndim - 2) + (c,)
  return xf.reshape(x.shape) * mul.reshape(shape) + add.reshape(shape)


class _GroupNormParams(nn.Module):
  """Holds scale and bias where Flax's nn.GroupNorm kept them (`GroupNorm_0`).

  Checkpoints, the official-weight converter and exported bundles all name
  them so; the computation is `group_norm`.
  """
  num_groups: int
  epsilon: float
  dtype: Dtype | None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    y = group_norm(x, scale, bias, self.num_groups, self.epsilon)
    # Flax's promotion rule: without a dtype, the input's and the float32
    # params' common type.
    return y.astype(self.dtype or jnp.promote_types(x.dtype, jnp.float32))


class GroupNorm(nn.Module):
  """GroupNorm(32, eps=1e-6) with affine scale/bias, as `Normalize` in taming.

  Biased variance like PyTorch. Statistics are computed in float32 even when
  activations are bf16; the output has `dtype` (default: float32).
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    groups = self.num_groups
    if x.shape[-1] % groups:
      raise ValueError(
          f'GroupNorm needs channels ({x.shape[-1]}) divisible by num_groups '
          f'({groups}); pick channel widths that are multiples of {groups}.')
    return _GroupNormParams(groups, self.epsilon, self.dtype,
                            name='GroupNorm_0')(x)


class Conv(nn.Module):
  """A 2-D convolution with PyTorch-default init and explicit padding.

  `padding` is PyTorch's symmetric integer padding (so a 3x3 conv with
  padding 1 maps H to H), or 'VALID'. `cpu_kernels` (every conv-holding
  layer has it, set once per run from the mesh's platform) selects
  XLA:CPU's fast weight gradient (`fast_conv`); off, it is `nn.Conv` with
  XLA's own convolution, what accelerators run.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int | str = 1
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer | None = None
  dtype: Dtype | None = None
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    fan_in = x.shape[-1] * k * k
    pad = self.padding
    if isinstance(pad, int):
      pad = ((pad, pad), (pad, pad))
    return nn.Conv(
        self.features, (k, k), strides=(self.strides, self.strides),
        padding=pad, use_bias=self.use_bias,
        kernel_init=self.kernel_init or torch_kernel_init,
        bias_init=torch_bias_init(fan_in), dtype=self.dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=(fast_conv.conv_general_dilated
                              if self.cpu_kernels else
                              jax.lax.conv_general_dilated), name='conv')(x)


class Dense(nn.Module):
  """A Linear layer with PyTorch-default init."""
  features: int
  use_bias: bool = True
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.Dense(
        self.features, use_bias=self.use_bias, kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(x.shape[-1]), dtype=self.dtype,
        param_dtype=jnp.float32, name='linear')(x)


class ResnetBlock(nn.Module):
  """GN-swish-conv twice, plus a 1x1 `nin_shortcut` when widths differ."""
  features: int
  dropout: float = 0.0
  dtype: Dtype | None = None
  norm_groups: int = 32
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    g, cpu = self.norm_groups, self.cpu_kernels
    h = Conv(self.features, 3, name='conv1', dtype=self.dtype,
             cpu_kernels=cpu)(
                 swish(GroupNorm(g, name='norm1', dtype=self.dtype)(x)))
    h = swish(GroupNorm(g, name='norm2', dtype=self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv(self.features, 3, name='conv2', dtype=self.dtype,
             cpu_kernels=cpu)(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, 1, padding=0, name='nin_shortcut',
               dtype=self.dtype, cpu_kernels=cpu)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, with a residual.

  q, k, v and proj_out are the official 1x1 convs, written as Dense layers on
  the channel axis (identical maths, and the importer maps them by name).
  """
  dtype: Dtype | None = None
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    hn = GroupNorm(self.norm_groups, name='norm', dtype=self.dtype)(x)
    q, k, v = (Dense(c, name=n, dtype=self.dtype)(hn).reshape(b, h * w, c)
               for n in ('q', 'k', 'v'))
    # Written out rather than jax.nn.dot_product_attention: its (B, T, N, H)
    # layout puts the softmax gradient's sum on a non-minor axis, which
    # XLA:CPU reduces slowly (fwd+bwd at 2x1024 tokens x 512: 118 -> 80 ms).
    scores = jnp.einsum('bqc,bkc->bqk', q, k,
                        preferred_element_type=jnp.float32) * (c ** -0.5)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum('bqk,bkc->bqc', weights.astype(v.dtype), v)
    return x + Dense(c, name='proj_out', dtype=self.dtype)(
        out.reshape(b, h, w, c))


class Downsample(nn.Module):
  """Zero-pad right/bottom by one pixel, then a VALID stride-2 3x3 conv.

  This asymmetric padding is what the official code does (pad (0,1,0,1)); it
  is not SAME padding, and official weights only agree with it.
  """
  dtype: Dtype | None = None
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return Conv(x.shape[-1], 3, strides=2, padding='VALID', name='conv',
                dtype=self.dtype, cpu_kernels=self.cpu_kernels)(x)


def _upsample_phase_kernels(kernel: Array) -> Array:
  """A 3x3 kernel applied after 2x nearest upsampling, as 2x2 kernels.

  Output pixel (2h + a, 2w + b) of "upsample, then 3x3 conv (padding 1)"
  sees only input rows {h-1, h} (a = 0; taps 1 and 2 both land on row h) or
  {h, h+1} (a = 1; taps 0 and 1 on row h), and likewise for columns. So each
  of the four output phases is a 2x2 kernel whose taps are sums of the 3x3
  taps: rows [k0, k1 + k2] for a = 0 and [k0 + k1, k2] for a = 1. Returns
  them stacked on the output channels, (2, 2, Cin, (a, b, Cout)).
  """
  def pairs(k: Array, axis: int) -> Array:
    t = [jnp.take(k, i, axis=axis) for i in range(3)]
    return jnp.stack([jnp.stack([t[0], t[1] + t[2]], axis=axis),
                      jnp.stack([t[0] + t[1], t[2]], axis=axis)])
  rows = pairs(kernel, 0)               # (a, 2, 3, Cin, Cout)
  both = jax.vmap(lambda k: pairs(k, 1))(rows)  # (a, b, 2, 2, Cin, Cout)
  cin, cout = kernel.shape[2:]
  return both.transpose(2, 3, 4, 0, 1, 5).reshape(2, 2, cin, 4 * cout)


def nearest_upsample_conv(x: Array, kernel: Array,
                          cpu_kernels: bool = False) -> Array:
  """conv3x3(nearest_upsample_x2(x)), padding 1, at the input's resolution.

  One 2x2 conv over x padded by one pixel gives every output phase at once
  (phase (a, b) is its output shifted by (a, b)); then the phases are
  interleaved. The same products as the upsampled 3x3 conv, minus the
  duplicates: 16 instead of 36 multiply-adds per input pixel and channel
  pair, and no 4x larger upsampled tensor to write, convolve and (for the
  gradient) sum back, on every platform. Measured 3.3x faster forward +
  backward than upsample-then-conv on CPU at 2x128x128x128 -> 256
  (1076 -> 329 ms). `cpu_kernels`: the 2x2 conv's weight gradient as
  XLA:CPU matmuls (`fast_conv`).
  """
  b, h, w, _ = x.shape
  cout = kernel.shape[-1]
  y = fast_conv.conv2d(x, _upsample_phase_kernels(kernel), (1, 1),
                       ((1, 1), (1, 1)), cpu_kernels=cpu_kernels)
  y = y.reshape(b, h + 1, w + 1, 2, 2, cout)
  # Phase (a, p) sits at offset (a, p) of the (H + 1, W + 1) output.
  rows = [jnp.stack([y[:, a:a + h, p:p + w, a, p] for p in range(2)], axis=3)
          for a in range(2)]               # each (B, H, W, 2 (p), Cout)
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, cout)


class _KernelBias(nn.Module):
  """A conv's kernel and bias, initialised as `Conv` does."""
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[Array, Array]:
    k = self.kernel_size
    kernel = self.param('kernel', torch_kernel_init,
                        (k, k, in_features, self.features), jnp.float32)
    bias = self.param('bias', torch_bias_init(in_features * k * k),
                      (self.features,), jnp.float32)
    return kernel, bias


class _ConvParams(nn.Module):
  """`Conv`'s parameters at `Conv`'s paths (NAME/conv/kernel, .../bias), for
  layers that apply them their own way; checkpoints and the official-weight
  converter see an ordinary Conv."""
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[Array, Array]:
    return _KernelBias(self.features, self.kernel_size, name='conv')(
        in_features)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv (see `nearest_upsample_conv`)."""
  dtype: Dtype | None = None
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    kernel, bias = _ConvParams(c, 3, name='conv')(c)
    dt = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    y = nearest_upsample_conv(x.astype(dt), kernel.astype(dt),
                              self.cpu_kernels)
    return y + bias.astype(dt)


class MidBlock(nn.Module):
  """ResnetBlock, AttnBlock, ResnetBlock at constant width (`mid_*`)."""
  dropout: float = 0.0
  dtype: Dtype | None = None
  norm_groups: int = 32
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    c, g, cpu = x.shape[-1], self.norm_groups, self.cpu_kernels
    x = ResnetBlock(c, self.dropout, self.dtype, g, cpu, name='block_1')(
        x, train)
    x = AttnBlock(self.dtype, g, name='attn_1')(x)
    return ResnetBlock(c, self.dropout, self.dtype, g, cpu, name='block_2')(
        x, train)


def nearest_upsample(x: Array, factor: int) -> Array:
  """Replicates each cell of an (B, H, W, ...) map into a factor x factor block."""
  if factor == 1:
    return x
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def avg_pool(x: Array, factor: int) -> Array:
  """Non-overlapping factor x factor average pooling of a NHWC map."""
  if factor == 1:
    return x
  return nn.avg_pool(x, (factor, factor), strides=(factor, factor))


def count_params(tree: Any) -> int:
  """Number of scalar parameters in a pytree of arrays."""
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree))


def check_divisible(size: Sequence[int], factor: int, what: str) -> None:
  """Raises a clear error when an image side is not a multiple of `factor`."""
  for s in size:
    if s % factor:
      raise ValueError(
          f'{what}: image side {s} is not a multiple of the largest '
          f'downsampling factor {factor}; resize or crop images to a multiple '
          f'of {factor} (e.g. {max(factor, s - s % factor)}).')
