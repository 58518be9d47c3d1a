r"""Where the stage-1 step's time goes on CPU: per-model and per-layer timings.

`benchmarks/stage1_step.py` times the whole jitted step; this script times
its pieces separately so that optimisation effort goes where the time is:

  models  encoder / decoder fwd+bwd (params and input grads), LPIPS fwd +
          input grad (its params are frozen), discriminator fwd+bwd;
  convs   every conv shape the step uses: forward, input grad and weight
          grad alone, XLA's own and fast_conv's;
  norm    GroupNorm + swish forward + backward at each resolution.

  python benchmarks/stage1_profile.py --part models convs norm [--batch 2]

Each case is jitted, warmed up, then timed for `--repeats` calls; the
candidates of one case are interleaved round-robin (the CPU is shared, so a
burst of outside load should hit every candidate alike) and medians are
printed with XLA's FLOP count and the resulting GFLOP/s.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from dqvq.cpu import fast_conv
from dqvq.cpu import tuning as cpu_tuning
from dqvq.models import decoder as decoder_lib
from dqvq.models import discriminator as disc_lib
from dqvq.models import encoder as encoder_lib
from dqvq.models import layers
from dqvq.models import perceptual
# pylint: enable=g-import-not-at-top,wrong-import-position

DN = ('NHWC', 'HWIO', 'NHWC')


def flops_of(fn: Callable[..., Any], *args: Any) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0))


def time_cases(cases: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]],
               repeats: int, flops: dict[str, float] | None = None) -> None:
  """Prints the median time (and GFLOP/s) of each jitted case, interleaved."""
  jitted = {k: jax.jit(f) for k, (f, _) in cases.items()}
  if flops is None:
    flops = {k: flops_of(f, *a) for k, (f, a) in cases.items()}
  for k, (_, a) in cases.items():
    jax.block_until_ready(jitted[k](*a))
  times = {k: [] for k in cases}
  for _ in range(repeats):
    for k, (_, a) in cases.items():
      t0 = time.perf_counter()
      jax.block_until_ready(jitted[k](*a))
      times[k].append(time.perf_counter() - t0)
  for k in cases:
    med = float(np.median(times[k]))
    print(f'  {k:48s} {med * 1e3:9.1f} ms  {flops[k] / 1e9:8.2f} GFLOP '
          f'{flops[k] / med / 1e9:7.1f} GFLOP/s', flush=True)


def sum_sq(tree: Any) -> Array:
  return sum(jnp.sum(jnp.square(l)) for l in jax.tree.leaves(tree))


Array = jax.Array


def profile_models(batch: int, res: int, repeats: int) -> None:
  """fwd+bwd of each model in the step, at the paper's settings."""
  key = jax.random.key(0)
  x = jax.random.uniform(key, (batch, res, res, 3), minval=-1, maxval=1)
  cases = {}
  cpu = cpu_tuning.cpu_kernels(jax.devices())  # as the trainer decides

  enc = encoder_lib.HierarchicalEncoder(cpu_kernels=cpu)
  enc_p = jax.jit(enc.init)(key, x)

  def enc_loss(p, x):
    return sum(jnp.mean(jnp.square(o)) for o in enc.apply(p, x))

  cases['encoder fwd'] = (enc_loss, (enc_p, x))
  cases['encoder fwd+bwd'] = (jax.grad(enc_loss), (enc_p, x))

  dec = decoder_lib.Decoder(cpu_kernels=cpu)
  z = jax.random.normal(key, (batch, res // 8, res // 8, 256))
  dec_p = jax.jit(dec.init)(key, z)

  def dec_loss(p, z):
    return jnp.mean(jnp.square(dec.apply(p, z)[0]))

  cases['decoder fwd'] = (dec_loss, (dec_p, z))
  cases['decoder fwd+bwd'] = (jax.grad(dec_loss, argnums=(0, 1)), (dec_p, z))

  lp = perceptual.LPIPS(cpu_kernels=cpu)
  lp_p = {'params': perceptual.init_lpips_params()}

  def lp_loss(xh, x):
    return jnp.mean(lp.apply(lp_p, x, xh))

  cases['lpips fwd'] = (lp_loss, (x, x * 0.9))
  cases['lpips fwd+input grad'] = (jax.grad(lp_loss), (x, x * 0.9))

  disc = disc_lib.NLayerDiscriminator(cpu_kernels=cpu)
  d_v = jax.jit(functools.partial(disc.init, train=False))(key, x)

  def d_loss(p, x):
    out, _ = disc.apply({'params': p, 'batch_stats': d_v['batch_stats']}, x,
                        train=True, mutable=['batch_stats'])
    return jnp.mean(out)

  cases['disc fwd'] = (d_loss, (d_v['params'], x))
  cases['disc fwd+bwd (params, input)'] = (jax.grad(d_loss, argnums=(0, 1)),
                                           (d_v['params'], x))
  print('models:')
  time_cases(cases, repeats)


def conv_shapes(batch: int, res: int) -> list[tuple[int, int, int, int, int,
                                                      int]]:
  """(batch, size, cin, cout, k, stride) of the step's main convs."""
  r = res
  return [
      (batch, r, 128, 128, 3, 1),
      (batch, r // 2, 128, 128, 3, 1),
      (batch, r // 2, 256, 128, 3, 1),
      (batch, r // 4, 256, 256, 3, 1),
      (batch, r // 8, 256, 256, 3, 1),
      (batch, r // 16, 512, 512, 3, 1),
      (2 * batch, r, 64, 64, 3, 1),           # LPIPS
      (2 * batch, r // 2, 128, 128, 3, 1),
      (2 * batch, r // 8, 512, 512, 3, 1),
      (batch, r + 1, 128, 128, 3, 2),         # Downsample (padded input)
      (batch, r // 2 + 1, 128, 128, 3, 2),
      (batch, r, 3, 64, 4, 2),                # discriminator
      (batch, r // 2, 64, 128, 4, 2),
      (batch, r // 4, 128, 256, 4, 2),
      (batch, r // 8, 256, 512, 4, 1),
  ]


def profile_convs(batch: int, res: int, repeats: int, which: str) -> None:
  """Forward / input grad / weight grad of each conv shape, XLA vs fast."""
  print('convs (b, size, cin, cout, k, stride):')
  for b, s, cin, cout, k, st in conv_shapes(batch, res):
    pad = ((1, 1), (1, 1)) if st == 1 or k == 4 else ((0, 0), (0, 0))
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, s, s, cin))
    w = jax.random.normal(kw, (k, k, cin, cout)) / np.sqrt(k * k * cin)
    y_shape = jax.eval_shape(
        lambda x, w: lax.conv_general_dilated(x, w, (st, st), pad,
                                              dimension_numbers=DN), x, w)
    ct = jax.random.normal(kc, y_shape.shape)
    one = 2.0 * np.prod(y_shape.shape) * k * k * cin
    print(f' {b} {s} {cin} {cout} {k} {st}  ({one / 1e9:.2f} GFLOP/pass)')

    def xla(x, w):
      return lax.conv_general_dilated(x, w, (st, st), pad,
                                      dimension_numbers=DN)

    def fast(x, w):
      return fast_conv.conv2d(x, w, (st, st), pad, cpu_kernels=True)

    cases, flops = {}, {}
    for name, conv in (('xla', xla), ('fast', fast)):
      if which in ('all', 'fwd') and (name == 'xla' or st > 1):
        cases[f'{name} fwd'] = (conv, (x, w))
        flops[f'{name} fwd'] = one
      if which in ('all', 'bwd'):
        cases[f'{name} input grad'] = (
            lambda x, w, ct, conv=conv: jax.vjp(lambda a: conv(a, w), x)[1](ct),
            (x, w, ct))
        flops[f'{name} input grad'] = one
        cases[f'{name} weight grad'] = (
            lambda x, w, ct, conv=conv: jax.vjp(lambda a: conv(x, a), w)[1](ct),
            (x, w, ct))
        flops[f'{name} weight grad'] = one
    time_cases(cases, repeats, flops)


def profile_norm(batch: int, res: int, repeats: int) -> None:
  """GroupNorm(32) + swish forward and forward+backward."""
  print('GroupNorm + swish:')
  for s, c in ((res, 128), (res // 2, 128), (res // 4, 256), (res // 8, 256)):
    x = jax.random.normal(jax.random.key(0), (batch, s, s, c))
    gn = layers.GroupNorm()
    p = gn.init(jax.random.key(1), x)

    def fwd(p, x):
      return jnp.sum(layers.swish(gn.apply(p, x)))

    nbytes = x.size * 4
    cases = {f'{s}x{s}x{c} fwd': (fwd, (p, x)),
             f'{s}x{s}x{c} fwd+bwd': (jax.grad(fwd, argnums=(0, 1)), (p, x))}
    time_cases(cases, repeats, {k: 0.0 for k in cases})
    print(f'    (one pass over the activation = {nbytes / 2**20:.0f} MiB)')


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--part', nargs='+', default=['models', 'convs', 'norm'],
                 choices=['models', 'convs', 'norm'])
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--resolution', type=int, default=256)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--conv_passes', default='all', choices=['all', 'fwd', 'bwd'])
  args = p.parse_args()
  if 'models' in args.part:
    profile_models(args.batch, args.resolution, args.repeats)
  if 'convs' in args.part:
    profile_convs(args.batch, args.resolution, args.repeats, args.conv_passes)
  if 'norm' in args.part:
    profile_norm(args.batch, args.resolution, args.repeats)


if __name__ == '__main__':
  cpu_tuning.prepare_process()
  main()
