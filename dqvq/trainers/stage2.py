"""Stage 2: training the DQ-Transformer on a frozen DQ-VAE's token streams.

One step: codes and grain maps (from a token dataset written by
`python -m dqvq.tokenize`, or encoded on the fly from images by the frozen
tokenizer) -> coarse-to-fine streams (`dqvq.sequence`, inside the step, so
the host only moves small integer maps) -> teacher-forced Position and
Content logits -> the official loss (content CE + mean of per-granularity
position CEs, pads ignored) -> AdamW (decay on linear kernels only).

With label dropout (`model.label_dropout` > 0) a class-conditional model
sees the null class instead of the label that often, so sampling can use
classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dqvq import config_lib
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq import losses
from dqvq.models import transformer as transformer_lib
from dqvq import sequence
from dqvq import sharding
from dqvq.trainers import optim
from dqvq.trainers import task as task_lib
from dqvq import visualize

Array = jax.Array


@flax.struct.dataclass
class Stage2State:
  step: Array
  params: Any
  opt_state: Any
  rng: Array


@flax.struct.dataclass
class Stage2Setup:
  """What a stage-2 step closes over (not state): the transformer, its token
  layout, optimizer, schedule and the config."""
  model: transformer_lib.DQTransformer = flax.struct.field(pytree_node=False)
  layout: sequence.StreamLayout = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  schedule: Any = flax.struct.field(pytree_node=False)
  config: Any = flax.struct.field(pytree_node=False)


def build_models(config: ml_collections.ConfigDict,
                 layout: sequence.StreamLayout) -> Stage2Setup:
  """The transformer (`transformer_lib.from_config`) and its optimizer."""
  model = transformer_lib.from_config(config.model, layout,
                                      config_lib.compute_dtype(config))
  schedule = optim.learning_rate_schedule(config)
  return Stage2Setup(model, layout, optim.adamw(config, schedule), schedule,
                      config)


def init_state(models: Stage2Setup, rng: Array) -> Stage2State:
  init_rng, state_rng = jax.random.split(rng)
  params = nn.unbox(
      transformer_lib.init_variables(models.model, init_rng)['params'])
  return Stage2State(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=models.tx.init(params), rng=state_rng)


def state_shardings(models: Stage2Setup, mesh: jax.sharding.Mesh,
                    abstract: Stage2State) -> Any:
  boxed = jax.eval_shape(
      lambda r: transformer_lib.init_variables(models.model, r),
      jax.random.key(0))
  specs = nn.get_partition_spec(boxed)['params']
  return sharding.logical_state_shardings(
      abstract, specs, mesh, transformer_lib.LOGICAL_AXIS_RULES)


def codes_of(batch: dict[str, Array], tok: tokenizer_lib.Tokenizer
             ) -> tuple[Array, Array]:
  """Code and grain maps from a token batch, or encoded from its images."""
  if 'codes' in batch:
    return batch['codes'], batch['grain_map']
  out = tok.encode(batch['image'])
  return (jax.lax.stop_gradient(out['codes']),
          jax.lax.stop_gradient(out['grain_map']))


def _labels(models: Stage2Setup, batch: dict[str, Array],
            rng: Array | None) -> Array | None:
  lay = models.layout
  if not lay.num_classes:
    return None
  labels = batch['label'].astype(jnp.int32)
  p = models.config.model.label_dropout
  if rng is not None and p > 0:
    drop = jax.random.bernoulli(rng, p, labels.shape)
    labels = jnp.where(drop, lay.num_classes, labels)  # the null class
  return labels


def _forward(models, params, batch, tok, train, rngs=None):
  codes, grain_map = codes_of(batch, tok)
  labels = _labels(models, batch, rngs['label'] if rngs else None)
  streams = sequence.encode(codes, grain_map, models.layout, labels)
  io = sequence.model_inputs(streams, models.layout)
  pos_logits, con_logits = models.model.apply(
      {'params': params}, io['inputs'], io['targets']['position'],
      io['targets']['grain'], train=train,
      next_pad=io['targets']['pad'],
      rngs={'dropout': rngs['dropout']} if rngs else None)
  sums = losses.token_loss_sums(pos_logits, con_logits, io['targets'],
                                models.layout.num_grains, batch.get('mask'))
  return sums, streams, con_logits


def train_step(models: Stage2Setup, state: Stage2State,
               batch: dict[str, Array], tok: tokenizer_lib.Tokenizer
               ) -> tuple[Stage2State, dict[str, Array]]:
  cfg = models.config
  keys = jax.random.split(jax.random.fold_in(state.rng, state.step), 2)
  rngs = {'dropout': keys[0], 'label': keys[1]}
  num_grains = models.layout.num_grains

  def loss_fn(params):
    sums, streams, _ = _forward(models, params, batch, tok, True, rngs)
    out = losses.token_losses(sums, num_grains, cfg.loss.content_weight,
                              cfg.loss.position_weight)
    out['code_length'] = jnp.mean(streams['num_codes'].astype(jnp.float32))
    out['truncated'] = jnp.mean(streams['truncated'].astype(jnp.float32))
    return out['loss'], out

  grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = models.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics['grad_norm'] = optax.global_norm(grads)
  metrics['learning_rate'] = models.schedule(state.step)
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state), metrics


def eval_step(models: Stage2Setup, state: Stage2State,
              batch: dict[str, Array], tok: tokenizer_lib.Tokenizer
              ) -> dict[str, Array]:
  sums, streams, _ = _forward(models, state.params, batch, tok, False)
  mask = batch['mask'].astype(jnp.float32)
  sums['images'] = jnp.sum(mask)
  sums['code_length'] = jnp.sum(streams['num_codes'] * mask)
  return sums


def summarize(models: Stage2Setup, sums: dict[str, Any]) -> dict[str, float]:
  out = losses.token_losses(
      {k: jnp.asarray(v) for k, v in sums.items()}, models.layout.num_grains,
      models.config.loss.content_weight, models.config.loss.position_weight)
  result = {f'val/{k}': float(v) for k, v in out.items()}
  result['val/code_length'] = float(sums['code_length']) / max(
      float(sums['images']), 1.0)
  return result


def teacher_forced(models: Stage2Setup, state: Stage2State,
                   batch: dict[str, Array], tok: tokenizer_lib.Tokenizer
                   ) -> dict[str, Array]:
  """Images from the true tokens and from the model's top-1 next codes.

  The second decodes, at every true position, the code the model ranks
  first given the true prefix: how well it has learned the data, before
  any sampler runs.
  """
  _, streams, con_logits = _forward(models, state.params, batch, tok, False)
  predicted = jnp.argmax(con_logits, -1)
  target_content = streams['content'][:, 1:]
  content = streams['content'].at[:, 1:].set(
      jnp.where(target_content < models.layout.codebook_size, predicted,
                target_content))
  true_codes, _ = sequence.decode(streams['content'], streams['position'],
                                  models.layout)
  pred_codes, _ = sequence.decode(content, streams['position'], models.layout)
  return {'true': tok.decode(true_codes), 'predicted': tok.decode(pred_codes),
          'grain_map': sequence.grain_map_from_streams(streams['position'],
                                                       models.layout)}


def make_task(config: ml_collections.ConfigDict, workdir: str,
              mesh: jax.sharding.Mesh) -> task_lib.Task:
  """Tokenizer, data, model and step functions of a stage-2 run."""
  del workdir
  tok = tokenizer_lib.load_stage1(config.tokenizer.workdir, mesh)
  logging.info('Tokenizer: %s step %d (fingerprint %s).',
               config.tokenizer.workdir, tok.step, tok.fingerprint)
  trained_at = int(tok.config.data.resolution)
  if not config.tokens_dir and int(config.data.resolution) != trained_at:
    # The layout would follow the images and train silently on a grid the
    # tokenizer never saw; its codes would not mean what they did.
    raise ValueError(
        f'config.data.resolution={config.data.resolution} but the tokenizer '
        f'in {config.tokenizer.workdir} was trained at {trained_at} px; set '
        f'--config.data.resolution={trained_at} (or train a tokenizer at '
        f'{config.data.resolution} px).')
  layout = sequence.layout_from_config(config, tok.vae)
  models = build_models(config, layout)
  logging.info('Token layout: grids %s, capacities %s, sequence length %d.',
               layout.grid_sizes, layout.stream_capacities, layout.length)
  if config.tokens_dir:
    # pylint: disable=g-import-not-at-top
    from dqvq.data import token_pipeline
    from dqvq.data import tokens
    # pylint: enable=g-import-not-at-top
    tokens.verify_token_dataset(tok, config.tokens_dir)
    datasets = token_pipeline.create_token_datasets(
        config.tokens_dir, global_batch_size=config.batch_size,
        seed=config.seed, mesh=mesh, eval_batch_size=config.eval_batch_size)
    batch_keys = ('codes', 'grain_map', 'label', 'mask')
  else:
    from dqvq.data import pipeline  # pylint: disable=g-import-not-at-top
    datasets = pipeline.create_datasets(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        mesh=mesh, eval_batch_size=config.eval_batch_size)
    batch_keys = ('image', 'label', 'mask')
  recon_fn = jax.jit(lambda s, b, t: teacher_forced(models, s, b, t))

  def pictures(state, host_batch, frozen, step):
    del step
    n = config.num_images
    batch = {k: np.asarray(host_batch[k][:n]) for k in batch_keys}
    out = jax.device_get(recon_fn(state, batch, frozen))
    return visualize.coding_panel(
        out['true'], out['predicted'], out['grain_map'], layout.num_grains,
        grain_factors=tok.vae.grain_factors, min_size=128)

  return task_lib.Task(
      datasets=datasets,
      init=lambda rng: init_state(models, rng),
      state_shardings=lambda abstract: state_shardings(models, mesh, abstract),
      train_step=lambda s, b, t: train_step(models, s, b, t),
      eval_step=lambda s, b, t: eval_step(models, s, b, t),
      summarize=lambda sums: summarize(models, sums),
      pictures=pictures, frozen=tok, batch_keys=batch_keys,
      progress_keys=('loss', 'content_loss', 'position_loss',
                     'content_accuracy', 'code_length', 'grad_norm'))

