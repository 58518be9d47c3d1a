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
  replaces the last good checkpoint, and the error says what to change.

Checksums of saved arrays, the restore-side guard, are in `dqvq.checksums`.

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
