r"""Forward / input-grad formulations of a 3x3 conv on XLA:CPU, side by side.

Scratch benchmark behind fast_conv's choice of forward: XLA's own conv vs
matmul formulations (full im2col, 3-tap row im2col, 9 contiguous flat-shift
slices). Interleaved round-robin, medians.

  python benchmarks/conv_variants.py --size 256 --cin 128 --cout 128
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from benchmarks import stage1_profile
from dqvq.cpu import fast_conv
# pylint: enable=g-import-not-at-top,wrong-import-position

DN = ('NHWC', 'HWIO', 'NHWC')


def xla(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=DN)


def im2col(x, w):
  b, h, wd, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + wd] for i in range(3)
                          for j in range(3)], axis=-1)
  y = cols.reshape(-1, 9 * c) @ w.reshape(9 * c, -1)
  return y.reshape(b, h, wd, -1)


def row3(x, w):
  b, h, wd, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = jnp.concatenate([xp[:, :, j:j + wd] for j in range(3)], axis=-1)
  y = 0
  for i in range(3):
    y = y + rows[:, i:i + h].reshape(-1, 3 * c) @ w[i].reshape(3 * c, -1)
  return y.reshape(b, h, wd, -1)


def flat9(x, w):
  """Output on the (H, W+2) 'wide' grid: every tap is a contiguous slice."""
  b, h, wd, c = x.shape
  wp = wd + 2
  xp = jnp.pad(x, ((0, 0), (1, 2), (1, 1), (0, 0)))  # extra row: overrun.
  flat = xp.reshape(b, (h + 3) * wp, c)
  y = 0
  for i in range(3):
    for j in range(3):
      off = i * wp + j
      y = y + jnp.einsum('bnc,cd->bnd', flat[:, off:off + h * wp], w[i, j])
  return y.reshape(b, h, wp, -1)[:, :, :wd]


def flat_im2col(x, w):
  b, h, wd, c = x.shape
  wp = wd + 2
  xp = jnp.pad(x, ((0, 0), (1, 2), (1, 1), (0, 0)))
  flat = xp.reshape(b, (h + 3) * wp, c)
  cols = jnp.concatenate([flat[:, i * wp + j:i * wp + j + h * wp]
                          for i in range(3) for j in range(3)], axis=-1)
  y = jnp.einsum('bnk,kd->bnd', cols, w.reshape(9 * c, -1))
  return y.reshape(b, h, wp, -1)[:, :, :wd]


def wg_taps(x, dy):
  """fast_conv's current weight gradient: 9 (C, N) @ (N, O) matmuls."""
  return fast_conv._weight_grad_taps(  # pylint: disable=protected-access
      x, dy, (3, 3, x.shape[-1], dy.shape[-1]), (1, 1), ((1, 1), (1, 1)),
      None, x.dtype)


def wg_row3(x, dy):
  """3 matmuls (3C, N) @ (N, O) on the 3 horizontal shifts stacked."""
  b, h, wd, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = jnp.concatenate([xp[:, :, j:j + wd] for j in range(3)], axis=-1)
  d = dy.reshape(-1, dy.shape[-1])
  out = [rows[:, i:i + h].reshape(-1, 3 * c).T @ d for i in range(3)]
  return jnp.stack(out).reshape(3, 3, c, -1)


def wg_dy3(x, dy):
  """3 matmuls (C, N') @ (N', 3O): dy's 3 column shifts on the wide grid."""
  b, h, wd, c = x.shape
  o = dy.shape[-1]
  wp = wd + 2
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # (b, h+2, wp, c)
  # dy_j[b, y, x'] = dy[b, y, x' - j] on the wide grid (zero elsewhere).
  dys = jnp.concatenate(
      [jnp.pad(dy, ((0, 0), (0, 0), (j, 2 - j), (0, 0))) for j in range(3)],
      axis=-1).reshape(-1, 3 * o)
  out = [xp[:, i:i + h].reshape(-1, c).T @ dys for i in range(3)]
  # out[i][c, j*o + o'] = dW[i, j, c, o'].
  return jnp.stack(out).reshape(3, c, 3, o).transpose(0, 2, 1, 3)


def wg_dy9(x, dy):
  """One (C, N') @ (N', 9O) matmul: dy's 9 shifts on the flat padded grid."""
  b, h, wd, c = x.shape
  o = dy.shape[-1]
  wp = wd + 2
  n = (h + 3) * wp  # One spare zero row: the last shifts overrun by 2.
  xf = jnp.pad(x, ((0, 0), (1, 2), (1, 1), (0, 0))).reshape(b, n, c)
  dyw = jnp.pad(dy, ((0, 0), (0, 0), (0, 2), (0, 0))).reshape(b, h * wp, o)
  dys = jnp.concatenate(
      [jnp.pad(dyw, ((0, 0), (i * wp + j, n - h * wp - i * wp - j), (0, 0)))
       for i in range(3) for j in range(3)], axis=-1)
  out = xf.reshape(-1, c).T @ dys.reshape(-1, 9 * o)
  return out.reshape(c, 3, 3, o).transpose(1, 2, 0, 3)


def wg_dy3flat(x, dy):
  """3 matmuls (C, N') @ (N', 3O), row shifts on the flat grid for dy too."""
  b, h, wd, c = x.shape
  o = dy.shape[-1]
  wp = wd + 2
  n = (h + 3) * wp
  xf = jnp.pad(x, ((0, 0), (1, 2), (1, 1), (0, 0))).reshape(b, n, c)
  dyw = jnp.pad(dy, ((0, 0), (0, 0), (0, 2), (0, 0))).reshape(b, h * wp, o)
  dys = jnp.concatenate(
      [jnp.pad(dyw, ((0, 0), (j, 2 - j), (0, 0))) for j in range(3)], axis=-1)
  out = [xf[:, i * wp:i * wp + h * wp + 2].reshape(-1, c).T
         @ dys.reshape(-1, 3 * o) for i in range(3)]
  return jnp.stack(out).reshape(3, c, 3, o).transpose(0, 2, 1, 3)


def wg_xlaconv(x, dy):
  """As a forward-style conv: channels as batch, dy as a HxW kernel."""
  b, h, wd, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  lhs = xp.transpose(3, 1, 2, 0)  # (C, H+2, W+2, B)
  rhs = dy.transpose(1, 2, 0, 3)  # (H, W, B, O)
  out = lax.conv_general_dilated(lhs, rhs, (1, 1), 'VALID',
                                 dimension_numbers=DN)  # (C, 3, 3, O)
  return out.transpose(1, 2, 0, 3)


def wg_ksplit(x, dy):
  """Taps with the N contraction split in 4 batched chunks, then summed."""
  b, h, wd, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  d = dy.reshape(4, -1, dy.shape[-1])
  out = []
  for i in range(3):
    for j in range(3):
      t = xp[:, i:i + h, j:j + wd].reshape(4, -1, c)
      out.append(jnp.einsum('pnc,pno->co', t, d))
  return jnp.stack(out).reshape(3, 3, c, -1)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--size', type=int, default=256)
  p.add_argument('--cin', type=int, default=128)
  p.add_argument('--cout', type=int, default=128)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--variants', nargs='+',
                 default=['xla', 'im2col', 'row3', 'flat9', 'flat_im2col'])
  p.add_argument('--weight_grad', action='store_true')
  args = p.parse_args()
  if args.weight_grad:
    return weight_grad_main(args)
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (args.batch, args.size, args.size, args.cin))
  w = jax.random.normal(kw, (3, 3, args.cin, args.cout)) / np.sqrt(9 * args.cin)
  ref = jax.jit(xla)(x, w)
  fns = {name: globals()[name] for name in args.variants}
  for name, f in fns.items():
    err = float(jnp.max(jnp.abs(jax.jit(f)(x, w) - ref)))
    print(f'{name}: max err {err:.2e}')
  one = 2.0 * args.batch * args.size ** 2 * 9 * args.cin * args.cout
  stage1_profile.time_cases({k: (f, (x, w)) for k, f in fns.items()},
                            args.repeats, {k: one for k in fns})


def weight_grad_main(args) -> None:
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (args.batch, args.size, args.size, args.cin))
  dy = jax.random.normal(kw, (args.batch, args.size, args.size, args.cout))
  names = [v for v in args.variants if v.startswith('wg_')] or [
      'wg_taps', 'wg_row3', 'wg_dy3', 'wg_xlaconv', 'wg_ksplit']
  fns = {name: globals()[name] for name in names}
  ref = jax.jit(wg_taps)(x, dy)
  for name, f in fns.items():
    err = float(jnp.max(jnp.abs(jax.jit(f)(x, dy) - ref)) /
                jnp.max(jnp.abs(ref)))
    print(f'{name}: max rel err {err:.2e}')
  one = 2.0 * args.batch * args.size ** 2 * 9 * args.cin * args.cout
  stage1_profile.time_cases({k: (f, (x, dy)) for k, f in fns.items()},
                            args.repeats, {k: one for k in fns})


if __name__ == '__main__':
  main()
