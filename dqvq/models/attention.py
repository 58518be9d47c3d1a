"""Pre-LN causal self-attention blocks of the DQ-Transformer (official names).

The official StackGPT's `CausalSelfAttention` and `Block`, with logical axis
names on every weight ('embed', 'mlp', 'heads', 'vocab') for FSDP sharding.
Two paths share the weights: the full causal forward (training, teacher
forcing) and one token at a time against a KV cache (sampling, the codec).
Pads are masked out as keys, so what an image's tokens see never depends
on how much padding its layout has; attention goes through
`jax.nn.dot_product_attention` so accelerators get fused kernels (dropout on
attention probabilities, which the fused path cannot do, falls back to an
explicit softmax in training).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def init(names: tuple[str | None, ...], init=nn.initializers.normal(0.02)):
  return nn.with_logical_partitioning(init, names)


def dense(features: int, names: tuple[str, str], name: str, dtype: Any,
           use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=init(names),
                  bias_init=nn.with_logical_partitioning(
                      nn.initializers.zeros, (names[1],)))


def layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(
                          nn.initializers.ones, ('embed',)),
                      bias_init=nn.with_logical_partitioning(
                          nn.initializers.zeros, ('embed',)))


def attention_mask(key_pad: Array) -> Array:
  """(B, 1, T, T) causal mask that also hides pad keys."""
  t = key_pad.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  return causal[None, None] & ~key_pad[:, None, None, :]


class SelfAttention(nn.Module):
  """Multi-head causal self-attention with separate q/k/v (official names).

  With `cache` (the decode path) `x` is one new token per sample: its key and
  value are written at `slot` of the (keys, values) cache and its query
  attends over the cache, `mask` being (B, T) valid keys (written, not pad).
  The same q/k/v/proj layers run either way, so params are shared.
  """
  num_heads: int
  dropout: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, mask: Array, train: bool,
               cache: tuple[Array, Array] | None = None,
               slot: Array | None = None) -> Any:
    b, t, e = x.shape
    d = e // self.num_heads
    split = lambda y: y.reshape(b, t, self.num_heads, d)
    q, k, v = (split(dense(e, ('embed', 'heads'), n, self.dtype)(x))
               for n in ('query', 'key', 'value'))
    if cache is not None:
      # Cache layout (B, H, T, D): heads lead, so the single-query products
      # are plain batched matmuls with no transpose of the whole cache.
      heads_first = lambda y: jnp.swapaxes(y, 1, 2)
      keys = jax.lax.dynamic_update_slice_in_dim(
          cache[0], heads_first(k).astype(cache[0].dtype), slot, axis=2)
      values = jax.lax.dynamic_update_slice_in_dim(
          cache[1], heads_first(v).astype(cache[1].dtype), slot, axis=2)
      out = single_query_attention(q, keys, values, mask)
      proj = dense(e, ('heads', 'embed'), 'proj', self.dtype)
      return proj(out.reshape(b, t, e)), (keys, values)
    if train and self.dropout > 0:
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(d).astype(q.dtype)
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
      probs = jax.nn.softmax(logits.astype(jnp.float32), -1).astype(v.dtype)
      probs = nn.Dropout(self.dropout)(probs, deterministic=False)
      out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return dense(e, ('heads', 'embed'), 'proj', self.dtype)(
        out.reshape(b, t, e))


def single_query_attention(q: Array, keys: Array, values: Array,
                            key_valid: Array) -> Array:
  """q (B, 1, H, D) over a (B, H, T, D) cache; key_valid (B, T) bool.

  The explicit softmax of `jax.nn.dot_product_attention`'s XLA path (scale,
  masked logits, float32 softmax), so decoding matches the full forward to
  float rounding. Returns (B, 1, H, D).
  """
  d = q.shape[-1]
  logits = jnp.einsum('bqhd,bhkd->bhqk', q, keys.astype(q.dtype))
  logits = logits.astype(jnp.float32) / jnp.sqrt(jnp.float32(d))
  logits = jnp.where(key_valid[:, None, None, :], logits,
                     jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, -1).astype(values.dtype)
  return jnp.einsum('bhqk,bhkd->bqhd', probs, values).astype(q.dtype)


class Block(nn.Module):
  """minGPT pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_ratio: int = 4
  attn_dropout: float = 0.0
  resid_dropout: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, mask: Array, train: bool,
               cache: tuple[Array, Array] | None = None,
               slot: Array | None = None) -> Any:
    """Full forward, or with `cache` one decode step -> (x, new cache)."""
    e = x.shape[-1]
    drop = lambda y: nn.Dropout(self.resid_dropout)(y, deterministic=not train)
    attn = SelfAttention(self.num_heads, self.attn_dropout, self.dtype,
                         name='attn')
    h = attn(layer_norm('ln1', self.dtype)(x), mask, train, cache, slot)
    if cache is not None:
      h, cache = h
    x = x + drop(h)
    h = layer_norm('ln2', self.dtype)(x)
    h = dense(self.mlp_ratio * e, ('embed', 'mlp'), 'mlp_0', self.dtype)(h)
    h = nn.gelu(h, approximate=False)
    h = dense(e, ('mlp', 'embed'), 'mlp_2', self.dtype)(h)
    return x + drop(h) if cache is None else (x + drop(h), cache)
