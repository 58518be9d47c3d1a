"""`python -m dqvq.evaluate`: the JSON, pictures and TensorBoard of a run.

One tokenizer evaluation (with two --ratios budgets, random LPIPS and a
random Inception) and one generator evaluation are shared by the tests, on
the 2-step `:runlocal` runs of conftest at 32 px, 12 images, batch 8.

scipy's `sqrtm` of a 2048 x 2048 matrix costs 20-100 s on a loaded 2-core
machine, and each evaluation takes several FIDs. The shared runs therefore
use `_low_rank_sqrtm`, the same principal square root computed in the few
dimensions that the product of two covariances of a dozen images spans
(checked against scipy below; test_fid.py covers `frechet_distance`, and
the slow test runs an evaluation with scipy's own `sqrtm`).
"""

from __future__ import annotations

import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from dqvq.eval import coding
from dqvq.eval import fid as fid_lib
from dqvq.eval import generator_eval
from dqvq.eval import tokenizer_eval
from dqvq import evaluate
from dqvq import sampling
from dqvq import sequence
from dqvq import sharding

from conftest import load_config

NUM_IMAGES = 12  # two batches of 8, the second padded
_SCIPY_SQRTM = scipy.linalg.sqrtm  # before any test patches it


def _low_rank_sqrtm(a: np.ndarray) -> np.ndarray:
  """sqrtm(A) for A of low rank: U sqrtm(U^T A U) U^T, U spanning A's ranges.

  A = U U^T A U U^T when U holds an orthonormal basis of A's column and row
  spaces, so the principal root is U sqrt(M) U^T with M = U^T A U (the zero
  eigenvalues of the complement stay zero). U comes from A and A^T applied
  to 64 random vectors each, exact while the rank is below 64.
  """
  probe = np.random.default_rng(0).normal(size=(a.shape[0], 64))
  u, s, _ = np.linalg.svd(np.concatenate([a @ probe, a.T @ probe], axis=1),
                          full_matrices=False)
  u = u[:, s > s[0] * 1e-9]
  assert u.shape[1] < 64, 'not a low-rank product: use scipy.linalg.sqrtm'
  return u @ _SCIPY_SQRTM(u.T @ a @ u) @ u.T


@pytest.fixture(scope='module')
def stats_cache(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('fid_cache'))


@pytest.fixture(scope='module')
def tokenizer_eval_run(stage1_workdir, demo_data_dir, stats_cache,
                       tmp_path_factory):
  out = str(tmp_path_factory.mktemp('tokenizer_eval'))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(scipy.linalg, 'sqrtm', _low_rank_sqrtm)
    payload = evaluate.run(evaluate.EvalOptions(
        workdir=stage1_workdir, data_dir=demo_data_dir, num_images=NUM_IMAGES,
        batch_size=8, inception_weights='random', lpips_weights='random',
        ratios=(0.3, 0.7), out=out, stats_cache=stats_cache, num_pictures=4))
  return payload, out


@pytest.fixture(scope='module')
def generator_eval_run(stage2_workdir, demo_data_dir, stats_cache,
                       tokenizer_eval_run, tmp_path_factory):
  del tokenizer_eval_run  # runs first, so the reference statistics are cached
  out = str(tmp_path_factory.mktemp('generator_eval'))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(scipy.linalg, 'sqrtm', _low_rank_sqrtm)
    payload = evaluate.run(evaluate.EvalOptions(
        workdir=stage2_workdir, data_dir=demo_data_dir,
        num_images=NUM_IMAGES, num_samples=8, batch_size=8,
        inception_weights='random', out=out, stats_cache=stats_cache,
        codec_images=0))  # the codec: tests/test_evaluate_codec.py
  return payload, out


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def test_low_rank_sqrtm_matches_scipy():
  rng = np.random.default_rng(0)
  f1, f2 = rng.normal(size=(5, 300)), rng.normal(size=(6, 300)) + 0.3
  a = np.cov(f1, rowvar=False) @ np.cov(f2, rowvar=False)
  want = scipy.linalg.sqrtm(a)
  got = _low_rank_sqrtm(a)
  # SciPy's Schur sqrtm is itself only accurate to ~1e-6 relative on this
  # rank-deficient product (1.03e-6 seen on an AVX-512 machine); the square
  # check below is the tight one.
  np.testing.assert_allclose(np.trace(got), np.trace(want).real, rtol=1e-5)
  np.testing.assert_allclose(got @ got, a, atol=1e-8)


def test_tokenizer_json_is_complete(tokenizer_eval_run, stats_cache):
  payload, out = tokenizer_eval_run
  with open(os.path.join(out, 'metrics.json')) as f:
    stored = json.load(f)
  assert stored == payload
  assert stored['what'] == 'tokenizer' and stored['step'] == 2
  assert stored['config']['stage'] == 1
  assert stored['data']['dataset'] == 'dqvq_demo'
  assert stored['data']['num_images'] == NUM_IMAGES
  assert stored['data']['resolution'] == 32
  assert stored['data']['split'] == 'validation'
  assert len(stored['data']['hash']) == 16
  assert stored['weights']['lpips'] == {'path': 'random', 'comparable': False}
  assert stored['weights']['inception']['comparable'] is False
  assert any('RANDOM' in n for n in stored['notes'])
  m = stored['metrics']
  for key in ('psnr', 'ssim', 'l1', 'mse', 'psnr_of_mean_mse', 'lpips',
              'rfid', 'code_length_mean', 'code_length_var',
              'code_length_expected', 'codebook_usage', 'codebook_unused',
              'perplexity', 'codebook_usage_f8', 'codebook_usage_f4',
              'perplexity_f4', 'ratio_f8', 'ratio_f4', 'target_ratio_f4',
              'bits_per_image', 'coding_map_auroc',
              'coding_map_auroc_per_image'):
    assert _finite(m[key]), (key, m[key])
  assert m['num_images'] == NUM_IMAGES
  assert 0 < m['psnr'] < 100 and 0 < m['ssim'] <= 1 and m['lpips'] >= 0
  assert m['rfid'] >= 0
  for key in ('codebook_usage', 'codebook_usage_f8', 'codebook_usage_f4',
              'coding_map_auroc', 'coding_map_auroc_per_image'):
    assert 0.0 <= m[key] <= 1.0, key
  assert m['ratio_f8'] + m['ratio_f4'] == pytest.approx(1.0)
  hist = np.asarray(stored['histograms']['code_length'], np.float64)
  assert hist.sum() == NUM_IMAGES
  lengths = np.arange(hist.size)
  mean = (hist * lengths).sum() / hist.sum()
  assert m['code_length_mean'] == pytest.approx(mean)
  assert m['code_length_var'] == pytest.approx(
      (hist * (lengths - mean) ** 2).sum() / hist.sum())
  # 4x4 regions of 1 or 4 codes each.
  assert 16 <= m['code_length_min'] <= m['code_length_max'] <= 64
  for name in ('coding_maps.png', 'error_maps.png', 'reconstructions.png',
               'code_length_hist.png', 'rate_distortion.png'):
    assert name in stored['pictures']
    assert os.path.getsize(os.path.join(out, name)) > 1000, name
  assert os.path.exists(os.path.join(stats_cache, 'fid_reference_stats.npz'))


def test_rate_distortion_figures(tokenizer_eval_run):
  payload, _ = tokenizer_eval_run
  low, high = payload['rate_distortion']
  assert (low['fine_ratio_target'], high['fine_ratio_target']) == (0.3, 0.7)
  assert low['grain_ratios'] == pytest.approx([0.7, 0.3])
  assert high['code_length_mean'] > low['code_length_mean']
  assert high['bits_per_image'] > low['bits_per_image']
  for point in (low, high):
    for key in ('psnr', 'ssim', 'lpips', 'rfid', 'codebook_usage'):
      assert _finite(point[key]), key
    # 256 codes: 8 bits per code, plus 1 bit per region for two grains.
    assert point['bits_per_image'] == pytest.approx(
        point['code_length_mean'] * 8 + 16)
    assert sum(point['code_length_hist']) == NUM_IMAGES


def test_tensorboard_scalars(tokenizer_eval_run, stage1_workdir):
  del tokenizer_eval_run
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = {}
  for path in glob.glob(os.path.join(stage1_workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag.startswith('eval/'):  # training also wrote images
          tags[value.tag] = (event.step,
                             float(tf.make_ndarray(value.tensor)))
  step, psnr = tags['eval/tokenizer/psnr']
  assert step == 2 and 0 < psnr < 100
  assert 'eval/tokenizer/coding_map_auroc' in tags


def test_generator_json(generator_eval_run, tokenizer_eval_run):
  payload, out = generator_eval_run
  with open(os.path.join(out, 'metrics.json')) as f:
    stored = json.load(f)
  assert stored['what'] == 'generator' and stored['config']['stage'] == 2
  # Same images as the tokenizer run: same data hash (and FID cache).
  assert stored['data']['hash'] == tokenizer_eval_run[0]['data']['hash']
  m = stored['metrics']
  assert _finite(m['fid']) and m['fid'] >= 0
  assert _finite(m['inception_score']) and m['inception_score'] >= 1.0
  assert m['num_samples'] == 8 and m['reference_count'] == NUM_IMAGES
  for prefix in ('sample_', 'data_'):
    for key in ('code_length_mean', 'code_length_var', 'codebook_usage'):
      assert _finite(m[prefix + key]), prefix + key
  hists = stored['histograms']
  assert sum(hists['sample_code_length']) == 8
  assert sum(hists['data_code_length']) == NUM_IMAGES
  # The generator's tokenizer is the tokenizer run's: same data lengths.
  assert m['data_code_length_mean'] == pytest.approx(
      tokenizer_eval_run[0]['metrics']['code_length_mean'])
  assert 0.0 <= m['code_length_tv_distance'] <= 1.0
  for name in ('samples.png', 'sample_coding_maps.png',
               'code_length_hist.png'):
    assert os.path.exists(os.path.join(out, name)), name


def test_sample_statistics_match_gathered_images(stage2_workdir, tmp_path,
                                                 monkeypatch):
  """Each sampled batch is reduced on the mesh, to the host path's figures.

  The reference is the evaluation as it was: `Generator.sample` gathers all
  images to the host, which puts them back on the devices for Inception.
  Reduced batch by batch instead, the features, Inception Score and code
  statistics are the same, and the only images gathered are the first
  batch's, for its pictures.
  """
  mesh = sharding.create_mesh()
  gen = generator_eval.load(stage2_workdir, None, mesh)
  fid = generator_eval.fid_setup('random', mesh, 'test', str(tmp_path), [])
  config = sampling.SamplingConfig()
  gathered = []
  host_gather = sharding.host_gather

  def spy(tree):
    out = host_gather(tree)
    gathered.extend(np.shape(x) for x in jax.tree.leaves(out))
    return out

  monkeypatch.setattr(sharding, 'host_gather', spy)
  got = generator_eval.sample_statistics(
      gen, 12, sampling_config=config, batch_size=8, fid=fid, num_pictures=3)
  monkeypatch.undo()
  assert [s for s in gathered if len(s) == 4] == [(8, 32, 32, 3)]
  assert {s for s in gathered if len(s) == 2} == {(8, 2048), (8, 1008)}

  want = gen.sample(12, config=config, batch_size=8)
  np.testing.assert_allclose(got['pictures']['image'], want['image'][:3],
                             atol=1e-5)
  np.testing.assert_array_equal(got['pictures']['grain_map'],
                                want['grain_map'][:3])
  np.testing.assert_array_equal(got['pictures']['label'], want['label'][:3])
  feats, scores = fid_lib.FeatureStats(), fid_lib.InceptionScoreStats(12)
  spec = sharding.batch_sharding(mesh)
  for lo in (0, 8):  # the old host_features: host images back on the mesh
    padded = np.zeros((8, 32, 32, 3), np.float32)
    padded[:len(want['image'][lo:lo + 8])] = want['image'][lo:lo + 8]
    x = jax.make_array_from_callback(padded.shape, spec,
                                     lambda idx, a=padded: a[idx])
    fid.update(feats, x, np.arange(8) < 12 - lo, scores)
  assert got['features'].count == feats.count == 12
  for a, b in zip(got['features'].mean_cov(), feats.mean_cov()):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got['inception_score'].result(), scores.result(),
                             rtol=1e-5)
  factors = tuple(gen.tokenizer.vae.grain_factors)
  sums = coding.coding_sums(jnp.asarray(want['codes']),
                            jnp.asarray(want['grain_map']), factors,
                            gen.tokenizer.vae.codebook_size)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got['sums']),
               jax.device_get(sums))
  assert got['complete'] == int(np.sum(np.all(
      want['writes'].reshape(12, -1) == 1, axis=1)))


@pytest.mark.parametrize('change, error, match', [
    (dict(split='nosuch'), ValueError, "not a split of dqvq_demo"),
    (dict(num_images=100_000), ValueError, 'has 192 images'),
    (dict(inception_weights='/nonexistent/inc'), FileNotFoundError,
     'python -m dqvq.convert inception'),
    (dict(lpips_weights='/nonexistent/lpips'), FileNotFoundError,
     'python -m dqvq.convert lpips'),
    (dict(what='generator'), ValueError, 'needs a stage-2 run'),
    (dict(bundle='/some/bundle'), ValueError, 'exactly one of --workdir'),
    (dict(ratios=(1.5,)), ValueError, r'lie in \(0, 1\)'),
    (dict(batch_size=12), ValueError, 'multiple of the 8 devices'),
])
def test_bad_input_fails_early(stage1_workdir, demo_data_dir, tmp_path,
                               change, error, match):
  options = dict(workdir=stage1_workdir, data_dir=demo_data_dir,
                 num_images=8, out=str(tmp_path / 'eval'))
  with pytest.raises(error, match=match):
    evaluate.run(evaluate.EvalOptions(**{**options, **change}))
  assert not os.path.exists(tmp_path / 'eval')


def test_ratios_need_a_router():
  vqgan = load_config('imagenet_stage1').get_config('runlocal,vqgan').model
  with pytest.raises(ValueError, match="router='none'.*drop --ratios"):
    tokenizer_eval.validate_ratios((0.5,), vqgan)
  tokenizer_eval.validate_ratios((), vqgan)  # no budgets: fine
  dual = load_config('imagenet_stage1').get_config('runlocal').model
  tokenizer_eval.validate_ratios((0.3, 0.7), dual)


def test_budget_ratios_and_bits():
  assert tokenizer_eval.budget_grain_ratios(0.3, (0.5, 0.5)) == (
      pytest.approx(0.7), 0.3)
  triple = tokenizer_eval.budget_grain_ratios(0.5, (0.4, 0.3, 0.3))
  np.testing.assert_allclose(triple, (0.5 * 4 / 7, 0.5 * 3 / 7, 0.5))
  bits = sequence.bits_per_image(640.0, 1024, 256, 2)
  assert bits == {'bits_per_image': 6656.0, 'bits_codes': 6400.0,
                  'bits_grain_map': 256.0}
  assert sequence.bits_per_image(256.0, 1024, 256, 1)[
      'bits_grain_map'] == 0.0
  three = sequence.bits_per_image(10.0, 16, 4, 3)
  assert three['bits_per_image'] == pytest.approx(40 + 4 * math.log2(3))


def test_length_distances():
  same = generator_eval.length_distances([0, 2, 2], [0, 1, 1])
  assert same == {'code_length_tv_distance': 0.0,
                  'code_length_wasserstein': 0.0}
  # All images at length 1 vs all at length 3: disjoint, 2 codes apart.
  apart = generator_eval.length_distances([0, 5], [0, 0, 0, 7])
  assert apart == {'code_length_tv_distance': 1.0,
                   'code_length_wasserstein': 2.0}
  with pytest.raises(ValueError, match='at least one image'):
    generator_eval.length_distances([0, 0], [1])


@pytest.mark.slow
def test_fid_with_scipy_sqrtm(stage1_workdir, demo_data_dir, tmp_path):
  """The unpatched path: scipy's sqrtm on the real 2048-d statistics."""
  payload = evaluate.run(evaluate.EvalOptions(
      workdir=stage1_workdir, data_dir=demo_data_dir, num_images=NUM_IMAGES,
      batch_size=8, inception_weights='random', lpips_weights='',
      out=str(tmp_path / 'eval'), tensorboard=False))
  assert _finite(payload['metrics']['rfid'])
  assert payload['metrics']['lpips'] is None
  assert payload['weights']['lpips'] is None
  assert any('LPIPS: skipped' in n for n in payload['notes'])
