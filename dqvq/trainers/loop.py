"""The training loop both stages share.

    validate config -> mesh -> data -> abstract state + shardings
    -> restore the newest checkpoint (or config.resume_step) or init
    -> loop: global batch -> jitted step (state donated) -> metrics on device
       -> wait for the step before it (the host runs one step ahead, no more)
       -> every log_every: one host sync, divergence check, scalars to
          TensorBoard, one short progress line
       -> every eval_every / image_every: validation pass, pictures
       -> every checkpoint_every, at the end, on SIGTERM or Ctrl-C: the
          state's loss on a validation batch checked, then a checkpoint
    -> a summary: final metrics, where the checkpoints and pictures are

An unwritable workdir is refused before anything is built or compiled.
SIGTERM and Ctrl-C are trapped before anything compiles and only stop the
run at the next step boundary, after a save. A diverging run (non-finite
metrics or state, or a loss spike past `config.loss_spike_factor` times its
running mean) stops before anything is saved, so every checkpoint is a good
one and the error names the newest. Everything a step needs besides the
batch is in the state or closed over, so a resumed run replays the same
per-step keys (fold_in(key, step)) and data order and ends bit-identical on
CPU.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from dqvq import checkpoint as ckpt_lib
from dqvq.data import pipeline
from dqvq import metrics as metrics_lib
from dqvq import sharding
from dqvq.trainers import checks
from dqvq.trainers import stage1
from dqvq.trainers import task as task_lib
from dqvq import visualize


def device_batch(host_batch, mesh, keys) -> dict[str, jax.Array]:
  """The arrays of a host batch as global arrays (counters stay on the host)."""
  return pipeline.make_global_batch({k: host_batch[k] for k in keys}, mesh)


def evaluate(task: task_lib.Task, state, eval_fn, mesh,
             config) -> dict[str, float]:
  """One pass over the eval split (or num_eval_batches of it)."""
  total = None
  limit = config.num_eval_batches or task.datasets.eval_batches
  for i, batch in enumerate(iter(task.datasets.eval)):
    if i >= limit:
      break
    sums = eval_fn(state, device_batch(batch, mesh, task.batch_keys),
                   task.frozen)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  return task.summarize(jax.device_get(total))


def make_task(config: ml_collections.ConfigDict, workdir: str,
              mesh: jax.sharding.Mesh) -> task_lib.Task:
  if config.stage == 1:
    return stage1.make_task(config, workdir, mesh)
  from dqvq.trainers import stage2  # pylint: disable=g-import-not-at-top
  return stage2.make_task(config, workdir, mesh)


def write_pictures(task: task_lib.Task, state, host_batch, writer, step: int,
                   workdir: str, config: ml_collections.ConfigDict) -> None:
  panel = task.pictures(state, host_batch, task.frozen, step)
  if panel is None:
    return
  name = f'stage{config.stage}'
  metrics_lib.write_images(writer, step, {f'{name}/panel': panel[None]})
  if jax.process_index() == 0:
    visualize.save_png(
        os.path.join(workdir, 'pictures', f'{name}_{step:07d}.png'), panel)


def _format_metrics(metrics: Mapping[str, float]) -> str:
  return ', '.join(f'{k}={v:.4g}' for k, v in sorted(metrics.items()))


def _summarize_run(config: ml_collections.ConfigDict, workdir: str, step: int,
                   stopped: str | None, train_scalars: Mapping[str, float],
                   val: Mapping[str, float] | None, saved: Sequence[int],
                   seconds: float) -> None:
  """The end-of-run lines: what was reached, final metrics, where things are.

  (`python -m dqvq.train` adds the next command to run.)
  """
  total = config.num_train_steps
  if stopped:
    logging.info('Stopped at step %d/%d (%s) after %s; rerun the same '
                 'command to resume.', step, total, stopped,
                 metrics_lib.format_duration(seconds))
  else:
    logging.info('Finished %d steps in %s.', total,
                 metrics_lib.format_duration(seconds))
  final = {f'train/{k}': v for k, v in train_scalars.items()
           if k in ('loss', config.get('loss_spike_metric', 'loss'))}
  final.update(val or {})
  if final:
    logging.info('Final: %s', _format_metrics(final))
  pictures = os.path.join(workdir, 'pictures')
  logging.info(
      'Checkpoints: %s (steps %s); pictures: %s; curves: tensorboard '
      '--logdir %s', ckpt_lib.checkpoint_dir(workdir),
      ', '.join(map(str, saved)) or 'none',
      pictures if os.path.isdir(pictures) else 'none yet', workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Trains the stage `config` names in `workdir`; returns the final state.

  The state's step is below `config.num_train_steps` when the run stopped
  early (SIGTERM, Ctrl-C, `stop_at_step`) after saving.

  Raises:
    DivergenceError: the run diverged; nothing diverged was saved.
  """
  checks.validate_config(config)
  # Before the data, the models and the compiles: an unwritable workdir
  # would otherwise surface only at the first summary or checkpoint.
  ckpt_lib.check_writable(workdir, ckpt_lib.checkpoint_dir(workdir))
  # Trapped before anything compiles: a Ctrl-C during a compile only sets
  # the flag, and the stop waits for the next step boundary.
  with ckpt_lib.stop_signals(sigint=True):
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> Any:
  started = time.monotonic()
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  task = make_task(config, workdir, mesh)  # prepares the demo data if needed
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(task.init, rng)
  shardings = task.state_shardings(abstract)
  logging.info(
      'State: %.3f GiB per device (params and optimizer, mesh %s), before '
      'activations; `python -m dqvq.tools.aot` checks a topology ahead of time.',
      sharding.bytes_per_device(abstract, shardings) / 2**30,
      dict(mesh.shape))
  train_iter = iter(task.datasets.train)

  checkpointer = ckpt_lib.Checkpointer(
      workdir, save_every=config.checkpoint_every,
      keep=config.keep_checkpoints, best_metric=config.best_metric or None,
      best_mode='min', config=config.to_dict(),
      # Hosts agree on a stop signal at logging steps only (they sync there
      # anyway); between them a step is dispatched without a host round trip.
      stop_sync_every=config.log_every)
  writer = None
  try:
    guard = ckpt_lib.DivergenceGuard(config.get('loss_spike_factor', 10.0),
                                     config.get('loss_spike_metric', 'loss'))
    restored = checkpointer.restore(
        sharding.with_shardings(abstract, shardings), data_iter=train_iter,
        step=config.get('resume_step', 0) or None)
    if restored is None:
      state = jax.jit(task.init, out_shardings=shardings)(rng)
      logging.info('Initialised a new run in %s.', workdir)
    else:
      state, step, meta = restored
      guard.load_state_dict(meta.get('divergence_guard'))
      logging.info('Resumed from step %d in %s.', step, workdir)
    writer = metrics_lib.create_writer(workdir)
    state = _loop(config, workdir, task, state, mesh, shardings, train_iter,
                  checkpointer, writer, guard, started)
  except BaseException:
    # The last good save must commit before the error reaches the user (it
    # is the step the error names), and no Orbax or writer thread may
    # outlive the interpreter; a failure here must not hide the first one.
    try:
      _close(checkpointer, writer)
    except Exception:  # pylint: disable=broad-exception-caught
      logging.exception('Closing the checkpointer after an error failed.')
    raise
  _close(checkpointer, writer)
  return state


def _close(checkpointer: ckpt_lib.Checkpointer,
           writer: metrics_lib.MetricWriter | None) -> None:
  checkpointer.close()
  if writer is not None:
    writer.close()


class StepsInFlight:
  """Bounds how many dispatched steps the device has yet to finish.

  A jitted step returns at once (asynchronous dispatch), and the loop syncs
  with the device only every `log_every` steps, so the host could queue that
  many steps. A SIGTERM seen at step N then waits for all of them before the
  save can start, where a scheduler's grace period may be 30 s: the demo's
  stage 1 (`log_every` 20, two cores) took 27.5 s from the signal to its exit
  unbounded and 8.0 s with depth 1 (benchmarks/stop_latency.py). Waiting, after
  dispatching step N, for step N - `depth` bounds that wait to `depth` + 1
  steps and keeps the device fed: step N is queued while the host fetches
  and dispatches step N + 1. `depth` 0 waits for nothing (no bound).
  """

  def __init__(self, depth: int = 1):
    if depth < 0:
      raise ValueError(f'depth must be 0 (no bound) or more, got {depth}.')
    self.depth = depth
    self._pending: collections.deque[Any] = collections.deque()

  def add(self, outputs: Any) -> None:
    """Takes a dispatched step's outputs; blocks on the oldest beyond depth."""
    if not self.depth:
      return
    self._pending.append(outputs)
    while len(self._pending) > self.depth:
      jax.block_until_ready(self._pending.popleft())


def _loop(config: ml_collections.ConfigDict, workdir: str,
          task: task_lib.Task, state: Any, mesh: jax.sharding.Mesh,
          shardings: Any, train_iter: Any,
          checkpointer: ckpt_lib.Checkpointer,
          writer: metrics_lib.MetricWriter, guard: ckpt_lib.DivergenceGuard,
          started: float) -> Any:
  """The training loop proper, from `state` to the end or a stop; returns
  the last state (its step is below num_train_steps after a stop)."""
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  frozen = jax.device_put(task.frozen, replicated)
  train_fn = jax.jit(task.train_step,
                     in_shardings=(shardings, batch_sharding, replicated),
                     out_shardings=(shardings, replicated), donate_argnums=(0,))
  eval_fn = jax.jit(task.eval_step,
                    in_shardings=(shardings, batch_sharding, replicated),
                    out_shardings=replicated)
  task = dataclasses.replace(task, frozen=frozen)

  if int(state.step) == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
  # The console line is short (step, loss, rates, ETA); TensorBoard gets all.
  progress = metrics_lib.ProgressReporter(
      config.num_train_steps, config.batch_size, every=config.log_every,
      metric_keys=('loss',))
  accumulator = metrics_lib.MetricsAccumulator()
  probe_batch = None

  def probe(state) -> dict[str, float]:
    """Validation metrics of `state` on one batch, always the first."""
    nonlocal probe_batch
    if probe_batch is None:
      probe_batch = next(iter(task.datasets.eval))
    return task.summarize(jax.device_get(eval_fn(
        state, device_batch(probe_batch, mesh, task.batch_keys), frozen)))

  step = start_step = int(state.step)
  # Every save first checks the state it saves: its leaves are finite (the
  # checkpointer) and its loss on a validation batch (`probe`). Both are
  # compiled programs; they compile here, before the first step, and not
  # inside the grace period of the run's first SIGTERM
  # (benchmarks/stop_latency.py --resume_from).
  checkpointer.check_state(step, state)
  val = None
  if step == 0:  # the untrained baseline every later validation compares to
    val = evaluate(task, state, eval_fn, mesh, config)
    metrics_lib.write_scalars(writer, 0, val)
    logging.info('step 0 validation: %s', _format_metrics(val))
    guard.check_state(0, val)  # also the reference for later validations
  else:
    # Also shows what the restored state measures: a restore of the wrong
    # run shows here, before any compute is spent on it.
    logging.info('step %d (restored) on one validation batch: %s', step,
                 _format_metrics(probe(state)))
  skipped = 0
  last_batch = None
  scalars: dict[str, float] = {}
  stopped = None
  in_flight = StepsInFlight(config.get('steps_in_flight', 1))
  while step < config.num_train_steps:
    host_batch = next(train_iter)
    skipped = int(host_batch.get('num_skipped_total', skipped))
    batch = device_batch(host_batch, mesh, task.batch_keys)
    state, step_metrics = train_fn(state, batch, frozen)
    step += 1
    accumulator.add(step_metrics)
    in_flight.add(step_metrics)
    if step == start_step + 1:
      progress.start(step)  # rates exclude the compile of the first step
    last_batch = host_batch
    is_last = step == config.num_train_steps
    if step % config.log_every == 0 or is_last:
      scalars = accumulator.compute()
      accumulator.reset()
      rates = progress.update(step, scalars)
      metrics_lib.write_scalars(writer, step, {
          f'train/{k}': v for k, v in {
              **scalars, **rates, 'skipped_images': float(skipped)}.items()})
      guard.observe(step, scalars, checkpointer.all_steps())  # once written
    step_val = None  # validation metrics of this step's state
    if step % config.eval_every == 0 or is_last:
      val = step_val = evaluate(task, state, eval_fn, mesh, config)
      metrics_lib.write_scalars(writer, step, val)
      logging.info('step %d validation: %s', step, _format_metrics(val))
      guard.check_state(step, val, checkpointer.all_steps())
    if step % config.image_every == 0 or is_last:
      write_pictures(task, state, last_batch, writer, step, workdir, config)
    if checkpointer.should_stop(step):
      stopped = ckpt_lib.stop_reason() or 'preemption notice'
    elif step == config.get('stop_at_step', 0):
      stopped = 'stop_at_step'
    force = is_last or stopped is not None
    if checkpointer.save_due(step, force):
      if step_val is None:
        # The loss of the very state to be saved, on one validation batch:
        # the training loss is one update behind it (DivergenceGuard).
        guard.check_state(step, probe(state), checkpointer.all_steps())
      checkpointer.maybe_save(
          step, state, data_iter=train_iter, metrics=step_val, force=force,
          extra={'divergence_guard': guard.state_dict()})
    if stopped:
      break
  checkpointer.wait_until_finished()
  _summarize_run(config, workdir, step, stopped, scalars, val,
                 checkpointer.all_steps(), time.monotonic() - started)
  return state
