"""Reads PyTorch checkpoint files into numpy, without torch and without code.

Why this exists: the official DQ-VAE weights, torchvision's VGG16 and the
LPIPS heads ship as `.pth` files, and dqvq must import them on machines that
have no torch. `torch.load` is also unsafe on untrusted files, because a
pickle can name any callable. This reader unpickles with an allow-list: the
only globals it resolves are the handful torch uses to describe tensors
(`_rebuild_tensor_v2`, `*Storage`, `OrderedDict`, ...), and those resolve to
inert stand-ins defined here, so no code from the file ever runs. Any other
global raises `pickle.UnpicklingError`.

Both on-disk formats are supported:

* zip (PyTorch >= 1.6, the default): a zip archive `<name>/data.pkl` whose
  persistent ids ('storage', StorageType, key, location, numel) point at raw
  little-endian storage bytes in `<name>/data/<key>`.
* legacy (`_use_new_zipfile_serialization=False`, and everything older than
  1.6, e.g. the LPIPS `vgg.pth`): five pickles in a row -- magic number,
  protocol version, sys info, the object (persistent ids ('storage', type,
  key, location, numel, view_metadata)), the list of storage keys -- then,
  for each key, an int64 element count and the raw bytes.

Tensors become `np.ndarray` (bfloat16 as `ml_dtypes.bfloat16`), OrderedDicts
plain dicts (nesting, e.g. Lightning's `{'state_dict': {...}}`, is kept);
ints, strings and lists pass through. A tensor's (offset, size, stride) view
of its storage is bounds-checked, read with `as_strided` and copied, so each
array owns contiguous memory.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> numpy dtype. UntypedStorage holds bytes.
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64,
    'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8,
    'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'ComplexFloatStorage': np.complex64, 'ComplexDoubleStorage': np.complex128,
    'UntypedStorage': np.uint8,
}
# torch.<dtype> objects (pickled under their canonical names), should a file
# hold one.
_TORCH_DTYPES = {n: np.dtype(n) for n in (
    'float32', 'float64', 'float16', 'int64', 'int32', 'int16', 'int8',
    'uint8', 'bool', 'complex64', 'complex128')}
_TORCH_DTYPES['bfloat16'] = ml_dtypes.bfloat16


def _no_setstate(self, state):
  del state
  raise pickle.UnpicklingError(
      f'refusing to set state on {self!r}: dqvq reads tensors only')


class _StorageType:
  """Stand-in for a torch storage class or dtype: only records a dtype."""
  __slots__ = ('name', 'dtype')
  __setstate__ = _no_setstate

  def __init__(self, name: str, dtype: Any):
    self.name = name
    self.dtype = np.dtype(dtype)

  def __repr__(self):
    return f'torch.{self.name}'


class _Callable:
  """A fresh, state-less wrapper around an allow-listed rebuild function.

  Wrapping (rather than returning the module-level function) means a hostile
  BUILD opcode can neither modify our functions nor leak into later loads.
  """
  __slots__ = ('_fn', '_name')
  __setstate__ = _no_setstate

  def __init__(self, fn, name: str):
    self._fn, self._name = fn, name

  def __call__(self, *args):
    return self._fn(*args)

  def __repr__(self):
    return self._name


class _Storage:
  """A storage's dtype, element count and, once read, its 1-D array.

  Pre-1.0 legacy files can also name a storage that is a slice
  [start, start + numel) of a `root` storage; its bytes come from the root.
  """

  def __init__(self, key: str, dtype: np.dtype, numel: int,
               root: _Storage | None = None, start: int = 0):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.root, self.start = root, start
    self.array: np.ndarray | None = None

  def data(self) -> np.ndarray | None:
    if self.root is None:
      return self.array
    base = self.root.data()
    return None if base is None else base[self.start:self.start + self.numel]


class _LazyTensor:
  """A tensor view over a storage whose bytes may not have been read yet."""

  def __init__(self, storage: Any, offset: int, size: Any, stride: Any):
    if not isinstance(storage, _Storage):
      raise pickle.UnpicklingError(
          f'tensor rebuilt from {type(storage).__name__}, not a storage')
    self.storage, self.offset = storage, int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)

  def materialize(self) -> np.ndarray:
    """Copies the strided view out of the storage, after a bounds check."""
    data = self.storage.data()
    if data is None:
      raise pickle.UnpicklingError(
          f'storage {self.storage.key!r} was referenced but never written')
    if len(self.size) != len(self.stride):
      raise pickle.UnpicklingError(f'size {self.size} vs stride {self.stride}')
    if any(s < 0 for s in self.size + self.stride) or self.offset < 0:
      raise pickle.UnpicklingError('negative size, stride or offset')
    if 0 in self.size:
      return np.empty(self.size, dtype=data.dtype)
    last = self.offset + sum(
        (n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= data.size:
      raise pickle.UnpicklingError(
          f'tensor view (offset {self.offset}, size {self.size}, stride '
          f'{self.stride}) reads past its storage of {data.size} elements')
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size,
        strides=tuple(s * item for s in self.stride), writeable=False)
    return np.array(view, copy=True, order='C')


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


class _TensorClass:
  """Stand-in for torch.Tensor / nn.Parameter in `_rebuild_from_type_v2`."""


def _rebuild_from_type_v2(func, new_type, args, state):
  del state  # Python attributes on a tensor subclass; not needed for values.
  if not (isinstance(new_type, type) and issubclass(new_type, _TensorClass)):
    raise pickle.UnpicklingError(
        f'refusing to rebuild a tensor of type {new_type!r}: dqvq reads '
        'tensors only')
  return func(*args)


class _Opaque:
  """Placeholder for a disallowed global when `allow_unknown=True`.

  It records what the pickle tried to build and runs none of it, so a
  checkpoint's tensors can be read past e.g. Lightning hyper-parameter
  objects.
  """
  qualname = '?'

  def __new__(cls, *args, **kwargs):
    obj = super().__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, []
    return obj

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items.append((key, value))

  def append(self, value):  # APPENDS falls back to this without `extend`.
    self.items.append(value)

  def __repr__(self):
    return f'<opaque {self.qualname}>'


def _allowed_global(module: str, name: str) -> Any:
  """The stand-in for an allow-listed global, or None."""
  if module == 'collections' and name == 'OrderedDict':
    return collections.OrderedDict
  qualname = f'{module}.{name}'
  if module == 'torch._utils' and name in ('_rebuild_tensor_v2',
                                           '_rebuild_tensor'):
    return _Callable(_rebuild_tensor, qualname)
  if module == 'torch._utils' and name in ('_rebuild_parameter',
                                           '_rebuild_parameter_with_state'):
    return _Callable(_rebuild_parameter, qualname)
  if module == 'torch._tensor' and name == '_rebuild_from_type_v2':
    return _Callable(_rebuild_from_type_v2, qualname)
  if (module, name) in (('torch', 'Tensor'), ('torch._tensor', 'Tensor'),
                        ('torch.nn.parameter', 'Parameter')):
    return type(name, (_TensorClass,), {})
  if module in ('torch', 'torch.storage') and name in _STORAGE_DTYPES:
    return _StorageType(name, _STORAGE_DTYPES[name])
  if module == 'torch' and name in _TORCH_DTYPES:
    return _StorageType(name, _TORCH_DTYPES[name])
  if module == 'torch' and name == 'Size':
    return tuple
  return None


class _Unpickler(pickle.Unpickler):
  """Allow-list unpickler; records the storages the object refers to.

  Storage bytes are filled in after unpickling (the legacy format stores
  them after the pickle), so tensors are `_LazyTensor`s until `_finish`.
  """

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage],
               allow_unknown: bool):
    super().__init__(file, encoding='utf-8')
    self._storages = storages
    self._allow_unknown = allow_unknown

  def find_class(self, module: str, name: str) -> Any:
    found = _allowed_global(module, name)
    if found is not None:
      return found
    if self._allow_unknown:
      return type(name, (_Opaque,), {'qualname': f'{module}.{name}'})
    raise pickle.UnpicklingError(
        f'refusing to load {module}.{name}: dqvq reads tensors only (pass '
        'allow_unknown=True to keep such objects as inert placeholders)')

  def persistent_load(self, pid: Any) -> Any:
    if not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != 'storage':
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    if len(pid) not in (5, 6):
      raise pickle.UnpicklingError(f'malformed storage id {pid!r}')
    storage_type, key, numel = pid[1], _ascii(pid[2]), int(pid[4])
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'unknown storage type {storage_type!r}')
    dtype = storage_type.dtype
    if storage_type.name == 'UntypedStorage':
      dtype = np.dtype(np.uint8)  # numel is then a byte count.
    storage = self._storages.get(key)
    if storage is None:
      storage = self._storages[key] = _Storage(key, dtype, numel)
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return storage
    # Pre-1.0 files: (view_key, offset, size) of a slice of this storage.
    view_key = _ascii(view[0])
    if view_key not in self._storages:
      self._storages[view_key] = _Storage(view_key, dtype, int(view[2]),
                                          root=storage, start=int(view[1]))
    return self._storages[view_key]


def _ascii(x: Any) -> str:
  return x.decode('ascii') if isinstance(x, bytes) else str(x)


def _finish(obj: Any) -> Any:
  """Replaces lazy tensors with arrays and OrderedDicts with plain dicts."""
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    return {k: _finish(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_finish(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_finish(v) for v in obj)
  if isinstance(obj, _Opaque):
    obj.args, obj.state, obj.items = _finish((obj.args, obj.state, obj.items))
    return obj
  return obj


def _from_bytes(buf: bytes, dtype: np.dtype, numel: int, little: bool,
                what: str) -> np.ndarray:
  if numel < 0 or len(buf) < numel * dtype.itemsize:
    raise pickle.UnpicklingError(
        f'{what}: expected {numel} x {dtype} ({numel * dtype.itemsize} bytes), '
        f'found {len(buf)} bytes; the file is truncated')
  arr = np.frombuffer(buf, dtype=dtype, count=numel)
  if not little and dtype.itemsize > 1:
    arr = arr.byteswap()
  return arr


def _load_zip(f: BinaryIO, allow_unknown: bool) -> Any:
  with zipfile.ZipFile(f) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n == 'data.pkl' or n.endswith('/data.pkl')]
    if len(pkl) != 1:
      raise pickle.UnpicklingError(
          f'zip checkpoint must hold one */data.pkl, found {pkl}')
    prefix = pkl[0][:-len('data.pkl')]
    little = True
    if prefix + 'byteorder' in names:
      little = zf.read(prefix + 'byteorder').decode().strip() == 'little'
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), storages,
                     allow_unknown).load()
    for key, st in storages.items():
      if st.root is not None:
        continue
      name = f'{prefix}data/{key}'
      if name not in names:
        raise pickle.UnpicklingError(f'storage file {name} missing from zip')
      st.array = _from_bytes(zf.read(name), st.dtype, st.numel, little, name)
  return _finish(obj)


def _load_legacy(f: BinaryIO, allow_unknown: bool) -> Any:
  def plain_load():
    return _Unpickler(f, {}, allow_unknown=False).load()

  if plain_load() != _LEGACY_MAGIC:
    raise pickle.UnpicklingError('not a PyTorch checkpoint (bad magic number)')
  if (protocol := plain_load()) != _LEGACY_PROTOCOL:
    raise pickle.UnpicklingError(f'unsupported legacy protocol {protocol}')
  sys_info = plain_load()
  little = not isinstance(sys_info, dict) or sys_info.get('little_endian', 1)
  storages: dict[str, _Storage] = {}
  obj = _Unpickler(f, storages, allow_unknown).load()
  for key in plain_load():
    key = _ascii(key)
    st = storages.get(key)
    if st is None:
      raise pickle.UnpicklingError(f'storage {key!r} listed but never used')
    (numel,) = struct.unpack('<q' if little else '>q', f.read(8))
    if numel < 0:
      raise pickle.UnpicklingError(f'storage {key!r}: negative size {numel}')
    st.array = _from_bytes(f.read(numel * st.dtype.itemsize), st.dtype, numel,
                           little, f'storage {key!r}')
  return _finish(obj)


def load(path: str | os.PathLike[str], *, allow_unknown: bool = False) -> Any:
  """Reads a `.pth`/`.ckpt` file into nested dicts of numpy arrays.

  Args:
    path: a file written by `torch.save`, in the zip or the legacy format.
    allow_unknown: when False (default) any global other than torch's tensor
      machinery raises `pickle.UnpicklingError`. When True such objects become
      inert `_Opaque` placeholders (nothing is constructed or called), which
      lets one read the tensors out of, e.g., a Lightning checkpoint whose
      hyper-parameters are pickled objects.

  Returns:
    The checkpoint's top-level object, usually a dict of arrays or of nested
    dicts.
  """
  with open(path, 'rb') as f:
    if zipfile.is_zipfile(f):
      f.seek(0)
      return _load_zip(f, allow_unknown)
    f.seek(0)
    if f.read(262)[257:262] == b'ustar':
      raise pickle.UnpicklingError(
          f'{path}: tar-format checkpoints (PyTorch < 0.4) are not supported; '
          're-save it with a newer torch')
    f.seek(0)
    return _load_legacy(f, allow_unknown)


def flatten(tree: Any, sep: str = '.') -> dict[str, np.ndarray]:
  """{'a': {'b': arr}} -> {'a.b': arr}: the arrays of a loaded checkpoint."""
  out: dict[str, np.ndarray] = {}

  def walk(node: Any, prefix: str) -> None:
    if isinstance(node, np.ndarray):
      out[prefix] = node
    elif isinstance(node, dict):
      for k, v in node.items():
        walk(v, f'{prefix}{sep}{k}' if prefix else str(k))

  walk(tree, '')
  return out
