"""Sharding-independent checksums of a checkpoint's arrays.

Every save records them and every restore verifies them, so a checkpoint
whose bits changed on disk after the save (a flipped bit, a bad copy) is
noticed and skipped instead of silently resumed from; Orbax itself reads
such bits back without complaint. `dqvq.checkpoint` re-exports the public
names.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

PyTree = Any


class ChecksumMismatchError(ValueError):
  """A checkpoint's arrays read back with other bits than were saved."""


# Host blocks are checksummed this many 32-bit words at a time, which bounds
# the temporaries (64 MiB each) whatever the size of a shard.
_CHUNK_WORDS = 1 << 24


def _as_words(block: np.ndarray) -> np.ndarray:
  """The bits of `block` as uint32; 64-bit items gain a trailing axis of 2."""
  block = np.asarray(block, order='C')  # (ascontiguousarray makes 0-d 1-d)
  if block.dtype == np.bool_:
    block = block.view(np.uint8)
  size = block.dtype.itemsize
  if size == 4:
    return block.view(np.uint32)
  if size > 4:
    return block.view(np.uint32).reshape(block.shape + (size // 4,))
  return block.view(f'uint{8 * size}').astype(np.uint32)


def _block_sums(words: np.ndarray, starts: Sequence[int],
                shape: Sequence[int]) -> tuple[int, int]:
  """Sums of `words` and of words * (2i + 1), i their flat index in `shape`.

  `words` is the block of a global word array of `shape` that begins at
  `starts`, so the sums of all blocks add up to those of the whole array.
  """
  if tuple(words.shape) == tuple(shape) and words.size <= _CHUNK_WORDS:
    # The whole array, small (most leaves): the flat index is a plain range.
    words = words.reshape(-1)
    plain = int(words.sum(dtype=np.uint32))
    weight = np.arange(1, 2 * words.size, 2, dtype=np.uint32)
    return plain, int((words * weight).sum(dtype=np.uint32))
  strides = [1] * len(shape)
  for d in reversed(range(len(shape) - 1)):
    strides[d] = strides[d + 1] * shape[d + 1]
  plain = weighted = 0
  rows = max(1, _CHUNK_WORDS // max(1, words[0].size))
  for first in range(0, words.shape[0], rows):
    part = words[first:first + rows]
    # 2i + 1 as an outer sum of per-axis terms, full size only at the end;
    # uint64 products wrap mod 2**64, and their low 32 bits are what counts.
    weight = np.ones((), np.uint32)
    for d, n in enumerate(part.shape):
      start = starts[d] + (first if d == 0 else 0)
      axis = (np.arange(n, dtype=np.uint64) + np.uint64(start % 2**32)) * (
          np.uint64(2 * strides[d] % 2**32))
      weight = weight[..., None] + axis.astype(np.uint32)
    plain += int(part.sum(dtype=np.uint32))
    weighted += int((part * weight).sum(dtype=np.uint32))
  return plain % 2**32, weighted % 2**32


def _leaf_sums(x: Any) -> tuple[int, int]:
  """This process's share of a leaf's two checksum words."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if isinstance(x, jax.Array) and not x.is_fully_replicated:
    # One replica of every shard, wherever it lives: summed over all
    # processes, each element counts exactly once.
    blocks = [(np.asarray(s.data), [i.start or 0 for i in s.index])
              for s in x.addressable_shards if s.replica_id == 0]
  else:  # the whole value, the same on every process (Orbax writes host
    # values from the primary): counted by the first process only
    blocks = ([(np.asarray(x), [0] * np.ndim(x))]
              if jax.process_index() == 0 else [])
  plain = weighted = 0
  for block, starts in blocks:
    words = _as_words(block)
    extra = words.shape[block.ndim:]  # 64-bit items: their two words
    p, w = _block_sums(words, list(starts) + [0] * len(extra),
                       tuple(np.shape(x)) + extra)
    plain, weighted = plain + p, weighted + w
  return plain % 2**32, weighted % 2**32


def leaf_checksums(tree: PyTree) -> dict[str, str]:
  """{`jax.tree_util.keystr` path: '<dtype>:<16 hex digits>'} per array leaf.

  Two uint32 sums over the bits of each leaf, computed on the host from the
  shards this process holds: the plain sum, and the sum weighted by 2i + 1,
  i the element's global flat index. Integer sums add up exactly in any
  order, so the checksums do not depend on the sharding: a state saved on
  one mesh verifies when restored onto another, and on multi-host jobs each
  process sums only its own shards and one small all-gather adds them up
  (every process must call this, as it must call save and restore). A word
  changed by delta moves the weighted sum by (2i + 1) * delta, never 0 mod
  2**32 as 2i + 1 is odd, so any single changed word (one flipped bit
  included) is always caught; it is a checksum for damage, not a hash for
  identity (`dqvq.inference.tokenizer.fingerprint` names weights, on one host).

  The cost is one pass over the state on the host: on CPU the arrays are
  there already; on accelerators it adds a device-to-host copy of each
  process's shards to every save, as Orbax's own copy does.
  """
  names, dtypes, sums = [], [], []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not isinstance(x, jax.Array) and np.asarray(x).dtype.kind not in (
        'biufcV'):  # strings and objects carry no array bits
      continue
    names.append(jax.tree_util.keystr(path))
    dtypes.append(str(x.dtype if hasattr(x, 'dtype') else
                      np.asarray(x).dtype))
    sums.append(_leaf_sums(x))
  table = np.array(sums, np.uint32).reshape(-1, 2)
  if jax.process_count() > 1:
    table = multihost_utils.process_allgather(table).sum(
        axis=0, dtype=np.uint32)
  return {name: f'{dtype}:{int(p):08x}{int(w):08x}'
          for name, dtype, (p, w) in zip(names, dtypes, table)}


def verify_checksums(tree: PyTree, recorded: Mapping[str, str] | None
                     ) -> None:
  """Raises ChecksumMismatchError if a leaf differs from what was saved.

  Leaves restored into another dtype than they were saved with (Orbax
  casts) cannot be compared and are skipped, as are steps saved before
  checksums were recorded (`recorded` empty).
  """
  if not recorded:
    return
  bad = [path for path, value in leaf_checksums(tree).items()
         if path in recorded and recorded[path] != value and
         recorded[path].split(':')[0] == value.split(':')[0]]
  if bad:
    raise ChecksumMismatchError(
        f'{len(bad)} array(s) read back with other bits than were saved '
        f'(checksum mismatch: {", ".join(f"state{p}" for p in bad[:5])}'
        f'{", ..." if len(bad) > 5 else ""}); the files were damaged after '
        'the save.')
