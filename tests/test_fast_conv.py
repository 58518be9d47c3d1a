"""The custom-VJP convolution must be a numerically exact stand-in for XLA's.

Every kernel/stride/padding the DQ-VAE models use is checked for the output
and both gradients against `jax.vjp` of plain `lax.conv_general_dilated`; the
Flax plug-in is checked against a plain `nn.Conv`. Shapes are tiny so the file
runs in seconds.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq.cpu import fast_conv

DN = ('NHWC', 'HWIO', 'NHWC')

# (name, input HxW, kernel, stride, padding) for every conv the models use.
CASES = [
    ('3x3_s1_p1', (8, 8), 3, 1, ((1, 1), (1, 1))),
    ('3x3_s1_p1_odd', (7, 5), 3, 1, ((1, 1), (1, 1))),
    ('3x3_s1_p1_tiny', (2, 3), 3, 1, ((1, 1), (1, 1))),
    # Downsample: caller pads right/bottom by one, then VALID stride 2.
    ('3x3_s2_valid', (9, 9), 3, 2, 'VALID'),
    ('3x3_s2_valid_even', (8, 10), 3, 2, 'VALID'),
    ('1x1_s1_p0', (6, 5), 1, 1, ((0, 0), (0, 0))),
    ('4x4_s2_p1', (8, 8), 4, 2, ((1, 1), (1, 1))),
    ('4x4_s2_p1_odd', (9, 7), 4, 2, ((1, 1), (1, 1))),
    ('4x4_s1_p1', (6, 7), 4, 1, ((1, 1), (1, 1))),
    ('3x3_s1_same', (5, 6), 3, 1, 'SAME'),
    # Not used by the models, but the row-stacked weight gradient and the
    # strided tap forward must handle any padding, including crops.
    ('3x3_s1_asym', (6, 7), 3, 1, ((0, 2), (2, 1))),
    ('3x3_s1_crop', (7, 6), 3, 1, ((-1, 1), (1, -1))),
    ('3x3_s2_p1', (8, 7), 3, 2, ((1, 1), (1, 1))),
    ('5x5_s3_p2', (11, 9), 5, 3, ((2, 2), (2, 1))),
    ('2x3_s1_p1', (5, 6), (2, 3), 1, ((1, 0), (1, 1))),
]
CASE_IDS = [c[0] for c in CASES]


def _data(hw, k, stride, padding, dtype, cin=3, cout=5, batch=2, seed=0):
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (batch, *hw, cin), jnp.float32)
  kh, kw_ = (k, k) if isinstance(k, int) else k
  w = jax.random.normal(kw, (kh, kw_, cin, cout), jnp.float32) / np.sqrt(
      kh * kw_)
  y_shape = jax.eval_shape(
      lambda x, w: lax.conv_general_dilated(
          x, w, (stride, stride), padding, dimension_numbers=DN), x, w).shape
  dy = jax.random.normal(kc, y_shape, jnp.float32)
  return x.astype(dtype), w.astype(dtype), dy.astype(dtype)


def _ref_vjp(x, w, dy, stride, padding):
  def f(x, w):
    return lax.conv_general_dilated(x, w, (stride, stride), padding,
                                    dimension_numbers=DN)
  y, pull = jax.vjp(f, x, w)
  return (y, *pull(dy))


def _fast_vjp(x, w, dy, stride, padding):
  y, pull = jax.vjp(
      lambda x, w: fast_conv.conv2d(x, w, (stride, stride), padding,
                                    cpu_kernels=True), x, w)
  return (y, *pull(dy))


def _assert_close(got, want, rtol, atol):
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=rtol,
                             atol=atol)


@pytest.mark.parametrize('name,hw,k,stride,padding', CASES, ids=CASE_IDS)
def test_float32_matches_xla(name, hw, k, stride, padding):
  del name
  x, w, dy = _data(hw, k, stride, padding, jnp.float32)
  ref = jax.jit(_ref_vjp, static_argnums=(3, 4))(x, w, dy, stride, padding)
  got = jax.jit(_fast_vjp, static_argnums=(3, 4))(x, w, dy, stride, padding)
  for g, r, what in zip(got, ref, ('y', 'dx', 'dw')):
    assert g.shape == r.shape and g.dtype == r.dtype, what
    _assert_close(g, r, rtol=1e-5, atol=1e-5)
  # Guard against a vacuous pass (e.g. a zero gradient on both sides).
  assert float(jnp.abs(ref[2]).max()) > 0.1


@pytest.mark.parametrize('name,hw,k,stride,padding', CASES, ids=CASE_IDS)
def test_bfloat16_matches_float32_reference(name, hw, k, stride, padding):
  """bf16 grads keep bf16 dtype and stay within bf16 rounding of the truth."""
  del name
  x, w, dy = _data(hw, k, stride, padding, jnp.bfloat16)
  got = jax.jit(_fast_vjp, static_argnums=(3, 4))(x, w, dy, stride, padding)
  ref = _ref_vjp(x.astype(jnp.float32), w.astype(jnp.float32),
                 dy.astype(jnp.float32), stride, padding)
  for g, r, what in zip(got, ref, ('y', 'dx', 'dw')):
    assert g.dtype == jnp.bfloat16, what
    scale = float(jnp.abs(r).max())
    _assert_close(g, r, rtol=2e-2, atol=2e-2 * scale)


# Stride-1 cases whose weight gradient runs as blocks of output rows.
STRIDE1_CASES = [c for c in CASES if c[3] == 1]


@pytest.mark.parametrize('block_rows', [1, 2, 3])
@pytest.mark.parametrize('name,hw,k,stride,padding', STRIDE1_CASES,
                         ids=[c[0] for c in STRIDE1_CASES])
def test_weight_grad_in_row_blocks_matches_xla(block_rows, name, hw, k, stride,
                                               padding):
  """The tiny cases fit one block by default; here the loop over blocks runs,
  with one row per block and with blocks that leave a zero-padded last one
  (e.g. 3 blocks of 3 rows for 8 or 7 output rows)."""
  del name
  x, w, dy = _data(hw, k, stride, padding, jnp.float32, cin=4, cout=3)
  ref = _ref_vjp(x, w, dy, stride, padding)[2]
  # pylint: disable=protected-access
  pads = fast_conv._normalize_padding(padding, x.shape, w.shape, (1, 1))
  weight_grad = functools.partial(
      fast_conv._weight_grad_stacked, kernel_shape=w.shape, padding=pads,
      precision=None, dtype=w.dtype, block_rows=block_rows)
  # pylint: enable=protected-access
  jaxpr = str(jax.make_jaxpr(weight_grad)(x, dy))
  # fori_loop with static bounds traces as a scan.
  assert ('scan' in jaxpr or 'while' in jaxpr) == (dy.shape[1] > block_rows)
  _assert_close(jax.jit(weight_grad)(x, dy), ref, rtol=1e-5, atol=1e-5)


def test_conv2d_gradient_through_row_blocks(monkeypatch):
  """conv2d's VJP takes its blocks from the byte budget (here: one row)."""
  monkeypatch.setattr(fast_conv, 'WEIGHT_GRAD_BLOCK_BYTES', 1)
  x, w, dy = _data((7, 5), 3, 1, ((1, 1), (1, 1)), jnp.float32)
  ref = _ref_vjp(x, w, dy, 1, ((1, 1), (1, 1)))
  # A fresh function: jax reuses traces of the same function and shapes,
  # which other tests made with the default budget.
  vjp = lambda x, w, dy: _fast_vjp(x, w, dy, 1, ((1, 1), (1, 1)))
  assert 'scan' in str(jax.make_jaxpr(vjp)(x, w, dy))
  got = jax.jit(vjp)(x, w, dy)
  for g, r in zip(got, ref):
    _assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('rows,bytes_per_row,budget,want', [
    (256, 1000, 8000, 8),    # a divisor of the height fills the budget
    (256, 1000, 7000, 4),    # largest divisor in budget (4 >= 7 / 2)
    (61, 1000, 8000, 8),     # prime: 8 even blocks of 8 (3 zero rows)
    (32, 1000, 10 ** 6, 32),  # everything fits: one block
    (32, 10 ** 6, 1000, 1),   # not even one row fits: one row per block
])
def test_rows_per_block(monkeypatch, rows, bytes_per_row, budget, want):
  monkeypatch.setattr(fast_conv, 'WEIGHT_GRAD_BLOCK_BYTES', budget)
  # pylint: disable-next=protected-access
  got = fast_conv._rows_per_block(rows, bytes_per_row)
  assert got == want
  blocks = -(-rows // got)
  assert blocks * got - rows < blocks  # fewer zero rows than blocks


def _uses_custom_vjp(fn, *args) -> bool:
  return 'custom_vjp_call' in str(jax.make_jaxpr(fn)(*args))


def test_the_caller_chooses_the_path_not_the_backend():
  """cpu_kernels=False is plain lax (what accelerators get), on any backend;
  True is the custom VJP, named by its scope in the lowered program."""
  x, w, _ = _data((6, 6), 3, 1, ((1, 1), (1, 1)), jnp.float32)
  fn = lambda cpu: lambda x, w: fast_conv.conv2d(
      x, w, (1, 1), ((1, 1), (1, 1)), cpu_kernels=cpu)
  assert _uses_custom_vjp(fn(True), x, w)
  assert not _uses_custom_vjp(fn(False), x, w)
  np.testing.assert_array_equal(fn(False)(x, w), lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN))
  grad = lambda cpu: jax.jit(jax.grad(lambda w: jnp.sum(fn(cpu)(x, w) ** 2)))
  assert fast_conv.SCOPE in grad(True).lower(w).as_text(debug_info=True)
  assert fast_conv.SCOPE not in grad(False).lower(w).as_text(debug_info=True)


def test_downsample_forward_avoids_strided_xla_conv():
  """The 3x3 stride-2 forward runs as tap matmuls (XLA's strided conv is
  ~4x slower on CPU); its gradients are covered by the cases above."""
  x, w, _ = _data((9, 9), 3, 2, 'VALID', jnp.float32)
  fwd = lambda cpu: lambda x, w: fast_conv.conv2d(x, w, (2, 2), 'VALID',
                                                  cpu_kernels=cpu)
  assert 'conv_general_dilated' not in str(jax.make_jaxpr(fwd(True))(x, w))
  assert 'conv_general_dilated' in str(jax.make_jaxpr(fwd(False))(x, w))


def _conv_pair(dtype=None, **kwargs):
  plain = nn.Conv(6, dtype=dtype, **kwargs)
  fast = nn.Conv(6, dtype=dtype,
                 conv_general_dilated=fast_conv.conv_general_dilated, **kwargs)
  return plain, fast


@pytest.mark.parametrize('kwargs,expect_fast', [
    (dict(kernel_size=(3, 3), padding=((1, 1), (1, 1))), True),
    (dict(kernel_size=(3, 3), strides=(2, 2), padding='VALID'), True),
    (dict(kernel_size=(4, 4), strides=(2, 2), padding=1), True),
    (dict(kernel_size=(1, 1), padding=0), True),
    (dict(kernel_size=(3, 3), padding='SAME'), True),
    # Not handled by the custom VJP: must fall back to lax, unchanged.
    (dict(kernel_size=(3, 3), kernel_dilation=2, padding=2), False),
    (dict(kernel_size=(3, 3), feature_group_count=3, padding=1), False),
], ids=['3x3', '3x3_s2', '4x4_s2', '1x1', 'same', 'dilated', 'grouped'])
def test_flax_plugin_matches_nn_conv(kwargs, expect_fast):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 6))
  plain, fast = _conv_pair(**kwargs)
  params = plain.init(jax.random.PRNGKey(2), x)
  assert (jax.tree.structure(params) ==
          jax.tree.structure(fast.init(jax.random.PRNGKey(2), x)))

  def loss(module):
    return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

  assert _uses_custom_vjp(loss(fast), params, x) == expect_fast
  assert not _uses_custom_vjp(loss(plain), params, x)
  want = jax.jit(jax.value_and_grad(loss(plain), argnums=(0, 1)))(params, x)
  got = jax.jit(jax.value_and_grad(loss(fast), argnums=(0, 1)))(params, x)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_flax_plugin_bf16_and_extra_batch_dims():
  """bf16 compute with f32 params, and Flax's flattening of batch dims."""
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 8, 8, 4))
  plain, fast = _conv_pair(jnp.bfloat16, kernel_size=(3, 3), padding=1)
  params = plain.init(jax.random.PRNGKey(4), x)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, x).astype(jnp.float32) ** 2)
  assert _uses_custom_vjp(loss(fast), params)
  want = jax.jit(jax.grad(loss(plain)))(params)
  got = jax.jit(jax.grad(loss(fast)))(params)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.float32
    _assert_close(g, r, rtol=3e-2, atol=3e-2 * float(jnp.abs(r).max()))


def test_vmap_over_batch_of_batches():
  """vmap (with a shared kernel) gives the grads of the folded batch."""
  x, w, _ = _data((6, 6), 3, 1, ((1, 1), (1, 1)), jnp.float32, batch=6)
  xs = x.reshape(3, 2, 6, 6, 3)
  pad = ((1, 1), (1, 1))

  def vmapped(w, xs):
    y = jax.vmap(lambda xb: fast_conv.conv2d(xb, w, (1, 1), pad,
                                             cpu_kernels=True))(xs)
    return jnp.sum(jnp.tanh(y))

  def folded(w, x):
    y = lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=DN)
    return jnp.sum(jnp.tanh(y))

  assert _uses_custom_vjp(vmapped, w, xs)
  gw, gx = jax.jit(jax.grad(vmapped, argnums=(0, 1)))(w, xs)
  rw, rx = jax.grad(folded, argnums=(0, 1))(w, x)
  _assert_close(gw, rw, 1e-5, 1e-5)
  _assert_close(gx.reshape(x.shape), rx, 1e-5, 1e-5)
  # Per-sub-batch kernel gradients: vmap of grad.
  per = jax.jit(jax.vmap(jax.grad(vmapped), in_axes=(None, 0)))(w, xs[:, None])
  _assert_close(per.sum(0), rw, 1e-5, 1e-5)


def test_rank_other_than_four_errors_clearly():
  x = jnp.zeros((2, 3, 6, 6, 3))
  w = jnp.zeros((3, 3, 3, 4))
  with pytest.raises(ValueError, match='4-D NHWC'):
    fast_conv.conv2d(x, w, (1, 1), 'VALID', cpu_kernels=True)


@pytest.mark.parametrize('axis_type', ['Auto', 'Explicit'])
def test_batch_sharded_over_devices_matches(num_devices, axis_type):
  """Data-parallel jit: the per-tap matmuls reduce across device shards."""
  mesh = jax.make_mesh((num_devices,), ('data',),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  x, w, dy = _data((6, 6), 3, 1, ((1, 1), (1, 1)), jnp.float32,
                   batch=num_devices)
  # Reference on unsharded arrays: under Explicit axes jax's own conv weight
  # gradient refuses a sharded batch (it asks for an out_sharding).
  ref = _ref_vjp(x, w, dy, 1, ((1, 1), (1, 1)))
  xs, dys = jax.device_put(x, batch), jax.device_put(dy, batch)
  got = jax.jit(_fast_vjp, static_argnums=(3, 4))(xs, w, dys, 1,
                                                  ((1, 1), (1, 1)))
  assert got[0].sharding.spec[0] == 'data'  # Still batch-parallel.
  for g, r in zip(got, ref):
    _assert_close(g, r, 1e-5, 1e-5)
