"""GroupNorm: PyTorch's statistics, Flax's parameter names and gradients.

`layers.group_norm` sums per channel first, then per group (faster on
XLA:CPU); the result must still be the textbook GroupNorm, the one the
official checkpoints were trained with.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq.models import layers


def _reference(x, scale, bias, groups, eps):
  """Two-pass GroupNorm in float64, as torch.nn.GroupNorm defines it."""
  x = np.asarray(x, np.float64)
  b, c = x.shape[0], x.shape[-1]
  g = x.reshape(b, -1, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
  return y * np.asarray(scale) + np.asarray(bias)


def _random_params(module, x, seed=1):
  params = module.init(jax.random.key(seed), x)
  return jax.tree.map(
      lambda a: a + 0.5 * jax.random.normal(jax.random.key(seed + 1), a.shape),
      params)


@pytest.mark.parametrize('shape', [(2, 8, 8, 64), (3, 16, 96), (1, 4, 4, 32)])
def test_group_norm_matches_two_pass_reference(shape):
  x = 3.0 * jax.random.normal(jax.random.key(0), shape) + 1.5
  module = layers.GroupNorm()
  params = _random_params(module, x)
  p = params['params']['GroupNorm_0']
  y = module.apply(params, x)
  assert y.dtype == jnp.float32 and y.shape == shape
  np.testing.assert_allclose(
      y, _reference(x, p['scale'], p['bias'], 32, 1e-6), rtol=1e-4, atol=1e-4)


def test_parameters_and_gradients_as_flax_group_norm():
  """Same tree as nn.GroupNorm kept (checkpoints, converter) and same grads."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 64)) * 2.0 - 0.5
  module = layers.GroupNorm()
  params = _random_params(module, x)
  assert jax.tree.map(jnp.shape, params) == {
      'params': {'GroupNorm_0': {'scale': (64,), 'bias': (64,)}}}
  flax_gn = nn.GroupNorm(num_groups=32, epsilon=1e-6)
  target = jax.random.normal(jax.random.key(5), x.shape)

  def loss(apply, p, x):
    return jnp.sum(jnp.sin(apply(p, x)) * target)

  ours = jax.grad(lambda p, x: loss(module.apply, p, x), (0, 1))(params, x)
  theirs = jax.grad(lambda p, x: loss(flax_gn.apply, p, x), (0, 1))(
      {'params': params['params']['GroupNorm_0']}, x)
  np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-4, atol=1e-5)
  for name in ('scale', 'bias'):
    np.testing.assert_allclose(ours[0]['params']['GroupNorm_0'][name],
                               theirs[0]['params'][name], rtol=1e-4, atol=1e-4)


def test_bf16_statistics_in_float32():
  """bf16 activations: statistics in float32, output in the asked dtype."""
  x = (100.0 + jax.random.normal(jax.random.key(0), (2, 8, 8, 32))).astype(
      jnp.bfloat16)
  module = layers.GroupNorm(dtype=jnp.bfloat16)
  params = module.init(jax.random.key(1), x)
  y = module.apply(params, x)
  assert y.dtype == jnp.bfloat16
  ref = _reference(np.asarray(x, np.float32), 1.0, 0.0, 32, 1e-6)
  # A bf16 mean of ~100 would be off by ~0.5 and wreck the unit variance.
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.05)
  assert layers.GroupNorm().apply(params, x).dtype == jnp.float32


def test_channels_not_divisible_by_groups():
  with pytest.raises(ValueError, match='divisible by num_groups'):
    layers.GroupNorm().init(jax.random.key(0), jnp.zeros((1, 4, 4, 48)))
