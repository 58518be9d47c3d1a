"""The training loop both stages share.

    validate config -> mesh -> data -> abstract state + shardings
    -> restore latest checkpoint (state and data position) or init
    -> loop: global batch -> jitted step (state donated) -> metrics on device
       -> every log_every: one host sync, scalars, progress line
       -> every eval_every / image_every: validation pass, pictures
       -> every checkpoint_every, at the end, on SIGTERM: checkpoint

An unwritable workdir is refused before anything is built or compiled. A
non-finite loss stops the run before anything is saved, so the last good
checkpoint survives. Everything a step needs besides the batch is in the
state or closed over, so a resumed run replays the same per-step keys
(fold_in(key, step)) and data order and ends bit-identical on CPU.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from dqvq import checkpoint as ckpt_lib
from dqvq import config_lib
from dqvq import metrics as metrics_lib
from dqvq import sharding
from dqvq import visualize
from dqvq.data import pipeline
from dqvq.trainers import common
from dqvq.trainers import stage1


def device_batch(host_batch, mesh, keys) -> dict[str, jax.Array]:
  """The arrays of a host batch as global arrays (counters stay on the host)."""
  return pipeline.make_global_batch({k: host_batch[k] for k in keys}, mesh)


def evaluate(task: common.Task, state, eval_fn, mesh,
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
              mesh: jax.sharding.Mesh) -> common.Task:
  if config.stage == 1:
    return stage1.make_task(config, workdir, mesh)
  from dqvq.trainers import stage2  # pylint: disable=g-import-not-at-top
  return stage2.make_task(config, workdir, mesh)


def write_pictures(task: common.Task, state, host_batch, writer, step: int,
                   workdir: str, config: ml_collections.ConfigDict) -> None:
  panel = task.pictures(state, host_batch, task.frozen, step)
  if panel is None:
    return
  name = f'stage{config.stage}'
  metrics_lib.write_images(writer, step, {f'{name}/panel': panel[None]})
  if jax.process_index() == 0:
    visualize.save_png(
        os.path.join(workdir, 'pictures', f'{name}_{step:07d}.png'), panel)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Trains the stage `config` names in `workdir`; returns the final state."""
  config_lib.validate_config(config)
  # Before the data, the models and the compiles: an unwritable workdir
  # would otherwise surface only at the first summary or checkpoint.
  ckpt_lib.check_writable(workdir, ckpt_lib.checkpoint_dir(workdir))
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  task = make_task(config, workdir, mesh)  # prepares the demo data if needed
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(task.init, rng)
  shardings = task.state_shardings(abstract)
  logging.info(
      'State: %.3f GiB per device (params and optimizer, mesh %s), before '
      'activations; `python -m dqvq.aot` checks a topology ahead of time.',
      sharding.bytes_per_device(abstract, shardings) / 2**30,
      dict(mesh.shape))
  train_iter = iter(task.datasets.train)

  checkpointer = ckpt_lib.Checkpointer(
      workdir, save_every=config.checkpoint_every,
      keep=config.keep_checkpoints, best_metric=config.best_metric or None,
      best_mode='min', config=config.to_dict())
  ckpt_lib.install_preemption_handler()
  restored = checkpointer.restore_latest(
      sharding.with_shardings(abstract, shardings), data_iter=train_iter)
  if restored is None:
    state = jax.jit(task.init, out_shardings=shardings)(rng)
    logging.info('Initialised a new run in %s.', workdir)
  else:
    state, step, _ = restored
    logging.info('Resumed from step %d in %s.', step, workdir)

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

  writer = metrics_lib.create_writer(workdir)
  if int(state.step) == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
  progress = metrics_lib.ProgressReporter(
      config.num_train_steps, config.batch_size, every=config.log_every,
      metric_keys=task.progress_keys)
  accumulator = metrics_lib.MetricsAccumulator()
  step = start_step = int(state.step)
  if step == 0:  # the untrained baseline every later validation compares to
    val = evaluate(task, state, eval_fn, mesh, config)
    metrics_lib.write_scalars(writer, 0, val)
    logging.info('step 0 validation: %s', ', '.join(
        f'{k}={v:.4g}' for k, v in sorted(val.items())))
  skipped = 0
  last_batch = None
  while step < config.num_train_steps:
    host_batch = next(train_iter)
    skipped = int(host_batch.get('num_skipped_total', skipped))
    batch = device_batch(host_batch, mesh, task.batch_keys)
    state, step_metrics = train_fn(state, batch, frozen)
    step += 1
    accumulator.add(step_metrics)
    if step == start_step + 1:
      progress.start(step)  # rates exclude the compile of the first step
    last_batch = host_batch
    is_last = step == config.num_train_steps
    if step % config.log_every == 0 or is_last:
      scalars = accumulator.compute()
      accumulator.reset()
      ckpt_lib.check_finite(step, scalars)
      scalars.update(progress.update(step, scalars))
      scalars['skipped_images'] = float(skipped)
      metrics_lib.write_scalars(writer, step, {f'train/{k}': v
                                               for k, v in scalars.items()})
    val = None
    if step % config.eval_every == 0 or is_last:
      val = evaluate(task, state, eval_fn, mesh, config)
      metrics_lib.write_scalars(writer, step, val)
      logging.info('step %d validation: %s', step, ', '.join(
          f'{k}={v:.4g}' for k, v in sorted(val.items())))
    if step % config.image_every == 0 or is_last:
      write_pictures(task, state, last_batch, writer, step, workdir, config)
    stop = checkpointer.should_stop(step) or step == config.get(
        'stop_at_step', 0)
    checkpointer.maybe_save(step, state, data_iter=train_iter, metrics=val,
                            force=is_last or stop)
    if stop:
      logging.warning('Stopped at step %d (preemption or stop_at_step): '
                      'checkpoint saved, exiting.', step)
      break
  checkpointer.wait_until_finished()
  writer.flush()
  return state
