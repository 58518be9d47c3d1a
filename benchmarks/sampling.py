r"""Sampling throughput: KV-cached sampler vs the naive full-prefix one.

A random-param class-conditional DQ-Transformer on the paper's dual layout
(16 x 16 coarse and 32 x 32 fine grids, codebook 1024, 1000 classes, full
capacities: 1284 slots). Budgets pin the coarse stream to --coarse codes
(default 128, so the fine stream covers the other half with 512 codes: 640
codes per image, the paper's average length). Both samplers run in the same
process; the naive one recomputes the teacher-forced forward over the whole
buffer twice per slot, so it is timed over its first --naive_steps slots
(every slot costs the same there) and reported per sampled token.

  python benchmarks/sampling.py --width 256 --position_layers 2 \
      --content_layers 4 --batch 4

Last line: tokens_per_s=... naive_tokens_per_s=... images_per_s=...
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from dqvq.cpu import tuning as cpu_tuning  # pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq.models import transformer as tr_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq import sampling  # pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq import sequence  # pylint: disable=g-import-not-at-top,wrong-import-position


def random_params(model: tr_lib.DQTransformer, seed: int = 0):
  """N(0, 0.02) params of the model's shapes, drawn on the host.

  `jax.eval_shape` compiles nothing, so this skips compiling the init.
  """
  t = model.layout.length - 1
  ints = jnp.zeros((1, t), jnp.int32)
  x = {'content': ints, 'position': ints, 'grain': ints,
       'pad': jnp.zeros((1, t), bool)}
  shapes = nn.unbox(jax.eval_shape(model.init, {'params': jax.random.key(0)},
                                   x, ints, ints))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(0.02 * rng.normal(size=s.shape), s.dtype), shapes)


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--width', type=int, default=256)
  p.add_argument('--num_heads', type=int, default=8)
  p.add_argument('--position_layers', type=int, default=2)
  p.add_argument('--content_layers', type=int, default=4)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--coarse', type=int, default=128,
                 help='Coarse codes per image (the fine stream covers the '
                 'rest, 4 codes per region).')
  p.add_argument('--naive_steps', type=int, default=6)
  p.add_argument('--top_k', type=int, default=300)
  p.add_argument('--bf16', action='store_true')
  p.add_argument('--repeats', type=int, default=3,
                 help='Timed cached calls (after the compiling one); the '
                 'median is reported.')
  args = p.parse_args()

  layout = sequence.StreamLayout((16, 32), 1024, num_classes=1000)
  model = tr_lib.DQTransformer(
      layout, width=args.width, num_heads=args.num_heads,
      position_layers=args.position_layers,
      content_layers=args.content_layers, block_size=2048,
      embed_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0,
      dtype=jnp.bfloat16 if args.bf16 else None)
  params = random_params(model)
  config = sampling.SamplingConfig(
      top_k_content=args.top_k, min_codes=(args.coarse, 0),
      max_codes=(args.coarse, 1024))
  labels = jnp.arange(args.batch, dtype=jnp.int32) * 7 % 1000
  print(f'devices: {jax.devices()}; layout {layout.length} slots; '
        f'batch {args.batch}', flush=True)

  cached = sampling.make_sampler(model, config)
  _, compile_s = _timed(cached, params, labels, jax.random.key(0))
  runs = [_timed(cached, params, labels, jax.random.key(1))
          for _ in range(max(args.repeats, 1))]
  out, seconds = runs[0][0], float(np.median([r[1] for r in runs]))
  codes = int(np.sum(out['num_codes']))
  _, writes = sequence.decode(out['content'], out['position'], layout)
  assert np.all(np.asarray(writes) == 1), 'incomplete sample'
  print(f'cached: first call {compile_s:.1f}s (with compile), then '
        f'{seconds:.2f}s (median of {len(runs)}) for {args.batch} images, {codes / args.batch:.0f} '
        f'codes/image, {int(out["steps"])} loop steps', flush=True)

  if args.naive_steps <= 0:
    print(f'tokens_per_s={codes / seconds:.1f} naive_tokens_per_s=nan '
          f'images_per_s={args.batch / seconds:.3f}')
    return
  naive = sampling.make_naive_sampler(model, config,
                                      max_steps=args.naive_steps)
  _timed(naive, params, labels, jax.random.key(0))
  out_n, naive_s = _timed(naive, params, labels, jax.random.key(1))
  naive_tokens = args.batch * int(out_n['steps'])  # one code per slot each
  prefix = np.asarray(out['content'])[:, :args.naive_steps + 1]
  same = np.array_equal(np.asarray(out_n['content'])[:, :args.naive_steps + 1],
                        prefix)
  print(f'naive: {naive_s:.2f}s for {int(out_n["steps"])} slots; first slots '
        f'equal to cached: {same}', flush=True)
  print(f'tokens_per_s={codes / seconds:.1f} '
        f'naive_tokens_per_s={naive_tokens / naive_s:.2f} '
        f'images_per_s={args.batch / seconds:.3f}')


if __name__ == '__main__':
  cpu_tuning.prepare_process()
  main()
