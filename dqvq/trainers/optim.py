"""Pieces both stages share: dtypes, learning-rate schedule, optimizers, and
the `Task` a stage hands the shared loop.

The schedule is the official `Scheduler_LinearWarmup_CosineDecay`: a linear
warm-up from 0 (so the very first update uses lr 0, as LambdaLR does), then a
cosine to 0, floored at `min_lr_multiplier`. The learning rate is the
official `base_learning_rate * global_batch_size` when
`optim.scale_lr_by_batch` is on (the paper's 4.5e-6 * 8 GPUs * 30).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dqvq.models import dqvae

Array = jax.Array

COMPUTE_DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  name = config.get('compute_dtype', 'float32')
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'compute_dtype={name!r}; choose one of '
                     f'{tuple(COMPUTE_DTYPES)}.')
  return COMPUTE_DTYPES[name]


def build_dqvae(model_config: ml_collections.ConfigDict,
                dtype: Any = None, cpu_kernels: bool = False) -> dqvae.DQVAE:
  """DQVAE from `config.model`, with a clear error for unknown fields.

  `cpu_kernels` is the run's platform decision (dqvq.cpu.tuning), not a
  config field: a config means the same model on every platform.
  """
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in model_config.to_dict().items()}
  known = set(dqvae.DQVAE.__dataclass_fields__) - set(
      dqvae.NON_CONFIG_FIELDS)
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(f'Unknown config.model fields {unknown}; DQVAE takes '
                     f'{sorted(known)}.')
  model = dqvae.DQVAE(**kwargs, dtype=dtype, cpu_kernels=cpu_kernels)
  model.validate()
  return model


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  lr = config.optim.base_learning_rate
  if config.optim.scale_lr_by_batch:
    lr *= config.batch_size
  return lr


def learning_rate_schedule(config: ml_collections.ConfigDict
                           ) -> Callable[[Array], Array]:
  """Linear warm-up then cosine decay over `num_train_steps` (official)."""
  peak = peak_learning_rate(config)
  warmup = float(config.optim.warmup_steps)
  total = float(config.num_train_steps)
  floor = float(config.optim.min_lr_multiplier)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    warm = s / max(1.0, warmup)
    progress = (s - warmup) / max(1.0, total - warmup)
    cos = jnp.maximum(0.5 * (1.0 + jnp.cos(math.pi * progress)), floor)
    return peak * jnp.where(s < warmup, warm, cos)

  return schedule


def adam(config: ml_collections.ConfigDict,
         schedule: Callable[[Array], Array]) -> optax.GradientTransformation:
  """Adam with the official betas (0.5, 0.9), no weight decay, optional clip."""
  opt = config.optim
  tx = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


def decay_mask(params: Any) -> Any:
  """True on linear-layer kernels: the official AdamW decays only those.

  Biases, LayerNorm, embedding tables and the absolute position table are
  not decayed (`Dualformer.configure_optimizers`).
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def subtree_mask(name: str) -> Callable[[Any], Any]:
  """params -> True on the leaves under the top-level module `name`."""
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[0], 'key', None) == name, params)


def adamw(config: ml_collections.ConfigDict,
          schedule: Callable[[Array], Array]) -> optax.GradientTransformation:
  """AdamW with decoupled weight decay on linear kernels, optional clip."""
  opt = config.optim
  tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                   weight_decay=opt.weight_decay, mask=decay_mask)
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


@dataclasses.dataclass
class Task:
  """What a stage hands the shared loop (`dqvq.trainers.loop`).

  Attributes:
    datasets: `dqvq.data.pipeline.Datasets`-like train/eval iterables.
    init: rng -> fresh state (traced: used under eval_shape and jit).
    state_shardings: abstract state -> NamedShardings on the mesh.
    train_step: (state, batch, frozen) -> (state, metrics).
    eval_step: (state, batch, frozen) -> pytree of per-batch sums.
    summarize: host sums over the eval split -> {'val/...': float}.
    pictures: (state, host batch, frozen, step) -> uint8 panel or None.
    frozen: weights the steps read but never change (LPIPS, the tokenizer);
      replicated on the mesh and passed to every step.
    batch_keys: which host-batch arrays go to the device.
    progress_keys: metrics on the console progress line (None: all).
  """
  datasets: Any
  init: Callable[[Array], Any]
  state_shardings: Callable[[Any], Any]
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  summarize: Callable[[dict[str, Any]], dict[str, float]]
  pictures: Callable[..., Any]
  frozen: Any
  batch_keys: tuple[str, ...]
  progress_keys: tuple[str, ...] | None = None
