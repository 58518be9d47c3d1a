"""The training loop both stages share.

    validate config -> mesh -> data -> abstract state + shardings
    -> restore latest checkpoint (state and data position) or init
    -> loop: global batch -> jitted step (state donated) -> metrics on device
       -> every log_every: one host sync, scalars, progress line
       -> every eval_every / image_every: validation pass, pictures
       -> every checkpoint_every, at the end, on SIGTERM: checkpoint

A non-finite loss stops the run before anything is saved, so the last good
checkpoint survives. Everything a step needs besides the batch is in the
state or closed over, so a resumed run replays the same per-step keys
(fold_in(key, step)) and data order and ends bit-identical on CPU.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dqvq import checkpoint as ckpt_lib
from dqvq import config_lib
from dqvq import metrics as metrics_lib
from dqvq import sharding
from dqvq import visualize
from dqvq.data import pipeline
from dqvq.models import quantizer
from dqvq.trainers import stage1


def _setup_state(models: stage1.Stage1Models, config: ml_collections.ConfigDict,
                 mesh: jax.sharding.Mesh):
  """Abstract state, its shardings, and a jitted initializer into them."""
  res = config.data.resolution
  shape = (1, res, res, 3)
  init = functools.partial(stage1.init_state, models, image_shape=shape)
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.infer_state_shardings(abstract, mesh)
  init_fn = jax.jit(init, out_shardings=shardings)
  return abstract, shardings, lambda: init_fn(rng)


def device_batch(host_batch, mesh) -> dict[str, jax.Array]:
  """The arrays of a host batch as global arrays (counters stay on the host)."""
  return pipeline.make_global_batch(
      {k: host_batch[k] for k in ('image', 'label', 'mask')}, mesh)


def evaluate(models, state, eval_fn, datasets, mesh, config) -> dict[str, float]:
  """One pass over the eval split (or num_eval_batches of it)."""
  total = None
  counts = None
  limit = config.num_eval_batches or datasets.eval_batches
  for i, batch in enumerate(iter(datasets.eval)):
    if i >= limit:
      break
    out = eval_fn(state, device_batch(batch, mesh))
    sums = out['sums']
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    counts = out['code_counts'] if counts is None else counts + out[
        'code_counts']
  total = jax.device_get(total)
  n = max(float(total.pop('count')), 1.0)
  result = {f'val/{k}': float(v) / n for k, v in total.items()}
  usage = jax.device_get(quantizer.usage_stats(counts))
  result['val/codebook_usage'] = float(usage['codebook_usage'])
  result['val/perplexity'] = float(usage['perplexity'])
  return result


def write_pictures(models, recon_fn, state, batch, writer, step,
                   workdir) -> None:
  images = batch['image'][: models.config.num_images]
  out = jax.device_get(recon_fn(state, jnp.asarray(images)))
  # Small images are enlarged (nearest) so code cells stay visible.
  zoom = max(1, 128 // images.shape[1])
  up = lambda a: np.repeat(np.repeat(np.asarray(a), zoom, 1), zoom, 2)
  panel = visualize.stage1_panel(
      up(images), up(out['reconstruction']), out['grain_map'],
      models.vae.num_grains, grain_factors=tuple(
          f * zoom for f in models.vae.grain_factors))
  metrics_lib.write_images(writer, step, {'stage1/panel': panel[None]})
  if jax.process_index() == 0:
    visualize.save_png(os.path.join(workdir, 'pictures', f'stage1_{step:07d}.png'),
                       panel)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Trains stage 1 per `config` in `workdir`; returns the final state."""
  config_lib.validate_config(config)
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  datasets = pipeline.create_datasets(  # prepares the demo data if needed
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      mesh=mesh, eval_batch_size=config.eval_batch_size)
  stage1.resolve_entropy_thresholds(config, workdir)
  models = stage1.build_models(config)
  lpips_params = stage1.lpips_params_for(config)
  abstract, shardings, init_fn = _setup_state(models, config, mesh)
  train_iter = iter(datasets.train)

  checkpointer = ckpt_lib.Checkpointer(
      workdir, save_every=config.checkpoint_every,
      keep=config.keep_checkpoints, best_metric=config.best_metric or None,
      best_mode='min', config=config.to_dict())
  ckpt_lib.install_preemption_handler()
  restored = checkpointer.restore_latest(
      sharding.with_shardings(abstract, shardings), data_iter=train_iter)
  if restored is None:
    state = init_fn()
    logging.info('Initialised a new run in %s.', workdir)
  else:
    state, step, _ = restored
    logging.info('Resumed from step %d in %s.', step, workdir)

  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  if lpips_params is not None:
    lpips_params = jax.device_put(lpips_params, replicated)
  train_fn = jax.jit(
      functools.partial(stage1.train_step, models),
      in_shardings=(shardings, batch_sharding, replicated),
      out_shardings=(shardings, replicated), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(stage1.eval_step, models),
                    in_shardings=(shardings, batch_sharding),
                    out_shardings=replicated)

  recon_fn = jax.jit(functools.partial(stage1.reconstruct, models))
  writer = metrics_lib.create_writer(workdir)
  if int(state.step) == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
  progress = metrics_lib.ProgressReporter(
      config.num_train_steps, config.batch_size, every=config.log_every)
  accumulator = metrics_lib.MetricsAccumulator()
  step = start_step = int(state.step)
  if step == 0:  # the untrained baseline every later validation compares to
    val = evaluate(models, state, eval_fn, datasets, mesh, config)
    metrics_lib.write_scalars(writer, 0, val)
    logging.info('step 0 validation: %s', ', '.join(
        f'{k}={v:.4g}' for k, v in sorted(val.items())))
  skipped = 0
  last_batch = None
  while step < config.num_train_steps:
    host_batch = next(train_iter)
    skipped = int(host_batch.get('num_skipped_total', skipped))
    batch = device_batch(host_batch, mesh)
    state, step_metrics = train_fn(state, batch, lpips_params)
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
      val = evaluate(models, state, eval_fn, datasets, mesh, config)
      metrics_lib.write_scalars(writer, step, val)
      logging.info('step %d validation: %s', step, ', '.join(
          f'{k}={v:.4g}' for k, v in sorted(val.items())))
    if step % config.image_every == 0 or is_last:
      write_pictures(models, recon_fn, state, last_batch, writer, step, workdir)
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
