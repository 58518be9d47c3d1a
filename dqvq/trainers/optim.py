"""The learning-rate schedule and optimizers both stages share.

The schedule is the official `Scheduler_LinearWarmup_CosineDecay`: a linear
warm-up from 0 (so the very first update uses lr 0, as LambdaLR does), then a
cosine to 0, floored at `min_lr_multiplier`. The learning rate is the
official `base_learning_rate * global_batch_size` when
`optim.scale_lr_by_batch` is on (the paper's 4.5e-6 * 8 GPUs * 30).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

Array = jax.Array


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
