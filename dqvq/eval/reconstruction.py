"""Per-image reconstruction metrics: PSNR, SSIM, LPIPS, L1 (jit-friendly jnp).

Conventions, chosen to equal what common tools report on saved images:

* Inputs are NHWC batches in [-1, 1] (the model's range) and every metric is
  per image, shape (B,). The evaluate command reduces over a split with
  `masked_sums` (padded examples drop out) and `means`.
* Both images are clipped to [-1, 1] first: decoder outputs overshoot, and a
  reconstruction is only ever looked at (or saved, or fed to FID) clipped.
* `quantize=True` (default) also rounds to the 256 levels of a uint8 PNG,
  exactly as `dqvq.visualize.to_uint8` does, and measures on [0, 255] with
  data_range 255. That is what one gets by running scikit-image or
  torchmetrics on saved PNGs (how most tokenizer papers' numbers are made;
  the official DQ-VAE code has no PSNR/SSIM at all). `quantize=False`
  measures the float images on [0, 1] with data_range 1. PSNR is invariant to
  the scale, so only the rounding differs (typically < 0.01 dB).
* SSIM is measured on [0, 1] (or [0, 255]), never on [-1, 1]: its luminance
  term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) is not shift invariant,
  and the standard values assume a data range starting at zero.

`peak_signal_noise_ratio` and `structural_similarity` are the scikit-image
functions of the same name (with `channel_axis=-1, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False`, the Wang et al. 2004 settings) on
already-scaled data with an explicit data_range; `psnr` / `ssim` wrap them
for model-range images.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Wang et al. 2004 / scikit-image constants.
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage's value: an 11-tap window at sigma 1.5
# Split means replace the infinite PSNR of an exact reconstruction by this,
# the same ceiling as stage 1's validation PSNR (MSE floored at 1e-10 on
# [0, 1]). It is below the largest finite PSNR of a 256x256 uint8 image
# (about 101 dB, one level off in one value), so it only touches exact copies.
PSNR_CAP_DB = 100.0


def to_eval_range(images: Array, quantize: bool = True) -> tuple[Array, float]:
  """[-1, 1] images -> (array on [0, data_range], data_range).

  With quantize, uint8 levels 0..255 as float32 (data_range 255), computed
  with the exact float32 expression of `visualize.to_uint8` so that metrics
  here equal metrics on the saved PNGs. Otherwise [0, 1] (data_range 1).
  """
  x = jnp.clip(jnp.asarray(images, jnp.float32), -1.0, 1.0)
  if quantize:
    return jnp.round((x + 1.0) * 127.5), 255.0
  return (x + 1.0) * 0.5, 1.0


def _check_pair(x: Array, y: Array, where: str) -> None:
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(
        f'{where} needs two NHWC batches of the same shape (B, H, W, C); got '
        f'{x.shape} and {y.shape}. Add a batch axis with x[None] for one image.')


def peak_signal_noise_ratio(x: Array, y: Array, data_range: float) -> Array:
  """Per-image PSNR in dB of (B, H, W, C) data on [0, data_range].

  Equals `skimage.metrics.peak_signal_noise_ratio(x[i], y[i], data_range=...)`;
  identical images give +inf, as there.
  """
  _check_pair(x, y, 'peak_signal_noise_ratio')
  diff = jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)
  mse = jnp.mean(jnp.square(diff), axis=(1, 2, 3))
  # log10(R^2) - log10(mse) rather than log10(R^2 / mse): same value, and
  # log10(0) = -inf gives +inf without a division warning.
  return 10.0 * (2.0 * jnp.log10(jnp.float32(data_range)) - jnp.log10(mse))


def gaussian_window(sigma: float = SSIM_SIGMA,
                    truncate: float = SSIM_TRUNCATE) -> np.ndarray:
  """Normalised 1-D Gaussian taps, as scipy.ndimage.gaussian_filter1d."""
  radius = int(truncate * sigma + 0.5)
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (t / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def _valid_filter(x: Array, taps: np.ndarray) -> Array:
  """Separable Gaussian over H then W, 'valid' only.

  skimage filters with 'reflect' borders and then crops the window radius
  from every side, so the kept values never see the padding: a valid
  filter gives the cropped map directly, without padding anything. A sum of
  shifted slices is exact, cheap for 11 taps, and fuses on every backend.
  """
  n = len(taps)
  h, w = x.shape[1] - n + 1, x.shape[2] - n + 1
  x = sum(float(taps[i]) * x[:, i:i + h] for i in range(n))
  return sum(float(taps[i]) * x[:, :, i:i + w] for i in range(n))


def structural_similarity(x: Array, y: Array, data_range: float,
                          sigma: float = SSIM_SIGMA) -> Array:
  """Per-image mean SSIM of (B, H, W, C) data on [0, data_range].

  Equals `skimage.metrics.structural_similarity(x[i], y[i], channel_axis=-1,
  data_range=data_range, gaussian_weights=True, sigma=sigma,
  use_sample_covariance=False)`: per channel, the SSIM map over the pixels at
  least one window radius from the border, averaged, then averaged over
  channels (equal counts, so one mean over all of them).
  """
  _check_pair(x, y, 'structural_similarity')
  taps = gaussian_window(sigma)
  if min(x.shape[1:3]) < len(taps):
    raise ValueError(
        f'SSIM with sigma={sigma} needs images of at least {len(taps)}x'
        f'{len(taps)} pixels (its Gaussian window); got {x.shape[1:3]}. '
        'Evaluate at a larger resolution.')
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  # The (co)variances E[xy] - E[x]E[y] cancel catastrophically in float32 on
  # [0, 255] data; they are shift invariant, so take them on data centred by
  # the image mean, and add the mean back only for the luminance term. This
  # keeps float32 within ~1e-6 of skimage's float64.
  cx = jnp.mean(x, axis=(1, 2), keepdims=True)
  cy = jnp.mean(y, axis=(1, 2), keepdims=True)
  x, y = x - cx, y - cy
  mx, my = _valid_filter(x, taps), _valid_filter(y, taps)
  vx = _valid_filter(x * x, taps) - mx * mx
  vy = _valid_filter(y * y, taps) - my * my
  vxy = _valid_filter(x * y, taps) - mx * my
  ux, uy = mx + cx, my + cy
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  s = ((2.0 * ux * uy + c1) * (2.0 * vxy + c2)) / (
      (ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def psnr(images: Array, reconstructions: Array, *,
         quantize: bool = True) -> Array:
  """Per-image PSNR (dB) of [-1, 1] images; see the module docstring.

  Data range 255 on uint8 levels (quantize) or 1 on [0, 1]. An exact
  reconstruction gives +inf; `reconstruction_metrics` caps it for means.
  """
  x, r = to_eval_range(images, quantize)
  y, _ = to_eval_range(reconstructions, quantize)
  return peak_signal_noise_ratio(x, y, r)


def ssim(images: Array, reconstructions: Array, *,
         quantize: bool = True) -> Array:
  """Per-image SSIM (Wang et al. settings) of [-1, 1] images; 1 if equal."""
  x, r = to_eval_range(images, quantize)
  y, _ = to_eval_range(reconstructions, quantize)
  return structural_similarity(x, y, r)


def lpips_distance(lpips_model: nn.Module, params: Any, images: Array,
                   reconstructions: Array, *, quantize: bool = True) -> Array:
  """Per-image LPIPS (B,) with `dqvq.models.perceptual.LPIPS` (eval mode).

  `params` from `perceptual.load_lpips_params`. Inputs take the same clip
  (and uint8 rounding) as the other metrics, then go back to [-1, 1], the
  range LPIPS' scaling layer expects.
  """
  _check_pair(jnp.asarray(images), jnp.asarray(reconstructions),
              'lpips_distance')
  x, r = to_eval_range(images, quantize)
  y, _ = to_eval_range(reconstructions, quantize)
  return lpips_model.apply({'params': params}, x * (2.0 / r) - 1.0,
                           y * (2.0 / r) - 1.0, train=False)


def reconstruction_metrics(images: Array, reconstructions: Array, *,
                           quantize: bool = True,
                           psnr_cap_db: float = PSNR_CAP_DB
                           ) -> dict[str, Array]:
  """All pixel metrics per image: 'psnr' (capped), 'ssim', 'mse', 'l1'.

  'mse' is on [0, 1] units so that the split's PSNR of the mean MSE can be
  reported next to the mean PSNR (`means`). 'l1' is the mean |x - x_hat| in
  the model's [-1, 1] units, the paper's error-map quantity. Add 'lpips'
  from `lpips_distance` before summing if wanted.
  """
  x, r = to_eval_range(images, quantize)
  y, _ = to_eval_range(reconstructions, quantize)
  p = peak_signal_noise_ratio(x, y, r)
  return {
      'psnr': jnp.minimum(p, psnr_cap_db),
      'ssim': structural_similarity(x, y, r),
      'mse': jnp.mean(jnp.square((x - y) / r), axis=(1, 2, 3)),
      'l1': jnp.mean(jnp.abs(x - y) * (2.0 / r), axis=(1, 2, 3)),
  }


def masked_sums(per_image: Mapping[str, Array],
                mask: Array | None = None) -> dict[str, Array]:
  """Per-image metrics -> float32 sums over real examples, plus 'count'.

  `mask` (B,) marks real (1) and padding (0) examples of the last batch.
  Padding is removed with `where`, not a product, so an infinite or NaN value
  in a padded slot cannot leak into the sum. Merge batches/hosts with
  `dqvq.eval.coding.merge_sums`.
  """
  b = next(iter(per_image.values())).shape[0]
  keep = jnp.ones((b,), bool) if mask is None else jnp.asarray(mask) > 0
  sums = {k: jnp.sum(jnp.where(keep, jnp.asarray(v, jnp.float32), 0.0))
          for k, v in per_image.items()}
  sums['count'] = jnp.sum(keep.astype(jnp.float32))
  return sums


def means(sums: Mapping[str, Any]) -> dict[str, float]:
  """Split means from `masked_sums` totals (host floats).

  Adds 'psnr_of_mean_mse', the PSNR of the split's mean MSE (torchmetrics'
  default reduction), when 'mse' is present.
  """
  sums = jax.device_get(dict(sums))
  if 'count' not in sums:
    raise ValueError("sums need a 'count' entry; build them with masked_sums.")
  n = float(sums.pop('count'))
  if n <= 0:
    raise ValueError('No real examples were summed (count is 0): check the '
                     "batch 'mask' and that the split is not empty.")
  result = {k: float(v) / n for k, v in sums.items()}
  if 'mse' in result:
    result['psnr_of_mean_mse'] = float(
        -10.0 * np.log10(max(result['mse'], 1e-10)))
  return result
