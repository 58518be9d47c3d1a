"""Checkpoints for both training stages: Orbax manager, restore, preemption.

The restore side (fallback to older steps, resume_step, the config diff of
`CheckpointRestoreError`) is `dqvq.checkpoint_restore`; its names are
re-exported here, so callers need only this module.

What a checkpoint holds (one Orbax step directory, `<workdir>/checkpoints/N`):
  state: the train-state pytree (StandardSave: sharded jax.Arrays are written
    by the processes that own their shards, so nothing is gathered to one
    device or host);
  data:  the grain iterator position (`grain.checkpoint.CheckpointHandler`,
    one small JSON file per process, since each host reads its own shard);
  meta:  JSON with the step, the config, wall time, the caller's metrics and
    a checksum of every array of `state` (`checksums.leaf_checksums`).

Why this layout, and what it guarantees:
- Saves are asynchronous: the device->host copy blocks the step, the file
  writes run in the background, and Orbax waits for the previous save before
  starting the next one (and we wait again before exit).
- Orbax commits a step atomically. On POSIX disks it writes
  `N.orbax-checkpoint-tmp-<timestamp>/`, puts `commit_success.txt` inside and
  renames it to `N/`; on GCS it writes `N/` in place and `commit_success.txt`
  last. Unfinished steps are invisible to `all_steps()`. A step that committed
  but was damaged later (disk trouble, a partial copy) is caught at restore:
  files that no longer read, and arrays that read back with other bits than
  their checksums in `meta` say. `restore_latest` falls back to older steps,
  with a warning naming each bad one. The checksums are summed on the host,
  each process over its own shards; they do not depend on the sharding, so
  they hold on multi-host jobs and across a change of mesh. The data
  position (small JSON, one file per process) has no checksum: grain's own
  parser is its only check.
- A run whose state no longer matches its checkpoints (the model changed)
  gets a `CheckpointRestoreError` listing every step tried and the config
  fields that differ from those the checkpoint was saved with.
- Retention: the last `keep` steps, plus the `keep_best` best steps by
  `best_metric`, so a good validation checkpoint survives a later regression.
- A diverged state must never replace a good checkpoint: the loop checks
  the training metrics and the loss of the state to be saved
  (`DivergenceGuard`: non-finite, or a spike past a factor of the running
  mean) before `maybe_save`, and `maybe_save` refuses non-finite metrics
  and a state (parameters, optimizer state, anything float) with NaN/inf.
  So every saved step passed these checks, and a `DivergenceError` names the
  newest one as the last good step. `restore(step=N)` resumes from an older
  step (`--config.resume_step=N`); the newer ones are moved aside.
- Multi-host: every process must call `maybe_save`, `restore_latest` and
  `close` with the same arguments; Orbax runs the barriers and lets only the
  primary host write the shared files. Never guard these calls with
  `jax.process_index() == 0`: the other hosts' shards would never be written
  and the barrier would hang.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from dqvq import checkpoint_restore

# Re-exported so that the training loop needs only this module.
# pylint: disable=g-importing-member,unused-import
from dqvq.checkpoint_restore import abstract_state_of
from dqvq.checkpoint_restore import CheckpointRestoreError
from dqvq.checksums import ChecksumMismatchError
from dqvq.checksums import leaf_checksums
from dqvq.checksums import verify_checksums
from dqvq.run_guards import check_finite
from dqvq.run_guards import check_writable
from dqvq.run_guards import DivergenceError
from dqvq.run_guards import DivergenceGuard
from dqvq.run_guards import install_preemption_handler
from dqvq.run_guards import LossSpikeError
from dqvq.run_guards import nonfinite_leaves
from dqvq.run_guards import NonFiniteLossError
from dqvq.run_guards import preemption_requested
from dqvq.run_guards import reset_preemption_request
from dqvq.run_guards import stop_reason
from dqvq.run_guards import stop_signals
from dqvq.run_guards import UnwritableDirectoryError
# pylint: enable=g-importing-member,unused-import

PyTree = Any

# Orbax's replica-parallel save (its default off GPU) has each replica of a
# replicated array write one slice of it, and cuts every slice with an eager,
# separately dispatched op. For a state of ~600 mostly small arrays on 8
# devices that is ~4,500 dispatches: 8.3 of the 9 s of a demo-model save on
# CPU, to split writes of a few KiB. Below 1 MiB per slice one replica writes
# the whole array; large arrays on a pod are still written in parallel.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def _register_array_handler() -> None:
  """Orbax's jax.Array handler with the threshold above, silently (Orbax
  warns on every override, which would land in every run's log)."""
  # The absl logger's own level, not `logging.set_verbosity`: restoring a
  # verbosity would pin an explicit level where there was none (NOTSET, which
  # follows the root logger), and INFO logs would vanish under pytest's caplog.
  logger = logging.get_absl_logger()
  level = logger.level
  logger.setLevel(logging.converter.STANDARD_ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=(
                MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)),
        override=True)
  finally:
    logger.setLevel(level)


_register_array_handler()


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
  """Where a run in `workdir` keeps its Orbax steps."""
  return epath.Path(workdir) / 'checkpoints'


def _jsonable(tree: Any) -> Any:
  """A JSON-safe copy: numpy/jax scalars to python, unknown objects to str."""
  def default(x):
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
      return np.asarray(x).tolist()
    if hasattr(x, 'to_dict'):  # ml_collections.ConfigDict
      return x.to_dict()
    return str(x)
  return json.loads(json.dumps(tree, default=default, allow_nan=True))


class Checkpointer(checkpoint_restore.CheckpointRestorer):
  """Saves and restores the train state, data position and metadata.

  Saving, retention and stopping are here; the restore methods
  (`restore_latest`, `restore`, `restore_step`, `read_meta`) come from
  `CheckpointRestorer` in `dqvq.checkpoint_restore`.

  Typical loop (every process runs all of it, with the same arguments):

    ckpt = Checkpointer(workdir, save_every=1000, config=config,
                        best_metric='val/rec_loss', best_mode='min')
    install_preemption_handler()
    restored = ckpt.restore_latest(abstract_state, data_iter)
    state, step = (restored[0], restored[1]) if restored else (init(), 0)
    while step < num_steps:
      state, metrics = train_step(state, next(data_iter))
      step += 1
      if ckpt.should_stop(step):
        break
      if ckpt.save_due(step):  # fetch metrics to the host only when needed
        host_metrics = jax.device_get(metrics)
        check_finite(step, host_metrics, ckpt.latest_step())
        ckpt.maybe_save(step, state, data_iter, host_metrics)
    ckpt.maybe_save(step, state, data_iter, force=True)  # no-op if saved
    ckpt.close()
  """

  def __init__(self, workdir: str | epath.PathLike, *, save_every: int,
               keep: int = 3, best_metric: str | None = None,
               best_mode: str = 'min', keep_best: int = 1,
               config: Any = None, async_save: bool = True,
               check_state_finite: bool = True, stop_sync_every: int = 1):
    """Opens (or creates) `<workdir>/checkpoints`.

    Args:
      workdir: the run directory; checkpoints live in its `checkpoints/`.
      save_every: save when `step % save_every == 0` (0: only forced saves).
      keep: how many of the most recent steps to keep.
      best_metric: metric name (a key of the `metrics` passed to `maybe_save`)
        whose best `keep_best` steps are kept even when older than `keep`;
        steps saved without it never count as best. None: latest only.
      best_mode: 'min' or 'max' for `best_metric`.
      keep_best: how many best steps to keep.
      config: the run config (dict or ConfigDict), stored in every `meta`.
      async_save: write files in the background (the default; off makes
        every save blocking, which is simpler to debug).
      check_state_finite: refuse to save a state with NaN/inf floats.
      stop_sync_every: on multi-host jobs without JAX's preemption service,
        `should_stop(step)` agrees on the local signal flags with a host
        all-gather at the steps that are multiples of this (each is a host
        round trip that waits for every host). The training loop passes its
        `log_every`, whose steps already wait for the metrics, so no step in
        between adds a host sync; a signal is then acted on at the next
        logging step.
    """
    if best_mode not in ('min', 'max'):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
    if keep < 1:
      raise ValueError(f'keep must be >= 1 to resume at all, got {keep}.')
    if save_every < 0:
      raise ValueError(f'save_every must be >= 0, got {save_every}.')
    self.directory = checkpoint_dir(workdir)
    self.save_every = save_every
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.check_state_finite = check_state_finite
    self.stop_sync_every = max(1, stop_sync_every)
    self._config = _jsonable(config) if config is not None else None
    self._start_time = time.time()

    policies = [ocp_managers.LatestN(n=keep)]
    metric_of = None
    if best_metric is not None:
      worst = math.inf if best_mode == 'min' else -math.inf

      def metric_of(metrics: Mapping[str, Any]) -> float:
        value = (metrics or {}).get(best_metric)
        if value is None or not math.isfinite(float(value)):
          return worst
        return float(value)

      # BestN keeps the last n after sorting; reverse=True puts the smallest
      # last, which is what 'min' wants.
      policies.append(ocp_managers.BestN(
          get_metric_fn=metric_of, reverse=(best_mode == 'min'), n=keep_best,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        # best_fn does not choose what is kept (the policy does) but Orbax
        # only writes the per-step metrics file, which the policy needs after
        # a restart, and answers best_step(), when it is set.
        best_fn=metric_of, best_mode=best_mode,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # leftovers of saves killed mid-write
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'data': grain.checkpoint.CheckpointHandler(),
            'meta': ocp.JsonCheckpointHandler(),
        })

  # -- passthroughs ---------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (unfinished tmp directories excluded)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The best step by `best_metric` (the latest if none is configured)."""
    return self._manager.best_step()

  def wait_until_finished(self) -> None:
    """Blocks until the background writes of the last save are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes, then releases the manager's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  # -- saving ---------------------------------------------------------------

  def check_state(self, step: int, state: PyTree) -> None:
    """Refuses a state holding NaN/inf, as every save does first.

    The training loop also calls it once before its first step: the check
    is a compiled program, which would otherwise compile inside the grace
    period of the run's first SIGTERM (benchmarks/stop_latency.py).

    Raises:
      NonFiniteLossError: naming the leaves and the last good saved step.
    """
    if not self.check_state_finite:
      return
    bad = nonfinite_leaves(state)
    if bad:
      raise NonFiniteLossError(step, [f'state{b}' for b in bad],
                               self.latest_step(), self.all_steps())

  def save_due(self, step: int, force: bool = False) -> bool:
    """Whether `maybe_save(step, ..., force=force)` would write (the loop
    checks the state it is about to save only then)."""
    latest = self.latest_step()
    if latest is not None and step <= latest:
      return False
    return (force or (self.save_every > 0 and step % self.save_every == 0) or
            self._manager.reached_preemption(step))

  def maybe_save(self, step: int, state: PyTree, data_iter: Any = None,
                 metrics: Mapping[str, Any] | None = None, force: bool = False,
                 extra: Mapping[str, Any] | None = None) -> bool:
    """Saves when `step` is due (or `force`); returns whether it saved.

    A step at or below the latest saved one is never rewritten (Orbax does not
    overwrite), which makes the final forced save after a periodic one, or
    after a preemption save, a no-op.

    Args:
      step: the number of completed training steps the state reflects.
      state: pytree of jax.Arrays (sharded or not) and numpy/python scalars.
      data_iter: grain DatasetIterator whose position is saved with the state.
      metrics: host scalars stored in meta; `best_metric` is read from it.
      force: save even off the `save_every` grid (end of run, preemption).
      extra: more JSON-able metadata for `meta`.

    Raises:
      NonFiniteLossError: `metrics` or the state hold NaN/inf; nothing saved.
    """
    if not self.save_due(step, force):
      return False
    latest = self.latest_step()
    metrics = _jsonable(dict(metrics or {}))
    saved_steps = self.all_steps()
    check_finite(step, {k: v for k, v in metrics.items()
                        if isinstance(v, (int, float))}, latest, saved_steps)
    self.check_state(step, state)
    meta = {
        'step': int(step),
        'time': time.time(),
        'elapsed_s': time.time() - self._start_time,
        'config': self._config,
        'metrics': metrics,
        **_jsonable(dict(extra or {})),
        'checksums': leaf_checksums(state),  # verified by every restore
    }
    items = {'state': ocp.args.StandardSave(state),
             'meta': ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    # Orbax waits for the previous async save before starting this one.
    saved = self._manager.save(step, args=ocp.args.Composite(**items),
                               metrics=metrics, force=True)
    if saved:  # the end-of-run summary lists the steps; not one line each
      logging.debug('Checkpoint at step %d started (%s).', step,
                    'async' if self._manager.is_saving_in_progress()
                    else 'done')
    return saved

  # -- stopping -------------------------------------------------------------

  def should_stop(self, step: int | None = None) -> bool:
    """True once the job should save and exit (SIGTERM, preemption notice).

    Call it every step with the step number on every host: on multi-host
    jobs JAX's preemption sync point is a collective decision that only
    becomes True for all hosts at the same step. A locally trapped signal is
    used as is on a single host; with several hosts and no preemption
    service, the hosts OR their flags so that they stop at the same step.
    """
    if step is not None and self._manager.reached_preemption(step):
      return True
    local = preemption_requested()
    if jax.process_count() == 1:
      return local
    if step is not None and step % self.stop_sync_every:
      return False
    flags = multihost_utils.process_allgather(np.array(local))
    return bool(np.any(flags))
