"""LPIPS perceptual distance (VGG16 variant), as the official DQ-VAE loss uses.

The official reconstruction loss is L1 + LPIPS, with taming-transformers'
copy of LPIPS (`modules/losses/lpips.py`). Matching it needs the same
backbone (torchvision's ImageNet VGG16 `features`), the same input scaling,
the same channel normalisation and the learned `lin0..lin4` heads from the
LPIPS repo's `vgg.pth`. All of those weights are frozen: the trainer keeps
the LPIPS params out of the optimizer (Linen cannot mark params as
non-trainable), while gradients still flow to the images.

Parameter tree (names follow torchvision's `features.<i>` indices so the
converter is a rename plus transpose):

  net/features_{0,2,5,7,10,12,14,17,19,21,24,26,28}/conv/{kernel,bias}
  lin{0..4}/conv/kernel                      (1, 1, C, 1), no bias

Weights come from `load_lpips_params`: an Orbax checkpoint written by
`python -m dqvq.convert lpips ...`, or the explicit string 'random' (tests;
the distance is then meaningless and a warning says so).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dqvq.models import frozen_weights
from dqvq.models.layers import Conv

Array = jax.Array
Dtype = Any

# LPIPS ScalingLayer constants, for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# torchvision vgg16 `features`: (index, out channels) of each 3x3 conv, and
# the conv index after whose ReLU LPIPS taps a feature map (relu{1..5}_*).
VGG16_CONVS = ((0, 64), (2, 64), (5, 128), (7, 128), (10, 256), (12, 256),
               (14, 256), (17, 512), (19, 512), (21, 512), (24, 512),
               (26, 512), (28, 512))
VGG16_TAPS = (2, 7, 14, 21, 28)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# Max-pools sit before these conv indices (features.4, 9, 16, 23).
_POOL_BEFORE = (5, 10, 17, 24)

CONVERT_HINT = (
    'python -m dqvq.convert lpips --vgg16 vgg16-397923af.pth --lin vgg.pth '
    '--out PATH  (vgg16-397923af.pth: torchvision\'s ImageNet VGG16 state '
    'dict; vgg.pth: the LPIPS repo\'s VGG linear heads)')


def normalize_channels(x: Array, eps: float = 1e-10) -> Array:
  """x / (||x||_2 over channels + eps), the official `normalize_tensor`.

  The norm's argument is floored at 1e-30 so that the gradient stays finite
  where a feature vector is exactly zero (sqrt'(0) is infinite and would give
  NaN). This changes the value only where ||x|| < 1e-15, by under 1e-5
  relative, far below float32 noise of real features.
  """
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x / (jnp.sqrt(jnp.maximum(sq, 1e-30)) + eps)


class VGG16Features(nn.Module):
  """torchvision VGG16 `features[:30]`; returns relu1_2 ... relu5_3 (NHWC)."""
  dtype: Dtype | None = None
  cpu_kernels: bool = False  # see layers.Conv

  @nn.compact
  def __call__(self, x: Array) -> list[Array]:
    taps = []
    for idx, features in VGG16_CONVS:
      if idx in _POOL_BEFORE:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
      x = nn.relu(Conv(features, 3, padding=1, dtype=self.dtype,
                       cpu_kernels=self.cpu_kernels,
                       name=f'features_{idx}')(x))
      if idx in VGG16_TAPS:
        taps.append(x)
    return taps


class LPIPS(nn.Module):
  """Per-image LPIPS distance between two image batches in [-1, 1].

  `apply({'params': p}, x0, x1)` with NHWC images of at least 16x16 returns a
  (B,) float32 distance. The official module returns (B, 1, 1, 1); squeeze
  or broadcast as needed.

  Attributes:
    dropout: rate of the Dropout before each lin head, applied only when
      `train=True` (needs a 'dropout' rng). The official code builds these
      with p=0.5 and, because Lightning's `model.train()` undoes the LPIPS
      `.eval()`, they are active during official training. Default 0.0 (off)
      gives the deterministic eval-mode distance; set 0.5 to mimic the quirk.
    dtype: computation dtype of the VGG convs; normalisation and the lin heads
      run in float32.
    cpu_kernels: XLA:CPU's fast convolution gradients (see layers.Conv); the
      stage-1 loss takes LPIPS's input gradient, which they also speed up.
  """
  dropout: float = 0.0
  dtype: Dtype | None = None
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x0: Array, x1: Array, train: bool = False) -> Array:
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
      raise ValueError(
          f'LPIPS needs two NHWC RGB batches of equal shape, got {x0.shape} '
          f'and {x1.shape}.')
    if min(x0.shape[1:3]) < 16:
      raise ValueError(f'LPIPS needs images of at least 16x16, got {x0.shape}.')
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    b = x0.shape[0]
    # One pass over both batches: same weights, half the kernel launches.
    x = (jnp.concatenate([x0, x1]).astype(jnp.float32) - shift) / scale
    feats = VGG16Features(dtype=self.dtype, cpu_kernels=self.cpu_kernels,
                          name='net')(x)
    total = jnp.zeros((b,), jnp.float32)
    for k, f in enumerate(feats):
      f = normalize_channels(f.astype(jnp.float32))
      diff = jnp.square(f[:b] - f[b:])
      if train and self.dropout > 0:
        diff = self._dropout(diff)
      lin = Conv(1, 1, padding=0, use_bias=False, name=f'lin{k}')(diff)
      total = total + jnp.mean(lin, axis=(1, 2, 3))
    return total

  def _dropout(self, x: Array) -> Array:
    """Inverted dropout, as nn.Dropout, but with the mask drawn flat.

    Same law; the flat draw avoids XLA:CPU's slow compile of the threefry
    sampler for 4-D shapes (several seconds per shape).
    """
    keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - self.dropout,
                                (x.size,)).reshape(x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout), 0.0)


def init_lpips_params(seed: int = 0) -> dict[str, Any]:
  """Randomly initialised LPIPS params (PyTorch-default init), float32.

  Drawn with numpy from the same U(+-1/sqrt(fan_in)) law as `Conv`'s init,
  rather than through `LPIPS().init`: on CPU, XLA takes ~2 s to compile the
  threefry kernel for each distinct weight shape (~25 s for VGG16), while
  numpy draws all 14.7M values in a fraction of a second. Only tests and
  smoke runs use random LPIPS, so the exact random stream does not matter.
  The lin heads take |U|: trained LPIPS clamps them to be non-negative, and
  so a random LPIPS is still a non-negative distance (a usable loss).
  """
  rng = np.random.default_rng(seed)

  def layer(tree):
    kernel = tree['conv']['kernel']
    bound = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))
    out = {'kernel': rng.uniform(-bound, bound, kernel.shape)}
    if 'bias' in tree['conv']:
      out['bias'] = rng.uniform(-bound, bound, tree['conv']['bias'].shape)
    return {'conv': jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), out)}

  abstract = abstract_lpips_params()
  params = {'net': {k: layer(v) for k, v in abstract['net'].items()}}
  for k, v in abstract.items():
    if k != 'net':
      params[k] = jax.tree.map(jnp.abs, layer(v))
  return params


def abstract_lpips_params() -> dict[str, Any]:
  """The params tree as ShapeDtypeStructs, computed without allocating."""
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  return jax.eval_shape(
      lambda a, b: LPIPS().init(jax.random.PRNGKey(0), a, b), x, x)['params']


def save_lpips_params(params: Any, path: str | os.PathLike[str]) -> None:
  """Writes params as an Orbax checkpoint directory (must not exist yet)."""
  frozen_weights.save(params, path, abstract_lpips_params(), what='LPIPS',
                      hint=CONVERT_HINT)


def check_lpips_params(params: Any, where: str) -> None:
  """Raises ValueError naming every missing, extra or mis-shaped leaf."""
  frozen_weights.check(params, abstract_lpips_params(), what='LPIPS',
                       where=where, hint=CONVERT_HINT)


def load_lpips_params(path: str | None, *, seed: int = 0) -> dict[str, Any]:
  """LPIPS params from an Orbax checkpoint directory, or random for 'random'.

  Args:
    path: directory written by `python -m dqvq.convert lpips` (or by
      `save_lpips_params`), or the explicit string 'random'. None is an error,
      so a config that forgot the path cannot silently train with a random
      perceptual loss.
    seed: PRNG seed for 'random'.

  Returns:
    The 'params' collection of `LPIPS` (float32 arrays).

  Raises:
    FileNotFoundError: the path does not exist; the message gives the
      command that creates it.
    ValueError: None, or a checkpoint whose tree/shapes differ from LPIPS's.
  """
  if path is None:
    raise ValueError(
        "LPIPS weights path is unset: give the directory made by "
        f"`{CONVERT_HINT}`, or the string 'random' for an untrained LPIPS.")
  if path == 'random':
    logging.warning('LPIPS is RANDOMLY initialised (weights path "random"): '
                    'the perceptual loss is not meaningful.')
    return init_lpips_params(seed)
  return frozen_weights.load(path, abstract_lpips_params(), what='LPIPS',
                             hint=CONVERT_HINT)
