"""Vector quantizers with an EMA codebook and dead-code restart.

`VectorQuantizer` ('ema', the default) is the official one below;
`CosineQuantizer` ('cosine') is the same with features and codes
l2-normalised (its docstring says why it keeps the EMA). The third choice of
`config.model.quantizer`, FSQ, has no codebook to learn (`dqvq.models.fsq`).

This is the official `VectorQuantize2` (RQ-VAE style), not the paper's plain
VQ: the codebook is not trained by gradients but follows an exponential moving
average of the vectors assigned to each code, and codes whose EMA count falls
below one are restarted from random vectors of the current batch.

State lives in the 'codebook' variable collection (`embedding`, and the EMA
statistics `cluster_size` and `embed_sum`), so optimizers never see it and a
training step updates it by running `apply(..., mutable=['codebook'])`.

Sharding: under `jax.jit` the batch is one global array, so the counts and
sums below already cover every data-parallel device and an 8-device step
equals a 1-device step on the same global batch. Under `shard_map`/`pmap`,
set `axis_name` and they are summed with `psum` instead.

Differences from the official code, on purpose: `embed_sum` starts equal to
the codebook (the official one starts from unrelated N(0, 1) draws, bug 21);
restart vectors are drawn from the global batch (the official draws from rank
0's shard); there is no unused padding row (the importer drops row 1024).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


def nearest_codes(x: Array, codebook: Array) -> Array:
  """argmin_k ||x - e_k||^2 over the last axis, first index on ties."""
  d = (jnp.sum(x * x, axis=-1, keepdims=True) + jnp.sum(codebook ** 2, axis=-1)
       - 2.0 * jnp.matmul(x, codebook.T, precision=_HIGHEST))
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


def ema_update(cluster_size: Array, embed_sum: Array, x: Array, codes: Array,
               decay: float, axis_name: str | None = None
               ) -> tuple[Array, Array, Array]:
  """One EMA step of the per-code counts and vector sums.

  Returns (cluster_size, embed_sum, batch_counts). `x` is (N, D), `codes`
  (N,); every vector counts once (replicated coarse cells count once per
  cell, as in the official code).
  """
  one_hot = jax.nn.one_hot(codes, cluster_size.shape[0], dtype=jnp.float32)
  counts = one_hot.sum(axis=0)
  sums = jnp.matmul(one_hot.T, x, precision=_HIGHEST)
  if axis_name is not None:
    counts, sums = jax.lax.psum((counts, sums), axis_name)
  cluster_size = decay * cluster_size + (1.0 - decay) * counts
  embed_sum = decay * embed_sum + (1.0 - decay) * sums
  return cluster_size, embed_sum, counts


def restart_dead_codes(cluster_size: Array, embed_sum: Array, x: Array,
                       key: Array) -> tuple[Array, Array]:
  """Replaces codes with EMA count < 1 by random vectors of the batch.

  When the batch holds fewer vectors than codes it is tiled and jittered with
  U[0, 1) * 0.01 / sqrt(D), as the official code, so restarted codes differ.
  """
  num_codes, dim = embed_sum.shape
  n = x.shape[0]
  noise_key, perm_key = jax.random.split(key)
  if n < num_codes:
    reps = math.ceil(num_codes / n)
    x = jnp.tile(x, (reps, 1))
    x = x + jax.random.uniform(noise_key, x.shape) * (0.01 / math.sqrt(dim))
  candidates = x[jax.random.permutation(perm_key, x.shape[0])[:num_codes]]
  used = cluster_size >= 1.0
  embed_sum = jnp.where(used[:, None], embed_sum, candidates)
  cluster_size = jnp.where(used, cluster_size, 1.0)
  return cluster_size, embed_sum


def codebook_from_ema(cluster_size: Array, embed_sum: Array,
                      eps: float = 1e-5) -> Array:
  """Laplace-smoothed cluster means: the codebook implied by the EMA state."""
  n = cluster_size.sum()
  smoothed = n * (cluster_size + eps) / (n + cluster_size.shape[0] * eps)
  return embed_sum / smoothed[:, None]


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  """x / max(||x||, eps) over the last axis.

  The floor keeps a zero vector zero, with a zero gradient, where x / ||x||
  would give NaN.
  """
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def max_cosine_codes(x: Array, codebook: Array) -> Array:
  """argmax_k cos(x, e_k) over the last axis, first index on ties."""
  sim = jnp.matmul(l2_normalize(x), l2_normalize(codebook).T,
                   precision=_HIGHEST)
  return jnp.argmax(sim, axis=-1).astype(jnp.int32)


def usage_stats(counts: Array) -> dict[str, Array]:
  """Share of codes used in a batch and the perplexity of the code histogram."""
  p = counts / jnp.maximum(counts.sum(), 1.0)
  perplexity = jnp.exp(-jnp.sum(jax.scipy.special.xlogy(p, p)))
  return {'codebook_usage': jnp.mean(counts > 0), 'perplexity': perplexity}


class VectorQuantizer(nn.Module):
  """Quantizes (B, H, W, D) latents against a (K, D) EMA codebook.

  Attributes:
    codebook_size: K (paper: 1024).
    codebook_dim: D (paper: 256).
    beta: commitment weight (official 0.25).
    decay: EMA decay (official 0.99).
    restart_unused: restart dead codes from the batch (official True).
    axis_name: psum axis for statistics under shard_map/pmap; None under jit.
  """
  codebook_size: int = 1024
  codebook_dim: int = 256
  beta: float = 0.25
  decay: float = 0.99
  restart_unused: bool = True
  eps: float = 1e-5
  axis_name: str | None = None

  def setup(self):
    k, d = self.codebook_size, self.codebook_dim
    self.embedding = self.variable(
        'codebook', 'embedding',
        lambda: self._initial_codebook(jax.random.uniform(
            self.make_rng('params'), (k, d), jnp.float32, -1.0 / k, 1.0 / k)))
    self.cluster_size = self.variable('codebook', 'cluster_size',
                                      lambda: jnp.zeros((k,), jnp.float32))
    self.embed_sum = self.variable('codebook', 'embed_sum',
                                   lambda: self.embedding.value)

  # What the cosine codebook changes (CosineQuantizer); the identity and the
  # plain squared distance here.
  def _initial_codebook(self, codebook: Array) -> Array:
    return codebook

  def _features(self, z: Array) -> Array:
    """The vectors that are quantized and that the EMA averages."""
    return z

  def _assign(self, flat: Array, codebook: Array) -> Array:
    return nearest_codes(flat, codebook)

  def _codebook_from_ema(self, cluster_size: Array, embed_sum: Array
                         ) -> Array:
    return codebook_from_ema(cluster_size, embed_sum, self.eps)

  def lookup(self, codes: Array) -> Array:
    """Code ids (any shape) -> vectors (..., D)."""
    return jnp.take(self.embedding.value, codes, axis=0)

  def nearest(self, z: Array) -> Array:
    """The codebook vector nearest to each latent (..., D); no update, no
    gradient. What the decoder would get if these latents were coded."""
    codebook = jax.lax.stop_gradient(self.embedding.value)
    flat = self._features(jax.lax.stop_gradient(z).astype(jnp.float32)
                          ).reshape(-1, self.codebook_dim)
    return jnp.take(codebook, self._assign(flat, codebook),
                    axis=0).reshape(z.shape)

  def __call__(self, z: Array, weight_mask: Array | None = None,
               train: bool = False) -> tuple[Array, Array, dict[str, Array]]:
    """Returns (straight-through quantized z, codes (B, H, W), aux losses).

    Args:
      z: (B, H, W, D) latents.
      weight_mask: (B, H, W) per-cell weight of the commitment loss (the code
        weight mask); None weighs every cell 1.
      train: update the EMA codebook (needs mutable 'codebook' and, with
        restarts, a 'restart' rng).
    """
    if z.shape[-1] != self.codebook_dim:
      raise ValueError(f'latent channels {z.shape[-1]} != codebook_dim '
                       f'{self.codebook_dim}; set z_channels = codebook_dim.')
    z = self._features(z.astype(jnp.float32))
    flat = z.reshape(-1, self.codebook_dim)
    codebook = self.embedding.value
    codes = self._assign(flat, codebook)
    z_q = jnp.take(codebook, codes, axis=0).reshape(z.shape)

    mask = 1.0 if weight_mask is None else weight_mask[..., None]
    commitment = self.beta * jnp.mean(
        (jax.lax.stop_gradient(z_q) - z) ** 2 * mask)
    # The codebook term has no gradient at all (the codebook is an EMA, not a
    # parameter); it is kept so the logged loss matches the official value.
    codebook_term = jax.lax.stop_gradient(jnp.mean((z_q - z) ** 2 * mask))

    if train and not self.is_initializing():
      cluster, embed, counts = ema_update(
          self.cluster_size.value, self.embed_sum.value,
          jax.lax.stop_gradient(flat), codes, self.decay, self.axis_name)
      if self.restart_unused:
        pool = jax.lax.stop_gradient(flat)
        if self.axis_name is not None:
          # Same key and same gathered pool on every device: identical codebooks.
          pool = jax.lax.all_gather(pool, self.axis_name, tiled=True)
        cluster, embed = restart_dead_codes(cluster, embed, pool,
                                            self.make_rng('restart'))
      self.cluster_size.value = cluster
      self.embed_sum.value = embed
      self.embedding.value = self._codebook_from_ema(cluster, embed)
    else:
      counts = jax.ops.segment_sum(jnp.ones_like(codes, jnp.float32), codes,
                                   self.codebook_size)
      if self.axis_name is not None:
        counts = jax.lax.psum(counts, self.axis_name)

    z_st = z + jax.lax.stop_gradient(z_q - z)
    aux = {'q_loss': commitment + codebook_term, 'commitment_loss': commitment,
           'codebook_loss': codebook_term, **usage_stats(counts)}
    return z_st, codes.reshape(z.shape[:-1]), aux


class CosineQuantizer(VectorQuantizer):
  """The EMA quantizer on the unit sphere: an l2-normalised codebook.

  Features and codes are l2-normalised before the nearest-neighbour search
  (ViT-VQGAN, Yu et al. 2022; improved VQGAN), so a code is chosen by
  direction alone: the search is the maximum cosine similarity, and no code
  can be left behind because the features' norm drifted away from it. The
  decoder gets unit vectors (the straight-through estimate of the
  normalised feature), and the commitment loss pulls the normalised feature
  towards its code, its gradient going back through the normalisation.

  The codebook keeps the EMA update rather than learning by gradient with a
  codebook loss, for three reasons:
  * it is the optimum the codebook loss only approaches: for fixed
    assignments, the unit vector with the largest summed cosine to its
    features is their normalised mean, which is what the EMA's cluster mean,
    renormalised, tracks (spherical k-means, online);
  * a codebook learned by gradient moves at the generator's learning rate
    and warm-up (Adam's step, whatever its distance to the cluster mean)
    and would want a rate of its own; the EMA moves each code a fixed
    1 - decay of the way to its cluster's mean at every step;
  * the dead-code restart, the other half of high codebook usage, needs the
    EMA's counts, and the state keeps the EMA quantizer's tree
    ('codebook': embedding, cluster_size, embed_sum; same shapes), so every
    user of it works unchanged.
  `embedding` holds the normalised codebook, so `lookup` is a plain gather.
  """

  def _initial_codebook(self, codebook: Array) -> Array:
    return l2_normalize(codebook)

  def _features(self, z: Array) -> Array:
    return l2_normalize(z)

  def _assign(self, flat: Array, codebook: Array) -> Array:
    return max_cosine_codes(flat, codebook)

  def _codebook_from_ema(self, cluster_size: Array, embed_sum: Array
                         ) -> Array:
    return l2_normalize(codebook_from_ema(cluster_size, embed_sum, self.eps))
