"""Coding statistics of a dynamic tokenizer: usage, code length, coding map.

The numbers of paper Table 6 and a figure of merit for its Figure 5, from
`DQVAE.encode` outputs:

* 'codes' (B, h, w) on the finest latent grid: a region of grain k holds
  (f_0 / f_k)^2 codes, each repeated over its (f_k / f_fine)^2 finest cells.
* 'grain_map' (B, H/f_0, W/f_0): one grain id per region, 0 = COARSEST ...
  K-1 = FINEST, matching `grain_factors` ordered coarse to fine, e.g.
  (16, 8): 0 is f=16 (1 code per 16x16 region), 1 is f=8 (4 codes).

Every statistic counts each code ONCE: a coarse code repeated over 4 (or 16)
finest cells is one code of the image, as in the paper's code length. (The
training-time `stage1.eval_step` histogram counts finest cells; its usage is
the same, its perplexity is not.)

On device, per batch: `coding_sums` gives int32 counts (exact; float32 would
round past 2^24) that add up over batches, devices and hosts with
`merge_sums`. On host: `summarize_coding` turns a split's sums into floats.
Code usage follows the paper (used codes / codebook size over the whole
split); the official `codebook_usage_dqvae.py` prints 1 - that, reported here
as 'codebook_unused'. Code-length mean and population variance (`np.var`, as
the official `visualize_dual_grain.py`) come from an exact histogram.

The coding map vs error map (Fig. 5) is scored per region with an AUROC
(`coding_map_auroc`, `RegionScores` to collect a split, pooled over the split or
within each image) against `granularity.region_error`'s map.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from dqvq.models import granularity as grain_lib
from dqvq.models import quantizer

Array = jax.Array


def _keep(batch: int, mask: Array | None) -> Array:
  """(B,) int32: 1 for real examples, 0 for padding."""
  if mask is None:
    return jnp.ones((batch,), jnp.int32)
  return (jnp.asarray(mask) > 0).astype(jnp.int32)


def _check_maps(codes: Array, grain_map: Array,
                grain_factors: Sequence[int]) -> None:
  r = grain_factors[0] // grain_factors[-1]
  want = (grain_map.shape[0], grain_map.shape[1] * r, grain_map.shape[2] * r)
  if codes.ndim != 3 or tuple(codes.shape) != want:
    raise ValueError(
        f'codes {codes.shape} do not match grain_map {grain_map.shape} with '
        f'grain_factors {tuple(grain_factors)}: expected codes {want} (the '
        "finest grid). Pass DQVAE.encode's 'codes' and 'grain_map' and the "
        "model's grain_factors, coarse to fine.")


def representative_cells(grain_map: Array,
                         grain_factors: Sequence[int]) -> Array:
  """(B, h, w) bool on the finest grid: True on one cell per code.

  A grain-k code covers r_k = f_k / f_fine finest cells per side, aligned to
  its region's corner; its top-left cell (y % r_k == 0 and x % r_k == 0)
  stands for it. There are `grain.code_length` such cells per image.
  """
  fine = grain_factors[-1]
  g = grain_lib.replicate_to_finest(grain_map, grain_factors)
  side = jnp.asarray([f // fine for f in grain_factors], jnp.int32)[g]
  ys = jnp.arange(g.shape[1], dtype=jnp.int32)[None, :, None]
  xs = jnp.arange(g.shape[2], dtype=jnp.int32)[None, None, :]
  return (ys % side == 0) & (xs % side == 0)


def code_counts(codes: Array, grain_map: Array, grain_factors: Sequence[int],
                codebook_size: int, mask: Array | None = None) -> Array:
  """(K_grains, codebook_size) int32: how often each code id is used per grain.

  Each code counts once (see `representative_cells`); sum over axis 0 for the
  overall histogram. `mask` (B,) drops padded examples.
  """
  _check_maps(codes, grain_map, grain_factors)
  weight = representative_cells(grain_map, grain_factors).astype(jnp.int32)
  weight = weight * _keep(codes.shape[0], mask)[:, None, None]
  g = grain_lib.replicate_to_finest(grain_map, grain_factors)
  index = g.astype(jnp.int32) * codebook_size + codes.astype(jnp.int32)
  flat = jnp.zeros((len(grain_factors) * codebook_size,), jnp.int32)
  flat = flat.at[index.ravel()].add(weight.ravel())
  return flat.reshape(len(grain_factors), codebook_size)


def grain_counts(grain_map: Array, num_grains: int,
                 mask: Array | None = None) -> Array:
  """(num_grains,) int32: regions assigned to each grain (0 = coarsest)."""
  keep = _keep(grain_map.shape[0], mask)[:, None, None]
  one_hot = (grain_map[..., None] == jnp.arange(num_grains)).astype(jnp.int32)
  return jnp.sum(one_hot * keep[..., None], axis=(0, 1, 2))


def max_code_length(grain_map_shape: Sequence[int],
                    grain_factors: Sequence[int]) -> int:
  """Codes of an image whose regions are all finest: the histogram's top bin."""
  regions = int(grain_map_shape[-2]) * int(grain_map_shape[-1])
  return regions * grain_lib.codes_per_region(grain_factors)[-1]


def length_histogram(lengths: Array, max_length: int,
                     mask: Array | None = None) -> Array:
  """(max_length + 1,) int32 counts of images per code length 0..max_length."""
  keep = _keep(lengths.shape[0], mask)
  return jnp.zeros((max_length + 1,), jnp.int32).at[
      lengths.astype(jnp.int32)].add(keep)


def coding_sums(codes: Array, grain_map: Array, grain_factors: Sequence[int],
                codebook_size: int, mask: Array | None = None
                ) -> dict[str, Array]:
  """One batch's additive coding statistics (jit-friendly, int32).

  Returns 'code_counts' (K_grains, codebook_size), 'grain_counts'
  (K_grains,), 'length_hist' (max_code_length + 1,) and 'count' (images).
  """
  factors = tuple(grain_factors)
  lengths = grain_lib.code_length(grain_map, factors)
  return {
      'code_counts': code_counts(codes, grain_map, factors, codebook_size,
                                 mask),
      'grain_counts': grain_counts(grain_map, len(factors), mask),
      'length_hist': length_histogram(
          lengths, max_code_length(grain_map.shape, factors), mask),
      'count': jnp.sum(_keep(codes.shape[0], mask)),
  }


def merge_sums(*sums: Any) -> Any:
  """Adds sum pytrees of the same structure (batches, hosts, devices)."""
  if not sums:
    raise ValueError('merge_sums needs at least one pytree of sums.')
  return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *sums)


def expected_code_length(grain_ratios: Sequence[float],
                         grain_factors: Sequence[int], num_regions: int
                         ) -> float:
  """Mean code length the target shares imply (Table 6 'expected').

  E.g. 256 regions at r_fine = 0.5 with F = {8, 16}: 256 * (0.5 + 0.5 * 4)
  = 640.
  """
  grain_lib.validate_grain_ratios(tuple(grain_ratios), len(grain_factors))
  per = grain_lib.codes_per_region(grain_factors)
  return float(num_regions * sum(r * c for r, c in zip(grain_ratios, per)))


def usage_summary(counts: Any, suffix: str = '') -> dict[str, float]:
  """Host usage figures of one code histogram (codebook_size,).

  'codebook_usage' = used / codebook size (paper), 'codebook_unused' = 1 -
  that (what the official script prints as "usage"), 'codes_used', and the
  'perplexity' of the histogram (exp of its entropy; codebook size at best).
  """
  counts = np.asarray(jax.device_get(counts))
  # The perplexity is the quantizer's (training logs the same figure); the
  # usage is recomputed from the integer count, as usage_stats' float32 mean
  # would print 0.3 as 0.30000001.
  perplexity = quantizer.usage_stats(
      jnp.asarray(counts, jnp.float32))['perplexity']
  used = int(np.count_nonzero(counts))
  return {f'codebook_usage{suffix}': used / counts.size,
          f'codebook_unused{suffix}': 1.0 - used / counts.size,
          f'codes_used{suffix}': float(used),
          f'perplexity{suffix}': float(perplexity)}


def length_summary(length_hist: Any) -> dict[str, float]:
  """Mean, population variance, min and max code length from a histogram."""
  hist = np.asarray(jax.device_get(length_hist), np.float64)
  n = hist.sum()
  if n <= 0:
    raise ValueError('The code-length histogram is empty: no real images were '
                     "summed (check the batch 'mask').")
  lengths = np.arange(hist.size, dtype=np.float64)
  mean = float((hist * lengths).sum() / n)
  used = np.nonzero(hist)[0]
  return {'code_length_mean': mean,
          'code_length_var': float((hist * (lengths - mean) ** 2).sum() / n),
          'code_length_min': float(used[0]),
          'code_length_max': float(used[-1])}


def summarize_coding(sums: dict[str, Any], grain_factors: Sequence[int],
                     grain_ratios: Sequence[float] | None = None
                     ) -> dict[str, float]:
  """A split's coding figures from merged `coding_sums` (host floats).

  Overall usage keys have no suffix; per-grain ones end in '_f{factor}' (the
  paper's r_{f=8} naming), e.g. 'codebook_usage_f8', 'ratio_f8' (share of
  regions at that grain) and, given `grain_ratios` (coarse to fine),
  'target_ratio_f8' and 'code_length_expected'.
  """
  sums = jax.device_get(sums)
  factors = tuple(grain_factors)
  counts = np.asarray(sums['code_counts'])
  if counts.shape[0] != len(factors):
    raise ValueError(f'code_counts has {counts.shape[0]} grains but '
                     f'grain_factors={factors}; pass the model\'s factors.')
  result = {'num_images': float(sums['count'])}
  result.update(length_summary(sums['length_hist']))
  result.update(usage_summary(counts.sum(axis=0)))
  regions = np.asarray(sums['grain_counts'], np.float64)
  for k, f in enumerate(factors):
    result.update(usage_summary(counts[k], suffix=f'_f{f}'))
    result[f'ratio_f{f}'] = float(regions[k] / max(regions.sum(), 1.0))
  if grain_ratios is not None:
    per_image = regions.sum() / max(float(sums['count']), 1.0)
    result['code_length_expected'] = expected_code_length(
        grain_ratios, factors, int(round(per_image)))
    for f, r in zip(factors, grain_ratios):
      result[f'target_ratio_f{f}'] = float(r)
  return result


# --- Coding map vs error map (paper Fig. 5) --------------------------------


def auroc(scores: Any, labels: Any) -> float:
  """Area under the ROC curve, = sklearn.metrics.roc_auc_score(labels, scores).

  Rank form (Mann-Whitney U): the probability that a random positive scores
  above a random negative, ties counting one half, computed with average
  ranks in O(n log n). Host NumPy/SciPy, float64.

  Raises:
    ValueError: shapes differ, labels are not binary, scores are not finite,
      or only one class is present (the AUROC is then undefined).
  """
  s = np.asarray(jax.device_get(scores), np.float64).ravel()
  y = np.asarray(jax.device_get(labels)).ravel()
  if s.shape != y.shape:
    raise ValueError(f'scores ({s.size}) and labels ({y.size}) must have the '
                     'same number of entries.')
  if not np.isin(y, (0, 1)).all():
    raise ValueError('labels must be binary (bool or 0/1); threshold them '
                     'first, e.g. errors > np.median(errors).')
  if not np.isfinite(s).all():
    raise ValueError('scores contain NaN or inf; drop those entries first.')
  pos = y.astype(bool)
  n_pos, n_neg = int(pos.sum()), int((~pos).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError(
        f'AUROC needs both classes; got {n_pos} positives and {n_neg} '
        'negatives. Evaluate on more regions, or pick another quantile.')
  ranks = stats.rankdata(s)  # average ranks for ties
  return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0)
               / (n_pos * n_neg))


def coding_map_auroc(fine_mask: Any, errors: Any,
                     quantile: float = 0.5) -> float:
  """How well the coding map predicts the error map (paper Fig. 5), in [0, 1].

  Per region: label = its error (from a coarse-only / fixed-length
  reconstruction, `granularity.region_error`) lies above the split's `quantile`;
  score = the router chose the finest grain there (`grain_map == K - 1`),
  or the grain id itself (higher = finer) for an ordinal score with three
  grains. 0.5 is chance, 1.0 means fine codes went exactly to the high-error
  regions.

  A 0/1 score still gives a meaningful AUROC: its ROC curve has a single
  corner (FPR, TPR), so the area is (TPR + 1 - FPR) / 2 = (TPR + TNR) / 2,
  exactly the balanced accuracy of "fine" as a predictor of "hard region",
  insensitive to the fine share (the router's budget) and to the quantile's
  class balance. `auroc(errors, fine_mask)` is the threshold-free reverse
  view (do high-error regions rank above low-error ones among fine picks).

  Args:
    fine_mask: per-region scores of the whole split, any shape.
    errors: per-region errors, same shape.
    quantile: threshold of "high error", in (0, 1); 0.5 is the median.
  """
  e = np.asarray(jax.device_get(errors), np.float64).ravel()
  m = np.asarray(jax.device_get(fine_mask), np.float64).ravel()
  if e.shape != m.shape:
    raise ValueError(f'fine_mask ({m.size} regions) and errors ({e.size}) must '
                     'cover the same regions; use region_size = f_0.')
  if not 0.0 < quantile < 1.0:
    raise ValueError(f'quantile must lie in (0, 1), got {quantile}.')
  if not np.isfinite(e).all():
    raise ValueError('errors contain NaN or inf.')
  return auroc(m, e > np.quantile(e, quantile))


class RegionScores:
  """Collects per-region (score, error) pairs of a split on host.

  The error threshold is a quantile of the whole split, so regions cannot be
  reduced per batch; a region costs 8 bytes (13M regions, 100 MB, for
  ImageNet val at 256px). Under multi-host evaluation, gather the per-host
  arrays (e.g. `multihost_utils.process_allgather`) before `add`.
  """

  def __init__(self) -> None:
    self._scores: list[np.ndarray] = []
    self._errors: list[np.ndarray] = []

  def add(self, scores: Any, errors: Any, mask: Any | None = None) -> None:
    """Adds a batch: scores and errors (B, h, w); mask (B,) drops padding."""
    s = np.asarray(jax.device_get(scores), np.float32)
    e = np.asarray(jax.device_get(errors), np.float32)
    if s.shape != e.shape or s.ndim < 1:
      raise ValueError(f'scores {s.shape} and errors {e.shape} must both be '
                       '(B, h, w) over the same regions.')
    if mask is not None:
      keep = np.asarray(jax.device_get(mask)) > 0
      s, e = s[keep], e[keep]
    self._scores.append(s.reshape(s.shape[0], -1))
    self._errors.append(e.reshape(e.shape[0], -1))

  def __len__(self) -> int:
    return sum(s.size for s in self._scores)

  def _split(self) -> tuple[np.ndarray, np.ndarray]:
    if not self._scores:
      raise ValueError('RegionScores is empty: add() batches first.')
    return np.concatenate(self._scores), np.concatenate(self._errors)

  def auroc(self, quantile: float = 0.5) -> float:
    """`coding_map_auroc` over everything added so far."""
    scores, errors = self._split()
    return coding_map_auroc(scores, errors, quantile)

  def per_image_auroc(self, quantile: float = 0.5) -> tuple[float, int]:
    """Mean over images of `coding_map_auroc` within each image, and the
    number of images it averages.

    The pooled `auroc` asks whether fine codes went to the split's hard
    regions, so it also scores how many fine regions each image got; this
    asks only whether, inside each image, they went to that image's hard
    regions (its own `quantile` of the error), which is what the paper's
    Fig. 5 shows image by image. An image whose errors all lie on one side
    of its quantile (a flat image) has no hard regions to find and is left
    out; one whose scores are all equal scores 0.5.
    """
    scores, errors = self._split()
    got = []
    for s, e in zip(scores, errors):
      labels = e > np.quantile(e.astype(np.float64), quantile)
      if labels.any() and not labels.all():
        got.append(auroc(s, labels))
    if not got:
      raise ValueError('No image has regions on both sides of its error '
                       f'quantile {quantile}; the per-image AUROC is undefined.')
    return float(np.mean(got)), len(got)
