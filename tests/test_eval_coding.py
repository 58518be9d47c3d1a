"""Coding statistics on hand-built code/grain maps, and the coding-map AUROC."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq.eval import coding
from dqvq.models import granularity as grain_lib

DUAL = (16, 8)      # grain 0 = f16 (1 code per region), 1 = f8 (4 codes)
TRIPLE = (32, 16, 8)


def _dual_batch():
  """Two images of 2x2 regions (codebook 8), values worked out below."""
  grain = np.asarray([[[0, 1], [1, 0]],     # coarse, fine / fine, coarse
                      [[1, 1], [1, 1]]])    # all fine
  codes = np.zeros((2, 4, 4), np.int32)
  codes[0] = [[5, 5, 1, 2],
              [5, 5, 3, 5],
              [1, 1, 2, 2],
              [7, 0, 2, 2]]
  codes[1] = np.arange(16).reshape(4, 4) % 8
  return jnp.asarray(codes), jnp.asarray(grain)


def _counts(d, k=8):
  out = np.zeros((k,), np.int64)
  for code, n in d.items():
    out[code] = n
  return out


def test_dual_counts_each_code_once():
  codes, grain = _dual_batch()
  counts = np.asarray(coding.code_counts(codes[:1], grain[:1], DUAL, 8))
  # Coarse regions: codes 5 (top-left) and 2 (bottom-right), once each even
  # though each covers 4 finest cells.
  np.testing.assert_array_equal(counts[0], _counts({5: 1, 2: 1}))
  np.testing.assert_array_equal(
      counts[1], _counts({1: 3, 2: 1, 3: 1, 5: 1, 7: 1, 0: 1}))
  assert counts.sum() == 10  # = 1 + 4 + 4 + 1 codes
  cells = np.asarray(coding.representative_cells(grain, DUAL))
  np.testing.assert_array_equal(cells.sum(axis=(1, 2)), [10, 16])
  # Padding drops out.
  masked = coding.code_counts(codes, grain, DUAL, 8, mask=jnp.asarray([1, 0]))
  np.testing.assert_array_equal(masked, counts)


def test_triple_counts_and_lengths():
  grain = jnp.asarray([[[0, 1, 2]]])  # one row of three 32x32 regions
  codes = np.zeros((1, 4, 12), np.int32)
  codes[0, :, 0:4] = 9                            # coarse: one code
  codes[0, 0:2, 4:6], codes[0, 0:2, 6:8] = 3, 4   # median: 2x2 cells
  codes[0, 2:4, 4:6], codes[0, 2:4, 6:8] = 3, 6
  codes[0, :, 8:12] = np.arange(16).reshape(4, 4) % 10  # fine: 16 codes
  counts = np.asarray(coding.code_counts(jnp.asarray(codes), grain, TRIPLE, 10))
  np.testing.assert_array_equal(counts[0], _counts({9: 1}, 10))
  np.testing.assert_array_equal(counts[1], _counts({3: 2, 4: 1, 6: 1}, 10))
  np.testing.assert_array_equal(
      counts[2], _counts({c: 2 if c < 6 else 1 for c in range(10)}, 10))
  sums = coding.coding_sums(jnp.asarray(codes), grain, TRIPLE, 10)
  assert sums['length_hist'].shape == (3 * 16 + 1,)
  assert int(np.argmax(sums['length_hist'])) == 21  # 1 + 4 + 16
  np.testing.assert_array_equal(sums['grain_counts'], [1, 1, 1])
  out = coding.summarize_coding(sums, TRIPLE, grain_ratios=(0.4, 0.3, 0.3))
  assert out['code_length_mean'] == 21 and out['code_length_var'] == 0
  assert out['ratio_f32'] == pytest.approx(1 / 3)
  assert out['codes_used_f16'] == 3 and out['codebook_usage_f16'] == 0.3
  assert out['code_length_expected'] == pytest.approx(3 * (0.4 + 1.2 + 4.8))


def test_dual_split_summary_by_hand():
  codes, grain = _dual_batch()
  out = coding.summarize_coding(coding.coding_sums(codes, grain, DUAL, 8),
                                DUAL, grain_ratios=(0.5, 0.5))
  assert out['num_images'] == 2
  # Lengths 10 and 16: mean 13, population variance 9.
  assert (out['code_length_mean'], out['code_length_var']) == (13, 9)
  assert (out['code_length_min'], out['code_length_max']) == (10, 16)
  assert out['code_length_expected'] == 4 * (0.5 * 1 + 0.5 * 4)
  # Regions: 2 coarse, 6 fine.
  assert (out['ratio_f16'], out['ratio_f8']) == (0.25, 0.75)
  assert (out['target_ratio_f16'], out['target_ratio_f8']) == (0.5, 0.5)
  overall = np.asarray([3, 5, 4, 3, 2, 4, 2, 3], np.float64)  # 26 codes
  p = overall / overall.sum()
  assert out['perplexity'] == pytest.approx(np.exp(-(p * np.log(p)).sum()),
                                            rel=1e-5)
  assert out['codebook_usage'] == 1.0 and out['codebook_unused'] == 0.0
  assert out['codebook_usage_f16'] == 0.25  # codes 2 and 5 of 8
  assert out['codebook_unused_f16'] == 0.75
  assert out['perplexity_f16'] == pytest.approx(2.0, rel=1e-5)
  assert out['codes_used_f8'] == 8


def test_sums_merge_over_batches_and_jit():
  codes, grain = _dual_batch()
  fn = jax.jit(functools.partial(coding.coding_sums, grain_factors=DUAL,
                                 codebook_size=8))
  whole = fn(codes, grain)
  parts = coding.merge_sums(fn(codes[:1], grain[:1]), fn(codes[1:], grain[1:]))
  for key in whole:
    np.testing.assert_array_equal(parts[key], whole[key])
  masked = fn(codes, grain, mask=jnp.asarray([1, 0]))
  out = coding.summarize_coding(masked, DUAL)
  assert out['num_images'] == 1 and out['code_length_mean'] == 10
  assert out['codebook_usage'] == 0.75  # codes 0, 1, 2, 3, 5, 7
  assert out['codebook_unused'] == 0.25


def test_bad_inputs():
  codes, grain = _dual_batch()
  with pytest.raises(ValueError, match='finest grid'):
    coding.code_counts(codes[:, :2], grain, DUAL, 8)
  with pytest.raises(ValueError, match='grain_factors'):
    coding.summarize_coding(coding.coding_sums(codes, grain, DUAL, 8), TRIPLE)
  with pytest.raises(ValueError, match='sum to 1'):
    coding.expected_code_length((0.5, 0.6), DUAL, 4)
  with pytest.raises(ValueError, match='empty'):
    coding.length_summary(np.zeros((5,)))


def _pairwise_auroc(scores, labels):
  pos, neg = scores[labels == 1], scores[labels == 0]
  diff = pos[:, None] - neg[None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_auroc_equals_pairwise_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = 300
  labels = rng.integers(0, 2, n)
  scores = rng.integers(0, 6, n) + 0.7 * labels  # many ties, some signal
  assert coding.auroc(scores, labels) == pytest.approx(
      _pairwise_auroc(scores, labels), abs=1e-12)
  floats = rng.normal(size=n).round(1)  # ties among floats too
  assert coding.auroc(floats, labels.astype(bool)) == pytest.approx(
      _pairwise_auroc(floats, labels), abs=1e-12)


def test_auroc_extremes_and_errors():
  labels = np.asarray([0, 0, 0, 1, 1])
  assert coding.auroc([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 1.0
  assert coding.auroc([0.9, 0.8, 0.7, 0.1, 0.2], labels) == 0.0
  assert coding.auroc(np.ones(5), labels) == 0.5
  with pytest.raises(ValueError, match='both classes'):
    coding.auroc([0.1, 0.2], [1, 1])
  with pytest.raises(ValueError, match='binary'):
    coding.auroc([0.1, 0.2], [0, 2])


def test_region_error_by_hand():
  x = np.zeros((1, 4, 4, 3), np.float32)
  y = np.zeros((1, 4, 4, 3), np.float32)
  y[0, :2, :2] = 0.4
  y[0, 2:, 2:, 0] = 0.3   # one channel of three: 0.1 on average
  y[0, 0, 3, :] = 3.0     # overshoot counts as 1.0 (clipped), over 4 pixels
  err = np.asarray(grain_lib.region_error(x, y, 2))
  np.testing.assert_allclose(err[0], [[0.4, 0.25], [0.0, 0.1]], atol=1e-6)
  with pytest.raises(ValueError, match='must divide'):
    grain_lib.region_error(x, y, 3)


def test_coding_map_auroc_is_balanced_accuracy():
  errors = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
  # Fine exactly on the four regions above the median: a perfect map.
  assert coding.coding_map_auroc(errors >= 4, errors) == 1.0
  assert coding.coding_map_auroc(errors < 4, errors) == 0.0
  # Fine on 3 of 4 hard regions and 2 of 4 easy ones: (0.75 + 0.5) / 2.
  fine = np.asarray([1, 0, 1, 0, 1, 1, 1, 0]).reshape(2, 2, 2)
  assert coding.coding_map_auroc(fine, errors) == pytest.approx(0.625)
  # quantile 0.75 (5.25): only regions 6 and 7 are hard. Region 6 is fine,
  # 7 is not (TPR 1/2); 2 of the 6 easy regions are coarse (TNR 2/6).
  assert coding.coding_map_auroc(fine, errors, quantile=0.75) == pytest.approx(
      (1 / 2 + 2 / 6) / 2)
  with pytest.raises(ValueError, match='quantile'):
    coding.coding_map_auroc(fine, errors, quantile=1.0)


def test_region_scores_collects_a_split():
  rng = np.random.default_rng(3)
  fine = rng.integers(0, 2, (6, 2, 2))
  errors = rng.uniform(size=(6, 2, 2)) + 0.3 * fine
  acc = coding.RegionScores()
  acc.add(fine[:4], errors[:4], mask=np.asarray([1, 1, 1, 0]))
  acc.add(jnp.asarray(fine[4:]), jnp.asarray(errors[4:]))
  kept = np.asarray([0, 1, 2, 4, 5])
  assert len(acc) == 5 * 4
  assert acc.auroc() == pytest.approx(
      coding.coding_map_auroc(fine[kept], errors[kept]), abs=1e-12)


def test_per_image_auroc_scores_each_image_against_its_own_errors():
  # Image 0 is all hard and image 1 all easy by the split's median: the
  # pooled AUROC is chance for a map that finds each image's worst regions
  # exactly; inside each image it is perfect.
  errors = np.asarray([[[5.0, 6.0], [7.0, 8.0]], [[1.0, 2.0], [3.0, 4.0]]])
  fine = np.asarray([[[0, 0], [1, 1]], [[0, 0], [1, 1]]])
  acc = coding.RegionScores()
  acc.add(fine, errors)
  assert acc.auroc() == pytest.approx(0.5)
  assert acc.per_image_auroc() == (pytest.approx(1.0), 2)
  # A reversed map in one image scores 0 there; a flat image (no region
  # above its median) is left out, a constant map scores 0.5.
  acc = coding.RegionScores()
  acc.add(np.asarray([[1, 1, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]]),
          np.asarray([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0],
                      [1.0, 2.0, 3.0, 4.0]]))
  assert acc.per_image_auroc() == (pytest.approx(0.25), 2)
  flat = coding.RegionScores()
  flat.add(np.ones((1, 4)), np.ones((1, 4)))
  with pytest.raises(ValueError, match='undefined'):
    flat.per_image_auroc()


@pytest.mark.slow
def test_counts_agree_with_a_real_triple_tokenizer():
  from dqvq.models import dqvae  # pylint: disable=g-import-not-at-top
  model = dqvae.DQVAE(**dqvae.tiny_kwargs('triple'))
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 64, 64, 3), minval=-1)
  # jit: op-by-op dispatch of the encoder takes twice as long on CPU.
  variables = jax.jit(functools.partial(model.init, method=model.encode))(
      jax.random.PRNGKey(1), x)
  out = jax.jit(functools.partial(model.apply, method=model.encode))(
      variables, x)
  codes, grain = out['codes'], out['grain_map']
  counts = coding.code_counts(codes, grain, model.grain_factors,
                              model.codebook_size)
  lengths = [int(coding.code_counts(codes[i:i + 1], grain[i:i + 1],
                                    model.grain_factors,
                                    model.codebook_size).sum())
             for i in range(2)]
  np.testing.assert_array_equal(lengths, out['code_length'])
  assert int(counts.sum()) == int(out['code_length'].sum())
  # A coarse code is one value repeated over its cells (what "count once"
  # relies on): every cell equals its code's representative cell.
  side = np.asarray([f // 8 for f in model.grain_factors])[np.asarray(
      jnp.repeat(jnp.repeat(grain, 4, axis=1), 4, axis=2))]
  ys, xs = np.indices(side.shape[1:])
  rep = np.asarray(codes)[np.arange(2)[:, None, None],
                          ys - ys % side, xs - xs % side]
  np.testing.assert_array_equal(rep, codes)
