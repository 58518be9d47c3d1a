"""Router / random / oracle allocations of a fixed fine budget (dqvq.study)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq.eval import allocation


def test_random_map_has_the_exact_quota_and_depends_on_the_key():
  a = allocation.random_grain_map(jax.random.key(0), 4, (8, 8), (0.75, 0.25))
  b = allocation.random_grain_map(jax.random.key(1), 4, (8, 8), (0.75, 0.25))
  assert a.shape == (4, 8, 8)
  np.testing.assert_array_equal(a.sum(axis=(1, 2)), [16] * 4)
  assert not np.array_equal(a, b)


def test_oracle_gives_fine_codes_where_they_lower_the_error_most():
  x = jnp.zeros((1, 4, 8, 3))
  coarse = jnp.zeros_like(x).at[:, :, 4:].set(0.8)   # right half is wrong
  fine = jnp.zeros_like(x).at[:, :, 6:].set(0.2)     # fine fixes most of it
  gain = allocation.region_gain(x, coarse, fine, 2)
  assert gain.shape == (1, 2, 4)
  np.testing.assert_allclose(gain[0, 0], [0, 0, 0.64, 0.60], atol=1e-6)
  oracle = allocation.oracle_grain_map(gain, (0.5, 0.5))
  np.testing.assert_array_equal(oracle[0], [[0, 0, 1, 1], [0, 0, 1, 1]])


def test_gap_closed():
  assert allocation.gap_closed(20.0, 19.0, 21.0) == 0.5
  assert allocation.gap_closed(19.0, 19.0, 21.0) == 0.0
  assert np.isnan(allocation.gap_closed(19.0, 19.0, 19.0))


def test_uniform_map():
  g = allocation.uniform_grain_map(2, (3, 3), 1)
  assert g.dtype == jnp.int32 and bool(jnp.all(g == 1))


def test_study_figures_on_a_tiny_model(demo_data_dir, tmp_path):
  """The study's measurements run end to end and order the allocations."""
  import functools  # pylint: disable=g-import-not-at-top
  from test_train import tiny  # pylint: disable=g-import-not-at-top
  from dqvq.eval import study_eval  # pylint: disable=g-import-not-at-top
  from dqvq.eval import study_report  # pylint: disable=g-import-not-at-top
  from dqvq.models import router as router_lib  # pylint: disable=g-import-not-at-top
  from dqvq.trainers import stage1  # pylint: disable=g-import-not-at-top

  c = tiny(demo_data_dir)
  c.model.entropy_thresholds = None  # quota routing: no table needed
  models = stage1.build_models(c)
  size = c.data.resolution
  state = jax.jit(functools.partial(stage1.init_state, models,
                                    image_shape=(1, size, size, 3)))(
                                        jax.random.key(0))
  c.data.eval_split = 'validation[:16]'
  res = study_eval.run_one(c, state, budgets=(0.5,), seeds=2)
  own = res['own']
  assert res['num_images'] == 16
  assert 0 < own['psnr'] < 60 and own['code_length_mean'] > 0
  assert np.isfinite(res['all_fine']) and np.isfinite(res['all_coarse'])
  (row,) = res['budget']['run']
  # Untrained, fine and coarse codes are equally poor: all allocations of
  # the same quota land within a fraction of a dB (the ordering itself is
  # tested on constructed errors above).
  values = [row[k] for k in ('router', 'random', 'oracle')]
  assert np.all(np.isfinite(values)) and np.ptp(values) < 0.5
  assert row['random_std'] >= 0 and row['code_length'] > 0
  text = study_report.markdown(res)
  assert '| 0.5 |' in text and '| all fine |' in text
  # Held to a budget, every image codes exactly its quota (Table 5's row
  # 'at budget'): round(25%) of the regions fine, the rest coarse.
  batches = study_eval.validation_batches(c)
  held = study_eval.coding_figures(
      study_eval.Model(c, state, grain_ratios=(0.75, 0.25)), batches)
  regions = (c.data.resolution // c.model.grain_factors[0]) ** 2
  fine = round(0.25 * regions)
  expected = (regions - fine) + fine * (
      c.model.grain_factors[0] // c.model.grain_factors[1]) ** 2
  assert held['code_length_mean'] == expected
  assert held['code_length_var'] == 0
  # Figure 5's reference points: the same per-image counts at the fixed
  # model's worst regions cannot score below the router's choice.
  model = study_eval.Model(c, state)
  fig = study_eval.figure5(study_eval.fixed_region_errors(model, batches),
                          model, batches)
  for key in ('auroc', 'ranking', 'ceiling', 'gain_oracle'):
    assert 0.0 <= fig[key] <= 1.0, key
  assert fig['ceiling'] >= fig['auroc'] - 1e-9
  for key in ('auroc', 'ranking', 'gain_oracle'):
    assert 0.0 <= fig[f'{key}_per_image'] <= 1.0, key
  assert 0 < fig['images_per_image'] <= 16
  assert fig['regions'] == 16 * regions
  # The study's Figure 5 part also scores Table 6's r = 0.3 model (the
  # paper's fine share) when that model was trained. Every name here is the
  # same tiny model, so that row must repeat the r = 0.5 model's figures.
  names = ('fixed_f8', 'dual_feature_r0.5', 'dual_entropy',
           'dual_feature_r0.3')
  one_batch = c.copy_and_resolve_references()
  one_batch.data.eval_split = 'validation[:8]'
  study = study_eval.run_study({n: (one_batch, state) for n in names},
                               ('figure5',), str(tmp_path), budgets=(0.5,),
                               seeds=1)
  paper = "dual_feature_r0.3 (the paper's ratio)"
  modes = router_lib.INFERENCE_MODES  # the tiny model has a feature router
  assert set(study['figure5']) == {paper} | {
      f'{n} ({m})' for n in ('dual_feature_r0.5', 'dual_entropy')
      for m in modes}
  own = c.model.router_inference
  assert study['figure5'][paper] == study['figure5'][
      f'dual_feature_r0.5 ({own})']
  assert os.path.isfile(tmp_path / 'coding_vs_error.png')
  # Table 6's in-distribution reference: fresh crops of the training
  # photographs, the same ones every call.
  crops = study_eval.training_crops(c, 12)
  again = study_eval.training_crops(c, 12)
  assert sum(len(x) for x, _ in crops) >= 12
  np.testing.assert_array_equal(crops[0][0], again[0][0])
  assert crops[0][0].shape[1:] == (size, size, 3)
  assert crops[0][0].min() >= -1.0 and crops[0][0].max() <= 1.0


def test_study_set_overrides_known_fields_only():
  """`python -m dqvq.study --set FIELD=VALUE` (config_lib.apply_overrides)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dqvq import config_lib  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(dict(
      model=dict(router_target='none', grain_ratios=(0.5, 0.5)),
      optim=dict(router_lr_multiplier=1.0)))
  config_lib.apply_overrides(c, ['model.router_target=gain',
                                 'optim.router_lr_multiplier=10',
                                 'model.grain_ratios=(0.7, 0.3)'])
  assert c.model.router_target == 'gain'
  assert c.optim.router_lr_multiplier == 10
  assert tuple(c.model.grain_ratios) == (0.7, 0.3)
  for bad in ('model.mystery=1', 'nothing.here=1', 'model.router_target'):
    with pytest.raises(ValueError, match='FIELD=VALUE|no field'):
      config_lib.apply_overrides(c, [bad])


def test_study_stops_with_a_stopped_run(demo_data_dir, tmp_path):
  """A model's run that stops early (here `stop_at_step`; SIGTERM and Ctrl-C
  take the same path) stops the study: it must not go on to train the next
  models under a stop meant for the whole study."""
  from test_train import tiny  # pylint: disable=g-import-not-at-top
  from dqvq import study  # pylint: disable=g-import-not-at-top

  base = tiny(demo_data_dir)
  base.stop_at_step = 1
  with pytest.raises(study.Stopped, match='fixed_f8 stopped at step 1 of 3'):
    study.train(base, 'fixed_f8', str(tmp_path), 3)
  assert os.listdir(tmp_path / 'fixed_f8' / 'checkpoints') == ['1']


def test_both_study_commands_list_their_flags_and_refuse_bad_ones(tmp_path):
  """`python -m dqvq.study` and its benchmarks/ name are one command: each
  lists the study's flags under --helpshort and names the fix for a bad flag,
  and exits (code 1, absl's for both) before it creates the workdir."""
  import test_train  # pylint: disable=g-import-not-at-top
  entries = {'module': ['-m', 'dqvq.study'],
             'script': [os.path.join('benchmarks', 'study.py')]}
  cases = {('--only', 'table5,bogus'): "--only: unknown parts ['bogus']",
           ('--steps', '0'): '--steps and --random_seeds must be positive',
           ('--helpshort',): '--workdir: Runs and results go here.'}
  procs = {}
  for entry, head in entries.items():  # at once: each is mostly imports
    for i, (args, _) in enumerate(cases.items()):
      workdir = tmp_path / f'{entry}{i}'
      procs[entry, args, workdir] = subprocess.Popen(
          [sys.executable, *head, '--workdir', str(workdir), *args],
          cwd=test_train.ROOT, env=test_train.cli_env(), text=True,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  for (entry, args, workdir), proc in procs.items():
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, (entry, out[-3000:])
    assert cases[args] in out, (entry, out[-3000:])
    assert 'Traceback' not in out, (entry, out[-3000:])
    assert not workdir.exists(), entry
