"""Guards that start and end a training run cleanly.

They exist so that a run fails loudly and early, loses nothing, and resumes
correctly:
- an unwritable workdir is refused before anything compiles (Orbax would
  otherwise hang in a barrier for minutes at the first save, and TensorBoard
  would die with a PermissionDeniedError traceback);
- a preemption notice (SIGTERM from Slurm, Kubernetes or Cloud TPU, some
  seconds before the kill) or a Ctrl-C only sets a flag; the loop finishes
  its step, saves and exits 0 instead of dying mid-step (a second Ctrl-C
  exits at once);
- a diverging run (a non-finite metric or state, or a loss past a factor of
  its running mean, `DivergenceGuard`) raises before the checkpoint save, so
  a diverged state never replaces the last good checkpoint, and the error
  names that step and says what to change.

Checksums of saved arrays, the restore-side guard, are in `dqvq.checksums`.

`dqvq.checkpoint` re-exports everything here; the loop needs only that module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator, Mapping, Sequence

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
_STOP_SIGNALS: list[str] = []  # names of the signals that set it, in order


def _kept_clause(last_good_step: int | None,
                 saved_steps: Sequence[int]) -> str:
  """What a diverged run left behind, and how to resume from it."""
  if last_good_step is None:
    return ('no checkpoint was saved yet, so the next run starts from '
            'scratch')
  older = sorted(s for s in saved_steps if s < last_good_step)
  hint = (f' (older saved steps: {", ".join(map(str, older))}; '
          '--config.resume_step=N resumes from one of them)' if older else '')
  return (f'the last good checkpoint is step {last_good_step}, and resuming '
          f'restarts from it{hint}')


class DivergenceError(FloatingPointError):
  """Training diverged; the run stops before saving the diverged state.

  The message says which value diverged at which step, which checkpoint is
  the last good one (the newest saved step, every one of which passed these
  checks) and what to change before resuming.
  """

  def __init__(self, step: int, what: str,
               last_good_step: int | None = None,
               saved_steps: Sequence[int] = ()):
    self.step = int(step)
    self.last_good_step = last_good_step
    self.saved_steps = tuple(sorted(saved_steps))
    super().__init__(
        f'Diverged at step {self.step}: {what}. Stopped before saving it, so '
        f'{_kept_clause(last_good_step, self.saved_steps)}. Lower the '
        'learning rate, enable gradient clipping '
        '(--config.optim.grad_clip_norm=1) or turn off bf16 compute, then '
        'resume.')


class NonFiniteLossError(DivergenceError):
  """A metric (or the state) went NaN/inf; the run stops before saving it."""

  def __init__(self, step: int, names: Sequence[str],
               last_good_step: int | None = None,
               saved_steps: Sequence[int] = ()):
    self.names = tuple(names)
    super().__init__(step, f'non-finite {", ".join(self.names)}',
                     last_good_step, saved_steps)


class LossSpikeError(DivergenceError):
  """A loss jumped past `factor` times its running mean: diverging, not yet
  NaN (weights blown up but still finite). Such a state is not saved either,
  because resuming from it only diverges again."""

  def __init__(self, step: int, name: str, value: float, mean: float,
               factor: float, last_good_step: int | None = None,
               saved_steps: Sequence[int] = ()):
    self.name, self.value, self.mean = name, float(value), float(mean)
    super().__init__(
        step, f'{name}={value:.4g} is more than {factor:g} times its '
        f'running mean {mean:.4g} (config.loss_spike_factor)',
        last_good_step, saved_steps)


def check_finite(step: int, metrics: Mapping[str, Any],
                 last_good_step: int | None = None,
                 saved_steps: Sequence[int] = ()) -> None:
  """Raises NonFiniteLossError naming every non-finite scalar in `metrics`.

  Called by the loop before `maybe_save`, on metrics it already fetched to
  the host for logging, so it costs no extra device round trip.

  Args:
    step: the training step the metrics belong to.
    metrics: name -> scalar (python, numpy or jax); non-scalars are checked
      element-wise.
    last_good_step: the latest saved step, quoted in the message.
    saved_steps: every saved step, for the message's resume hint.
  """
  bad = [name for name, value in metrics.items()
         if not np.all(np.isfinite(np.asarray(value, dtype=np.float64)))]
  if bad:
    raise NonFiniteLossError(step, sorted(bad), last_good_step, saved_steps)


class DivergenceGuard:
  """Stops a diverging run before it saves: non-finite metrics, or a loss
  past `factor` times its running mean.

  The loss a step reports was computed with the weights *before* its update,
  so the training loss alone judges each state one step late: a state whose
  weights just blew up (finite, but 1e4 times too large) reports a normal
  loss, is saved, and only the next step goes NaN, from which every resume
  diverges again. So the loop also hands `check_state` the validation
  metrics of the state about to be saved (the validation pass, or one
  validation batch), and the guard holds them to a running mean of their
  own (validation losses sit above training ones, by more as a small model
  overfits, so the training mean would be the wrong reference).

  Running means are exponential averages of the values seen (a spike never
  enters one), kept in each checkpoint's metadata (`state_dict`) so that a
  resumed run keeps its references.
  """

  def __init__(self, factor: float, metric: str, decay: float = 0.9):
    """Sets up the guard.

    Args:
      factor: a loss above factor * its running mean is a spike; <= 0 turns
        the spike check off (non-finite values are still refused).
      metric: the training metric watched (e.g. 'l1_loss'); its validation
        twin is `'val/' + metric`. It should be a positive loss, of which
        "ten times the mean" means something.
      decay: weight of the old mean in each update.
    """
    self.factor = float(factor)
    self.metric = metric
    self.decay = float(decay)
    self.means: dict[str, float] = {}
    self._warned = False

  def state_dict(self) -> dict[str, Any]:
    return {'metric': self.metric, 'means': dict(self.means)}

  def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
    """Takes the running means from a checkpoint's metadata (same metric)."""
    state = state or {}
    if state.get('metric') == self.metric:
      self.means = {k: float(v) for k, v in (state.get('means') or {}).items()}

  def _watch(self, step: int, name: str, metrics: Mapping[str, Any],
             saved_steps: Sequence[int]) -> None:
    saved_steps = sorted(saved_steps)
    last_good = max(saved_steps, default=None)
    check_finite(step, metrics, last_good, saved_steps)
    if name not in metrics:
      return
    value, mean = float(metrics[name]), self.means.get(name)
    if (self.factor > 0 and mean is not None and mean > 0 and
        value > self.factor * mean):
      raise LossSpikeError(step, name, value, mean, self.factor, last_good,
                           saved_steps)
    self.means[name] = value if mean is None else (
        self.decay * mean + (1.0 - self.decay) * value)

  def observe(self, step: int, metrics: Mapping[str, Any],
              saved_steps: Sequence[int] = ()) -> None:
    """Checks the logged training means of `step`.

    Raises:
      NonFiniteLossError: a metric is NaN/inf.
      LossSpikeError: the watched metric spiked.
    """
    if self.metric not in metrics and not self._warned:
      self._warned = True  # a typo would silently turn the spike check off
      logging.warning('config.loss_spike_metric=%r is not among the training '
                      'metrics (%s); only non-finite values are caught.',
                      self.metric, ', '.join(sorted(metrics)))
    self._watch(step, self.metric, metrics, saved_steps)

  def check_state(self, step: int, metrics: Mapping[str, Any],
                  saved_steps: Sequence[int] = ()) -> None:
    """Checks validation metrics ('val/...') of the state at `step`.

    Raises:
      NonFiniteLossError, LossSpikeError: as `observe`.
    """
    self._watch(step, f'val/{self.metric}', metrics, saved_steps)


def _request_stop(signum: int, frame: Any) -> None:
  del frame
  _STOP_REQUESTED.set()
  _STOP_SIGNALS.append('Ctrl-C' if signum == signal.SIGINT
                       else signal.Signals(signum).name)
  if signum == signal.SIGINT:
    # A second Ctrl-C means "now". The default action kills the process at
    # once, even while the main thread is inside a long C++ call (an XLA
    # compile), where a Python handler would only run after it returns.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    logging.warning('Ctrl-C: will save a checkpoint and stop after the '
                    'current step (press Ctrl-C again to exit at once, '
                    'losing the steps since the last checkpoint).')
  else:
    logging.warning('Received %s: will save a checkpoint and stop after the '
                    'current step.', signal.Signals(signum).name)


def install_preemption_handler(*, sigint: bool = False) -> list[int]:
  """Makes SIGTERM (and optionally SIGINT) request a save-and-stop.

  Schedulers (Slurm, Kubernetes, Cloud TPU) send SIGTERM some seconds before
  killing a job; a user sends SIGINT with Ctrl-C. The handler only sets a
  flag; the loop sees it through `Checkpointer.should_stop` at the next step
  boundary, saves and exits 0, so the interrupted run loses nothing. Only
  setting a flag is also what makes a signal during compilation harmless: a
  KeyboardInterrupt raised out of a compile, with XLA's threads still
  running, could crash the interpreter on its way out. A second SIGINT
  takes the default action (the process dies at once).

  When `jax.distributed` runs JAX's preemption service, JAX owns SIGTERM and
  propagates the notice so that all hosts agree on a step to save at
  (`Checkpointer.should_stop(step)` reads that); replacing its handler would
  break that agreement, so SIGTERM is left alone in that case.

  Must be called from the main thread (a Python signal rule).

  Args:
    sigint: also trap SIGINT (Ctrl-C).

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


@contextlib.contextmanager
def stop_signals(*, sigint: bool = True) -> Iterator[list[int]]:
  """`install_preemption_handler` for a block, restoring the previous
  handlers after it (a library caller, a test runner or the second stage of
  a two-stage run keeps its own Ctrl-C behaviour outside the loop).

  Off the main thread, where Python refuses signal handlers, it installs
  nothing and says so; `stop_at_step` and JAX's preemption notice still work.
  """
  if threading.current_thread() is not threading.main_thread():
    logging.warning('Not on the main thread: SIGTERM and Ctrl-C are not '
                    'trapped, so they stop the run without a checkpoint.')
    yield []
    return
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  installed = install_preemption_handler(sigint=sigint)
  try:
    yield installed
  finally:
    for signum in installed:
      signal.signal(signum, previous[signum])


def preemption_requested() -> bool:
  """True once a trapped signal arrived in this process."""
  return _STOP_REQUESTED.is_set()


def stop_reason() -> str | None:
  """'SIGTERM' or 'Ctrl-C': what requested the stop (None: nothing yet)."""
  return _STOP_SIGNALS[0] if _STOP_SIGNALS else None


def reset_preemption_request() -> None:
  """Clears the flag (for tests and for loops that handled the request)."""
  _STOP_REQUESTED.clear()
  _STOP_SIGNALS.clear()


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
