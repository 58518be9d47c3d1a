"""A 2-D convolution whose weight gradient is fast on XLA:CPU.

XLA:CPU runs a 3x3 convolution's forward pass and its input gradient through
its fast (Eigen / XNNPACK) convolution kernels, but lowers the *weight*
gradient to a convolution with unusual dimension numbers (batch contracted,
spatial dimensions as the output window) that falls onto a slow path: about
a tenth of the forward's FLOP rate. A plain `jax.grad` training step is then
dominated by the weight gradients.

The weight gradient of a convolution is, per kernel tap (i, j),

  dW[i, j] = sum_{b, h, w} x_pad[b, i + s*h, j + s*w, :]^T dy[b, h, w, :],

i.e. a (Cin, B*Ho*Wo) @ (B*Ho*Wo, Cout) matrix product per tap on a strided
slice of the padded input. XLA:CPU runs matmuls at full speed, so `conv2d`
below wraps the convolution in a `jax.custom_vjp` that keeps XLA's own
forward and input gradient (both already fast and measured no slower than
the alternatives) and computes the weight gradient with matmuls: for stride
1, one product per kernel row of x's rows and column-shifted dy per block
of output rows (`_weight_grad_stacked`); strided convs per tap. One
large im2col matmul and one batched einsum over stacked taps were also
measured; both were slower (they materialise a k*k times larger patch
tensor), see benchmarks/conv_grad.py.

This is CPU-only code. Nothing here decides when it runs: the model layers
carry a `cpu_kernels` field, set once from the mesh's platform
(`dqvq.cpu.tuning.cpu_kernels`), and only call into this module when it is
True. Accelerators keep XLA's own gradient: cuDNN and TPU convolutions
compute weight gradients natively and fast, and a program traced or
exported for them never contains these matmuls.

Plug-in for Flax: `conv_general_dilated` below has the signature of
`jax.lax.conv_general_dilated` and can be passed as
`nn.Conv(..., conv_general_dilated=fast_conv.conv_general_dilated)`; it routes
plain NHWC/HWIO convolutions to `conv2d` and everything else to lax.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
Padding = str | Sequence[tuple[int, int]]
PadPairs = tuple[tuple[int, int], tuple[int, int]]

# NHWC activations and HWIO kernels: Flax's (and this project's) layout.
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')

# The name scope of every op this module adds: an exported or lowered
# program names it in its op locations, so tests can prove that a program
# for an accelerator holds none of it (tests/test_export_platforms.py).
SCOPE = 'dqvq_cpu_kernels'


def _plain_conv(x: Array, kernel: Array, strides: tuple[int, int],
                padding: PadPairs, precision: Any) -> Array:
  return lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=_DIMENSION_NUMBERS,
      precision=precision)


def _normalize_padding(padding: Padding, x_shape: Sequence[int],
                       kernel_shape: Sequence[int],
                       strides: tuple[int, int]) -> PadPairs:
  """Explicit ((lo, hi), (lo, hi)) pads; hashable, as custom_vjp needs."""
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(tuple(x_shape[1:3]), tuple(kernel_shape[:2]),
                               strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if len(pads) != 2:
    raise ValueError(f'conv2d needs two (lo, hi) padding pairs, got {padding}.')
  return pads  # type: ignore[return-value]


def _weight_grad_sharding(x: Array, kernel_sharding: Any) -> Any:
  """Output sharding of a tap matmul, needed only under explicit sharding.

  With an Explicit-axis mesh, x's batch axis is sharded in its type, and a
  matmul contracting it must name where its result lives (XLA inserts the
  cross-device reduction). dW gets the kernel's own (Cin, Cout) sharding so
  that the cotangent matches the primal. Auto meshes and unsharded inputs
  need nothing (None), as with XLA's own gradient.
  """
  mesh = jax.typeof(x).sharding.mesh
  if mesh.empty or not mesh.explicit_axes:
    return None
  spec = (None, None)
  if kernel_sharding is not None and not kernel_sharding.mesh.empty:
    spec = tuple(kernel_sharding.spec[2:4])
    spec += (None,) * (2 - len(spec))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _tap_rows(x_pad: Array, i: int, j: int, ho: int, wo: int,
              strides: tuple[int, int]) -> Array:
  """(B*Ho*Wo, Cin): the padded input's pixels that kernel tap (i, j) meets,
  one row per output pixel."""
  b, _, _, cin = x_pad.shape
  sh, sw = strides
  window = lax.slice(x_pad, (0, i, j, 0),
                     (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
                     (1, sh, sw, 1))
  return window.reshape(b * ho * wo, cin)


def _weight_grad_taps(x: Array, dy: Array, kernel_shape: Sequence[int],
                      strides: tuple[int, int], padding: PadPairs,
                      precision: Any, dtype: Any,
                      kernel_sharding: Any = None) -> Array:
  """dW as one (Cin, N) @ (N, Cout) matmul per kernel tap, N = B*Ho*Wo.

  The input is padded once (lax.pad also accepts negative pads, which crop,
  matching conv_general_dilated), then each tap reads the strided window of
  the padded input that met dy's pixels. Products accumulate in float32 so
  bf16 gradients lose no more than the final rounding.
  """
  kh, kw, cin, cout = kernel_shape
  b, ho, wo, _ = dy.shape
  zero = jnp.zeros((), x.dtype)
  x_pad = lax.pad(x, zero, ((0, 0, 0), (*padding[0], 0), (*padding[1], 0),
                            (0, 0, 0)))
  dy_rows = dy.reshape(b * ho * wo, cout)
  out_sharding = _weight_grad_sharding(x, kernel_sharding)
  taps = []
  for i in range(kh):
    for j in range(kw):
      taps.append(lax.dot_general(
          _tap_rows(x_pad, i, j, ho, wo, strides), dy_rows,
          (((0,), (0,)), ((), ())), precision=precision,
          preferred_element_type=jnp.float32, out_sharding=out_sharding))
  return jnp.stack(taps).reshape(kh, kw, cin, cout).astype(dtype)


# Working set of one block of the stacked-shift weight gradient. XLA:CPU
# materialises the shifted copies that feed its matmuls; at the DQ-VAE's
# shapes whole-image copies are hundreds of MB, and this machine class copies
# at ~5-10 GB/s, so building them first cost about as much as the matmuls.
# Blocks of a few output rows, built and consumed while in cache, measured
# 1.0-1.2x faster than one whole-image block, and the stacked form 1.1-1.3x
# faster than per-tap matmuls (benchmarks/conv_grad.py
# --weight_grad_variants: 106 / 95 / 80 GFLOP/s at 256x256x128, batch 2).
WEIGHT_GRAD_BLOCK_BYTES = 8 * 2 ** 20


@contextlib.contextmanager
def whole_image_weight_grads():
  """Traces inside use one block per weight gradient: the same products, no loop.

  XLA's cost analysis counts a loop body once, so a blocked program's FLOP
  count is too low; read counts from a program traced in here. Use a fresh
  function object inside: jax reuses traces of one it has seen.
  """
  global WEIGHT_GRAD_BLOCK_BYTES
  budget = WEIGHT_GRAD_BLOCK_BYTES
  WEIGHT_GRAD_BLOCK_BYTES = 2 ** 62
  try:
    yield
  finally:
    WEIGHT_GRAD_BLOCK_BYTES = budget


def _rows_per_block(rows: int, bytes_per_row: int) -> int:
  """Output rows per block: within the budget, dividing `rows` if it can.

  A divisor means no zero rows; when the largest divisor in budget is under
  half of it (e.g. a prime row count), blocks are evened out instead, so the
  last one is padded by fewer rows than there are blocks.
  """
  most = max(1, min(rows, WEIGHT_GRAD_BLOCK_BYTES // max(1, bytes_per_row)))
  divisor = max(d for d in range(1, most + 1) if rows % d == 0)
  if 2 * divisor >= most:
    return divisor
  return -(-rows // -(-rows // most))


def _weight_grad_stacked(x: Array, dy: Array, kernel_shape: Sequence[int],
                         padding: PadPairs, precision: Any, dtype: Any,
                         block_rows: int | None = None) -> Array:
  """Stride-1 dW as kh (Cin, N) @ (N, kw*Cout) matmuls per block of rows.

  A per-tap matmul has a tiny (Cin, Cout) output and a huge contraction,
  which XLA:CPU's matmul runs well below its square-matrix rate. Instead the
  kw column shifts of dy, placed on the padded width, are stacked along its
  channel axis, D[b, h, w', j*Cout + o] = dy[b, h, w' - j, o] (zero
  outside), and each kernel row i takes the padded input's rows h + i as
  they are: with rows flattened, x_pad[b, h + i, w'] for h in a block is one
  contiguous run of the flattened padded input. Then

    dW[i,j,c,o] = sum_{b,h,w'} x_pad[b, h + i, w', c] D[b, h, w', j*Cout + o],

  a (Cin, kw*Cout) output per kernel row and no wasted products. Stacking
  only dy's shifts measured faster than also stacking x's row shifts into
  one (kh*Cin, kw*Cout) product: 1.0-1.24x across the DQ-VAE's and LPIPS's
  shapes (345 -> 277 ms at 2x256x256x128), the copies being what costs.
  The sum over h runs over blocks of `block_rows` output rows (default: what
  fits WEIGHT_GRAD_BLOCK_BYTES) in a loop, so that each block's copies are
  built and consumed in cache; zero dy rows pad the last block when the
  blocks do not tile the height (they add nothing). Products accumulate in
  float32.
  """
  kh, kw, cin, cout = kernel_shape
  b, ho, _, _ = dy.shape
  (top, bottom), (left, right) = padding
  wp = x.shape[2] + left + right
  if block_rows is None:
    block_rows = _rows_per_block(
        ho, b * wp * (cin + kw * cout) * x.dtype.itemsize)
  rows = max(1, min(int(block_rows), ho))
  num_blocks = -(-ho // rows)
  extra = num_blocks * rows - ho  # zero rows completing the last block
  zero = jnp.zeros((), x.dtype)
  dzero = jnp.zeros((), dy.dtype)
  x_pad = lax.pad(x, zero, ((0, 0, 0), (top, bottom + extra, 0),
                            (left, right, 0), (0, 0, 0)))
  x_flat = x_pad.reshape(b, -1, cin)  # (B, padded rows * wp, Cin)

  def block(xs: Array, ds: Array) -> Array:
    """xs: (B, (r + kh - 1) * wp, Cin) flattened rows; ds: (B, r, Wo, Cout)."""
    r = ds.shape[1]
    stacked_dy = ds if kw == 1 else jnp.concatenate(
        [lax.pad(ds, dzero, ((0, 0, 0), (0, 0, 0), (j, kw - 1 - j, 0),
                             (0, 0, 0))) for j in range(kw)], axis=3)
    stacked_dy = stacked_dy.reshape(b, r * wp, kw * cout)
    return jnp.stack([lax.dot_general(
        lax.slice_in_dim(xs, i * wp, (i + r) * wp, axis=1), stacked_dy,
        (((0, 1), (0, 1)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32) for i in range(kh)])

  if num_blocks == 1:
    dw = block(x_flat, dy)
  else:
    if extra:
      dy = lax.pad(dy, dzero, ((0, 0, 0), (0, extra, 0), (0, 0, 0),
                               (0, 0, 0)))

    def body(index, acc):
      start = index * rows
      xs = lax.dynamic_slice_in_dim(x_flat, start * wp,
                                    (rows + kh - 1) * wp, axis=1)
      ds = lax.dynamic_slice_in_dim(dy, start, rows, axis=1)
      return acc + block(xs, ds)

    dw = lax.fori_loop(0, num_blocks, body,
                       jnp.zeros((kh, cin, kw * cout), jnp.float32))
  # dw[i, c, j*Cout + o] = dW[i, j, c, o].
  dw = dw.reshape(kh, cin, kw, cout).transpose(0, 2, 1, 3)
  return dw.astype(dtype)


def _strided_conv_taps(x: Array, kernel: Array, strides: tuple[int, int],
                       padding: PadPairs, precision: Any) -> Array:
  """A strided conv's forward as one (N, Cin) @ (Cin, Cout) matmul per tap.

  XLA:CPU runs the Downsample's 3x3 stride-2 conv at ~1/4 of its stride-1
  rate; summing kh*kw matmuls over strided windows of the padded input was
  measured 2.4-2.7x faster (benchmarks/conv_variants.py --strided). A
  space-to-depth rewrite into a stride-1 conv is not: its 2x2 kernel over
  4*Cin channels falls onto an equally slow XLA path, with 16/9 the FLOPs.
  """
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  b, h, w, _ = x.shape
  (pt, pb), (pl, pr) = padding
  ho = (h + pt + pb - kh) // sh + 1
  wo = (w + pl + pr - kw) // sw + 1
  zero = jnp.zeros((), x.dtype)
  x_pad = lax.pad(x, zero, ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  acc = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.dot_general(_tap_rows(x_pad, i, j, ho, wo, strides),
                            kernel[i, j],
                            (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
      acc = tap if acc is None else acc + tap
  return acc.astype(x.dtype).reshape(b, ho, wo, cout)


def _use_strided_taps(kernel_shape: Sequence[int],
                      strides: tuple[int, int]) -> bool:
  """Strided kernels that do not tile by the stride (the 3x3 Downsample).

  XLA's own forward is fast for the discriminator's 4x4 stride-2 convs
  (measured 2-3x faster than taps there, and than a space-to-depth rewrite,
  whose 2x2 stride-1 kernels XLA:CPU runs slowly), so they keep it.
  """
  kh, kw = kernel_shape[:2]
  return strides != (1, 1) and (kh % strides[0] or kw % strides[1])


def _conv_forward(x: Array, kernel: Array, strides: tuple[int, int],
                  padding: PadPairs, precision: Any) -> Array:
  if _use_strided_taps(kernel.shape, strides):
    return _strided_conv_taps(x, kernel, strides, padding, precision)
  return _plain_conv(x, kernel, strides, padding, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fast_conv(x: Array, kernel: Array, strides: tuple[int, int],
               padding: PadPairs, precision: Any) -> Array:
  return _conv_forward(x, kernel, strides, padding, precision)


def _fast_conv_fwd(x, kernel, strides, padding, precision):
  return _conv_forward(x, kernel, strides, padding, precision), (x, kernel)


def _fast_conv_bwd(strides, padding, precision, residuals, dy):
  x, kernel = residuals
  # XLA's own input gradient (a conv of dy with the flipped kernel and, for
  # strides > 1, lhs dilation): linear_transpose emits exactly what jax.grad
  # would, without re-running the forward. It runs at the forward's rate for
  # stride 1 (benchmarks/stage1_profile.py --part convs); tap-wise scatter
  # matmuls were measured as no faster.
  (dx,) = jax.linear_transpose(
      lambda xx: _plain_conv(xx, kernel, strides, padding, precision),
      jax.ShapeDtypeStruct(x.shape, x.dtype))(dy)
  kernel_sharding = jax.typeof(kernel).sharding
  if (strides == (1, 1) and
      _weight_grad_sharding(x, kernel_sharding) is None):
    dw = _weight_grad_stacked(x, dy, kernel.shape, padding, precision,
                              kernel.dtype)
  else:
    # Strided convs, and explicitly sharded ones (per-tap (Cin, Cout) outputs
    # take the kernel's own sharding), keep per-tap matmuls.
    dw = _weight_grad_taps(x, dy, kernel.shape, strides, padding, precision,
                           kernel.dtype, kernel_sharding)
  return dx, dw


_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)


def conv2d(x: Array, kernel: Array, strides: Sequence[int] = (1, 1),
           padding: Padding = 'VALID', precision: Any = None, *,
           cpu_kernels: bool) -> Array:
  """NHWC x HWIO convolution; with `cpu_kernels`, XLA:CPU's fast gradient.

  Same values and gradients as `lax.conv_general_dilated` with NHWC/HWIO/NHWC
  dimension numbers (up to float summation order). The caller states the
  path (`cpu_kernels`, the layer's field) so that nothing here depends on
  the process's default backend.

  Args:
    x: (B, H, W, Cin) input.
    kernel: (kh, kw, Cin, Cout) kernel, same dtype as x.
    strides: (sh, sw) window strides.
    padding: ((top, bottom), (left, right)) or a lax padding string
      ('VALID', 'SAME', 'SAME_LOWER').
    precision: passed to the convolution and the weight-gradient matmuls.
    cpu_kernels: True for the custom VJP above (CPU runs only); False for
      plain `lax.conv_general_dilated`, which is what accelerators get.

  Returns:
    The (B, Ho, Wo, Cout) output.
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(
        f'conv2d needs a 4-D NHWC input and HWIO kernel, got shapes '
        f'{x.shape} and {kernel.shape}; vmap over extra batch axes or fold '
        f'them into the batch axis.')
  strides = tuple(int(s) for s in strides)
  pads = _normalize_padding(padding, x.shape, kernel.shape, strides)
  if cpu_kernels:
    with jax.named_scope(SCOPE):
      return _fast_conv(x, kernel, strides, pads, precision)
  return _plain_conv(x, kernel, strides, pads, precision)


def _is_unit(values: Sequence[int] | None) -> bool:
  return values is None or all(int(v) == 1 for v in values)


def _is_nhwc_hwio(dimension_numbers: Any, lhs_shape: Sequence[int],
                  rhs_shape: Sequence[int]) -> bool:
  """True when dimension_numbers mean NHWC input, HWIO kernel, NHWC output."""
  if dimension_numbers is None:  # lax's default is NCHW/OIHW.
    return False
  try:
    given = lax.conv_dimension_numbers(lhs_shape, rhs_shape,
                                       dimension_numbers)
  except (TypeError, ValueError):
    return False
  return given == lax.conv_dimension_numbers(lhs_shape, rhs_shape,
                                             _DIMENSION_NUMBERS)


def conv_general_dilated(
    lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None, feature_group_count: int = 1,
    batch_group_count: int = 1, precision: Any = None,
    preferred_element_type: Any = None) -> Array:
  """Drop-in `lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=)`.

  For CPU runs only (a layer passes it when its `cpu_kernels` is on). Routes
  undilated, ungrouped 2-D NHWC/HWIO convolutions (every conv in the DQ-VAE
  models) to `conv2d`'s CPU path; anything else (dilation, groups, other
  layouts or ranks, a preferred output type) goes to lax unchanged, so the
  plug-in can never change what a layer computes.
  """
  fast = (lhs.ndim == 4 and rhs.ndim == 4 and
          len(window_strides) == 2 and _is_unit(lhs_dilation) and
          _is_unit(rhs_dilation) and feature_group_count == 1 and
          batch_group_count == 1 and preferred_element_type is None and
          lhs.dtype == rhs.dtype and
          _is_nhwc_hwio(dimension_numbers, lhs.shape, rhs.shape))
  if fast:
    return conv2d(lhs, rhs, window_strides, padding, precision,
                  cpu_kernels=True)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
