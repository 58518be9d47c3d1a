"""Tests for dqvq.interop.torch_checkpoint, the torch-free .pth reader.

The fixtures in tests/data were written by real torch (see
tests/data/make_torch_fixtures.py), so these tests check the reader against
the actual on-disk formats without needing torch installed.
"""

import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from dqvq.interop import torch_checkpoint

DATA = os.path.join(os.path.dirname(__file__), 'data')
FORMATS = ('tiny_zip.pth', 'tiny_legacy.pth')


@pytest.fixture(scope='module')
def expected():
  with np.load(os.path.join(DATA, 'tiny_expected.npz')) as z:
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize('name', FORMATS)
def test_reads_every_tensor_exactly(name, expected):
  got = torch_checkpoint.flatten(
      torch_checkpoint.load(os.path.join(DATA, name)), sep='/')
  assert sorted(got) == sorted(expected)
  for key, want in expected.items():
    have = got[key]
    assert have.shape == want.shape, key
    if key.endswith('w_bf16'):
      assert have.dtype == ml_dtypes.bfloat16
      have = have.astype(np.float32)
    assert have.dtype == want.dtype, key
    np.testing.assert_array_equal(have, want, err_msg=key)


@pytest.mark.parametrize('name', FORMATS)
def test_structure_views_and_plain_values(name, expected):
  ckpt = torch_checkpoint.load(os.path.join(DATA, name))
  assert ckpt['epoch'] == 3 and ckpt['global_step'] == 10
  assert ckpt['nested']['plain'] == [1, 2.5, 'three']
  sd = ckpt['state_dict']
  assert type(sd) is dict  # OrderedDict (with `_metadata`) -> plain dict.
  assert list(sd)[:2] == ['w_f32', 'w_f16']  # Order is kept.
  # The transposed and offset views are copied into owned C-order arrays.
  for key in ('transposed', 'offset_view'):
    assert sd[key].flags['C_CONTIGUOUS'] and sd[key].flags['OWNDATA']
  np.testing.assert_array_equal(sd['transposed'].T[1:, 2:5],
                                sd['offset_view'])
  np.testing.assert_array_equal(
      np.concatenate([sd['shared_a'].ravel(), sd['shared_b'].ravel()]),
      np.arange(12, dtype=np.float32))
  assert sd['scalar'].shape == () and sd['scalar'] == 3.5
  assert sd['empty'].shape == (0, 3)
  assert sd['bn.num_batches_tracked'].dtype == np.int64
  np.testing.assert_array_equal(ckpt['bn_state']['running_var'],
                                expected['bn_state/running_var'])


# --- Hand-built files: the format without torch, and malformed input. ---


def _unicode(s: str) -> bytes:
  b = s.encode()
  return b'X' + struct.pack('<I', len(b)) + b


def _ints(xs) -> bytes:
  return b'(' + b''.join(b'K' + bytes([x]) for x in xs) + b't'


def _tensor_pickle(numel: int, offset: int, size, stride) -> bytes:
  """Protocol-2 pickle of {'t': tensor} exactly as torch.save lays it out."""
  return b''.join([
      b'\x80\x02}', _unicode('t'),
      b'ctorch._utils\n_rebuild_tensor_v2\n(',
      b'(', _unicode('storage'), b'ctorch\nFloatStorage\n', _unicode('0'),
      _unicode('cpu'), b'K' + bytes([numel]), b'tQ',
      b'K' + bytes([offset]), _ints(size), _ints(stride), b'\x89',
      b'ccollections\nOrderedDict\n)R', b'tRs.'])


def _write_zip(path, pkl: bytes, storages: dict[str, bytes]) -> None:
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', pkl)
    zf.writestr('archive/byteorder', 'little')
    for key, data in storages.items():
      zf.writestr(f'archive/data/{key}', data)


def test_hand_built_strided_view(tmp_path):
  storage = np.arange(10, dtype=np.float32)
  path = tmp_path / 'view.pth'
  _write_zip(path, _tensor_pickle(10, 1, (3, 2), (3, 1)),
             {'0': storage.tobytes()})
  got = torch_checkpoint.load(path)['t']
  want = np.lib.stride_tricks.as_strided(storage[1:], (3, 2), (12, 4))
  np.testing.assert_array_equal(got, want)
  assert got.tolist() == [[1, 2], [4, 5], [7, 8]]


def test_out_of_bounds_view_is_refused(tmp_path):
  path = tmp_path / 'oob.pth'
  # Last element would be 2 + 2*4 + 1 = 11 of a 10-element storage.
  _write_zip(path, _tensor_pickle(10, 2, (3, 2), (4, 1)),
             {'0': np.zeros(10, np.float32).tobytes()})
  with pytest.raises(pickle.UnpicklingError, match='past its storage'):
    torch_checkpoint.load(path)


def test_truncated_storage_is_refused(tmp_path):
  path = tmp_path / 'short.pth'
  _write_zip(path, _tensor_pickle(10, 0, (10,), (1,)),
             {'0': np.zeros(4, np.float32).tobytes()})
  with pytest.raises(pickle.UnpicklingError, match='truncated'):
    torch_checkpoint.load(path)


class _Evil:
  """Unpickling this with plain pickle would run a shell command."""

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f'touch {self.target}',))


def _legacy_file(path, obj_pickle: bytes) -> None:
  with open(path, 'wb') as f:
    pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({'protocol_version': 1001, 'little_endian': True}, f,
                protocol=2)
    f.write(obj_pickle)
    pickle.dump([], f, protocol=2)


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_code_execution_is_refused(tmp_path, fmt):
  target = tmp_path / 'pwned'
  evil = pickle.dumps({'w': _Evil(target)}, protocol=2)
  path = tmp_path / 'evil.pth'
  if fmt == 'zip':
    _write_zip(path, evil, {})
  else:
    _legacy_file(path, evil)
  with pytest.raises(pickle.UnpicklingError,
                     match=r'refusing to load posix\.system'):
    torch_checkpoint.load(path)
  assert not target.exists()
  # Placeholders are inert too: nothing runs, the call is only recorded.
  obj = torch_checkpoint.load(path, allow_unknown=True)
  assert not target.exists()
  assert obj['w'].qualname == 'posix.system'
  assert obj['w'].args == (f'touch {target}',)


def test_state_setting_on_allowed_globals_is_refused(tmp_path):
  # BUILD on an allow-listed stand-in must not be able to modify it.
  pkl = (b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}' + _unicode('x') +
         b'K\x01sb.')
  path = tmp_path / 'build.pth'
  _write_zip(path, pkl, {})
  with pytest.raises(pickle.UnpicklingError, match='refusing to set state'):
    torch_checkpoint.load(path)


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / 'junk.pth'
  with open(path, 'wb') as f:
    pickle.dump(12345, f, protocol=2)
  with pytest.raises(pickle.UnpicklingError, match='bad magic'):
    torch_checkpoint.load(path)
