"""A diverging run never saves a diverged state, and says where to resume.

The guard (`run_guards.DivergenceGuard`) on synthetic losses and real Orbax
checkpoints; `Checkpointer.restore(step=...)` (`--config.resume_step`); and
one real training run at a learning rate that blows it up.
"""

import glob
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq import checkpoint as ckpt_lib
from dqvq.trainers import checks

import test_train  # pylint: disable=g-bad-import-order


def _state(step: int, scale: float = 1.0) -> dict[str, jax.Array]:
  return {'w': jnp.full((4, 3), 2.0 * step * scale), 'count': jnp.int32(step)}


def test_spike_stops_before_saving_and_names_the_last_good_step(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  guard = ckpt_lib.DivergenceGuard(factor=10.0, metric='loss')
  losses = [1.0, 0.9, 0.8, 50.0]  # the last: finite, 60x the running mean
  with pytest.raises(ckpt_lib.LossSpikeError) as err:
    for step, loss in enumerate(losses, start=1):
      guard.observe(step, {'loss': loss, 'lr': 1e-4}, ckpt.all_steps())
      ckpt.maybe_save(step, _state(step), extra={
          'divergence_guard': guard.state_dict()})
  ckpt.close()
  assert err.value.step == 4 and err.value.last_good_step == 3
  message = str(err.value)
  assert 'step 4' in message and 'last good checkpoint is step 3' in message
  assert 'no checkpoint' not in message
  # Older steps exist, so the message says how to go back to one of them.
  assert 'older saved steps: 1, 2' in message and 'resume_step' in message
  assert ckpt.all_steps() == [1, 2, 3]

  # The running mean travels with the checkpoint: a resumed run still sees
  # the same spike.
  meta = ckpt_lib.Checkpointer(tmp_path, save_every=1).read_meta(3)
  resumed = ckpt_lib.DivergenceGuard(factor=10.0, metric='loss')
  resumed.load_state_dict(meta['divergence_guard'])
  with pytest.raises(ckpt_lib.LossSpikeError):
    resumed.observe(4, {'loss': 50.0})


def test_state_check_catches_what_the_lagging_training_loss_misses():
  """A step's loss is measured before its update: the step that blows the
  weights up still reports a normal loss; the state's own loss does not."""
  guard = ckpt_lib.DivergenceGuard(factor=10.0, metric='l1_loss')
  guard.check_state(0, {'val/l1_loss': 0.5, 'val/psnr': 10.0})  # untrained
  for step, loss in enumerate([0.48, 0.45, 0.44], start=1):
    guard.observe(step, {'l1_loss': loss})
  guard.check_state(3, {'val/l1_loss': 0.42})  # healthy: fine
  with pytest.raises(ckpt_lib.LossSpikeError, match=r'val/l1_loss=8\.3e\+04'):
    guard.check_state(4, {'val/l1_loss': 8.3e4}, saved_steps=[3])
  with pytest.raises(ckpt_lib.NonFiniteLossError, match='val/psnr'):
    guard.check_state(4, {'val/l1_loss': 0.4, 'val/psnr': float('nan')})
  # factor 0: no spike check, but NaN is still refused.
  off = ckpt_lib.DivergenceGuard(factor=0.0, metric='l1_loss')
  off.observe(1, {'l1_loss': 0.5})
  off.observe(2, {'l1_loss': 5e4})
  with pytest.raises(ckpt_lib.NonFiniteLossError):
    off.observe(3, {'l1_loss': float('inf')})


def test_message_without_any_checkpoint_says_so():
  with pytest.raises(ckpt_lib.NonFiniteLossError,
                     match='no checkpoint was saved yet'):
    ckpt_lib.DivergenceGuard(10.0, 'loss').observe(1, {'loss': float('nan')})


def test_resume_from_an_older_step_moves_the_newer_ones_aside(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5)
  for step in (1, 2, 3, 4):
    ckpt.maybe_save(step, _state(step))
  ckpt.close()

  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1, keep=5)
  with pytest.raises(FileNotFoundError, match=r'steps 1, 2, 3, 4; pick one'):
    ckpt.restore(ckpt_lib.abstract_state_of(_state(0)), step=7)
  state, step, _ = ckpt.restore(ckpt_lib.abstract_state_of(_state(0)), step=2)
  assert step == 2
  np.testing.assert_array_equal(state['w'], np.full((4, 3), 4.0))
  # Steps 3 and 4 are kept on disk under other names, out of Orbax's sight,
  # so the resumed run saves its own 3 and 4 and later restarts find them.
  assert ckpt.all_steps() == [1, 2]
  assert len(glob.glob(str(tmp_path / 'checkpoints' / '*.superseded-*'))) == 2
  assert ckpt.maybe_save(3, _state(3, scale=0.5))
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  state, step, _ = ckpt.restore(ckpt_lib.abstract_state_of(_state(0)))
  ckpt.close()
  assert step == 3
  np.testing.assert_array_equal(state['w'], np.full((4, 3), 3.0))


@pytest.mark.parametrize('field,value,match', [
    ('resume_step', -1, 'resume_step'),
    ('loss_spike_factor', 0.5, 'loss_spike_factor'),
    ('loss_spike_factor', -2.0, 'loss_spike_factor'),
    ('steps_in_flight', -1, 'steps_in_flight'),
])
def test_config_fields_validated(field, value, match, demo_data_dir):
  c = test_train.tiny(demo_data_dir)
  c[field] = value
  with pytest.raises(ValueError, match=match):
    checks.validate_config(c)


def test_blown_up_run_saves_only_finite_states(demo_data_dir, tmp_path):
  # lr 1e4 (x batch 8): step 1 trains at lr 0 (warm-up), step 2's update
  # wrecks the weights. Validation is off, so the check before each save is
  # what measures the state (one validation batch).
  run = subprocess.run(test_train.cli_command(
      'ffhq_stage1.py:runlocal', tmp_path,
      f'--config.data.data_dir={demo_data_dir}',
      '--config.optim.base_learning_rate=1e4', '--config.num_train_steps=4',
      '--config.eval_every=1000', '--config.image_every=1000',
      '--config.keep_checkpoints=10'), cwd=test_train.ROOT,
      env=test_train.cli_env(), capture_output=True, text=True, timeout=400)
  console = (run.stdout + run.stderr).strip().splitlines()
  assert run.returncode == 3, '\n'.join(console[-30:])  # diverged
  [saved] = test_train.restored_states(
      test_train.tiny(demo_data_dir, 'ffhq_stage1'), tmp_path)
  assert saved, 'nothing was saved before the divergence'
  for step, state in saved.items():
    assert not ckpt_lib.nonfinite_leaves(state), step
    assert int(state.step) == step
  # The message alone, last, naming the newest saved step as the good one.
  message = console[-1]
  assert re.match(r'(NonFiniteLossError|LossSpikeError): ', message), message
  assert f'last good checkpoint is step {max(saved)},' in message
  assert not [l for l in console if l.startswith('Traceback')]
