"""Guards that start and end a training run cleanly.

They exist so that a run fails loudly and early, loses nothing, and resumes
correctly:
- an unwritable workdir is refused before anything compiles (Orbax would
  otherwise hang in a barrier for minutes at the first save, and TensorBoard
  would die with a PermissionDeniedError traceback);
- a preemption notice (SIGTERM from Slurm, Kubernetes or Cloud TPU, some
  seconds before the kill) only sets a flag; the loop finishes its step,
  saves and exits 0 instead of dying mid-step;
- a non-finite loss raises before the checkpoint save, so a NaN state never
  replaces the last good checkpoint, and the error says what to change;
- every saved array gets a checksum, so a checkpoint whose bits changed on
  disk is noticed at restore instead of silently resumed from.

`dqvq.checkpoint` re-exports everything here; the loop needs only that module.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

PyTree = Any

# Set from the signal handler; read by every Checkpointer. A module-level
# event rather than an instance attribute because signals are per process.
_STOP_REQUESTED = threading.Event()


class NonFiniteLossError(FloatingPointError):
  """A metric (or the state) went NaN/inf; the run stops before saving it."""

  def __init__(self, step: int, names: Sequence[str],
               last_good_step: int | None = None):
    self.step = int(step)
    self.names = tuple(names)
    self.last_good_step = last_good_step
    kept = ('no checkpoint was written yet' if last_good_step is None else
            f'the last good checkpoint (step {last_good_step}) is kept')
    super().__init__(
        f'Non-finite value at step {self.step} in: {", ".join(self.names)}. '
        f'Stopped before saving, so {kept}; resuming restarts from it. '
        'Lower the learning rate, enable gradient clipping, or turn off '
        'bf16 compute, then resume.')


def check_finite(step: int, metrics: Mapping[str, Any],
                 last_good_step: int | None = None) -> None:
  """Raises NonFiniteLossError naming every non-finite scalar in `metrics`.

  Called by the loop before `maybe_save`, on metrics it already fetched to
  the host for logging, so it costs no extra device round trip.

  Args:
    step: the training step the metrics belong to.
    metrics: name -> scalar (python, numpy or jax); non-scalars are checked
      element-wise.
    last_good_step: the latest saved step, quoted in the message.
  """
  bad = [name for name, value in metrics.items()
         if not np.all(np.isfinite(np.asarray(value, dtype=np.float64)))]
  if bad:
    raise NonFiniteLossError(step, sorted(bad), last_good_step)


def _request_stop(signum: int, frame: Any) -> None:
  del frame
  if signum == signal.SIGINT and _STOP_REQUESTED.is_set():
    # A second Ctrl-C means "now": give the user the usual hard interrupt.
    raise KeyboardInterrupt
  _STOP_REQUESTED.set()
  logging.warning('Received %s: will save a checkpoint and stop after the '
                  'current step.', signal.Signals(signum).name)


def install_preemption_handler(*, sigint: bool = False) -> list[int]:
  """Makes SIGTERM (and optionally SIGINT) request a save-and-stop.

  Schedulers (Slurm, Kubernetes, Cloud TPU) send SIGTERM some seconds before
  killing a job. The handler only sets a flag; the loop sees it through
  `Checkpointer.should_stop`, finishes its step, saves and exits, so the
  interrupted run loses nothing that was checkpointed.

  When `jax.distributed` runs JAX's preemption service, JAX owns SIGTERM and
  propagates the notice so that all hosts agree on a step to save at
  (`Checkpointer.should_stop(step)` reads that); replacing its handler would
  break that agreement, so SIGTERM is left alone in that case.

  Must be called from the main thread (a Python signal rule).

  Args:
    sigint: also trap SIGINT (Ctrl-C); a second Ctrl-C still interrupts.

  Returns:
    The signals that now request a stop.
  """
  installed = []
  if _jax_preemption_service_active():
    logging.info('JAX preemption service active: leaving SIGTERM to it.')
  else:
    signal.signal(signal.SIGTERM, _request_stop)
    installed.append(signal.SIGTERM)
  if sigint:
    signal.signal(signal.SIGINT, _request_stop)
    installed.append(signal.SIGINT)
  return installed


def preemption_requested() -> bool:
  """True once a trapped signal arrived in this process."""
  return _STOP_REQUESTED.is_set()


def reset_preemption_request() -> None:
  """Clears the flag (for tests and for loops that handled the request)."""
  _STOP_REQUESTED.clear()


def _jax_preemption_service_active() -> bool:
  # pylint: disable-next=g-import-not-at-top,protected-access
  from jax._src import distributed
  return getattr(distributed.global_state, 'preemption_sync_manager',
                 None) is not None


class UnwritableDirectoryError(OSError):
  """A directory the run must write to cannot be created or written."""


def check_writable(*directories: str | os.PathLike[str]) -> None:
  """Creates each directory and writes, then deletes, a small probe file.

  An actual write is the only honest test: `os.access` answers yes to root
  on a read-only mount and knows nothing of object stores, and a regular
  file where a directory belongs only shows when something is created in it.
  Every process probes (each writes its own checkpoint shards), with its own
  probe name, and on multi-host jobs the processes agree on the outcome, so
  that all of them stop instead of the others hanging at the first barrier.

  Raises:
    UnwritableDirectoryError: naming the directory, the cause and the fix.
  """
  error = None
  for directory in directories:
    path = epath.Path(directory)
    probe = path / f'.dqvq-write-probe-{jax.process_index()}-{os.getpid()}'
    try:
      path.mkdir(parents=True, exist_ok=True)
      probe.write_text('dqvq checks that it can write here; safe to delete.')
      probe.unlink()
    except Exception as e:  # pylint: disable=broad-exception-caught
      # OSError locally; object stores raise their own types (tf.errors...).
      error = UnwritableDirectoryError(
          f'Cannot write to {path} ({type(e).__name__}: {e}). The run keeps '
          'its checkpoints and summaries there, so it stops now, before '
          'compiling anything. Pass a --workdir this process can write to, '
          f'or make {path} a writable directory (check its permissions and '
          'mount, and that no file stands where the directory should be).')
      error.__cause__ = e
      break
  if jax.process_count() > 1:
    failed = multihost_utils.process_allgather(np.array(error is not None))
    if error is None and np.any(failed):
      error = UnwritableDirectoryError(
          f'Process(es) {np.flatnonzero(failed).tolist()} cannot write to '
          f'{[os.fspath(d) for d in directories]}; their logs name the '
          'directory and the cause.')
  if error is not None:
    raise error


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
  identity (`dqvq.tokenizer.fingerprint` names weights, on one host).

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


@jax.jit
def _finite_per_leaf(leaves: list[jax.Array]) -> jax.Array:
  # One small reduction per leaf; the output is replicated, so every host can
  # read it without a gather of the (sharded) state itself.
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: PyTree) -> list[str]:
  """Paths (`jax.tree_util.keystr`) of float leaves holding NaN or inf.

  jax.Arrays are reduced on device, in one jitted call; host leaves (numpy,
  python floats) on the host, so a multi-host state never mixes global
  arrays with process-local ones in a computation.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  on_device, bad = [], []
  for path, x in flat:
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      continue
    if isinstance(x, jax.Array):
      on_device.append((jax.tree_util.keystr(path), x))
    elif not np.all(np.isfinite(x)):
      bad.append(jax.tree_util.keystr(path))
  if on_device:
    finite = np.asarray(_finite_per_leaf([x for _, x in on_device]))
    bad += [name for (name, _), ok in zip(on_device, finite) if not ok]
  return sorted(bad)
