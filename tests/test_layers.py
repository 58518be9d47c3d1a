"""Layers computed their own way must still be the textbook layer.

GroupNorm: `layers.group_norm` sums per channel first, then per group
(faster on XLA:CPU); it must give PyTorch's statistics with Flax's parameter
names and gradients. Upsample: one 2x2 conv per output phase at the input's
resolution; it must equal nearest upsampling then a 3x3 conv, values and
gradients, with an ordinary Conv's parameters. AttnBlock: the einsums
written out must be the official single-head attention.
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


class _UpsampleThenConv(nn.Module):
  """The plain computation: jnp.repeat x2, then the 3x3 Conv."""

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return layers.Conv(x.shape[-1], 3, name='conv')(x)


@pytest.mark.parametrize('shape', [(2, 5, 7, 8), (1, 1, 1, 4), (1, 6, 4, 16)])
def test_upsample_equals_nearest_upsample_then_conv(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  ours, plain = layers.Upsample(), _UpsampleThenConv()
  params = ours.init(jax.random.key(3), x)
  # The same parameter tree and initial values as the plain Conv.
  plain_init = plain.init(jax.random.key(3), x)
  assert (jax.tree.map(jnp.shape, params) ==
          jax.tree.map(jnp.shape, plain_init))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain_init)):
    np.testing.assert_array_equal(a, b)
  params = _random_params(ours, x)
  y = ours.apply(params, x)
  assert y.shape == (shape[0], 2 * shape[1], 2 * shape[2], shape[3])
  np.testing.assert_allclose(y, plain.apply(params, x), rtol=1e-5, atol=1e-5)

  ct = jax.random.normal(jax.random.key(4), y.shape)
  grads = [jax.vjp(m.apply, params, x)[1](ct) for m in (ours, plain)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_upsample_bf16_compute():
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 8))
  params = _random_params(layers.Upsample(), x)
  y = layers.Upsample(dtype=jnp.bfloat16).apply(params, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             _UpsampleThenConv().apply(params, x),
                             rtol=0.05, atol=0.05)


def test_attention_block_is_single_head_softmax_attention():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 32))
  block = layers.AttnBlock()
  params = _random_params(block, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params['params'])
  xs = np.asarray(x, np.float64)
  mean = xs.reshape(2, -1, 32, 1).mean(axis=(1, 3), keepdims=True)
  var = xs.reshape(2, -1, 32, 1).var(axis=(1, 3), keepdims=True)
  gn = p['norm']['GroupNorm_0']
  hn = ((xs.reshape(2, -1, 32, 1) - mean) / np.sqrt(var + 1e-6)).reshape(
      2, 12, 32) * gn['scale'] + gn['bias']
  dense = lambda n, a: a @ p[n]['linear']['kernel'] + p[n]['linear']['bias']
  q, k, v = (dense(n, hn) for n in ('q', 'k', 'v'))
  s = q @ k.transpose(0, 2, 1) / np.sqrt(32)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  expected = xs + dense('proj_out', w @ v).reshape(x.shape)
  np.testing.assert_allclose(block.apply(params, x), expected, rtol=1e-4,
                             atol=1e-4)
