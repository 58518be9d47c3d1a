"""Stage-1 losses against hand computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq import losses


def _one_hot_gate(grain_map, k):
  return jax.nn.one_hot(jnp.asarray(grain_map), k)


def test_budget_dual_official_by_hand():
  # 2 images, 2x2 regions: image 0 has 3 fine regions, image 1 has 1.
  gmap = np.array([[[1, 1], [1, 0]], [[0, 0], [0, 1]]])
  gate = _one_hot_gate(gmap, 2)
  # beta = mean_b sum(1*g0 + 4*g1) - 4 = ((1 + 12) + (3 + 4)) / 2 - 4 = 6
  # r = 6 / (16 - 4) = 0.5 (the batch-mean fine share), loss = 2*10*(r - t)^2.
  value = losses.budget_loss(gate, (16, 8), (0.7, 0.3), 'official', 10.0)
  np.testing.assert_allclose(value, 2 * 10 * (0.5 - 0.3) ** 2, rtol=1e-6)


def test_budget_triple_official_by_hand():
  gmap = np.array([[[0, 1], [2, 2]]])  # 1 coarse, 1 median, 2 fine regions
  gate = _one_hot_gate(gmap, 3)
  n0 = 4
  r_med = ((1 + 4 * 1 + 2) - n0) / (4 * n0 - n0)
  r_fine = ((1 + 1 + 16 * 2) - n0) / (16 * n0 - n0)
  expected = (r_med - 0.3) ** 2 + 2.0 * (r_fine - 0.3) ** 2
  value = losses.budget_loss(gate, (32, 16, 8), (0.4, 0.3, 0.3), 'official', 2.0)
  np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_budget_per_image_paper_eq7_by_hand():
  gmap = np.array([[[1, 1], [1, 0]], [[0, 0], [0, 1]]])
  gate = _one_hot_gate(gmap, 2)
  # Per-image fine shares 0.75 and 0.25, target 0.5: mean of 0.0625, 0.0625.
  value = losses.budget_loss(gate, (16, 8), (0.5, 0.5), 'per_image', 10.0)
  np.testing.assert_allclose(value, 10 * 0.0625, rtol=1e-6)
  # The batch-mean (official) loss is zero for the same gate: they differ.
  official = losses.budget_loss(gate, (16, 8), (0.5, 0.5), 'official', 10.0)
  np.testing.assert_allclose(official, 0.0, atol=1e-7)


def test_budget_gradient_flows_through_every_gate_channel():
  logits = jax.random.normal(jax.random.key(0), (2, 2, 2, 2))
  g = jax.grad(lambda l: losses.budget_loss(
      jax.nn.softmax(l), (16, 8), (0.9, 0.1), 'official', 10.0))(logits)
  assert np.abs(np.asarray(g)).sum() > 0


def test_budget_errors():
  gate = _one_hot_gate(np.zeros((1, 2, 2), int), 4)
  with pytest.raises(ValueError, match='per_image'):
    losses.budget_loss(gate, (64, 32, 16, 8), (0.25,) * 4, 'official', 1.0)
  with pytest.raises(ValueError, match='Unknown budget'):
    losses.budget_loss(gate, (16, 8), (0.5, 0.5), 'bogus', 1.0)


def test_hinge_losses():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  np.testing.assert_allclose(
      losses.hinge_d_loss(real, fake),
      0.5 * (np.mean([0, 0.5, 2.0]) + np.mean([0, 1.0, 2.0])), rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_g_loss(fake), 1 / 3, rtol=1e-6)
  np.testing.assert_array_equal(losses.disc_factor(jnp.array(4), 5), 0.0)
  np.testing.assert_array_equal(losses.disc_factor(jnp.array(5), 5), 1.0)


def test_adaptive_weight_equals_direct_computation():
  """Gradients via conv_kernel_grad equal jax.grad w.r.t. conv_out's kernel."""
  conv = nn.Conv(3, (3, 3), padding=1)
  feats = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  target = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  params = conv.init(jax.random.key(2), feats)
  disc_w = jax.random.normal(jax.random.key(3), (3,))
  nll_fn = lambda y: jnp.mean(jnp.abs(y - target)) + jnp.mean(y ** 2)
  g_fn = lambda y: -jnp.mean(jnp.tanh(y) @ disc_w)

  def through(fn):
    return jax.grad(lambda p: fn(conv.apply(p, feats)))(params)['params']['kernel']

  direct_nll, direct_g = through(nll_fn), through(g_fn)
  expected = min(np.linalg.norm(direct_nll) /
                 (np.linalg.norm(direct_g) + 1e-4), 1e4) * 0.8
  x_hat = conv.apply(params, feats)
  nll_grad, g_grad = jax.grad(nll_fn)(x_hat), jax.grad(g_fn)(x_hat)
  value = losses.adaptive_gan_weight(feats, nll_grad, g_grad,
                                     disc_weight=0.8, max_weight=None)
  np.testing.assert_allclose(value, expected, rtol=1e-4)
  np.testing.assert_allclose(
      losses.conv_kernel_grad(feats, nll_grad), direct_nll,
      rtol=1e-4, atol=1e-7)
  capped = losses.adaptive_gan_weight(feats, nll_grad, g_grad, 0.8, 1e-3)
  np.testing.assert_allclose(capped, min(expected, 1e-3), rtol=1e-4)


def test_token_losses_match_numpy_reference():
  """Official stage-2 loss: content CE over non-pad targets; position CE
  averaged per granularity, then over granularities."""
  rng = np.random.RandomState(0)
  b, t, vp, vc = 3, 7, 11, 9
  pos_logits = rng.randn(b, t, vp).astype(np.float32)
  con_logits = rng.randn(b, t, vc).astype(np.float32)
  targets = {'position': rng.randint(0, vp, (b, t)),
             'content': rng.randint(0, vc, (b, t)),
             'grain': np.repeat(np.array([[0, 0, 0, 1, 1, 1, 1]]), b, 0),
             'pad': rng.rand(b, t) < 0.3}
  targets['pad'][:, 0] = targets['pad'][:, 3] = False  # both grains present
  sums = losses.token_loss_sums(jnp.asarray(pos_logits),
                                jnp.asarray(con_logits),
                                {k: jnp.asarray(v) for k, v in targets.items()},
                                num_grains=2)
  out = losses.token_losses(sums, 2, content_weight=1.0, position_weight=0.5)

  def ce(logits, tgt):
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]

  valid = ~targets['pad']
  content = ce(con_logits, targets['content'])[valid].mean()
  pos = ce(pos_logits, targets['position'])
  per_grain = [pos[valid & (targets['grain'] == k)].mean() for k in (0, 1)]
  np.testing.assert_allclose(out['content_loss'], content, rtol=1e-5)
  np.testing.assert_allclose(out['position_loss_0'], per_grain[0], rtol=1e-5)
  np.testing.assert_allclose(out['position_loss'], np.mean(per_grain),
                             rtol=1e-5)
  np.testing.assert_allclose(out['loss'], content + 0.5 * np.mean(per_grain),
                             rtol=1e-5)
  acc = (con_logits.argmax(-1) == targets['content'])[valid].mean()
  np.testing.assert_allclose(out['content_accuracy'], acc, rtol=1e-6)
