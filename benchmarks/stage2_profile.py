r"""Where the stage-2 step's time goes on CPU: its parts, timed one by one.

`benchmarks/stage2_step.py` times the whole jitted, donated step; this times
what it is made of, each jitted alone on the same batch and state, so that
optimisation effort goes where the time is:

  step      the whole `stage2.train_step` (as stage2_step.py);
  grad      loss and gradient (`jax.grad` of the step's loss), no update;
  forward   the loss alone (teacher-forced forward, dropout on);
  update    the AdamW update and apply over the params, from fixed grads;
  matmul    one plain fp32 matmul with the step's FLOPs per call, for scale.

  python benchmarks/stage2_profile.py [--batch 2] [--capacities batch]

Prints each part's median seconds, XLA's FLOP count and GFLOP/s.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import optax

from benchmarks import stage2_common
from benchmarks import stage2_step
from dqvq import config_lib
from dqvq import losses
from dqvq.cpu import tuning as cpu_tuning
from dqvq.models import transformer as transformer_lib
from dqvq.trainers import stage2
# pylint: enable=g-import-not-at-top,wrong-import-position


def _time(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int
          ) -> tuple[float, float]:
  """(median seconds, XLA FLOPs) of `fn(*args)` after one warm-up call."""
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), float(cost.get('flops', 0.0))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--repeats', type=int, default=2)
  p.add_argument('--capacities', default='batch',
                 help='as stage2_step.py: "batch", "" (full layout) or C,F')
  p.add_argument('--parts', default='step,grad,forward,update,matmul')
  stage2_common.add_flags(p)
  args = p.parse_args()

  config = config_lib.stage2_config()
  if args.tiny:
    config.model.update(transformer_lib.tiny_kwargs())
    config.model.block_size = 2048  # the paper layout's 1,283 inputs
  config.batch_size = args.batch
  tok, layout, batch = stage2_step.token_batch(config, args)
  models = stage2.build_models(config, layout)
  state = jax.jit(functools.partial(stage2.init_state, models))(
      jax.random.key(0))
  rngs = {'dropout': jax.random.key(1), 'label': jax.random.key(2)}

  def loss(params):
    sums, _, _ = stage2._forward(models, params, batch, tok, True, rngs)  # pylint: disable=protected-access
    return losses.token_losses(sums, layout.num_grains, 1.0, 1.0)['loss']

  def update(params, opt_state, grads):
    updates, opt_state = models.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  grads = jax.tree.map(lambda x: x * 1e-3, state.params)
  n = 4096
  parts = {
      'step': (lambda s: stage2.train_step(models, s, batch, tok), (state,)),
      'grad': (jax.grad(loss), (state.params,)),
      'forward': (loss, (state.params,)),
      'update': (update, (state.params, state.opt_state, grads)),
      'matmul': (lambda a, b: a @ b, (jnp.ones((n, n)), jnp.ones((n, n)))),
  }
  print(f'{layout.length - 1} inputs per sequence, batch {args.batch}, '
        f'{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.1f}M '
        f'params', flush=True)
  for name in args.parts.split(','):
    fn, fargs = parts[name]
    secs, flops = _time(fn, fargs, args.repeats)
    print(f'{name:8s} {secs:7.2f} s  {flops / 1e9:8.1f} GFLOP  '
          f'{flops / secs / 1e9:6.1f} GFLOP/s', flush=True)


if __name__ == '__main__':
  cpu_tuning.prepare_process()
  main()
