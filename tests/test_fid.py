"""Tests for FID / IS statistics and the reference-statistics cache.

The references here are written independently: FID through the symmetric
form Tr sqrt(S1^1/2 S2 S1^1/2) with eigh (not sqrtm of the product), and IS
as the textbook mean KL(p(y|x) || p(y)).
"""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from dqvq.eval import fid
from dqvq import sharding


def _psd_sqrt(a):
  w, v = np.linalg.eigh(a)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _reference_fid(x1, x2):
  mu1, mu2 = x1.mean(0), x2.mean(0)
  s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
  r = _psd_sqrt(s1)
  cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)))
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross


def _stats(x):
  s = fid.FeatureStats()
  s.update(x)
  return s.mean_cov()


@pytest.fixture(scope='module')
def features():
  rng = np.random.default_rng(0)
  mix = rng.normal(size=(16, 16))
  return np.abs(rng.normal(size=(400, 16)) @ mix)  # Correlated, >= 0.


def test_fid_matches_independent_scipy_numpy(features):
  rng = np.random.default_rng(1)
  other = features[:300] * 1.3 + rng.normal(0.5, 0.7, (300, 16))
  got = fid.frechet_distance(*_stats(features), *_stats(other))
  want = _reference_fid(features, other)
  assert want > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-6)
  a = fid.FeatureStats()
  a.update(features)
  b = fid.FeatureStats()
  b.update(other)
  assert a.to_reference('a').frechet_distance(b.to_reference('b')) == got


def test_fid_is_zero_on_itself_and_grows_with_noise(features):
  mu, cov = _stats(features)
  scale = np.trace(cov)
  assert abs(fid.frechet_distance(mu, cov, mu, cov)) < 1e-6 * scale
  rng = np.random.default_rng(2)
  noise = rng.normal(size=features.shape)
  values = [fid.frechet_distance(mu, cov, *_stats(features + s * noise))
            for s in (0.0, 0.3, 1.0, 3.0, 10.0)]
  assert abs(values[0]) < 1e-6 * scale
  assert all(a < b for a, b in zip(values, values[1:])), values


def test_singular_and_imaginary_cases(caplog, monkeypatch):
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(8, 32)), rng.normal(size=(8, 32))  # N < D.
  (mu1, s1), (mu2, s2) = _stats(x), _stats(y)
  value = fid.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(value) and value > 0
  np.testing.assert_allclose(value, _reference_fid(x, y), rtol=1e-3)
  # Older SciPy returns NaN/inf for singular products: then retry with eps I.
  real_sqrtm, seen = scipy.linalg.sqrtm, []

  def flaky_sqrtm(a):
    seen.append(a)
    return np.full(a.shape, np.inf) if len(seen) == 1 else real_sqrtm(a)

  monkeypatch.setattr(scipy.linalg, 'sqrtm', flaky_sqrtm)
  with caplog.at_level(logging.WARNING):
    retried = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
  assert len(seen) == 2 and 'singular' in caplog.text
  eye = np.eye(32) * 1e-6
  np.testing.assert_allclose(seen[1], (s1 + eye) @ (s2 + eye))
  np.testing.assert_allclose(retried, value, rtol=1e-4)
  monkeypatch.undo()
  # Not covariances: sqrt(diag(-1, 1)) is imaginary, which must not be hidden.
  with pytest.raises(ValueError, match='imaginary'):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, 1.0]), np.zeros(2),
                         np.diag([-1.0, 1.0]))
  with pytest.raises(ValueError, match='same features'):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_stream_equals_np_cov(features):
  s = fid.FeatureStats()
  for lo, hi in ((0, 7), (7, 250), (250, 400)):  # Unequal batches.
    s.update(jnp.asarray(features[lo:hi], jnp.float32))
  mean, cov = s.mean_cov()
  f32 = features.astype(np.float32).astype(np.float64)
  assert s.count == 400 and mean.dtype == np.float64
  np.testing.assert_allclose(mean, f32.mean(0), rtol=1e-12)
  np.testing.assert_allclose(cov, np.cov(f32, rowvar=False), rtol=1e-9,
                             atol=1e-9)
  with pytest.raises(ValueError, match='16'):
    s.update(np.zeros((2, 8)))
  with pytest.raises(ValueError, match='NaN'):
    s.update(np.full((2, 16), np.nan))
  with pytest.raises(ValueError, match='at least 2'):
    fid.FeatureStats().mean_cov()


def test_inception_score():
  n, c = 1000, 1008
  mean, std = fid.inception_score(np.zeros((n, c)), splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12) and std < 1e-12
  onehot = 50.0 * np.eye(c)[np.arange(n) % 10]  # Confident, 10 classes used.
  mean, std = fid.inception_score(onehot, splits=10)
  assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6
  # Confident only in the graph's 8 extra classes: 1 when they are excluded.
  extra = 50.0 * np.eye(c)[1000 + np.arange(n) % 8]
  assert fid.inception_score(extra, splits=1)[0] == pytest.approx(8.0)
  assert fid.inception_score(extra, splits=1, num_classes=1000)[0] == (
      pytest.approx(1.0))
  logits = np.random.default_rng(4).normal(0, 3, (200, 20))
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  want = [np.exp(np.mean(np.sum(q * np.log(q / q.mean(0)), 1)))
          for q in (p[:100], p[100:])]
  got = fid.inception_score(logits, splits=2)
  np.testing.assert_allclose(got, (np.mean(want), np.std(want)), rtol=1e-10)
  with pytest.raises(ValueError, match='splits'):
    fid.inception_score(logits[:5], splits=10)


def test_inception_score_stats_stream_equals_inception_score():
  """Uneven batches across uneven splits give `inception_score`'s figures."""
  rng = np.random.default_rng(5)
  logits = rng.normal(0, 3, (203, 30))  # 203 = 7 splits of 29, 10 of 20.3
  logits[:40, 3] = 800.0  # p(y|x) of 0 in every other class: empty columns
  for splits, num_classes in ((10, None), (7, None), (1, 12)):
    s = fid.InceptionScoreStats(len(logits), splits, num_classes)
    for lo, hi in ((0, 1), (1, 17), (17, 150), (150, 203)):
      s.update(logits[lo:hi])
    np.testing.assert_allclose(
        s.result(), fid.inception_score(logits, splits, num_classes),
        rtol=1e-12, atol=1e-12)
  with pytest.raises(ValueError, match='splits'):
    fid.InceptionScoreStats(5, splits=10)
  s = fid.InceptionScoreStats(4, splits=2)
  s.update(logits[:3])
  with pytest.raises(ValueError, match='3 were added'):
    s.result()
  with pytest.raises(ValueError, match='5 logits rows'):
    s.update(logits[:2])


def test_reference_stats_cache(tmp_path, features):
  calls = []

  def compute(x):
    def fn():
      calls.append(1)
      s = fid.FeatureStats()
      s.update(x)
      return s
    return fn

  h1 = fid.make_source_hash(dataset='demo', split='train', size=64)
  assert h1 == fid.make_source_hash(size=64, split='train', dataset='demo')
  h2 = fid.make_source_hash(dataset='demo', split='train', size=128)
  assert h1 != h2
  first = fid.cached_reference_stats(tmp_path / 'c', h1, compute(features))
  again = fid.cached_reference_stats(tmp_path / 'c', h1,
                                     compute(features * 0))
  assert len(calls) == 1 and again.source_hash == h1 and again.count == 400
  np.testing.assert_array_equal(again.cov, first.cov)
  np.testing.assert_allclose(again.mean, features.mean(0))
  changed = fid.cached_reference_stats(tmp_path / 'c', h2,
                                       compute(features[:100]))
  assert len(calls) == 2 and changed.count == 100
  assert fid.ReferenceStats.load(tmp_path / 'c' / 'fid_reference_stats.npz'
                                 ).source_hash == h2
  (tmp_path / 'c' / 'fid_reference_stats.npz').write_bytes(b'garbage')
  fid.cached_reference_stats(tmp_path / 'c', h2, compute(features))
  assert len(calls) == 3
  np.savez(tmp_path / 'other.npz', mean=np.zeros(2))
  with pytest.raises(ValueError, match='missing'):
    fid.ReferenceStats.load(tmp_path / 'other.npz')
  with pytest.raises(TypeError, match='FeatureStats'):
    fid.cached_reference_stats(tmp_path / 'd', h1, lambda: features)


class _FakeInception(nn.Module):
  """Same output contract as FIDInception, tiny: for make_feature_fn only."""

  @nn.compact
  def __call__(self, images):
    pool = nn.Dense(4, name='proj')(images.reshape(images.shape[0], -1))
    return {'pool': pool, 'logits': pool * 2 + 1, 'logits_unbiased': pool * 2}


def test_make_feature_fn_shards_the_batch(num_devices):
  model = _FakeInception()
  x = np.random.default_rng(5).uniform(-1, 1, (num_devices, 4, 4, 3))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  want = model.apply({'params': params}, x)
  mesh = sharding.create_mesh()
  pool, logits = fid.make_feature_fn(model, params, mesh=mesh)(x)
  assert pool.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
  # float32 summation order differs per device layout and CPU (an element
  # of -2.5e-3 moved by 4e-8 on an AVX-512 machine): relative plus absolute.
  np.testing.assert_allclose(pool, want['pool'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, want['logits_unbiased'], rtol=1e-5,
                             atol=1e-6)
  _, biased = fid.make_feature_fn(model, params, logits_key='logits')(x)
  np.testing.assert_allclose(biased, want['logits'], rtol=1e-6)
  with pytest.raises(ValueError, match='pad it'):
    fid.make_feature_fn(model, params, mesh=mesh)(x[:3])
  with pytest.raises(ValueError, match='logits_key'):
    fid.make_feature_fn(model, params, logits_key='probs')
