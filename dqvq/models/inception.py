"""The FID InceptionV3 (pytorch-fid's / TF FID's network), in Flax, NHWC.

FID and IS are comparable with published numbers (the paper's tables) only
when computed with one network: the 2015-12-05 TF Inception graph of TF FID,
ported by pytorch-fid as `pt_inception-2015-12-05-6726825d.pth`. That is
torchvision's InceptionV3 (BasicConv2d = bias-free conv, BatchNorm eps 1e-3,
ReLU; no aux head) with the TF graph's weights, a 1008-way fc, pool branches
of Mixed_5b-d, 6b-e and 7b averaging with `count_include_pad=False`, and a
3x3 *max* pool in Mixed_7c's pool branch (`FIDInceptionE_2`).

Input: images in [-1, 1], (B, H, W, 3), any size, resized to 299x299 like
pytorch-fid's `F.interpolate(bilinear, align_corners=False)`: half-pixel
centres, no antialiasing, each output pixel blending its 2x2 nearest input
pixels -- also when downsampling, so large images (e.g. 1024 -> 299) alias,
exactly as in pytorch-fid. (It maps [0, 1] to [-1, 1] after resizing; the
weights of a bilinear resize sum to 1, so that order is equivalent.)

Output: dict(pool=(B, 2048) pool3 features for FID, logits=(B, 1008) with
the fc bias, logits_unbiased=(B, 1008) = pool @ W, which the reference IS
implementations softmax; see dqvq.eval.fid).

Params hold the BatchNorm running statistics too (inference only), and are
the PyTorch state dict renamed: `X.conv.weight` (O, I, H, W) -> `X/conv/kernel`
(H, W, I, O); `X.bn.{weight, bias, running_mean, running_var}` ->
`X/bn/{scale, bias, mean, var}`; `fc.weight` (1008, 2048) -> `fc/kernel`
(2048, 1008); `fc.bias` -> `fc/bias` (the map: `dqvq.interop.pretrained`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dqvq.models import frozen_weights

Array = jax.Array

FID_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
BN_EPS = 1e-3
WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_SHA256 = (  # torch.hub file names carry the first 8 hex digits.
    '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2')
CONVERT_HINT = (
    f'python -m dqvq.convert inception --weights {WEIGHTS_FILE} --out PATH  '
    f"({WEIGHTS_FILE}: pytorch-fid's FID Inception weights, from its GitHub "
    'release "fid_weights")')


# HIGHEST everywhere: TPUs (and TF32 GPUs) otherwise run float32 convs with
# bf16 / TF32 inputs, which moves FID by more than published digits allow.
PRECISION = jax.lax.Precision.HIGHEST


def resize_to_fid(images: Array) -> Array:
  """Bilinear 299x299 resize, as PyTorch's (align_corners=False, no AA)."""
  b, h, w, c = images.shape
  if (h, w) == (FID_SIZE, FID_SIZE):
    return images
  return jax.image.resize(images, (b, FID_SIZE, FID_SIZE, c), 'bilinear',
                          antialias=False)


# The three pools of the network. PyTorch pads max pools with -inf, as Flax
# does; TF's (hence FID's) average pool divides by the in-image count only.
avg_pool_exclude_pad = functools.partial(
    nn.avg_pool, window_shape=(3, 3), strides=(1, 1),
    padding=((1, 1), (1, 1)), count_include_pad=False)
max_pool_same = functools.partial(nn.max_pool, window_shape=(3, 3),
                                  strides=(1, 1), padding=((1, 1), (1, 1)))
max_pool_reduce = functools.partial(nn.max_pool, window_shape=(3, 3),
                                    strides=(2, 2), padding='VALID')


class FrozenBatchNorm(nn.Module):
  """Inference BatchNorm whose running statistics live in 'params'."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param('mean', nn.initializers.zeros, (c,), jnp.float32)
    var = self.param('var', nn.initializers.ones, (c,), jnp.float32)
    return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: bias-free conv, BatchNorm(eps=1e-3), ReLU."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, (self.strides,) * 2,
                ((ph, ph), (pw, pw)), use_bias=False, precision=PRECISION,
                name='conv')(x)
    return nn.relu(FrozenBatchNorm(name='bn')(x))


def _conv(name: str, features: int, kernel: int | tuple[int, int] = 1,
          strides: int = 1, padding: int | tuple[int, int] = 0) -> BasicConv2d:
  """BasicConv2d with PyTorch's int-or-pair kernel/padding arguments."""
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  padding = (padding, padding) if isinstance(padding, int) else padding
  return BasicConv2d(features, kernel, strides, padding, name=name)


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d: FIDInceptionA (pool branch excludes padding)."""
  pool_features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b5 = _conv('branch5x5_2', 64, 5, padding=2)(_conv('branch5x5_1', 48)(x))
    b3 = _conv('branch3x3dbl_1', 64)(x)
    b3 = _conv('branch3x3dbl_2', 96, 3, padding=1)(b3)
    b3 = _conv('branch3x3dbl_3', 96, 3, padding=1)(b3)
    bp = _conv('branch_pool', self.pool_features)(avg_pool_exclude_pad(x))
    return jnp.concatenate([_conv('branch1x1', 64)(x), b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: torchvision's InceptionB grid reduction (35 -> 17)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    bd = _conv('branch3x3dbl_1', 64)(x)
    bd = _conv('branch3x3dbl_2', 96, 3, padding=1)(bd)
    bd = _conv('branch3x3dbl_3', 96, 3, strides=2)(bd)
    return jnp.concatenate([_conv('branch3x3', 384, 3, strides=2)(x), bd,
                            max_pool_reduce(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e: FIDInceptionC, factorised 7x7 convs."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c7, row, col = self.channels_7x7, ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b7 = _conv('branch7x7_1', c7)(x)
    b7 = _conv('branch7x7_2', c7, row[0], padding=row[1])(b7)
    b7 = _conv('branch7x7_3', 192, col[0], padding=col[1])(b7)
    bd = _conv('branch7x7dbl_1', c7)(x)
    for k, (kernel, pad) in zip((2, 3, 4, 5), (col, row, col, row)):
      bd = _conv(f'branch7x7dbl_{k}', 192 if k == 5 else c7, kernel,
                 padding=pad)(bd)
    bp = _conv('branch_pool', 192)(avg_pool_exclude_pad(x))
    return jnp.concatenate([_conv('branch1x1', 192)(x), b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: torchvision's InceptionD grid reduction (17 -> 8)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = _conv('branch3x3_2', 320, 3, strides=2)(_conv('branch3x3_1', 192)(x))
    b7 = _conv('branch7x7x3_1', 192)(x)
    b7 = _conv('branch7x7x3_2', 192, (1, 7), padding=(0, 3))(b7)
    b7 = _conv('branch7x7x3_3', 192, (7, 1), padding=(3, 0))(b7)
    b7 = _conv('branch7x7x3_4', 192, 3, strides=2)(b7)
    return jnp.concatenate([b3, b7, max_pool_reduce(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b ('avg', FIDInceptionE_1) and Mixed_7c ('max', FIDInceptionE_2)."""
  pool: str = 'avg'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.pool not in ('avg', 'max'):
      raise ValueError(f"InceptionE pool must be 'avg' or 'max', not "
                       f'{self.pool!r}')

    def split(prefix, y):  # Parallel 1x3 and 3x1 convs, concatenated.
      return jnp.concatenate(
          [_conv(f'{prefix}a', 384, (1, 3), padding=(0, 1))(y),
           _conv(f'{prefix}b', 384, (3, 1), padding=(1, 0))(y)], axis=-1)

    b3 = split('branch3x3_2', _conv('branch3x3_1', 384)(x))
    bd = _conv('branch3x3dbl_1', 448)(x)
    bd = split('branch3x3dbl_3', _conv('branch3x3dbl_2', 384, 3, padding=1)(bd))
    pooled = avg_pool_exclude_pad(x) if self.pool == 'avg' else max_pool_same(x)
    bp = _conv('branch_pool', 192)(pooled)
    return jnp.concatenate([_conv('branch1x1', 320)(x), b3, bd, bp], axis=-1)


class FIDInception(nn.Module):
  """The FID InceptionV3: `apply({'params': p}, images)` -> dict, see top."""

  @nn.compact
  def __call__(self, images: Array) -> dict[str, Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError('FIDInception needs NHWC RGB images (B, H, W, 3) in '
                       f'[-1, 1], got shape {images.shape}.')
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f'FIDInception needs float images in [-1, 1], got '
                       f'{images.dtype}; map uint8 x to x / 127.5 - 1.')
    x = resize_to_fid(images.astype(jnp.float32))
    x = _conv('Conv2d_1a_3x3', 32, 3, strides=2)(x)    # 149x149
    x = _conv('Conv2d_2a_3x3', 32, 3)(x)               # 147x147
    x = _conv('Conv2d_2b_3x3', 64, 3, padding=1)(x)
    x = _conv('Conv2d_3b_1x1', 80)(max_pool_reduce(x))  # 73x73
    x = _conv('Conv2d_4a_3x3', 192, 3)(x)              # 71x71
    x = max_pool_reduce(x)                             # 35x35
    x = InceptionA(32, name='Mixed_5b')(x)             # 256 channels
    x = InceptionA(64, name='Mixed_5c')(x)             # 288
    x = InceptionA(64, name='Mixed_5d')(x)             # 288
    x = InceptionB(name='Mixed_6a')(x)                 # 768 x 17x17
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160),
                     ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)                 # 1280 x 8x8
    x = InceptionE('avg', name='Mixed_7b')(x)          # 2048
    x = InceptionE('max', name='Mixed_7c')(x)          # 2048
    pool = jnp.mean(x, axis=(1, 2))                    # Dropout: eval no-op.
    fc = nn.Dense(NUM_CLASSES, precision=PRECISION, name='fc')
    logits = fc(pool)
    unbiased = jnp.dot(pool, fc.variables['params']['kernel'],
                       precision=PRECISION)
    return {'pool': pool, 'logits': logits, 'logits_unbiased': unbiased}


@functools.cache
def abstract_inception_params() -> dict[str, Any]:
  """The params tree as ShapeDtypeStructs (traced once, nothing allocated)."""
  x = jax.ShapeDtypeStruct((1, FID_SIZE, FID_SIZE, 3), jnp.float32)
  return jax.eval_shape(
      lambda a: FIDInception().init(jax.random.PRNGKey(0), a), x)['params']


def init_inception_params(seed: int = 0) -> dict[str, Any]:
  """Random params for tests: He-normal kernels, identity BatchNorm.

  Drawn with numpy: XLA:CPU compiles a threefry kernel per weight shape.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(s.shape[:-1]))
      return rng.standard_normal(s.shape, np.float32) * np.float32(
          np.sqrt(2.0 / fan_in))
    fill = 1.0 if name in ('scale', 'var') else 0.0
    return np.full(s.shape, fill, np.float32)

  tree = jax.tree_util.tree_map_with_path(leaf, abstract_inception_params())
  return jax.tree.map(jnp.asarray, tree)


def check_inception_params(params: Any, where: str) -> None:
  """Raises ValueError naming every missing, extra or mis-shaped leaf."""
  frozen_weights.check(params, abstract_inception_params(),
                       what='FIDInception', where=where, hint=CONVERT_HINT)


def save_inception_params(params: Any, path: str | os.PathLike[str]) -> None:
  """Writes params as an Orbax checkpoint directory (must not exist yet)."""
  frozen_weights.save(params, path, abstract_inception_params(),
                      what='FIDInception', hint=CONVERT_HINT)


def load_inception_params(path_or_random: str, *,
                          seed: int = 0) -> dict[str, Any]:
  """FID Inception params from the converter's Orbax directory, or 'random'.

  'random' (tests, smoke runs) gives an untrained network, with a warning:
  its FID / IS mean nothing. Anything else must be a directory written by
  `python -m dqvq.convert inception`; other input names the fix.
  """
  if not path_or_random:
    raise ValueError('FID Inception weights path is unset: give the directory '
                     f"made by `{CONVERT_HINT}`, or 'random' for tests.")
  if path_or_random == 'random':
    logging.warning('FID Inception is RANDOMLY initialised (weights path '
                    '"random"): FID and IS values are not meaningful.')
    return init_inception_params(seed)
  path = os.path.abspath(os.fspath(path_or_random))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(
        f'FID Inception weights must be the Orbax checkpoint directory made '
        f'by `{CONVERT_HINT}`; {path} is not one.')
  return frozen_weights.load(path, abstract_inception_params(),
                             what='FIDInception', hint=CONVERT_HINT)
