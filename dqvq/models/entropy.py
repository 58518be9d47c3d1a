"""Per-region image entropy, percentile thresholds and entropy-based grain maps.

The official "better version" DQ-VAE (`dqvae_dual_entropy.py: Entropy`,
`RouterDual.py: DualGrainFixedEntropyRouter`) routes a region to the fine grain
when the Shannon entropy of its gray-level histogram exceeds a percentile
threshold read from a JSON table. The histogram is a Gaussian kernel density:

  K_nj = exp(-0.5 ((v_n - b_j) / sigma)^2),   b = linspace(bin_range, num_bins)
  p~_j = mean_n K_nj,  Z = sum_j p~_j + eps,  p_j = p~_j / Z + eps
  H    = -sum_j p_j ln p_j,                   eps = 1e-40

eps = 1e-40 is a float32 *denormal*. PyTorch keeps denormals; XLA on GPU/TPU
flushes them to zero, so a literal port turns empty bins into 0 * ln 0 = NaN.
This module computes the same quantity without relying on denormals:

* Kernel values below float32's smallest normal number are flushed to 0 on
  every platform (CPU keeps denormals, accelerators do not; flushing explicitly
  makes them agree). PyTorch keeps them. Almost every region has some such
  values (a pixel 13.2-14.4 sigma from some bin), but they only matter next
  to a tiny total mass, i.e. when every pixel of the region is more than
  ~0.1 from every bin centre: impossible with bins (-1, 1), possible with
  bins (0, 1) on dark regions. There the official H is itself below ~1e-9
  (it comes from denormal arithmetic) and we return a value between 0 and
  it, or the floor below when *every* kernel value is denormal or zero. In
  the official ImageNet JSON such values sit at keys <= 21 (T_20 = 3.3e-14,
  T_21 = 2.6e-11), so routing can differ only for fine ratios >= ~0.79.
* When some kernel value survives, p = p~ / sum p~ and 0 ln 0 := 0. This differs
  from the official value by the eps terms only, at most num_bins * eps *
  ln(1/eps) ~ 3e-37 in absolute terms.
* When every kernel value is 0, the official formula gives p_j = eps for all j
  and H = num_bins * eps * ln(1/eps). We return exactly the float32 number the
  official code produces (2.947292990206026e-37 for 32 bins, the value stored
  in the official threshold JSONs), not the float64 constant 2.94731e-37: the
  float64 constant is larger than the stored threshold, so `H <= T` would flip
  and route those regions fine.

Bin range history: the official JSONs for ImageNet and FFHQ were made with
bins linspace(0, 1) on [-1, 1] images (about 20-25% of regions sit at the
floor); the code switched to linspace(-1, 1) later. Use (0, 1) with the
official JSONs and the released checkpoint, (-1, 1) with tables made by
`dqvq.tools.entropy_thresholds` with that range (the table metadata records it).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

OFFICIAL_EPS = 1e-40
# ITU-R 601 luma weights, applied in this order like the official code.
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
# Bin range the official threshold JSONs were computed with (see docstring).
OFFICIAL_JSON_BIN_RANGE = (0.0, 1.0)
# Bin range of the official code at HEAD (after GitHub issue #7).
HEAD_BIN_RANGE = (-1.0, 1.0)

_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal, 1.1755e-38
# ln(_F32_TINY) = -87.3365. Cut a hair above it so that exp() never returns a
# denormal even with a 1-ulp error in the platform's exp.
_MIN_KERNEL_LOG = -87.33
_F32_DENORMAL_STEP = 2.0**-149


def _round_to_f32_denormal(x: float) -> float:
  """Rounds a tiny float64 to the float32 denormal grid, half to even."""
  return round(x / _F32_DENORMAL_STEP) * _F32_DENORMAL_STEP


def official_floor_entropy(num_bins: int = 32) -> float:
  """H of a region whose kernel values all underflow, as the official code gets it.

  Emulates float32 with denormals in float64 arithmetic (so a process that has
  flush-to-zero enabled still gets the right constant): eps rounds to the
  denormal grid, ln(eps) to float32, eps * ln(eps) to the denormal grid, and
  the sum of num_bins equal terms is rounded once to float32. For 32 bins this
  is bit-identical to keys 1..19 of the official ImageNet JSON.
  """
  eps = _round_to_f32_denormal(OFFICIAL_EPS)
  log_eps = float(np.float32(math.log(eps)))
  term = _round_to_f32_denormal(eps * log_eps)
  return -float(np.float32(num_bins * term))


@functools.partial(
    jax.jit,
    static_argnames=('region_size', 'num_bins', 'bin_range', 'sigma',
                     'bins_per_step'))
def region_entropy(images: Array,
                   region_size: int,
                   num_bins: int = 32,
                   bin_range: tuple[float, float] = HEAD_BIN_RANGE,
                   sigma: float = 0.01,
                   *,
                   bins_per_step: int | None = 8) -> Array:
  """Kernel-density entropy of each non-overlapping region of NHWC images.

  Args:
    images: (B, H, W, 3) RGB in [-1, 1]; any float dtype (computed in float32).
    region_size: side of the square regions; must divide H and W.
    num_bins: number of histogram bin centres.
    bin_range: (first, last) bin centre; (0, 1) reproduces the official JSONs.
    sigma: Gaussian kernel width.
    bins_per_step: bins evaluated together. The per-pixel, per-bin kernel is
      B*H*W*bins floats (268 MB for 32 images of 256px and 32 bins) and XLA on
      CPU materialises it before reducing, so bins are processed in chunks
      with `lax.map`; the peak is then about B*H*W*bins_per_step floats
      (77 MB at the default 8). None processes all bins at once.

  Returns:
    (B, H/region_size, W/region_size) float32 entropies (nats), regions in
    row-major order, with gradients stopped (the router is not trained).
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'region_entropy expects NHWC RGB images, got shape '
                     f'{images.shape}.')
  b, h, w, _ = images.shape
  if h % region_size or w % region_size:
    raise ValueError(f'Image size {h}x{w} is not a multiple of region_size '
                     f'{region_size}; crop or resize the images.')
  if sigma <= 0 or num_bins < 2:
    raise ValueError(f'Need sigma > 0 and num_bins >= 2, got sigma={sigma}, '
                     f'num_bins={num_bins}.')
  x = jax.lax.stop_gradient(images.astype(jnp.float32))
  gray = (GRAY_WEIGHTS[0] * x[..., 0] + GRAY_WEIGHTS[1] * x[..., 1] +
          GRAY_WEIGHTS[2] * x[..., 2])
  gh, gw = h // region_size, w // region_size
  pixels = gray.reshape(b, gh, region_size, gw, region_size)
  pixels = pixels.transpose(0, 1, 3, 2, 4).reshape(b, gh, gw, -1)
  # float64 linspace rounded once, so bins do not depend on the backend.
  centres = jnp.asarray(np.linspace(*bin_range, num_bins), jnp.float32)

  def bin_mass(centre: Array) -> Array:
    z = (pixels - centre) / sigma
    log_k = -0.5 * (z * z)
    # Explicit flush: identical results with or without hardware denormals.
    k = jnp.where(log_k > _MIN_KERNEL_LOG, jnp.exp(log_k), 0.0)
    # A sum, not the official mean: the 1/N cancels in p and a mean of tiny
    # normals could itself be denormal.
    return k.sum(axis=-1)

  if bins_per_step is None or bins_per_step >= num_bins:
    mass = jax.vmap(bin_mass)(centres)
  else:
    mass = jax.lax.map(bin_mass, centres, batch_size=bins_per_step)
  mass = jnp.moveaxis(mass, 0, -1)  # (B, gh, gw, bins)
  total = mass.sum(axis=-1, keepdims=True)
  alive = total > 0
  safe_total = jnp.where(alive, total, 1.0)
  p = _flush(mass / safe_total)
  # For a dominant bin (p > 1/2), ln p = log1p(-q) with q the share of all
  # *other* bins, summed directly (exclusive prefix + suffix sums) so that
  # near-flat regions keep their small entropy to float32 relative precision
  # instead of losing it in 1 - p.
  zero = jnp.zeros_like(mass[..., :1])
  prefix = jnp.concatenate([zero, jnp.cumsum(mass, -1)[..., :-1]], -1)
  suffix = jnp.concatenate(
      [jnp.cumsum(mass[..., ::-1], -1)[..., -2::-1], zero], -1)
  q = _flush((prefix + suffix) / safe_total)
  log_p = jnp.where(p > 0.5, jnp.log1p(-q), jnp.log(jnp.where(p > 0, p, 1.0)))
  terms = _flush(p * log_p)  # 0 ln 0 := 0 since p = 0 there
  ent = -jnp.sum(terms, axis=-1)
  ent = jnp.where(alive[..., 0], ent, official_floor_entropy(num_bins))
  return jax.lax.stop_gradient(ent.astype(jnp.float32))


def _flush(x: Array) -> Array:
  """Zeroes float32 denormals explicitly, so that CPU matches GPU/TPU FTZ."""
  return jnp.where(jnp.abs(x) >= _F32_TINY, x, 0.0)


# ----------------------------------------------------------------------------
# Percentile tables.

PERCENTILE_KEYS = tuple(str(k) for k in range(1, 100))
METADATA_KEY = 'metadata'
REQUIRED_METADATA = ('bin_range', 'num_bins', 'sigma', 'region_size',
                     'resolution', 'dataset', 'split', 'num_images')


def compute_entropy_thresholds(entropies: np.ndarray) -> dict[str, float]:
  """Percentile table {"1": T_1, ..., "99": T_99} exactly as the official script.

  T_k = sorted(entropies)[floor(N * k / 100)]. Entropies are taken as float32
  (what the model computes), so every stored value is a float32 number and the
  router's float32 comparison H <= T is exact.
  """
  values = np.sort(np.asarray(entropies, dtype=np.float32).reshape(-1))
  if values.size == 0 or not np.all(np.isfinite(values)):
    raise ValueError('Need a non-empty array of finite entropies, got '
                     f'{values.size} values.')
  n = values.size
  return {str(k): float(values[(n * k) // 100]) for k in range(1, 100)}


def _check_table(table: dict[str, float]) -> None:
  missing = [k for k in PERCENTILE_KEYS if k not in table]
  if missing:
    raise ValueError(f'Threshold table lacks percentile keys {missing[:5]}... '
                     '(need "1".."99").')
  vals = [float(table[k]) for k in PERCENTILE_KEYS]
  if any(not math.isfinite(v) for v in vals) or any(
      b < a for a, b in zip(vals, vals[1:])):
    raise ValueError('Threshold table values must be finite and '
                     'non-decreasing in the percentile.')


def save_thresholds(path: str, table: dict[str, float],
                    metadata: dict) -> None:
  """Writes the table as JSON, official layout plus a "metadata" entry.

  The percentile keys stay at the top level so that the official router
  (`json[str(k)]`) can still read our files. The metadata records how the
  entropies were computed; a table is only valid for the same bin range,
  sigma, region size and resolution.
  """
  import json  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  _check_table(table)
  missing = [k for k in REQUIRED_METADATA if k not in metadata]
  if missing:
    raise ValueError(f'Threshold metadata lacks {missing}; record '
                     f'{list(REQUIRED_METADATA)}.')
  data = {k: float(table[k]) for k in PERCENTILE_KEYS}
  data[METADATA_KEY] = dict(metadata)
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(data, indent=1))


def load_thresholds(path: str) -> tuple[dict[str, float], dict | None]:
  """Reads a table written by `save_thresholds` or an official JSON.

  Official JSONs (`scripts/tools/thresholds/*.json`) hold only the 99 keys, so
  metadata is None; they were computed with bins OFFICIAL_JSON_BIN_RANGE =
  (0, 1), sigma 0.01, 32 bins, 16x16 regions of 256px images.
  """
  import json  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  data = json.loads(epath.Path(path).read_text())
  metadata = data.pop(METADATA_KEY, None)
  extra = sorted(set(data) - set(PERCENTILE_KEYS))
  if extra:
    raise ValueError(f'{path}: unexpected keys {extra[:5]} in threshold table.')
  table = {k: float(v) for k, v in data.items()}
  _check_table(table)
  return {k: table[k] for k in PERCENTILE_KEYS}, metadata


def threshold_for_ratio(table: dict[str, float], fine_ratio: float) -> float:
  """Threshold T such that a share `fine_ratio` of regions has H > T.

  That is percentile q = 100 (1 - fine_ratio). The official router uses
  key int(100 - 100 r), which truncates float noise (r = 0.55 gives 44.999...
  -> "44"); here q is snapped to the nearest integer when within 1e-6 of it
  (0.55 -> "45"), and non-integer percentiles interpolate linearly between
  the neighbouring keys. Note that the official JSONs hold the floor value for
  keys 1..19, so their ratios above ~0.8 are not achievable.
  """
  _check_table(table)
  r = float(fine_ratio)
  q = 100.0 * (1.0 - r)
  if math.isfinite(q) and abs(q - round(q)) < 1e-6:
    q = float(round(q))
  if not 1.0 <= q <= 99.0:  # also rejects NaN
    raise ValueError(
        f'fine_ratio={fine_ratio} needs percentile {q:g}, but the table holds '
        'percentiles 1..99, i.e. it supports fine ratios from 0.01 to 0.99.')
  lo, hi = math.floor(q), math.ceil(q)
  t_lo, t_hi = float(table[str(lo)]), float(table[str(hi)])
  return t_lo if lo == hi else t_lo + (q - lo) * (t_hi - t_lo)


def _check_ratios(ratios: Sequence[float]) -> list[float]:
  ratios = [float(r) for r in ratios]
  if len(ratios) < 2:
    raise ValueError(f'Need one ratio per grain, at least 2, got {ratios}.')
  if any(not math.isfinite(r) or r < 0 for r in ratios):
    raise ValueError(f'Grain ratios must be finite and >= 0, got {ratios}.')
  if abs(math.fsum(ratios) - 1.0) > 1e-6:
    raise ValueError(f'Grain ratios (coarse to fine) must sum to 1, got '
                     f'{ratios} (sum {math.fsum(ratios):.6g}).')
  return ratios


def _fine_shares(ratios: Sequence[float]) -> list[float]:
  """Share of regions at grain >= k, for k = 1..K-1 (decreasing)."""
  return [math.fsum(ratios[k:]) for k in range(1, len(ratios))]


def thresholds_for_ratios(table: dict[str, float],
                          ratios_coarse_to_fine: Sequence[float]) -> list[float]:
  """K-1 non-decreasing thresholds for K grains with the given target shares.

  A region gets grain k (0 = coarsest) when T_k < H <= T_{k+1}, with T_0 =
  -inf and T_K = +inf; T_k is the threshold above which a share
  sum(ratios[k:]) of regions lies. Every such cumulative share must be within
  the table's 0.01..0.99.
  """
  ratios = _check_ratios(ratios_coarse_to_fine)
  return [threshold_for_ratio(table, s) for s in _fine_shares(ratios)]


def assign_grains_by_entropy(entropy: Array,
                             thresholds: Sequence[float] | Array) -> Array:
  """Grain map (int32, 0 = coarsest .. K-1 = finest) from K-1 thresholds.

  grain = #{k : H > T_k}; ties go to the coarser grain (H <= T -> coarse), as
  in the official router. Comparison is in float32, where tables computed by
  `compute_entropy_thresholds` (and the official JSONs) are exact.
  """
  if not isinstance(thresholds, jax.core.Tracer):
    t_np = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t_np.size == 0 or np.any(np.diff(t_np) < 0):
      raise ValueError(
          f'Need >= 1 non-decreasing thresholds, got {t_np.tolist()}.')
  t = jnp.asarray(thresholds, jnp.float32).reshape(-1)
  h = jnp.asarray(entropy, jnp.float32)
  return jnp.sum(h[..., None] > t, axis=-1).astype(jnp.int32)


def assign_grains_by_quota(entropy: Array,
                           ratios_coarse_to_fine: Sequence[float]) -> Array:
  """Per-image grain map with exact counts, no threshold table needed.

  In every image of n regions, the round(n * sum(ratios[k:])) highest-entropy
  regions get grain >= k. The finest grain therefore gets exactly
  round(n * r_finest) regions; intermediate grains get differences of rounded
  cumulative counts (so counts always sum to n). Equal entropies are ranked
  by row-major region index, lower index first (i.e. finer), deterministically.

  Args:
    entropy: (B, h, w) region entropies.
    ratios_coarse_to_fine: K target shares, summing to 1.

  Returns:
    (B, h, w) int32 grain map, 0 = coarsest.
  """
  ratios = _check_ratios(ratios_coarse_to_fine)
  n = entropy.shape[1] * entropy.shape[2]
  counts = jnp.asarray([round(n * s) for s in _fine_shares(ratios)], jnp.int32)
  return assign_grains_by_counts(entropy, counts)


def assign_grains_by_counts(scores: Array, counts: Array) -> Array:
  """Grain map giving grain >= k to the counts[..., k-1] top-scored regions.

  The ranking step of `assign_grains_by_quota`, with counts that may differ
  per image (the feature router's expected-count inference).

  Args:
    scores: (B, h, w) region scores; ties rank by row-major index, lower first.
    counts: (K-1,) or (B, K-1) int, non-increasing in k: the number of
      regions at grain >= k for k = 1..K-1.

  Returns:
    (B, h, w) int32 grain map, 0 = coarsest.
  """
  scores = jnp.asarray(scores, jnp.float32)
  b, gh, gw = scores.shape
  counts = jnp.broadcast_to(jnp.asarray(counts, jnp.int32),
                            (b, jnp.shape(counts)[-1]))
  flat = scores.reshape(b, gh * gw)
  order = jnp.argsort(-flat, axis=-1, stable=True)  # highest score first
  rank = jnp.argsort(order, axis=-1)  # inverse permutation
  grains = jnp.sum(rank[..., None] < counts[:, None, :], axis=-1)
  return grains.astype(jnp.int32).reshape(b, gh, gw)
