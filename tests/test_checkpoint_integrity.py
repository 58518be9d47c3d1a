"""Checkpoints and workdirs that fail loudly, and nothing lost.

Three behaviours, each on real files:
- an unwritable workdir or `checkpoints/` is refused at the start of
  `loop.train_and_evaluate`, before any data, model or compile;
- an array whose bits changed on disk (finite, plausible values: nothing but
  the recorded checksum can tell) is detected at restore, which falls back to
  the previous step with a warning;
- a run whose model changed gets a `CheckpointRestoreError` naming the config
  fields that differ from the checkpoint's.

Tests run as root here, where `chmod` alone does not make a directory
read-only; the permission cases drop the effective uid to `nobody` for the
call (a plain `chmod` suffices for other users).
"""

import contextlib
import glob
import logging
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import load_config
from dqvq import checkpoint as ckpt_lib
from dqvq import checksums
from dqvq.trainers import loop
from test_checkpoint import _save_steps
from test_checkpoint import _state

_NOBODY = 65534


@contextlib.contextmanager
def _unprivileged():
  """Acts as a user that directory permissions apply to (root bypasses them)."""
  if os.geteuid() != 0:
    yield
    return
  os.seteuid(_NOBODY)
  try:
    yield
  finally:
    os.seteuid(0)


@pytest.fixture
def shared_tmp():
  """A scratch dir that `nobody` can traverse (pytest's tmp_path is 0700)."""
  path = tempfile.mkdtemp(prefix='dqvq-ro-')
  os.chmod(path, 0o755)
  yield path
  for root, dirs, _ in os.walk(path):
    for d in dirs:
      os.chmod(os.path.join(root, d), 0o755)
  shutil.rmtree(path)


def _unwritable_workdir(base: str, how: str) -> tuple[str, str]:
  """(workdir, the path the error must name) for one way of being unwritable.

  Everything but the culprit is writable by the user the run acts as.
  """
  workdir = os.path.join(base, 'run')
  checkpoints = os.path.join(workdir, 'checkpoints')
  if how == 'workdir_under_a_file':
    open(os.path.join(base, 'file'), 'w').close()
    workdir = culprit = os.path.join(base, 'file', 'run')
  else:
    os.makedirs(workdir)
    if how == 'checkpoints_is_a_file':
      open(checkpoints, 'w').close()
      culprit = checkpoints
    elif how == 'read_only_workdir':  # checkpoints/ cannot even be created
      culprit = workdir
    else:
      assert how == 'read_only_checkpoints'
      os.makedirs(checkpoints)
      culprit = checkpoints
  if os.geteuid() == 0:  # hand it all to the user `_unprivileged` acts as
    for root, dirs, files in os.walk(base):
      for name in [root] + [os.path.join(root, n) for n in dirs + files]:
        os.chown(name, _NOBODY, -1)
  if how.startswith('read_only'):
    os.chmod(culprit, 0o555)
  return workdir, culprit


@pytest.mark.parametrize('how', ['read_only_checkpoints', 'read_only_workdir',
                                 'checkpoints_is_a_file',
                                 'workdir_under_a_file'])
def test_unwritable_workdir_is_refused_before_anything_is_built(
    shared_tmp, monkeypatch, how):
  workdir, culprit = _unwritable_workdir(shared_tmp, how)
  config = load_config('demo').stage1_config('runlocal')
  config.data.data_dir = os.path.join(shared_tmp, 'no_data_needed')

  def built_too_early(*args, **kwargs):
    raise AssertionError('data and models were built before the check')

  # Everything that reads data, builds models or compiles comes after
  # make_task; before the fix the run compiled, trained, then hung at save.
  monkeypatch.setattr(loop, 'make_task', built_too_early)
  start = time.monotonic()
  with _unprivileged(), pytest.raises(ckpt_lib.UnwritableDirectoryError) as e:
    loop.train_and_evaluate(config, workdir)
  assert time.monotonic() - start < 10
  message = str(e.value)
  assert f'Cannot write to {culprit} (' in message
  assert '--workdir' in message and 'before compiling' in message
  assert not glob.glob(os.path.join(shared_tmp, '**', '.dqvq-write-probe*'),
                       recursive=True)


def test_check_writable_creates_dirs_and_leaves_nothing_behind(tmp_path):
  checkpoints = tmp_path / 'new' / 'run' / 'checkpoints'
  ckpt_lib.check_writable(tmp_path / 'new' / 'run', checkpoints)
  assert checkpoints.is_dir() and not os.listdir(checkpoints)
  assert os.listdir(tmp_path / 'new' / 'run') == ['checkpoints']


def test_checksums_ignore_sharding_and_catch_one_flipped_bit(monkeypatch):
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ('a', 'b'),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rand = np.random.RandomState(0)
  host = {'w': rand.randn(16, 8).astype(np.float32),
          'h': rand.randn(8, 4, 2).astype(jnp.bfloat16)}
  first = ckpt_lib.leaf_checksums(host)  # host leaves: one whole block each
  assert first["['w']"].startswith('float32:')
  assert len(first["['w']"]) == len('float32:') + 16
  specs = (P(), P('a', None), P(None, 'a'), P('a', 'b'), P('b', 'a'))
  for spec in specs:
    placed = jax.device_put(host, NamedSharding(mesh, spec))
    assert ckpt_lib.leaf_checksums(placed) == first, spec
  # Big leaves are summed in chunks of rows; the sums must not change.
  monkeypatch.setattr(checksums, '_CHUNK_WORDS', 5)
  assert ckpt_lib.leaf_checksums(host) == first
  assert ckpt_lib.leaf_checksums(
      jax.device_put(host, NamedSharding(mesh, specs[3]))) == first
  monkeypatch.undo()

  w = host['w']
  seen = {first["['w']"]}
  for index, bit in [((0, 0), 0), ((3, 5), 0), ((3, 5), 31), ((15, 7), 22)]:
    flipped = w.copy()
    flipped.view(np.uint32)[index] ^= np.uint32(1 << bit)
    seen.add(ckpt_lib.leaf_checksums({'w': flipped})["['w']"])
  assert len(seen) == 5
  # Every kind of leaf a train state holds gets one, typed keys included.
  sums = ckpt_lib.leaf_checksums({
      'rng': jax.random.key(0), 'step': jnp.int32(3),
      'half': jnp.ones(3, jnp.bfloat16), 'mask': jnp.array([True, False])})
  assert sorted(v.split(':')[0] for v in sums.values()) == [
      'bfloat16', 'bool', 'int32', 'key<fry>']


def _one_ulp_off(x: jax.Array, index: tuple[int, ...]) -> np.ndarray:
  """`x` with its lowest mantissa bit at `index` flipped: finite, ~1e-7 off."""
  out = np.array(x)
  out.view(np.uint32)[index] ^= np.uint32(1)
  return out


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_silently_changed_array_falls_back_with_warning(tmp_path, caplog):
  _save_steps(tmp_path / 'run', [1, 2, 3]).close()
  # Damage that decodes fine: step 3's arrays replaced by those of a state
  # one low mantissa bit away, its meta kept. Orbax's data chunks carry no
  # checksum of their own (only OCDBT's b-tree nodes do), so a bit flipped
  # on disk, or a mixed-up copy, reads back like this.
  damaged = dict(_state(3), w=jnp.asarray(_one_ulp_off(_state(3)['w'],
                                                       (1, 2))))
  other = ckpt_lib.Checkpointer(tmp_path / 'other', save_every=1)
  other.maybe_save(3, damaged)
  other.close()
  step3 = tmp_path / 'run' / 'checkpoints' / '3'
  shutil.rmtree(step3 / 'state')
  shutil.copytree(tmp_path / 'other' / 'checkpoints' / '3' / 'state',
                  step3 / 'state')

  abstract = ckpt_lib.abstract_state_of(_state(0))
  # Orbax alone reads the damaged step back without complaint: finite
  # values, one element off by one ulp.
  with ocp.StandardCheckpointer() as plain:
    silent = plain.restore(step3 / 'state', abstract)
  assert np.all(np.isfinite(silent['w']))
  assert np.sum(np.asarray(silent['w']) != np.asarray(_state(3)['w'])) == 1

  ckpt = ckpt_lib.Checkpointer(tmp_path / 'run', save_every=1)
  # A step chosen by name is verified too: no fallback, a clear error.
  with pytest.raises(ckpt_lib.ChecksumMismatchError, match=r"state\['w'\]"):
    ckpt.restore_step(3, abstract)
  with caplog.at_level(logging.WARNING):
    state, step, _ = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 2
  np.testing.assert_array_equal(state['w'], np.full((4, 3), 4.0))
  warnings = [r.getMessage() for r in caplog.records
              if 'step 3' in r.getMessage()]
  assert any("checksum mismatch: state['w']" in m for m in warnings)
  assert not any("state['count']" in m for m in warnings)
  assert glob.glob(str(tmp_path / 'run' / 'checkpoints' / '3.unreadable-*'))


def test_meta_records_a_checksum_per_array_and_old_steps_still_load(tmp_path):
  ckpt = _save_steps(tmp_path, [1])
  meta = ckpt.read_meta(1)
  assert sorted(meta['checksums']) == ["['count']", "['w']"]
  ckpt.close()
  # A step saved before checksums existed restores unverified.
  meta_file = tmp_path / 'checkpoints' / '1' / 'meta' / 'metadata'
  text = meta_file.read_text()
  meta_file.write_text(text.replace('"checksums"', '"no_checksums"'))
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  _, step, meta = ckpt.restore_latest(ckpt_lib.abstract_state_of(_state(0)))
  assert step == 1 and 'checksums' not in meta
  ckpt.close()


def _config(ch: int) -> dict:
  return {'stage': 1, 'model': {'ch': ch, 'num_res_blocks': 2},
          'optim': {'base_learning_rate': 1e-4}, 'num_train_steps': 10}


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_changed_model_error_names_the_differing_config_fields(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1, config=_config(32))
  for step in (1, 2):
    ckpt.maybe_save(step, {'kernel': jnp.ones((3, 32))})
  ckpt.close()

  wider = _config(64)
  wider['num_train_steps'] = 20
  wider['model']['dropout'] = 0.1
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=1, config=wider)
  abstract = {'kernel': jax.ShapeDtypeStruct((3, 64), jnp.float32)}
  with pytest.raises(ckpt_lib.CheckpointRestoreError) as e:
    ckpt.restore_latest(abstract)
  ckpt.close()
  message = str(e.value)
  assert 'step 2: ' in message and 'step 1: ' in message
  assert 'the one step 2 was saved with' in message
  lines = [line.strip() for line in message.splitlines()]
  assert 'model.ch: 32 (checkpoint) vs 64 (config)' in lines
  assert 'model.dropout: (absent) (checkpoint) vs 0.1 (config)' in lines
  assert 'num_train_steps: 10 (checkpoint) vs 20 (config)' in lines
  assert not any(line.startswith(('model.num_res_blocks', 'stage', 'optim'))
                 for line in lines)
  # The steps stay where they are: nothing to quarantine, nothing lost.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
