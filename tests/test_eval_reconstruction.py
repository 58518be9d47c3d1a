"""Reconstruction metrics against scikit-image, and the split reduction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data as skdata
from skimage import metrics as skmetrics

from dqvq.eval import reconstruction as rec
from dqvq.models import perceptual
from dqvq import visualize


def _sk_ssim(a, b, data_range):
  return skmetrics.structural_similarity(
      np.asarray(a, np.float64), np.asarray(b, np.float64), channel_axis=-1,
      data_range=data_range, gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False)


def _sk_psnr(a, b, data_range):
  return skmetrics.peak_signal_noise_ratio(
      np.asarray(a, np.float64), np.asarray(b, np.float64),
      data_range=data_range)


def _random_pair(seed, shape=(3, 24, 29, 3), noise=0.2):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, shape).astype(np.float32)
  # Some values overshoot [-1, 1], as decoder outputs do.
  y = (x + rng.normal(0, noise, shape)).astype(np.float32)
  return x, y


def _astronaut_pairs(seed, size=48, count=3):
  """Noisy crops of a real photograph, in [-1, 1]."""
  rng = np.random.default_rng(seed)
  img = skdata.astronaut().astype(np.float32) / 127.5 - 1.0
  xs = []
  for _ in range(count):
    top, left = rng.integers(0, img.shape[0] - size, 2)
    xs.append(img[top:top + size, left:left + size])
  x = np.stack(xs)
  y = np.clip(x + rng.normal(0, 0.05, x.shape), -1.3, 1.3).astype(np.float32)
  return x, y


@pytest.mark.parametrize('pair', ['random', 'astronaut'])
def test_quantized_metrics_match_skimage_on_saved_pngs(pair):
  x, y = _random_pair(0) if pair == 'random' else _astronaut_pairs(1)
  # quantize=True must equal scikit-image run on the uint8 PNG content.
  xu, yu = visualize.to_uint8(x), visualize.to_uint8(y)
  ours_psnr = np.asarray(rec.psnr(x, y))
  ours_ssim = np.asarray(rec.ssim(x, y))
  for i in range(x.shape[0]):
    np.testing.assert_allclose(ours_psnr[i], _sk_psnr(xu[i], yu[i], 255),
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours_ssim[i], _sk_ssim(xu[i], yu[i], 255),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize('pair', ['random', 'astronaut'])
def test_float_metrics_match_skimage_on_unit_range(pair):
  x, y = _random_pair(2) if pair == 'random' else _astronaut_pairs(3)
  xf = (np.clip(x, -1, 1) + 1) / 2
  yf = (np.clip(y, -1, 1) + 1) / 2
  ours_psnr = np.asarray(rec.psnr(x, y, quantize=False))
  ours_ssim = np.asarray(rec.ssim(x, y, quantize=False))
  for i in range(x.shape[0]):
    np.testing.assert_allclose(ours_psnr[i], _sk_psnr(xf[i], yf[i], 1.0),
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours_ssim[i], _sk_ssim(xf[i], yf[i], 1.0),
                               rtol=0, atol=1e-4)


def test_core_functions_take_any_data_range():
  rng = np.random.default_rng(4)
  a = rng.uniform(0, 7, (2, 17, 13, 2)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.8, a.shape), 0, 7).astype(np.float32)
  ssim = np.asarray(rec.structural_similarity(a, b, 7.0))
  psnr = np.asarray(rec.peak_signal_noise_ratio(a, b, 7.0))
  for i in range(2):
    np.testing.assert_allclose(ssim[i], _sk_ssim(a[i], b[i], 7.0), atol=1e-4)
    np.testing.assert_allclose(psnr[i], _sk_psnr(a[i], b[i], 7.0), atol=1e-4)
  # A different data_range changes SSIM's constants, hence the value.
  assert abs(float(rec.structural_similarity(a, b, 70.0)[0]) - ssim[0]) > 1e-3


def test_identical_and_clipped_images():
  x, y = _astronaut_pairs(5, count=2)
  assert np.all(np.isinf(np.asarray(rec.psnr(x, x))))
  np.testing.assert_allclose(np.asarray(rec.ssim(x, x)), 1.0, atol=1e-6)
  flat = np.full((1, 16, 16, 3), 0.3, np.float32)  # constant image
  np.testing.assert_allclose(np.asarray(rec.ssim(flat, flat)), 1.0, atol=1e-6)
  # Overshoot beyond [-1, 1] is clipped, as in a saved reconstruction.
  over = np.where(x > 0.9, 1.7, x)
  np.testing.assert_allclose(np.asarray(rec.psnr(x, over)),
                             np.asarray(rec.psnr(x, np.clip(over, -1, 1))))
  assert np.all(np.asarray(rec.ssim(x, y)) < 1.0)


def test_metrics_jit_and_per_image_dict():
  x, y = _random_pair(6, shape=(2, 16, 20, 3))
  eager = rec.reconstruction_metrics(x, y)
  jitted = jax.jit(rec.reconstruction_metrics)(x, y)
  for key in ('psnr', 'ssim', 'mse', 'l1'):
    assert eager[key].shape == (2,)
    np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-5, atol=1e-6)
  xu = visualize.to_uint8(x).astype(np.float64)
  yu = visualize.to_uint8(y).astype(np.float64)
  np.testing.assert_allclose(
      eager['mse'], (((xu - yu) / 255) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(eager['l1'], np.abs(xu - yu).mean(
      axis=(1, 2, 3)) / 127.5, rtol=1e-5)


def test_sums_cap_exact_copies_and_drop_padding():
  x, y = _random_pair(7, shape=(3, 16, 16, 3))
  y[1] = x[1]  # an exact reconstruction: PSNR inf, capped for the mean
  per = rec.reconstruction_metrics(x, y)
  assert float(per['psnr'][1]) == rec.PSNR_CAP_DB
  per = dict(per, nan_in_padding=jnp.asarray([1.0, 2.0, jnp.nan]))
  sums = rec.masked_sums(per, mask=jnp.asarray([1, 1, 0]))
  out = rec.means(sums)
  assert sums['count'] == 2.0
  assert out['nan_in_padding'] == pytest.approx(1.5)
  psnr = np.asarray(per['psnr'])
  assert out['psnr'] == pytest.approx((psnr[0] + psnr[1]) / 2, rel=1e-6)
  mse = np.asarray(per['mse'])[:2].mean()
  assert out['psnr_of_mean_mse'] == pytest.approx(-10 * np.log10(mse),
                                                  rel=1e-5)
  with pytest.raises(ValueError, match='count is 0'):
    rec.means(rec.masked_sums(per, mask=jnp.zeros((3,))))


def test_bad_input_errors():
  x = np.zeros((1, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match='at least 11x11'):
    rec.ssim(x, x)
  with pytest.raises(ValueError, match='same shape'):
    rec.psnr(x, np.zeros((1, 8, 9, 3), np.float32))
  with pytest.raises(ValueError, match='batch axis'):
    rec.psnr(x[0], x[0])


def test_lpips_per_image_with_random_weights():
  params = perceptual.load_lpips_params('random')
  model = perceptual.LPIPS()
  x, y = _astronaut_pairs(8, size=32, count=2)
  y[1] = x[1]
  d = np.asarray(rec.lpips_distance(model, params, x, y))
  assert d.shape == (2,)
  assert d[0] > 1e-6
  assert abs(d[1]) < 1e-6
  # A thin wrapper: the module on the clipped (unquantized) images.
  direct = model.apply({'params': params}, jnp.asarray(x),
                       jnp.clip(jnp.asarray(y), -1, 1))
  np.testing.assert_allclose(
      rec.lpips_distance(model, params, x, y, quantize=False), direct,
      rtol=1e-5, atol=1e-7)
