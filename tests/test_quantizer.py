"""EMA vector quantizer against a NumPy reference, and under sharding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dqvq.models import quantizer as q_lib


def _reference_step(emb, cluster, embed_sum, x, key, decay, restart):
  """The official VectorQuantize2 training step, written in NumPy float64."""
  emb, cluster, embed_sum, x = (np.asarray(a, np.float64)
                                for a in (emb, cluster, embed_sum, x))
  k, d = emb.shape
  dist = ((x[:, None, :] - emb[None]) ** 2).sum(-1)
  codes = dist.argmin(-1)
  z_q = emb[codes]
  counts = np.bincount(codes, minlength=k).astype(np.float64)
  sums = np.zeros_like(embed_sum)
  np.add.at(sums, codes, x)
  cluster = decay * cluster + (1 - decay) * counts
  embed_sum = decay * embed_sum + (1 - decay) * sums
  if restart:
    noise_key, perm_key = jax.random.split(key)
    pool = x
    if x.shape[0] < k:
      reps = math.ceil(k / x.shape[0])
      pool = np.tile(x, (reps, 1))
      pool = pool + np.asarray(jax.random.uniform(noise_key, pool.shape),
                               np.float64) * (0.01 / math.sqrt(d))
    perm = np.asarray(jax.random.permutation(perm_key, pool.shape[0]))[:k]
    used = cluster >= 1
    embed_sum = np.where(used[:, None], embed_sum, pool[perm])
    cluster = np.where(used, cluster, 1.0)
  n = cluster.sum()
  smoothed = n * (cluster + 1e-5) / (n + k * 1e-5)
  return codes, z_q, cluster, embed_sum, embed_sum / smoothed[:, None]


def _init(k=8, d=4, batch=2, side=2, seed=0):
  vq = q_lib.VectorQuantizer(codebook_size=k, codebook_dim=d, decay=0.9)
  z = jax.random.normal(jax.random.key(seed), (batch, side, side, d))
  variables = vq.init({'params': jax.random.key(1)}, z)
  # A codebook state where some codes are alive and some are dead.
  cb = variables['codebook']
  cb = {**cb, 'embedding': jax.random.normal(jax.random.key(2), (k, d)),
        'cluster_size': jnp.array([5.0, 0.2, 3.0, 0.0, 1.5, 0.9, 2.0, 0.0])[:k],
        'embed_sum': jax.random.normal(jax.random.key(3), (k, d))}
  return vq, z, cb


def test_ema_and_restart_functions_match_numpy_reference():
  _, z, cb = _init()
  x = z.reshape(-1, 4)
  key = jax.random.key(11)
  codes = q_lib.nearest_codes(x, cb['embedding'])
  cluster, embed, counts = q_lib.ema_update(cb['cluster_size'], cb['embed_sum'],
                                            x, codes, 0.9)
  cluster, embed = q_lib.restart_dead_codes(cluster, embed, x, key)
  emb = q_lib.codebook_from_ema(cluster, embed)
  ref_codes, _, ref_cluster, ref_sum, ref_emb = _reference_step(
      cb['embedding'], cb['cluster_size'], cb['embed_sum'], x, key, 0.9, True)
  np.testing.assert_array_equal(codes, ref_codes)
  np.testing.assert_allclose(counts.sum(), x.shape[0])
  np.testing.assert_allclose(cluster, ref_cluster, rtol=1e-5)
  np.testing.assert_allclose(embed, ref_sum, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(emb, ref_emb, rtol=1e-5, atol=1e-6)
  assert np.sum(np.asarray(cluster) == 1.0) >= 1  # some codes were restarted


def test_restart_tiles_small_batches_with_jitter():
  cluster = jnp.zeros((8,))
  embed = jnp.zeros((8, 2))
  x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  new_cluster, new_embed = q_lib.restart_dead_codes(cluster, embed, x,
                                                    jax.random.key(0))
  np.testing.assert_array_equal(new_cluster, 1.0)
  rows = np.asarray(new_embed)
  # Every restarted row is a batch vector plus jitter below 0.01/sqrt(2).
  dist = np.abs(rows[:, None, :] - np.asarray(x)[None]).max(-1).min(-1)
  assert np.all(dist < 0.01 / np.sqrt(2))
  assert len({tuple(r) for r in rows.round(7)}) == 8  # all distinct


def test_module_step_matches_reference_on_live_codes():
  vq, z, cb = _init()
  (z_st, codes, aux), state = vq.apply(
      {'codebook': cb}, z, train=True, rngs={'restart': jax.random.key(11)},
      mutable=['codebook'])
  x = np.asarray(z).reshape(-1, 4)
  ref_codes, ref_zq, ref_cluster, ref_sum, ref_emb = _reference_step(
      cb['embedding'], cb['cluster_size'], cb['embed_sum'], x, None, 0.9, False)
  np.testing.assert_array_equal(np.asarray(codes).ravel(), ref_codes)
  # Output uses the pre-update codebook.
  np.testing.assert_allclose(np.asarray(z_st).reshape(-1, 4), ref_zq, atol=1e-5)
  new = state['codebook']
  live = ref_cluster >= 1
  np.testing.assert_allclose(np.asarray(new['embed_sum'])[live], ref_sum[live],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new['cluster_size'])[~live], 1.0)
  # Restarted rows are vectors of the batch.
  restarted = np.asarray(new['embed_sum'])[~live]
  assert np.all(np.abs(restarted[:, None] - x[None]).max(-1).min(-1) < 1e-6)
  assert 0.0 < float(aux['codebook_usage']) <= 1.0


def test_no_restart_and_eval_leave_dead_codes():
  vq, z, cb = _init()
  vq = vq.clone(restart_unused=False)
  (_, _, _), state = vq.apply({'codebook': cb}, z, train=True,
                              mutable=['codebook'])
  ref = _reference_step(cb['embedding'], cb['cluster_size'], cb['embed_sum'],
                        z.reshape(-1, 4), None, 0.9, False)
  np.testing.assert_allclose(state['codebook']['embedding'], ref[4], rtol=1e-5,
                             atol=1e-6)
  # Eval: no update at all.
  _, state = vq.apply({'codebook': cb}, z, train=False, mutable=['codebook'])
  for name in cb:
    np.testing.assert_array_equal(state['codebook'][name], cb[name])


def test_commitment_loss_weights_and_straight_through():
  vq, z, cb = _init()
  mask = jnp.array([[[0.25, 1.0], [1.0, 0.25]]] * 2)

  def loss(z):
    z_st, _, aux = vq.apply({'codebook': cb}, z, mask)
    return aux['q_loss'], (z_st, aux)

  (value, (z_st, aux)), grad = jax.value_and_grad(loss, has_aux=True)(z)
  codes = q_lib.nearest_codes(z.reshape(-1, 4), cb['embedding'])
  z_q = np.asarray(cb['embedding'])[np.asarray(codes)].reshape(z.shape)
  sq = (z_q - np.asarray(z)) ** 2 * np.asarray(mask)[..., None]
  np.testing.assert_allclose(aux['commitment_loss'], 0.25 * sq.mean(), rtol=1e-5)
  np.testing.assert_allclose(value, 1.25 * sq.mean(), rtol=1e-5)
  # Only the beta term has a gradient: d/dz beta*mean(m (z - zq)^2).
  expected = 0.25 * 2 * (np.asarray(z) - z_q) * np.asarray(mask)[..., None] / sq.size
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
  # Straight-through: forward value is the code vector, gradient is identity.
  np.testing.assert_allclose(z_st, z_q, atol=1e-6)
  g = jax.grad(lambda z: jnp.sum(vq.apply({'codebook': cb}, z)[0] * 3.0))(z)
  np.testing.assert_allclose(g, 3.0)


def test_sharded_update_equals_single_device():
  """The EMA statistics cover the global batch: 8 devices == 1 device."""
  k, d = 16, 8
  vq = q_lib.VectorQuantizer(codebook_size=k, codebook_dim=d)
  z = jax.random.normal(jax.random.key(0), (8, 4, 4, d))
  variables = vq.init({'params': jax.random.key(1)}, z)

  def step(variables, z):
    (_, codes, aux), state = vq.apply(variables, z, train=True,
                                      rngs={'restart': jax.random.key(5)},
                                      mutable=['codebook'])
    return codes, aux['perplexity'], state

  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8, 1),
                           ('data', 'fsdp'),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
  z_sharded = jax.device_put(z, NamedSharding(mesh, P('data')))
  assert len(z_sharded.sharding.device_set) == 8
  single = jax.jit(step)(variables, z)
  sharded = jax.jit(step)(variables, z_sharded)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_usage_stats():
  stats = q_lib.usage_stats(jnp.array([2.0, 2.0, 0.0, 0.0]))
  np.testing.assert_allclose(stats['codebook_usage'], 0.5)
  np.testing.assert_allclose(stats['perplexity'], 2.0, rtol=1e-6)
