"""What a stage hands the shared training loop (`dqvq.trainers.loop`).

Stage 1 and stage 2 differ in models, losses and data; the loop (resume,
steps, evaluation, pictures, checkpoints, stops) is one. A `Task` is the
boundary between them: a stage builds one, the loop runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

Array = jax.Array


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
