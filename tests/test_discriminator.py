"""Tests for the PatchGAN NLayerDiscriminator and its PyTorch-style BatchNorm.

The forward pass is checked against an independent NCHW numpy version of the
official `nn.Sequential`, using official-layout (O, I, H, W) weights mapped
through the documented key table, so shapes, padding, strides, BN semantics
and the importer mapping are all pinned down.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq.models.discriminator import NLayerDiscriminator, TorchBatchNorm
from dqvq.models.layers import count_params


def _np_conv(x, w, b, stride, pad):
  """NCHW cross-correlation, PyTorch Conv2d semantics, float64."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  k = w.shape[2]
  oh = (x.shape[2] - k) // stride + 1
  ow = (x.shape[3] - k) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], oh, ow))
  for i in range(k):
    for j in range(k):
      patch = x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
      out += np.einsum('nchw,oc->nohw', patch, w[:, :, i, j])
  return out if b is None else out + b[None, :, None, None]


def _np_bn_train(x, weight, bias, eps=1e-5):
  mean = x.mean(axis=(0, 2, 3), keepdims=True)
  var = x.var(axis=(0, 2, 3), keepdims=True)
  return ((x - mean) / np.sqrt(var + eps) * weight[None, :, None, None]
          + bias[None, :, None, None])


def _lrelu(x):
  return np.where(x > 0, x, 0.2 * x)


def _official_state_dict(ndf, rng):
  """Random tensors under the official names, ndf-scaled, n_layers=3."""
  sd = {}
  chans = [3, ndf, 2 * ndf, 4 * ndf, 8 * ndf]
  for idx, (cin, cout) in zip((0, 2, 5, 8), zip(chans, chans[1:])):
    sd[f'main.{idx}.weight'] = rng.normal(0, 0.2, (cout, cin, 4, 4))
  sd['main.0.bias'] = rng.normal(0, 0.1, (ndf,))
  for idx, c in ((3, 2 * ndf), (6, 4 * ndf), (9, 8 * ndf)):
    sd[f'main.{idx}.weight'] = rng.normal(1, 0.1, (c,))
    sd[f'main.{idx}.bias'] = rng.normal(0, 0.1, (c,))
  sd['main.11.weight'] = rng.normal(0, 0.2, (1, 8 * ndf, 4, 4))
  sd['main.11.bias'] = rng.normal(0, 0.1, (1,))
  return sd


def _to_flax(sd):
  """The mapping documented in the discriminator module docstring."""
  params = {}
  for idx in (0, 2, 5, 8, 11):
    conv = {'kernel': np.transpose(sd[f'main.{idx}.weight'], (2, 3, 1, 0))}
    if f'main.{idx}.bias' in sd:
      conv['bias'] = sd[f'main.{idx}.bias']
    params[f'main_{idx}'] = {'conv': conv}
  stats = {}
  for idx in (3, 6, 9):
    c = sd[f'main.{idx}.weight'].shape[0]
    params[f'main_{idx}'] = {'scale': sd[f'main.{idx}.weight'],
                             'bias': sd[f'main.{idx}.bias']}
    stats[f'main_{idx}'] = {'mean': np.zeros(c), 'var': np.ones(c)}
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  return {'params': f32(params), 'batch_stats': f32(stats)}


def _np_forward(sd, x_nchw):
  h = _lrelu(_np_conv(x_nchw, sd['main.0.weight'], sd['main.0.bias'], 2, 1))
  for conv, bn, stride in ((2, 3, 2), (5, 6, 2), (8, 9, 1)):
    h = _np_conv(h, sd[f'main.{conv}.weight'], None, stride, 1)
    h = _lrelu(_np_bn_train(h, sd[f'main.{bn}.weight'], sd[f'main.{bn}.bias']))
  return _np_conv(h, sd['main.11.weight'], sd['main.11.bias'], 1, 1)


def test_default_param_count_and_official_names():
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  disc = NLayerDiscriminator()
  variables = jax.eval_shape(
      lambda x: disc.init(jax.random.PRNGKey(0), x, train=False), x)
  assert count_params(variables['params']) == 2_765_633
  shapes = jax.tree.map(lambda s: s.shape, variables)
  assert shapes['params']['main_0']['conv'] == {'kernel': (4, 4, 3, 64),
                                                'bias': (64,)}
  assert shapes['params']['main_2']['conv'] == {'kernel': (4, 4, 64, 128)}
  assert shapes['params']['main_9'] == {'scale': (512,), 'bias': (512,)}
  assert shapes['params']['main_11']['conv']['kernel'] == (4, 4, 512, 1)
  assert set(shapes['batch_stats']) == {'main_3', 'main_6', 'main_9'}
  out, _ = jax.eval_shape(
      lambda v, x: disc.apply(v, x, train=True, mutable=['batch_stats']),
      variables, x)
  assert out.shape == (2, 30, 30, 1)


def test_matches_numpy_reference_in_train_mode():
  rng = np.random.default_rng(0)
  ndf = 4
  sd = _official_state_dict(ndf, rng)
  x = rng.uniform(-1, 1, (2, 3, 32, 32))
  want = _np_forward(sd, x)  # (2, 1, 2, 2)
  out, _ = NLayerDiscriminator(ndf=ndf).apply(
      _to_flax(sd), jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32),
      train=True, mutable=['batch_stats'])
  assert out.shape == (2, 2, 2, 1)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), want,
                             rtol=1e-4, atol=1e-4)


def test_official_weights_init():
  init = jax.jit(lambda k: NLayerDiscriminator().init(
      k, jnp.zeros((1, 64, 64, 3)), train=False))
  variables = init(jax.random.PRNGKey(0))
  p = variables['params']
  kernels = np.concatenate([np.ravel(p[f'main_{i}']['conv']['kernel'])
                            for i in (0, 2, 5, 8, 11)])
  assert abs(kernels.mean()) < 1e-3
  assert abs(kernels.std() - 0.02) < 1e-3
  scales = np.concatenate(
      [np.ravel(p[f'main_{i}']['scale']) for i in (3, 6, 9)])
  assert abs(scales.mean() - 1.0) < 3e-3 and abs(scales.std() - 0.02) < 3e-3
  for i in (3, 6, 9):
    assert not np.any(p[f'main_{i}']['bias'])
  # Conv biases keep PyTorch's default U(+-1/sqrt(fan_in)), fan_in 3*4*4.
  bias0 = np.asarray(p['main_0']['conv']['bias'])
  assert np.all(np.abs(bias0) <= 1 / np.sqrt(48)) and bias0.std() > 0.05
  stats = variables['batch_stats']['main_3']
  assert np.all(stats['mean'] == 0) and np.all(stats['var'] == 1)


def test_batchnorm_matches_pytorch_update_and_eval():
  rng = np.random.default_rng(1)
  x = rng.normal(2.0, 3.0, (4, 3, 3, 5)).astype(np.float32)
  bn = TorchBatchNorm()
  variables = {'params': {'scale': jnp.full((5,), 1.5),
                          'bias': jnp.full((5,), 0.25)},
               'batch_stats': {'mean': jnp.full((5,), 0.5),
                               'var': jnp.full((5,), 2.0)}}
  y, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  np.testing.assert_allclose(
      y, (x - mean) / np.sqrt(var + 1e-5) * 1.5 + 0.25, rtol=1e-4, atol=1e-4)
  n = 4 * 3 * 3
  new = updates['batch_stats']
  np.testing.assert_allclose(new['mean'], 0.9 * 0.5 + 0.1 * mean, rtol=1e-5)
  # PyTorch folds the UNBIASED variance into the running average.
  np.testing.assert_allclose(new['var'], 0.9 * 2.0 + 0.1 * var * n / (n - 1),
                             rtol=1e-5)
  y_eval = bn.apply(variables, x, train=False)
  np.testing.assert_allclose(
      y_eval, (x - 0.5) / np.sqrt(2.0 + 1e-5) * 1.5 + 0.25, rtol=1e-5)


def test_train_mode_needs_mutable_batch_stats_and_right_channels():
  disc = NLayerDiscriminator(ndf=2, n_layers=1)
  x = jnp.zeros((2, 16, 16, 3))
  variables = jax.jit(lambda k: disc.init(k, x, train=False))(
      jax.random.PRNGKey(0))
  with pytest.raises(Exception, match='batch_stats'):
    disc.apply(variables, x, train=True)  # Running stats would be dropped.
  with pytest.raises(ValueError, match='3 input channels'):
    disc.apply(variables, jnp.zeros((2, 16, 16, 1)), train=False)
  out = disc.apply(variables, x, train=False)
  assert out.shape == (2, 6, 6, 1)  # n_layers=1: 16 -> 8 -> 7 -> 6.
