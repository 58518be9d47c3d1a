"""Tests for the LPIPS module and its weight loading contract.

Weights here are random ('random' or numpy-drawn); that LPIPS with converted
real-layout weights computes the official formula is tested in
test_convert_lpips.py against a numpy reimplementation.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dqvq.models.layers import count_params
from dqvq.models import perceptual


@pytest.fixture(scope='module')
def params():
  return perceptual.load_lpips_params('random', seed=0)


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  x1 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1).astype(np.float32)
  return jnp.asarray(x0), jnp.asarray(x1)


_apply = jax.jit(perceptual.LPIPS().apply)


def test_param_count_and_tree():
  abstract = perceptual.abstract_lpips_params()
  assert count_params(abstract) == 14_716_160
  assert count_params(abstract['net']) == 14_714_688
  assert sorted(abstract) == ['lin0', 'lin1', 'lin2', 'lin3', 'lin4', 'net']
  assert abstract['net']['features_28']['conv']['kernel'].shape == (3, 3, 512,
                                                                    512)
  assert abstract['lin1']['conv'] == {
      'kernel': jax.ShapeDtypeStruct((1, 1, 128, 1), jnp.float32)}


def test_random_params_warn_and_match_tree(params, caplog):
  with caplog.at_level(logging.WARNING):
    again = perceptual.load_lpips_params('random', seed=0)
  assert 'RANDOMLY' in caplog.text
  perceptual.check_lpips_params(again, where='test')  # Raises on mismatch.
  np.testing.assert_array_equal(again['lin0']['conv']['kernel'],
                                params['lin0']['conv']['kernel'])
  for k in range(5):  # Trained LPIPS heads are non-negative; so are these.
    assert np.all(np.asarray(params[f'lin{k}']['conv']['kernel']) >= 0)
  kernel = np.asarray(params['net']['features_2']['conv']['kernel'])
  assert np.abs(kernel).max() <= 1 / np.sqrt(9 * 64)


def test_distance_properties(params, images):
  x0, x1 = images
  d01 = _apply({'params': params}, x0, x1)
  d10 = _apply({'params': params}, x1, x0)
  d00 = _apply({'params': params}, x0, x0)
  assert d01.shape == (2,) and d01.dtype == jnp.float32
  assert np.all(np.asarray(d01) > 1e-4)
  np.testing.assert_allclose(d01, d10, rtol=1e-5)
  np.testing.assert_allclose(d00, 0.0, atol=1e-7)


def test_gradient_reaches_the_reconstruction(params, images):
  x0, x1 = images
  grad_fn = jax.jit(jax.grad(
      lambda x, p: perceptual.LPIPS().apply({'params': p}, x0, x).sum()))
  g = np.asarray(grad_fn(x1, params))
  assert np.all(np.isfinite(g))
  assert np.abs(g).sum() > 0


def test_normalize_channels_is_safe_at_zero():
  x = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0, 0]))
  y = perceptual.normalize_channels(x)
  np.testing.assert_allclose(y[0, 0, 0], [0.6, 0.8, 0, 0], rtol=1e-6)
  g = jax.grad(lambda x: perceptual.normalize_channels(x).sum())(x)
  assert np.all(np.isfinite(np.asarray(g)))


def test_dropout_only_in_train_mode(params, images):
  x0, x1 = images
  v = {'params': params}
  base = _apply(v, x0, x1)
  drop = perceptual.LPIPS(dropout=0.5)
  evaluated = jax.jit(lambda v, a, b: drop.apply(v, a, b, train=False))
  np.testing.assert_allclose(evaluated(v, x0, x1), base, rtol=1e-5)
  trained = jax.jit(lambda v, a, b, k: drop.apply(
      v, a, b, train=True, rngs={'dropout': k}))
  d1 = trained(v, x0, x1, jax.random.PRNGKey(1))
  d2 = trained(v, x0, x1, jax.random.PRNGKey(2))
  assert not np.allclose(d1, base, rtol=1e-3)
  assert not np.allclose(d1, d2, rtol=1e-3)


def test_rejects_bad_inputs(params):
  v = {'params': params}
  with pytest.raises(ValueError, match='at least 16x16'):
    perceptual.LPIPS().apply(v, jnp.zeros((1, 8, 8, 3)),
                             jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match='equal shape'):
    perceptual.LPIPS().apply(v, jnp.zeros((1, 16, 16, 3)),
                             jnp.zeros((2, 16, 16, 3)))


def test_missing_or_unset_path_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r'python -m dqvq\.convert lpips --vgg16'):
    perceptual.load_lpips_params(str(tmp_path / 'nope'))
  with pytest.raises(ValueError, match="'random'"):
    perceptual.load_lpips_params(None)
  a_file = tmp_path / 'vgg.pth'
  a_file.write_bytes(b'x')
  with pytest.raises(ValueError, match='Orbax checkpoint directory'):
    perceptual.load_lpips_params(str(a_file))


def test_orbax_round_trip_and_mismatch(params, tmp_path):
  path = tmp_path / 'lpips'
  perceptual.save_lpips_params(params, path)
  loaded = perceptual.load_lpips_params(str(path))
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # A checkpoint with a wrongly shaped head and a missing one is rejected.
  bad = jax.tree.map(np.asarray, params)
  bad['lin0'] = {'conv': {'kernel': np.ones((1, 1, 32, 1), np.float32)}}
  del bad['lin4']
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(tmp_path / 'bad'), bad)
  with pytest.raises(ValueError, match=r"missing \['lin4'\].*'lin0'.*shape"):
    perceptual.load_lpips_params(str(tmp_path / 'bad'))
