r"""Throughput of the paper's stage-1 training step.

The full 256-pixel step of the official dual-grain feature-router DQ-VAE
(47.8M parameters): generator forward, LPIPS (VGG16, random weights: the
cost is the same), PatchGAN, adaptive weight, budget loss, both Adam updates
and the EMA codebook, jitted with the state donated, as `dqvq.train` runs it.

  python benchmarks/stage1_step.py --batch 2 --resolution 256 [--bf16] \
      [--variant feature_dual|entropy_dual|triple|tiny] [--steps 5]

Prints per-step times, then one line:
  images_per_s=... gflops_per_s=... peak_mem_mb=...
FLOPs come from XLA's cost analysis of the compiled step (on a CPU run,
compiled a second time with the CPU weight gradient in one block: XLA counts
a loop's body once, so the blocked step's own count is too low;
`--no_flops` skips it);
peak memory is the process's peak resident set (CPU) or the device's peak
bytes in use. `benchmarks/stage1_vs_official.py` runs this script beside the
official PyTorch step for a throughput ratio.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from dqvq import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq.cpu import fast_conv  # pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq.cpu import tuning as cpu_tuning  # pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq.trainers import stage1  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import stage1_profile  # pylint: disable=g-import-not-at-top,wrong-import-position

# 'tiny': the :runlocal toy model, a smoke run of the same step in seconds.
VARIANT_ARGS = {'feature_dual': '', 'entropy_dual': 'entropy',
                'triple': 'triple', 'tiny': 'runlocal'}


def peak_memory_mb() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2 ** 20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--resolution', type=int, default=256)
  p.add_argument('--variant', default='feature_dual', choices=VARIANT_ARGS)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--bf16', action='store_true')
  p.add_argument('--no_flops', action='store_true',
                 help='skip the second compile that counts FLOPs')
  args = p.parse_args()

  config = config_lib.stage1_config(VARIANT_ARGS[args.variant])
  config.batch_size = args.batch
  config.data.resolution = args.resolution
  config.lpips_weights = 'random'
  config.compute_dtype = 'bfloat16' if args.bf16 else 'float32'
  if config.model.router == 'entropy':
    config.model.entropy_thresholds = None  # quota routing: same cost
  cpu_kernels = cpu_tuning.cpu_kernels(jax.devices())
  models = stage1.build_models(config, cpu_kernels)
  shape = (1, args.resolution, args.resolution, 3)
  state = jax.jit(functools.partial(stage1.init_state, models,
                                    image_shape=shape))(jax.random.key(0))
  lpips = stage1.lpips_params_for(config)
  batch = {
      'image': jax.random.uniform(jax.random.key(1), (args.batch,) + shape[1:],
                                  minval=-1.0, maxval=1.0),
      'label': jnp.zeros((args.batch,), jnp.int32),
      'mask': jnp.ones((args.batch,), bool)}
  step = jax.jit(functools.partial(stage1.train_step, models),
                 donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, lpips).compile()
  print(f'compile: {time.perf_counter() - t0:.1f} s', flush=True)
  flops = 0.0
  if not args.no_flops and not cpu_kernels:
    # No loops in an accelerator's step: XLA's count of it is whole.
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get('flops', 0.0))
  elif not args.no_flops:
    # A CPU step's weight gradients loop over blocks, which XLA counts once:
    # count a second compile of the step traced in one block.
    with fast_conv.whole_image_weight_grads():
      flops = stage1_profile.flops_of(
          functools.partial(stage1.train_step, models), state, batch, lpips)

  state, metrics = compiled(state, batch, lpips)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, lpips)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
    print(f'step {i}: {times[-1]:.2f} s', flush=True)
  median = statistics.median(times)
  print(f'median step {median:.2f} s, {flops / 1e9:.1f} GFLOP per step '
        f'({args.variant}, batch {args.batch}, {args.resolution} px, '
        f'{"bf16" if args.bf16 else "fp32"}, {jax.devices()[0].platform})')
  print(f'images_per_s={args.batch / median:.4f} '
        f'gflops_per_s={flops / median / 1e9:.1f} '
        f'peak_mem_mb={peak_memory_mb():.0f}')


if __name__ == '__main__':
  # The process as dqvq's entry points set it up (CPU runs only).
  cpu_tuning.prepare_process()
  main()
