"""Every custom gradient path of stage 1 equals `jax.grad` of the plain model.

The training step differs from the textbook computation in three places:
the convolutions' weight gradient on CPU (`fast_conv`), the decoder's
Upsample (one 2x2 conv per output phase instead of repeat + 3x3 conv) and the
hand-assembled VJP of the generator loss (`stage1.generator_gradients`). Each
is checked here on the demo's real tokenizer (its config, at its training
resolution) and its real loss, against `jax.grad` of the loss written out
plainly, with XLA's own convolution gradient and the Upsample replaced by
repeat + conv through `nn.intercept_methods`.
"""

import functools
import importlib.util
import os

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq import losses
from dqvq.models import layers
from dqvq.trainers import stage1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_stage1_config(**model):
  spec = importlib.util.spec_from_file_location(
      'demo_cfg', os.path.join(ROOT, 'configs', 'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.stage1_config()
  c.model.update(model)
  return c


def plain_upsample(next_fun, args, kwargs, context):
  """Upsample as jnp.repeat x2 then a lax 3x3 conv with the same params."""
  if not (isinstance(context.module, layers.Upsample)
          and context.method_name == '__call__'):
    return next_fun(*args, **kwargs)
  (x,) = args
  p = context.module.variables['params']['conv']['conv']
  up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  y = lax.conv_general_dilated(up, p['kernel'], (1, 1), ((1, 1), (1, 1)),
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                               precision=lax.Precision.HIGHEST)
  return y + p['bias']


@pytest.mark.parametrize('router', ['feature', 'entropy'])
def test_step_gradient_equals_plain_jax_grad_on_demo_model(router):
  c = demo_stage1_config(router=router, entropy_thresholds=None)
  models = stage1.build_models(c, cpu_kernels=True)  # what a CPU run trains
  res = c.data.resolution
  state = jax.jit(functools.partial(stage1.init_state, models,
                                    image_shape=(1, res, res, 3)))(
                                        jax.random.key(0))
  # Smooth images with detail (not noise), so the router has a real choice.
  t = jnp.linspace(0.0, 6.0, res)
  base = jnp.sin(t[:, None] * t[None, :])[None, ..., None]
  x = jnp.tanh(base * jnp.asarray([[[[1.0, 0.5, -0.7]]], [[[-0.3, 0.9, 0.4]]]])
               + 0.3 * jax.random.normal(jax.random.key(1), (2, res, res, 3)))
  batch = {'image': x, 'label': jnp.zeros((2,), jnp.int32),
           'mask': jnp.ones((2,), bool)}

  got, _, _, metrics = jax.jit(functools.partial(
      stage1.generator_gradients, models))(state, batch, None)

  rngs = stage1._rngs(state)  # pylint: disable=protected-access
  vae = models.vae.clone(cpu_kernels=False)  # XLA's own conv gradients

  def total(params):
    out, _ = vae.apply({'params': params, 'codebook': state.codebook}, x,
                       train=True, rngs=rngs, mutable=['codebook'])
    budget = losses.budget_loss(
        out['gate'], vae.grain_factors, vae.grain_ratios,
        c.loss.budget_kind if router == 'feature' else 'none',
        c.loss.budget_weight)
    # The demo's feature router trains towards the oracle's allocation too
    # (config.model.router_target): its cross-entropy is part of the real
    # loss.
    gate_ce = c.loss.router_weight * out.get('router_loss', 0.0)
    return (losses.l1_loss(x, out['reconstruction'])
            + c.loss.codebook_weight * out['q_loss'] + budget + gate_ce)

  with nn.intercept_methods(plain_upsample):
    loss, want = jax.jit(jax.value_and_grad(total))(state.params)

  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  assert len(flat_got) == len(flat_want)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
  assert scale > 0
  for path, g in flat_got:
    w = flat_want[path]
    np.testing.assert_allclose(
        g, w, rtol=2e-3, atol=2e-5 * scale,
        err_msg=jax.tree_util.keystr(path))
  if router == 'feature':
    # The gate is trained: its gradient is present and not zero.
    gate = got['grain_router']
    assert any(float(jnp.max(jnp.abs(v))) > 0 for v in jax.tree.leaves(gate))
