"""Tests for the region entropy, percentile tables and grain assignment."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq.models import entropy as E

F32_TINY = float(np.finfo(np.float32).tiny)


def official_entropy_f64(images, region_size, num_bins=32, bin_range=(-1, 1),
                         sigma=0.01):
  """The official `Entropy.entropy` formula in float64, eps = 1e-40 as written.

  The gray image is formed in float32 like the official code (a flat region
  next to a bin has an entropy that is sensitive to its last bit); float32
  underflow of the kernel (below the smallest float32 denormal) is emulated
  so that all-underflow regions give the official floor.
  """
  x = np.asarray(images, np.float32)
  w = [np.float32(c) for c in (0.2989, 0.5870, 0.1140)]
  gray = (w[0] * x[..., 0] + w[1] * x[..., 1] + w[2] * x[..., 2])
  gray = gray.astype(np.float64)
  b, h, w = gray.shape
  r = region_size
  v = gray.reshape(b, h // r, r, w // r, r).transpose(0, 1, 3, 2, 4)
  v = v.reshape(b, h // r, w // r, r * r)
  bins = np.linspace(*bin_range, num_bins)
  k = np.exp(-0.5 * ((v[..., None] - bins) / sigma)**2)
  k = np.where(k < 2.0**-150, 0.0, k)
  eps = 1e-40
  pdf = k.mean(axis=-2)
  pdf = pdf / (pdf.sum(-1, keepdims=True) + eps) + eps
  return -np.sum(pdf * np.log(pdf), axis=-1), k


def gray_image(values, region_size):
  """RGB image whose gray value per region is given by a (gh, gw) array."""
  v = np.kron(np.asarray(values, np.float32),
              np.ones((region_size, region_size), np.float32))
  return np.repeat(v[None, :, :, None], 3, axis=-1)


def test_flat_below_noisy_and_finite():
  rng = np.random.RandomState(0)
  flat = np.full((1, 8, 8, 3), 0.3, np.float32)
  noisy = rng.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
  for bins in [(-1.0, 1.0), (0.0, 1.0)]:
    h_flat = E.region_entropy(flat, 8, bin_range=bins)
    h_noisy = E.region_entropy(noisy, 8, bin_range=bins)
    assert h_flat.shape == (1, 1, 1) and h_flat.dtype == jnp.float32
    assert float(h_flat[0, 0, 0]) + 1.0 < float(h_noisy[0, 0, 0])
    assert np.all(np.isfinite(h_flat)) and np.all(np.isfinite(h_noisy))


def test_dark_regions_give_official_floor():
  # Gray -0.5 is > 0.144 from every bin of linspace(0, 1): all kernels are 0.
  dark = gray_image([[-0.5, -1.0]], 8)
  h = np.asarray(E.region_entropy(dark, 8, bin_range=(0.0, 1.0)))
  assert np.all(np.isfinite(h))
  # Bit-identical to the floor stored in the official ImageNet/FFHQ JSONs.
  assert h[0, 0, 0] == h[0, 0, 1] == np.float32(2.947292990206026e-37)
  assert E.official_floor_entropy(32) == 2.947292990206026e-37
  # A float64 constant would sit above the stored threshold: H <= T would fail.
  assert np.float32(32 * 1e-40 * math.log(1e40)) > np.float32(h[0, 0, 0])
  grains = E.assign_grains_by_entropy(h, [2.947292990206026e-37])
  np.testing.assert_array_equal(grains, 0)
  # With bins [-1, 1] the same image is never at the floor (flat regions
  # next to a bin have a small but real entropy).
  h2 = np.asarray(E.region_entropy(dark, 8, bin_range=(-1.0, 1.0)))
  assert np.all(np.isfinite(h2)) and np.all(h2 > 1e-20)


@pytest.mark.parametrize('bins', [(-1.0, 1.0), (0.0, 1.0)])
def test_matches_official_formula(bins):
  rng = np.random.RandomState(1)
  x = rng.uniform(-1, 1, (3, 16, 24, 3)).astype(np.float32)
  x[0, :4, :4] = -0.6  # a floor region for bins (0, 1)
  x[1, 4:8, :4] = 0.25  # a flat region
  ref, k = official_entropy_f64(x, 4, bin_range=bins)
  got = np.asarray(E.region_entropy(x, 4, bin_range=bins))
  assert got.shape == (3, 4, 6)
  # Nearly every region has some denormal kernel values (a pixel 13-14 sigma
  # from some bin); flushing them is invisible unless the region's normal
  # kernel mass is itself tiny, the flush case tested separately.
  assert np.mean(np.any((k > 0) & (k < F32_TINY), axis=(-1, -2))) > 0.5
  normal_mass = np.where(k >= F32_TINY, k, 0).sum(axis=(-1, -2))
  flush_case = (normal_mass > 0) & (normal_mass < 1e-30)
  assert flush_case.sum() <= 1
  np.testing.assert_allclose(got[~flush_case], ref[~flush_case], rtol=1e-5,
                             atol=1e-35)
  if bins == (0.0, 1.0):
    assert got[0, 0, 0] == np.float32(E.official_floor_entropy(32))


def test_denormal_kernels_are_flushed():
  # Gray -0.135: the kernel of bin 0 (of linspace(0, 1)) is exp(-91), a float32
  # denormal that CPUs keep and accelerators flush. Output must not depend on it.
  g = np.float32(-0.135 * sum(E.GRAY_WEIGHTS))
  log_k = -0.5 * (float(g) / 0.01)**2
  assert 0 < np.exp(np.float32(log_k)) < F32_TINY  # really denormal on CPU
  flush_only = gray_image([[-0.135]], 4)
  h = np.asarray(E.region_entropy(flush_only, 4, bin_range=(0.0, 1.0)))
  assert h[0, 0, 0] == np.float32(E.official_floor_entropy(32))
  # Mixed region: moving the "denormal" pixels to -1 (kernel exactly 0) must
  # not change the output at all.
  rng = np.random.RandomState(2)
  base = rng.uniform(0.2, 0.8, (1, 4, 4, 3)).astype(np.float32)
  mask = np.zeros((1, 4, 4, 1), bool)
  mask[0, ::2, ::2] = True
  a = np.where(mask, np.float32(-0.135), base)
  b = np.where(mask, np.float32(-1.0), base)
  ha = E.region_entropy(a, 4, bin_range=(0.0, 1.0))
  hb = E.region_entropy(b, 4, bin_range=(0.0, 1.0))
  np.testing.assert_array_equal(ha, hb)


def test_row_major_region_order():
  rng = np.random.RandomState(3)
  x = np.full((2, 12, 16, 3), 0.1, np.float32)
  x[:, 4:8, 8:12] = rng.uniform(-1, 1, (2, 4, 4, 3))
  h = np.asarray(E.region_entropy(x, 4))
  assert h.shape == (2, 3, 4)
  for i in range(2):
    assert np.unravel_index(np.argmax(h[i]), h[i].shape) == (1, 2)


def test_jit_chunking_and_no_gradient():
  rng = np.random.RandomState(4)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.bfloat16)
  f = jax.jit(lambda im: E.region_entropy(im, 4, num_bins=7))
  h = f(x)
  # Jitted (fused) and eager float32 log/exp agree to a few ulps (1e-5
  # relative seen with the suite's XLA flags), not bit for bit.
  np.testing.assert_allclose(
      h, E.region_entropy(x, 4, num_bins=7, bins_per_step=None), rtol=3e-5)
  np.testing.assert_allclose(
      h, E.region_entropy(x, 4, num_bins=7, bins_per_step=3), rtol=3e-5)
  grad = jax.grad(lambda im: E.region_entropy(im, 4).sum())(
      x.astype(jnp.float32))
  assert np.all(np.asarray(grad) == 0)
  with pytest.raises(ValueError, match='multiple of region_size'):
    E.region_entropy(x, 3)


def test_percentile_table_matches_direct_computation():
  rng = np.random.RandomState(5)
  ent = rng.gamma(2.0, 1.0, size=(7, 9, 11)).astype(np.float32)
  table = E.compute_entropy_thresholds(ent)
  assert list(table) == [str(k) for k in range(1, 100)]
  s = np.sort(ent.reshape(-1))
  for k in (1, 37, 50, 99):
    assert table[str(k)] == float(s[int(s.size * k // 100)])
  vals = list(table.values())
  assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_threshold_for_ratio_rounding_and_interpolation():
  table = {str(k): float(k) / 10 for k in range(1, 100)}
  assert int(100 - 100 * 0.55) == 44  # the official off-by-one
  assert E.threshold_for_ratio(table, 0.55) == table['45']
  assert E.threshold_for_ratio(table, 0.56) == table['44']
  assert E.threshold_for_ratio(table, 0.5) == table['50']
  assert E.threshold_for_ratio(table, 0.555) == pytest.approx(4.45)
  assert E.threshold_for_ratio(table, 0.99) == table['1']
  for bad in (0.0, 1.0, 0.995, 0.005, float('nan')):
    with pytest.raises(ValueError, match='0.01 to 0.99'):
      E.threshold_for_ratio(table, bad)


def test_thresholds_for_ratios_and_grain_shares():
  rng = np.random.RandomState(6)
  ent = rng.uniform(0, 4, size=(64, 16, 16)).astype(np.float32)
  table = E.compute_entropy_thresholds(ent)
  t = E.thresholds_for_ratios(table, [0.5, 0.3, 0.2])
  assert len(t) == 2 and t[0] < t[1]
  assert t[0] == E.threshold_for_ratio(table, 0.5)
  assert t[1] == E.threshold_for_ratio(table, 0.2)
  grains = np.asarray(E.assign_grains_by_entropy(ent, t))
  assert grains.dtype == np.int32
  shares = np.bincount(grains.reshape(-1), minlength=3) / grains.size
  np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], atol=0.01)
  with pytest.raises(ValueError, match='sum to 1'):
    E.thresholds_for_ratios(table, [0.5, 0.3, 0.3])
  with pytest.raises(ValueError, match='non-decreasing'):
    E.assign_grains_by_entropy(ent, [2.0, 1.0])


def test_grain_ties_go_coarse():
  h = jnp.asarray([[[1.0, 2.0, 2.5, 3.0]]])
  np.testing.assert_array_equal(
      E.assign_grains_by_entropy(h, [2.0, 2.5]), [[[0, 0, 1, 2]]])
  f = jax.jit(E.assign_grains_by_entropy)
  np.testing.assert_array_equal(f(h, jnp.asarray([2.0])), [[[0, 0, 1, 1]]])


def test_quota_exact_counts_per_image():
  rng = np.random.RandomState(7)
  ent = rng.uniform(0, 4, size=(5, 6, 6)).astype(np.float32)
  ent[1] = 1.0  # all ties: resolved by region index
  grains = np.asarray(E.assign_grains_by_quota(ent, [0.25, 0.25, 0.5]))
  for i in range(5):
    counts = np.bincount(grains[i].reshape(-1), minlength=3)
    np.testing.assert_array_equal(counts, [9, 9, 18])
    # Finer grains hold higher entropies.
    assert ent[i][grains[i] == 2].min() >= ent[i][grains[i] == 1].max()
  np.testing.assert_array_equal(grains[1].reshape(-1)[:18], 2)
  g2 = np.asarray(E.assign_grains_by_quota(ent, (0.45, 0.55)))
  assert np.all(g2.reshape(5, -1).sum(-1) == round(36 * 0.55))
  with pytest.raises(ValueError, match='sum to 1'):
    E.assign_grains_by_quota(ent, [0.6, 0.6])


def test_save_load_roundtrip_and_official_json(tmp_path):
  table = {str(k): float(k) for k in range(1, 100)}
  meta = dict(bin_range=[-1.0, 1.0], num_bins=32, sigma=0.01, region_size=16,
              resolution=256, dataset='x', split='train', num_images=3)
  path = tmp_path / 'sub' / 't.json'
  E.save_thresholds(str(path), table, meta)
  assert json.loads(path.read_text())['50'] == 50.0  # official layout
  loaded, loaded_meta = E.load_thresholds(str(path))
  assert loaded == table and loaded_meta == meta
  official = tmp_path / 'official.json'
  official.write_text(json.dumps({str(k): k / 2 for k in range(1, 100)}))
  loaded, loaded_meta = E.load_thresholds(str(official))
  assert loaded_meta is None and loaded['50'] == 25.0
  with pytest.raises(ValueError, match='metadata lacks'):
    E.save_thresholds(str(path), table, {'num_bins': 32})
  official.write_text(json.dumps({str(k): -k for k in range(1, 100)}))
  with pytest.raises(ValueError, match='non-decreasing'):
    E.load_thresholds(str(official))
