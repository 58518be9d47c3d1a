"""Tests for dqvq.checkpoint: real Orbax checkpoints on disk.

Every test writes to its own tmp dir. Corruption tests damage the files Orbax
actually wrote (ocdbt data files, _METADATA, whole items) rather than faking
failures. Signals and preemption (real subprocess loops) are tested in
test_preemption.py.
"""

import glob
import logging
import os
import pathlib
import shutil

import flax
import grain
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from dqvq import checkpoint as ckpt_lib

def _state(step: int) -> dict[str, jax.Array]:
  """A state whose values are a known function of the step."""
  return {'w': jnp.full((4, 3), 2.0 * step), 'count': jnp.int32(step)}


def _data_iter():
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _steps_on_disk(workdir) -> list[int]:
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  return sorted(int(n) for n in names if n.isdigit())


def _save_steps(workdir, steps, **kwargs) -> ckpt_lib.Checkpointer:
  ckpt = ckpt_lib.Checkpointer(workdir, save_every=1, **kwargs)
  for step in steps:
    assert ckpt.maybe_save(step, _state(step))
  ckpt.wait_until_finished()
  return ckpt


def test_roundtrip_state_data_position_and_meta(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=5, config={'lr': 1e-4})
  it = _data_iter()
  for step in range(1, 11):
    next(it)
    ckpt.maybe_save(step, _state(step), it, metrics={'loss': 1.0 / step},
                    extra={'stage': 1})
  ckpt.close()
  assert _steps_on_disk(tmp_path) == [5, 10]

  fresh = _data_iter()
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=5)
  state, step, meta = ckpt.restore_latest(
      ckpt_lib.abstract_state_of(_state(0)), fresh)
  ckpt.close()
  assert step == 10
  np.testing.assert_array_equal(state['w'], np.full((4, 3), 20.0))
  assert int(state['count']) == 10
  assert next(fresh) == 10  # iterator resumes after the 10 consumed items
  assert meta['step'] == 10 and meta['config'] == {'lr': 1e-4}
  assert meta['metrics'] == {'loss': 0.1} and meta['stage'] == 1
  assert meta['time'] > 0


def test_restore_latest_is_none_without_checkpoints(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  assert ckpt.restore_latest(ckpt_lib.abstract_state_of(_state(0))) is None
  assert ckpt.latest_step() is None and ckpt.all_steps() == []
  ckpt.close()


def test_save_grid_force_and_no_overwrite(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=4)
  assert not ckpt.maybe_save(3, _state(3))          # off the grid
  assert ckpt.maybe_save(4, _state(4))              # on the grid
  assert not ckpt.maybe_save(4, _state(4), force=True)  # already saved
  assert ckpt.maybe_save(6, _state(6), force=True)  # end of run
  assert not ckpt.maybe_save(5, _state(5), force=True)  # older than latest
  ckpt.close()
  assert ckpt.all_steps() == [4, 6] == _steps_on_disk(tmp_path)


@pytest.mark.parametrize('mode,best', [('min', 2), ('max', 4)])
def test_keeps_last_k_plus_best_across_restarts(tmp_path, mode, best):
  metrics = {1: {'loss': 1.0}, 2: {'val/rec_loss': 0.5}, 3: {'loss': 1.0},
             4: {'val/rec_loss': 0.9}, 5: {}, 6: {'val/rec_loss': 0.7}}
  kwargs = dict(save_every=1, keep=2, best_metric='val/rec_loss',
                best_mode=mode)
  ckpt = ckpt_lib.Checkpointer(tmp_path, **kwargs)
  for step, m in metrics.items():
    ckpt.maybe_save(step, _state(step), metrics=m)
  ckpt.close()
  assert _steps_on_disk(tmp_path) == sorted({best, 5, 6})

  # A restarted run must still know which old step is best (metrics are
  # read back from disk), so it keeps it while newer steps rotate out.
  ckpt = ckpt_lib.Checkpointer(tmp_path, **kwargs)
  assert ckpt.best_step() == best
  ckpt.maybe_save(7, _state(7), metrics={'loss': 1.0})
  ckpt.maybe_save(8, _state(8), metrics={'val/rec_loss': 2.0 if mode == 'min'
                                         else -1.0})
  ckpt.close()
  assert _steps_on_disk(tmp_path) == sorted({best, 7, 8})


def _mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(
      np.array(jax.devices()).reshape(8, 1), ('data', 'fsdp'),
      axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_sharded_state_restores_into_same_and_other_shardings(tmp_path):
  mesh = _mesh()
  row = NamedSharding(mesh, P('data', None))
  rep = NamedSharding(mesh, P())
  w = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
  state = {'w': jax.device_put(w, row),
           'scale': jax.device_put(np.float32(3.5), rep)}
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  ckpt.maybe_save(1, state)

  same = ckpt_lib.abstract_state_of(state)
  restored, step, _ = ckpt.restore_latest(same)
  assert step == 1
  np.testing.assert_array_equal(restored['w'], w)
  assert float(restored['scale']) == 3.5
  assert restored['w'].sharding == row
  assert restored['scale'].sharding == rep
  assert len(restored['w'].addressable_shards) == 8
  assert restored['w'].addressable_shards[0].data.shape == (2, 8)

  for target in (rep, NamedSharding(mesh, P(None, 'data'))):
    other = {'w': jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=target),
             'scale': jax.ShapeDtypeStruct((), np.float32, sharding=rep)}
    restored, _, _ = ckpt.restore_latest(other)
    np.testing.assert_array_equal(restored['w'], w)
    assert restored['w'].sharding == target
  ckpt.close()


def test_replicated_arrays_above_and_below_the_replica_parallel_threshold(
    tmp_path):
  """Replicated over 8 devices, an 8 MiB array is still written by the
  replicas together (1 MiB each, the threshold) and small ones by one
  replica (dqvq.checkpoint); both read back exactly."""
  rep = NamedSharding(_mesh(), P())
  big_rows = 8 * ckpt_lib.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL // (256 * 4)
  big = np.random.default_rng(0).normal(size=(big_rows, 256)).astype(
      np.float32)  # 8 MiB: 1 MiB per replica's slice
  small = {f's{i}': np.full((3, 5), i, np.float32) for i in range(20)}
  state = jax.device_put({'big': big, **small}, rep)
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  ckpt.maybe_save(1, state)
  restored, _, _ = ckpt.restore_latest(ckpt_lib.abstract_state_of(state))
  np.testing.assert_array_equal(restored['big'], big)
  for k, v in small.items():
    np.testing.assert_array_equal(restored[k], v)
  ckpt.close()


@flax.struct.dataclass
class _TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def test_flax_train_state_restores_from_eval_shape(tmp_path, caplog):
  """The trainers' state: a flax.struct dataclass holding optax state."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  params = {'conv': {'kernel': jnp.arange(6.0).reshape(2, 3)}}
  state = _TrainState(jnp.int32(3), params, tx.init(params))
  _, state = jax.jit(lambda s: (None, s.replace(
      opt_state=tx.update(s.params, s.opt_state, s.params)[1])))(state)
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  ckpt.maybe_save(3, state)

  rep = NamedSharding(_mesh(), P())
  abstract = jax.eval_shape(lambda: state)
  placed = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)
  restored, _, _ = ckpt.restore_latest(placed)
  assert isinstance(restored, _TrainState)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(got, want)
    assert got.sharding == rep
  assert int(restored.opt_state[1][0].count) == 1

  with caplog.at_level(logging.WARNING):
    ckpt.restore_latest(abstract)  # no shardings: works, but says so
  assert any('without a sharding' in r.getMessage() for r in caplog.records)
  ckpt.close()


def _corrupt(step_dir: str, how: str) -> None:
  if how == 'delete_array_data':
    files = glob.glob(f'{step_dir}/state/**/d/*', recursive=True)
    assert files
    for f in files:
      os.remove(f)
  elif how == 'truncate_array_data':
    for f in glob.glob(f'{step_dir}/state/**/d/*', recursive=True):
      with open(f, 'r+b') as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif how == 'flip_byte_in_array_data':  # decodes to other bits, or fails
    for f in glob.glob(f'{step_dir}/state/**/d/*', recursive=True):
      with open(f, 'r+b') as fh:
        fh.seek(os.path.getsize(f) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))
  elif how == 'garbage_metadata':
    pathlib.Path(step_dir, 'state', '_METADATA').write_text('{"tree": ')
  elif how == 'missing_state_item':
    shutil.rmtree(os.path.join(step_dir, 'state'))
  elif how == 'empty_step_dir':  # final name, nothing inside, no commit file
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


# Orbax/tensorstore can leave an async read pending when a step fails to load;
# it is collected after the test's event loop closed. Harmless, not ours.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('how', ['delete_array_data', 'truncate_array_data',
                                 'flip_byte_in_array_data', 'garbage_metadata',
                                 'missing_state_item', 'empty_step_dir'])
def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog, how):
  _save_steps(tmp_path, [1, 2, 3]).close()
  _corrupt(str(tmp_path / 'checkpoints' / '3'), how)

  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  with caplog.at_level(logging.WARNING):
    state, step, _ = ckpt.restore_latest(ckpt_lib.abstract_state_of(_state(0)))
  assert step == 2
  np.testing.assert_array_equal(state['w'], np.full((4, 3), 4.0))
  assert any('step 3' in r.getMessage() and 'unreadable' in r.getMessage()
             for r in caplog.records)
  # The bad step is moved aside (kept for inspection), so the resumed run can
  # save step 3 again and the next restart does not trip over it.
  assert ckpt.latest_step() == 2
  assert glob.glob(str(tmp_path / 'checkpoints' / '3.unreadable-*'))
  assert ckpt.maybe_save(3, _state(3))
  ckpt.close()
  assert ckpt.all_steps() == [1, 2, 3]


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_all_steps_unreadable_raises_listing_them(tmp_path):
  _save_steps(tmp_path, [1, 2]).close()
  for step in (1, 2):
    _corrupt(str(tmp_path / 'checkpoints' / str(step)), 'delete_array_data')
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  with pytest.raises(ckpt_lib.CheckpointRestoreError,
                     match=r'(?s)step 2: .*step 1: '):
    ckpt.restore_latest(ckpt_lib.abstract_state_of(_state(0)))
  ckpt.close()


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_restore_fields_falls_back_but_leaves_the_damaged_step(tmp_path,
                                                                caplog):
  """A tokenizer loaded as a library reads the newest step that reads back,
  as a resume does, but must not move a training run's files aside."""
  _save_steps(tmp_path, [1, 2, 3]).close()
  _corrupt(str(tmp_path / 'checkpoints' / '3'), 'delete_array_data')
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  abstract = {'w': ckpt_lib.abstract_state_of(_state(0))['w']}
  with caplog.at_level(logging.WARNING):
    fields, step = ckpt.restore_fields(abstract)
  assert step == 2 and set(fields) == {'w'}
  np.testing.assert_array_equal(fields['w'], np.full((4, 3), 4.0))
  assert any('step 3' in r.getMessage() for r in caplog.records)
  assert ckpt.all_steps() == [1, 2, 3]
  # A named step has no fallback: its own error, not an older step's arrays.
  with pytest.raises(Exception) as err:
    ckpt.restore_fields(abstract, step=3)
  assert not isinstance(err.value, ckpt_lib.CheckpointRestoreError)
  _corrupt(str(tmp_path / 'checkpoints' / '2'), 'delete_array_data')
  _corrupt(str(tmp_path / 'checkpoints' / '1'), 'delete_array_data')
  with pytest.raises(ckpt_lib.CheckpointRestoreError,
                     match=r'(?s)step 3: .*step 2: .*step 1: '):
    ckpt.restore_fields(abstract)
  ckpt.close()


def test_unfinished_tmp_step_is_ignored_and_cleaned(tmp_path):
  """Orbax (POSIX) writes `N.orbax-checkpoint-tmp-<ts>` and renames it."""
  _save_steps(tmp_path, [1, 2]).close()
  root = tmp_path / 'checkpoints'
  # What a save killed before its rename leaves behind: a full copy of the
  # files but the temporary name and no commit_success.txt.
  tmp_step = root / '9.orbax-checkpoint-tmp-1700000000000'
  shutil.copytree(root / '2', tmp_step)
  for f in glob.glob(f'{tmp_step}/**/commit_success.txt', recursive=True):
    os.remove(f)

  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
  _, step, _ = ckpt.restore_latest(ckpt_lib.abstract_state_of(_state(0)))
  assert step == 2
  ckpt.maybe_save(3, _state(3))  # Orbax waits for its tmp cleanup first
  ckpt.close()
  assert not tmp_step.exists()


def test_nan_never_overwrites_the_last_good_checkpoint(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=2)
  losses = [1.0, 0.8, 0.7, float('nan'), 0.5]
  with pytest.raises(ckpt_lib.NonFiniteLossError) as err:
    for step, loss in enumerate(losses, start=1):
      state = _state(step) if np.isfinite(loss) else {
          'w': jnp.full((4, 3), jnp.nan), 'count': jnp.int32(step)}
      metrics = {'loss': loss, 'lr': 1e-4}
      ckpt_lib.check_finite(step, metrics, ckpt.latest_step())
      ckpt.maybe_save(step, state, metrics=metrics)
  assert err.value.step == 4 and err.value.names == ('loss',)
  message = str(err.value)
  assert 'step 4' in message and 'loss' in message and 'lr' not in message
  assert 'step 2' in message and 'learning rate' in message
  ckpt.close()

  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=2)
  state, step, _ = ckpt.restore_latest(ckpt_lib.abstract_state_of(_state(0)))
  assert step == 2
  np.testing.assert_array_equal(state['w'], np.full((4, 3), 4.0))

  # maybe_save itself refuses a NaN state even with finite metrics.
  bad = {'w': jnp.full((4, 3), jnp.inf), 'count': jnp.int32(4)}
  with pytest.raises(ckpt_lib.NonFiniteLossError, match=r"state\['w'\]"):
    ckpt.maybe_save(4, bad, metrics={'loss': 0.1})
  ckpt.close()
  assert ckpt.all_steps() == [2]
