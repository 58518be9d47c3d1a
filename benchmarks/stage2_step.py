r"""Throughput of the paper's stage-2 training step.

The class-conditional DQ-Transformer base model of configs/imagenet_stage2.py
(6 Position + 18 Content blocks, width 1024, 313,999,360 params; `--size
large`: 6 + 42), through `dqvq.trainers.stage2.train_step` jitted with the
state donated, as `dqvq.train` runs it: coarse-to-fine streams built inside
the step, teacher-forced logits with dropout 0.1, the official loss and
AdamW. The batch is a token batch (codes and grain maps, as a token dataset
from `python -m dqvq.tokenize` gives), so the frozen tokenizer's encoder is
not in the step; its maps are random but legal (`benchmarks/stage2_common.py`:
about half the regions fine, a coarse region's code repeated over its cells),
the same ones `official_stage2_step.py` builds its streams from.

  python benchmarks/stage2_step.py --batch 2 [--bf16] [--remat] [--steps 5] \
      [--size base|large] [--tiny]

`--tiny` keeps the paper's token layout (1,283 inputs, 1,000 classes) with
toy widths (`transformer.tiny_kwargs`): a smoke run in seconds, and a view of
what the step costs apart from the matmuls. Prints XLA's plan for the
compiled step (argument and temporary bytes, FLOPs; `--compile_only` stops
there), per-step times, what the streams hold, then one line:
  sequences_per_s=... gflops_per_s=... peak_mem_mb=...
FLOPs come from XLA's cost analysis of the compiled step (no loops in it, so
the count is whole); peak memory is the process's peak resident set (CPU) or
the device's peak bytes in use. `benchmarks/stage2_vs_official.py` runs this
script beside the official PyTorch step for a throughput ratio.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from dqvq import config_lib
from dqvq.cpu import tuning as cpu_tuning
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq.models import dqvae
from dqvq.models import transformer as transformer_lib
from dqvq import sequence
from dqvq.trainers import stage2
from benchmarks import stage2_common
from benchmarks.stage1_step import peak_memory_mb
# pylint: enable=g-import-not-at-top,wrong-import-position


def weightless_tokenizer() -> tokenizer_lib.Tokenizer:
  """The paper's dual-grain DQ-VAE (16/8 px grains, 1,024 codes), no weights.

  `sequence.layout_from_config` reads the token layout off the tokenizer, and
  the step takes it as an argument, but a token batch never runs its encoder
  (`stage2.codes_of`): the module alone is enough, and no stage-1 run is
  needed to time stage 2.
  """
  config = config_lib.stage1_config()
  return tokenizer_lib.Tokenizer(params={}, codebook={},
                                 vae=dqvae.from_config(config.model),
                                 config=config)


def token_batch(config: Any, args: argparse.Namespace
                ) -> tuple[tokenizer_lib.Tokenizer, sequence.StreamLayout,
                           dict[str, Any]]:
  """(tokenizer, layout, device batch) of the flags; sets the capacities.

  `args.capacities`: '' (every cell), 'C,F', or 'batch' (each stream as
  long as the batch's longest, the length the official pads to).
  """
  tok = weightless_tokenizer()
  res = config.data.resolution
  grids = [res // f for f in tok.vae.grain_factors]
  codes, grain_map, labels = stage2_common.random_maps(
      args.batch, args.seed, args.fine_ratio, grids[0], grids[-1],
      tok.vae.codebook_size, config.model.num_classes)
  if args.capacities == 'batch':
    config.model.capacities = stage2_common.batch_capacities(
        grain_map, (grids[-1] // grids[0]) ** 2)
  elif args.capacities:
    config.model.capacities = tuple(int(c) for c in args.capacities.split(','))
  batch = {'codes': jnp.asarray(codes), 'grain_map': jnp.asarray(grain_map),
           'label': jnp.asarray(labels),
           'mask': jnp.ones((args.batch,), bool)}
  return tok, sequence.layout_from_config(config, tok.vae), batch


def compile_step(models: stage2.Stage2Setup, *args: Any) -> tuple[Any, float]:
  """`stage2.train_step` jitted and compiled as `dqvq.train` runs it.

  The state (first of `args`) is donated, so its buffers are reused for the
  new state as in training. Prints the compile time and what XLA plans for
  the step (argument and temporary bytes, FLOPs); returns the compiled step
  and its FLOPs.
  """
  t0 = time.perf_counter()
  compiled = jax.jit(functools.partial(stage2.train_step, models),
                     donate_argnums=(0,)).lower(*args).compile()
  print(f'compile: {time.perf_counter() - t0:.1f} s', flush=True)
  memory = compiled.memory_analysis()
  if memory is not None:
    print(f'memory: arguments {memory.argument_size_in_bytes / 2**20:.0f} MB, '
          f'temporaries {memory.temp_size_in_bytes / 2**20:.0f} MB', flush=True)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0))
  print(f'{flops / 1e9:.1f} GFLOP per step (XLA cost analysis)', flush=True)
  return compiled, flops


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--size', default='base', choices=('base', 'large'))
  p.add_argument('--bf16', action='store_true')
  p.add_argument('--remat', action='store_true',
                 help='recompute block activations in the backward pass '
                 '(config.model.remat, which the paper config turns on for '
                 'its 30 sequences per device; off here unless given)')
  stage2_common.add_flags(p)
  p.add_argument('--compile_only', action='store_true',
                 help="print XLA's memory and FLOP figures, run no step")
  p.add_argument('--capacities', default='',
                 help='coarse,fine stream capacities (config.model.'
                 'capacities; default: every cell, 1,283 inputs), or '
                 '"batch": each stream as long as the batch\'s longest, the '
                 'length the official pads to')
  args = p.parse_args()

  config = config_lib.stage2_config('large' if args.size == 'large' else None)
  if args.tiny:
    config.model.update(transformer_lib.tiny_kwargs())
    config.model.block_size = 2048  # the paper layout's 1,283 inputs
  config.model.remat = args.remat
  config.compute_dtype = 'bfloat16' if args.bf16 else 'float32'
  config.batch_size = args.batch
  tok, layout, batch = token_batch(config, args)
  models = stage2.build_models(config, layout)
  state = jax.jit(functools.partial(stage2.init_state, models))(
      jax.random.key(config.seed))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  compiled, flops = compile_step(models, state, batch, tok)
  if args.compile_only:
    return

  run = {'state': state}

  def step():
    run['state'], run['metrics'] = compiled(run['state'], batch, tok)
    return float(run['metrics']['loss'])

  median = stage2_common.time_steps(step, args.steps)
  print(f'{stage2_common.describe(np.asarray(batch["grain_map"]))}; ours '
        f'{layout.length - 1} inputs (capacities {layout.stream_capacities}, '
        f'truncated {float(run["metrics"]["truncated"]):.2f})')
  print(f'median step {median:.2f} s, {flops / 1e9:.1f} GFLOP per step '
        f'({"tiny" if args.tiny else args.size} {num_params / 1e6:.1f}M '
        f'params, batch {args.batch}, {"bf16" if args.bf16 else "fp32"}, '
        f'remat {"on" if args.remat else "off"}, '
        f'{jax.devices()[0].platform})')
  print(f'sequences_per_s={args.batch / median:.4f} '
        f'gflops_per_s={flops / median / 1e9:.1f} '
        f'peak_mem_mb={peak_memory_mb():.0f}')


if __name__ == '__main__':
  cpu_tuning.prepare_process()
  main()
