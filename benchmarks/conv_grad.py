"""Forward+backward speed of a 3x3 conv: XLA's jax.grad vs fast_conv's VJP.

On XLA:CPU the weight gradient of a convolution runs far below the forward's
FLOP rate, which is what `dqvq.cpu.fast_conv` fixes. This script measures
both paths side by side in one process, interleaving their repeats so that
load from other processes hits both alike, and reports the median.

FLOPs are counted analytically: one conv pass is 2*B*Ho*Wo*k*k*Cin*Cout, and
forward + input gradient + weight gradient is three passes.

  python benchmarks/conv_grad.py                 # the three standard cases
  python benchmarks/conv_grad.py --dtype bfloat16
  python benchmarks/conv_grad.py --weight_grad_variants  # why stacked blocks

The last line is machine-readable, for the 256x256x128 case:
  xla_gflops_per_s=... fast_gflops_per_s=... speedup=...
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
# pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq.cpu import fast_conv
from dqvq.cpu import tuning as cpu_tuning
# pylint: enable=g-import-not-at-top,wrong-import-position

DN = ('NHWC', 'HWIO', 'NHWC')
PAD = ((1, 1), (1, 1))
# (batch, height=width, channels in = out).
CASES = ((2, 256, 128), (2, 64, 256), (2, 32, 512))
HEADLINE = (2, 256, 128)


def conv_flops(batch: int, size: int, channels: int, k: int = 3) -> float:
  """FLOPs of one stride-1 'same' conv pass (multiply and add counted)."""
  return 2.0 * batch * size * size * k * k * channels * channels


def interleaved_medians(fns: dict[str, Callable[[], jax.Array]],
                        warmup: int, repeats: int) -> dict[str, float]:
  """Median seconds per call, running the candidates round-robin.

  Round-robin rather than one after another so that a burst of load from
  other processes on a shared machine slows every candidate, not just one.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def make_inputs(batch: int, size: int, channels: int, dtype: jnp.dtype):
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (batch, size, size, channels), dtype)
  w = (jax.random.normal(kw, (3, 3, channels, channels), jnp.float32) /
       np.sqrt(9 * channels)).astype(dtype)
  ct = jax.random.normal(kc, x.shape, dtype)  # Same shape: 'same' padding.
  return x, w, ct


def grad_step(conv: Callable[[jax.Array, jax.Array], jax.Array]):
  """jit(grad) of <conv(x, w), ct> for x and w: forward plus both grads."""

  def loss(x, w, ct):
    return jnp.sum((conv(x, w) * ct).astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def xla_conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), PAD, dimension_numbers=DN)


def fast_conv_fn(x, w):
  return fast_conv.conv2d(x, w, (1, 1), PAD, cpu_kernels=True)


def run_case(batch: int, size: int, channels: int, dtype: jnp.dtype,
             warmup: int, repeats: int) -> tuple[float, float, float]:
  """Returns (xla GFLOP/s, fast GFLOP/s, max relative weight-grad diff)."""
  x, w, ct = make_inputs(batch, size, channels, dtype)
  xla_step = grad_step(xla_conv)
  fast_step = grad_step(fast_conv_fn)
  want = jax.block_until_ready(xla_step(x, w, ct))
  got = jax.block_until_ready(fast_step(x, w, ct))
  rel = max(
      float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))) /
            jnp.max(jnp.abs(r.astype(jnp.float32))))
      for g, r in zip(got, want))
  secs = interleaved_medians(
      {'xla': lambda: xla_step(x, w, ct), 'fast': lambda: fast_step(x, w, ct)},
      warmup, repeats)
  flops = 3 * conv_flops(batch, size, channels)
  return flops / secs['xla'] / 1e9, flops / secs['fast'] / 1e9, rel


# The implementations under test: per-tap matmuls (strided and explicitly
# sharded convs) and, per block of rows, one matmul per kernel row on x's
# rows and column-shifted dy (stride 1), also timed as one block (no loop).
# pylint: disable=protected-access
taps_weight_grad = fast_conv._weight_grad_taps
stacked_weight_grad = fast_conv._weight_grad_stacked
# pylint: enable=protected-access


def _patches(x, w_shape, ho, wo):
  """The k*k strided windows of the padded input, one per kernel tap."""
  kh, kw, _, _ = w_shape
  xp = jnp.pad(x, ((0, 0), *PAD, (0, 0)))
  return [xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)]


def weight_grad_im2col(x, ct, w_shape):
  """All taps as one (k*k*Cin, N) @ (N, Cout) matmul on an im2col tensor."""
  b, ho, wo, cout = ct.shape
  cols = jnp.stack(_patches(x, w_shape, ho, wo), axis=-2)
  cols = cols.reshape(b * ho * wo, -1)
  dw = lax.dot_general(cols, ct.reshape(-1, cout), (((0,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)
  return dw.reshape(w_shape)


def weight_grad_batched(x, ct, w_shape):
  """All taps as one batched einsum over a stacked (k*k, N, Cin) tensor."""
  cin, cout = w_shape[2:]
  b, ho, wo, _ = ct.shape
  taps = jnp.stack([p.reshape(-1, cin)
                    for p in _patches(x, w_shape, ho, wo)])
  dw = jnp.einsum('tnc,no->tco', taps, ct.reshape(-1, cout),
                  preferred_element_type=jnp.float32)
  return dw.reshape(w_shape)


def weight_grad_stacked_x_and_dy(x, ct, w_shape):
  """All taps as one (kh*Cin, N) @ (N, kw*Cout) matmul, in blocks of rows.

  Session 5's form: x's kh row shifts stacked on channels as well as dy's
  kw column shifts; one bigger product, but two stacked copies per block.
  """
  kh, kw, cin, cout = w_shape
  b, ho, wo, _ = ct.shape
  xp = jnp.pad(x, ((0, 0), *PAD, (0, 0)))
  wp = xp.shape[2]
  rows = next(r for r in (4, 2, 1) if ho % r == 0)

  def body(index, acc):
    xs = lax.dynamic_slice_in_dim(xp, index * rows, rows + kh - 1, axis=1)
    ds = lax.dynamic_slice_in_dim(ct, index * rows, rows, axis=1)
    sx = jnp.concatenate([xs[:, i:i + rows] for i in range(kh)], axis=3)
    sd = jnp.concatenate([jnp.pad(ds, ((0, 0), (0, 0), (j, wp - wo - j),
                                       (0, 0))) for j in range(kw)], axis=3)
    return acc + lax.dot_general(
        sx.reshape(-1, kh * cin), sd.reshape(-1, kw * cout),
        (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  dw = lax.fori_loop(0, ho // rows, body,
                     jnp.zeros((kh * cin, kw * cout), jnp.float32))
  return dw.reshape(kh, cin, kw, cout).transpose(0, 2, 1, 3)


def run_weight_grad_variants(cases: Sequence[tuple[int, int, int]],
                             dtype: jnp.dtype, warmup: int,
                             repeats: int) -> None:
  """Weight gradient alone: XLA vs per-tap matmuls vs the stacked forms."""
  for batch, size, channels in cases:
    x, w, ct = make_inputs(batch, size, channels, dtype)
    variants = {
        'xla': lambda x, ct: jax.vjp(lambda w: xla_conv(x, w), w)[1](ct)[0],
        'taps': lambda x, ct: taps_weight_grad(x, ct, w.shape, (1, 1), PAD,
                                               None, w.dtype),
        'stacked': lambda x, ct: stacked_weight_grad(x, ct, w.shape, PAD,
                                                     None, w.dtype),
        'stacked_one_block': lambda x, ct: stacked_weight_grad(
            x, ct, w.shape, PAD, None, w.dtype, block_rows=ct.shape[1]),
        'stacked_x_and_dy': lambda x, ct: weight_grad_stacked_x_and_dy(
            x, ct, w.shape),
        'im2col': lambda x, ct: weight_grad_im2col(x, ct, w.shape),
        'batched_einsum': lambda x, ct: weight_grad_batched(x, ct, w.shape),
    }
    jitted = {name: jax.jit(fn) for name, fn in variants.items()}
    secs = interleaved_medians(
        {name: (lambda f=f: f(x, ct)) for name, f in jitted.items()},
        warmup, repeats)
    flops = conv_flops(batch, size, channels)
    rates = ' '.join(f'{name}={flops / s / 1e9:.1f}'
                     for name, s in secs.items())
    print(f'weight_grad B={batch} {size}x{size}x{channels} GFLOP/s: {rates}',
          flush=True)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--weight_grad_variants', action='store_true',
                      help='also time the weight gradient alone, per variant')
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  print(f'backend={jax.default_backend()} devices={jax.device_count()} '
        f'dtype={args.dtype} repeats={args.repeats} (median)', flush=True)

  headline = None
  for batch, size, channels in CASES:
    xla, fast, rel = run_case(batch, size, channels, dtype, args.warmup,
                              args.repeats)
    print(f'conv3x3 B={batch} {size}x{size}x{channels} fwd+bwd GFLOP/s: '
          f'xla={xla:.1f} fast={fast:.1f} speedup={fast / xla:.2f}x '
          f'max_rel_grad_diff={rel:.1e}', flush=True)
    if (batch, size, channels) == HEADLINE:
      headline = (xla, fast)

  if args.weight_grad_variants:
    run_weight_grad_variants(CASES, dtype, args.warmup, args.repeats)

  xla, fast = headline
  print(f'xla_gflops_per_s={xla:.1f} fast_gflops_per_s={fast:.1f} '
        f'speedup={fast / xla:.2f}')


if __name__ == '__main__':
  cpu_tuning.prepare_process()
  main()
