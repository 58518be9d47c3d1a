"""Routers and grain merging: Gumbel straight-through, keys, replication."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq.models import entropy as entropy_lib
from dqvq.models import granularity as grain_lib
from dqvq.models import layers
from dqvq.models import router as router_lib


def _features(key, batch=2, grid=4, channels=32, factors=(16, 8)):
  keys = jax.random.split(key, len(factors))
  return [jax.random.normal(k, (batch, grid * factors[0] // f,
                                grid * factors[0] // f, channels))
          for k, f in zip(keys, factors)]


def _init_router(factors=(16, 8), gate_type='mlp'):
  r = router_lib.FeatureRouter(factors, gate_type)
  feats = _features(jax.random.key(0), factors=factors)
  params = r.init({'params': jax.random.key(1)}, feats, train=False)
  return r, params, feats


@pytest.mark.parametrize('factors', [(16, 8), (32, 16, 8)])
@pytest.mark.parametrize('gate_type', ['mlp', 'linear'])
def test_straight_through_forward_is_one_hot_and_gradient_flows(factors,
                                                                gate_type):
  r, params, feats = _init_router(factors, gate_type)

  def f(p):
    out = r.apply(p, feats, train=True, rngs={'gumbel': jax.random.key(7)})
    weights = jnp.arange(1.0, len(factors) + 1.0)
    return jnp.sum(out.gate * weights) + jnp.sum(out.gate_scale), out

  (_, out), grads = jax.value_and_grad(f, has_aux=True)(params)
  gate = np.asarray(out.gate)
  assert set(np.unique(gate)) <= {0.0, 1.0}
  np.testing.assert_array_equal(gate.sum(-1), 1.0)
  np.testing.assert_array_equal(np.argmax(gate, -1), out.grain_map)
  np.testing.assert_allclose(out.gate_scale, 1.0, atol=1e-6)
  last = 'gate_2' if gate_type == 'mlp' else 'gate_0'
  g = np.asarray(grads['params'][last]['linear']['kernel'])
  assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_gumbel_st_gradient_is_softmax_gradient():
  logits = jnp.array([[0.3, -0.2, 0.1]])
  key = jax.random.key(3)
  noise = jax.random.gumbel(key, logits.shape)
  w = jnp.array([1.0, 2.0, 5.0])
  g_st = jax.grad(lambda l: jnp.sum(
      router_lib.gumbel_straight_through(l, key, 0.5)[1] * w))(logits)
  g_soft = jax.grad(lambda l: jnp.sum(
      jax.nn.softmax((l + noise) / 0.5) * w))(logits)
  np.testing.assert_allclose(g_st, g_soft, rtol=1e-5)


def test_same_key_same_gate_different_key_different_noise_eval_no_noise():
  r, params, feats = _init_router()
  run = lambda k: r.apply(params, feats, train=True,
                          rngs={'gumbel': jax.random.key(k)})
  a, b, c = run(1), run(1), run(2)
  np.testing.assert_array_equal(a.grain_map, b.grain_map)
  np.testing.assert_array_equal(a.gate, b.gate)
  # Different noise: with 32 regions, the soft gradients/decisions differ.
  ga = jax.grad(lambda p: jnp.sum(r.apply(p, feats, train=True, rngs={
      'gumbel': jax.random.key(1)}).gate[..., 1]))(params)
  gc = jax.grad(lambda p: jnp.sum(r.apply(p, feats, train=True, rngs={
      'gumbel': jax.random.key(2)}).gate[..., 1]))(params)
  assert not np.allclose(ga['params']['gate_2']['linear']['kernel'],
                         gc['params']['gate_2']['linear']['kernel'])
  # Eval: deterministic argmax of the logits, needs no rng, no gate_scale.
  e1 = r.apply(params, feats, train=False)
  np.testing.assert_array_equal(e1.grain_map, np.argmax(e1.logits, -1))
  assert e1.gate_scale is None
  del c


def test_router_concatenates_coarse_first_after_pooling():
  """The gate sees [coarse, avgpool(fine)]: shifting fine features inside a
  region (pooling-invariant) leaves the logits unchanged."""
  r, params, feats = _init_router()
  coarse, fine = feats
  swapped = fine.reshape(2, 4, 2, 4, 2, 32)[:, :, ::-1, :, ::-1].reshape(fine.shape)
  a = r.apply(params, [coarse, fine], train=False).logits
  b = r.apply(params, [coarse, swapped], train=False).logits
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('factors', [(16, 8), (32, 16, 8)])
def test_replication_puts_coarse_feature_on_whole_region(factors):
  feats = _features(jax.random.key(4), factors=factors)
  key = jax.random.key(9)
  gmap = jax.random.randint(key, (2, 4, 4), 0, len(factors))
  merged = np.asarray(grain_lib.merge_grains(feats, gmap, factors))
  r = factors[0] // factors[-1]
  for b in range(2):
    for i in range(4):
      for j in range(4):
        k = int(gmap[b, i, j])
        side = factors[k] // factors[-1]
        src = np.asarray(feats[k])
        for y in range(r):
          for x in range(r):
            fy, fx = i * r + y, j * r + x
            np.testing.assert_array_equal(
                merged[b, fy, fx], src[b, fy // side, fx // side])


@pytest.mark.parametrize('factors', [(16, 8), (32, 16, 8)])
def test_mixture_is_the_merge_forward_and_compares_grains_backward(factors):
  """gate_gradient='mixture': one-hot gate -> exactly `merge_grains`; the
  gradient on gate k of a region is <dL/dmerged, features_k> summed over the
  region's finest cells, so (fine - coarse) says which grain lowers L."""
  feats = _features(jax.random.key(4), factors=factors)
  k = len(factors)
  gmap = jax.random.randint(jax.random.key(9), (2, 4, 4), 0, k)
  one_hot = jax.nn.one_hot(gmap, k)
  np.testing.assert_array_equal(
      grain_lib.mix_grains(feats, one_hot, factors),
      grain_lib.merge_grains(feats, gmap, factors))
  w = jax.random.normal(jax.random.key(5), feats[-1].shape)
  grad = np.asarray(jax.grad(lambda g: jnp.sum(
      grain_lib.mix_grains(feats, g, factors) * w))(one_hot))
  r = factors[0] // factors[-1]
  for j, f in enumerate(factors):
    rep = np.asarray(jnp.repeat(jnp.repeat(feats[j], f // factors[-1], 1),
                                f // factors[-1], 2))
    cells = (rep * np.asarray(w)).sum(-1)  # (B, H, W) on the finest grid
    want = cells.reshape(2, 4, r, 4, r).sum((2, 4))
    np.testing.assert_allclose(grad[..., j], want, rtol=1e-4, atol=1e-4)


def test_code_weight_mask_values():
  gmap = jnp.array([[[0, 1], [2, 0]]])
  mask = np.asarray(grain_lib.code_weight_mask(gmap, (32, 16, 8)))
  assert mask.shape == (1, 8, 8)
  np.testing.assert_allclose(mask[0, :4, :4], 1 / 16)
  np.testing.assert_allclose(mask[0, :4, 4:], 1 / 4)
  np.testing.assert_allclose(mask[0, 4:, :4], 1.0)
  # Each distinct code weighs 1: a region's mask sums to its number of codes.
  np.testing.assert_allclose(
      [mask[0, :4, :4].sum(), mask[0, :4, 4:].sum(), mask[0, 4:, :4].sum()],
      grain_lib.codes_per_region((32, 16, 8)))


def test_random_router_exact_shares_and_reproducible():
  r = router_lib.RandomRouter((16, 8), (0.75, 0.25))
  out = r.apply({}, 4, (4, 4), rngs={'router': jax.random.key(0)})
  again = r.apply({}, 4, (4, 4), rngs={'router': jax.random.key(0)})
  other = r.apply({}, 4, (4, 4), rngs={'router': jax.random.key(1)})
  np.testing.assert_array_equal(np.asarray(out.grain_map).sum((1, 2)), [4] * 4)
  np.testing.assert_array_equal(out.grain_map, again.grain_map)
  assert not np.array_equal(out.grain_map, other.grain_map)


def test_expected_inference_keeps_the_expected_count_where_argmax_collapses():
  """A gate that learned only the budget's prior (the same p_fine = 0.3 in
  every region, plus a tiny per-region ranking): argmax codes every region
  coarse; 'expected' gives each image round(0.3 n) fine regions, its
  top-ranked ones; with a per-image spread of p, per-image counts."""
  factors = (16, 8)
  feats = _features(jax.random.key(0), factors=factors)  # 2 images, 4 x 4
  r = router_lib.FeatureRouter(factors, 'linear', inference='expected')
  params = r.init({'params': jax.random.key(1)}, feats, train=False)
  bias = np.log(0.3 / 0.7)

  p = jax.tree.map(np.asarray, params)
  gate = p['params']['gate_0']['linear']
  gate['kernel'] = gate['kernel'] * 1e-4
  gate['bias'] = np.array([0.0, bias], np.float32)
  f = feats
  expected = np.asarray(r.apply(p, f, train=False).grain_map)
  argmax = np.asarray(router_lib.FeatureRouter(factors, 'linear').apply(
      p, f, train=False).grain_map)
  assert argmax.sum() == 0
  np.testing.assert_array_equal(expected.sum((1, 2)), [round(0.3 * 16)] * 2)
  # The fine regions are the gate's top-ranked ones.
  logits = np.asarray(r.apply(p, f, train=False).logits)
  diff = (logits[..., 1] - logits[..., 0]).reshape(2, -1)
  for b in range(2):
    top = np.argsort(-diff[b], kind='stable')[:5]
    assert set(np.flatnonzero(expected[b].reshape(-1))) == set(top)
  with pytest.raises(ValueError, match='Unknown router inference'):
    router_lib.FeatureRouter(factors, 'linear', inference='mode').apply(
        p, f, train=False)


def test_inference_train_routing_routes_as_inference_with_softmax_gradient():
  """train_routing='inference': training takes the inference decision (no
  Gumbel draw: the same map for any key) and its gate carries the softmax's
  gradient, so the budget loss still trains the logits."""
  factors = (16, 8)
  feats = _features(jax.random.key(0), factors=factors)
  r = router_lib.FeatureRouter(factors, 'linear', inference='expected',
                               train_routing='inference')
  params = r.init({'params': jax.random.key(1)}, feats, train=False)
  at_eval = r.apply(params, feats, train=False)
  for seed in (0, 1):
    routed = r.apply(params, feats, train=True,
                     rngs={'gumbel': jax.random.key(seed)})
    np.testing.assert_array_equal(routed.grain_map, at_eval.grain_map)
    np.testing.assert_array_equal(
        routed.gate, jax.nn.one_hot(at_eval.grain_map, 2))
  gumbel = router_lib.FeatureRouter(factors, 'linear', inference='expected')
  draws = [np.asarray(gumbel.apply(params, feats, train=True, rngs={
      'gumbel': jax.random.key(s)}).grain_map) for s in (0, 1)]
  assert (draws[0] != draws[1]).any()

  def fine_share(p):
    gate = r.apply(p, feats, train=True,
                   rngs={'gumbel': jax.random.key(0)}).gate
    return jnp.mean(gate[..., 1])

  grad = jax.grad(fine_share)(params)['params']['gate_0']['linear']['bias']
  logits = at_eval.logits
  soft = jax.nn.softmax(logits, axis=-1)
  want = jnp.mean(soft[..., 1] * soft[..., 0])  # d mean p1 / d bias_1
  np.testing.assert_allclose(grad[1], want, rtol=1e-5)
  with pytest.raises(ValueError, match='train_routing'):
    router_lib.FeatureRouter(factors, 'linear', train_routing='x').apply(
        params, feats, train=True, rngs={'gumbel': jax.random.key(0)})


def test_assign_grains_by_counts_per_image():
  scores = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4)))
  counts = jnp.asarray([[9, 2], [0, 0], [16, 16]])
  grains = np.asarray(entropy_lib.assign_grains_by_counts(scores, counts))
  for b, (ge1, ge2) in enumerate(np.asarray(counts)):
    assert (grains[b] >= 1).sum() == ge1 and (grains[b] >= 2).sum() == ge2
    order = np.argsort(-np.asarray(scores[b]).reshape(-1), kind='stable')
    np.testing.assert_array_equal(
        np.sort(grains[b].reshape(-1)[order])[::-1], grains[b].reshape(-1)[order])
  np.testing.assert_array_equal(
      entropy_lib.assign_grains_by_quota(scores, (0.25, 0.5, 0.25)),
      entropy_lib.assign_grains_by_counts(scores, jnp.asarray([12, 4])))


def test_mean_std_inputs_see_the_spread_within_a_region():
  """inputs='mean_std': the gate reads the paper's pooled means and, per fine
  channel, the spread of the normalised fine features within each region:
  ~0 where a region is flat, > 0 where it varies."""
  factors = (16, 8)
  coarse, fine = _features(jax.random.key(0), factors=factors)
  flat = layers.nearest_upsample(layers.avg_pool(fine, 2), 2)
  # Half the regions (the left half) vary around their own mean.
  sign = jnp.tile(jnp.array([[1.0, -1.0], [-1.0, 1.0]]),
                  (4, 4))[None, ..., None]
  varied = flat + 3.0 * sign * (jnp.arange(8) < 4)[None, None, :, None]
  inputs = {}
  for mode in router_lib.ROUTER_INPUTS:
    r = router_lib.FeatureRouter(factors, 'linear', inputs=mode)
    params = r.init({'params': jax.random.key(1)}, [coarse, varied],
                    train=False)
    _, state = r.apply(params, [coarse, varied], train=False,
                       mutable=['intermediates'])
    inputs[mode] = np.asarray(state['intermediates']['gate_inputs'][0])
  assert inputs['mean'].shape[-1] == 64 and inputs['mean_std'].shape[-1] == 96
  np.testing.assert_allclose(inputs['mean_std'][..., :64], inputs['mean'],
                             rtol=1e-6)
  spread = inputs['mean_std'][..., 64:]  # (B, 4, 4, 32)
  assert spread[:, :, 2:].max() < 1e-2  # flat regions
  assert spread[:, :, :2].min() > 0.1  # varied regions


def test_mean_logstd_inputs_keep_each_image_s_own_scale():
  """inputs='mean_logstd': the spread within a region of the features before
  the per-image GroupNorm, so that of two images with the same pattern, the
  one with twice the contrast reads log(2) higher; 'mean_std' (after the
  norm) cannot tell them apart."""
  factors = (16, 8)
  coarse, fine = _features(jax.random.key(0), batch=1, factors=factors)
  both = [jnp.concatenate([coarse, coarse]), jnp.concatenate([fine, 2 * fine])]
  spread = {}
  for mode in ('mean_std', 'mean_logstd'):
    r = router_lib.FeatureRouter(factors, 'linear', inputs=mode)
    params = r.init({'params': jax.random.key(1)}, both, train=False)
    _, state = r.apply(params, both, train=False, mutable=['intermediates'])
    spread[mode] = np.asarray(state['intermediates']['gate_inputs'][0])[
        ..., 64:]
  assert spread['mean_logstd'].shape == spread['mean_std'].shape
  np.testing.assert_allclose(spread['mean_std'][0], spread['mean_std'][1],
                             atol=1e-4)
  logstd = spread['mean_logstd']
  np.testing.assert_allclose(logstd[1] - logstd[0], np.log(2.0), atol=1e-3)
