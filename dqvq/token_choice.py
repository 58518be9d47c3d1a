"""How the sampler picks each token: guidance, filters and the draw.

Kept apart from the loop (`dqvq.sampling`) because these choices are the
knobs users turn (`SamplingConfig`) and the numerics the cached and naive
samplers must share exactly: both call the same functions on the same
logits with the same slot-keyed noise, so any difference between them is the
KV cache's. Per step and stream the order is the official one: guidance
mixes the conditional and null-class logits, then `filter_logits` applies
temperature, the legality mask, top-k and top-p, and `choose` takes the
argmax of the logits plus Gumbel noise (a categorical draw) or, greedy, the
plain argmax.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen (hashable: part of the compiled sampler's key).

  cfg_scale_*: classifier-free guidance, logits = u + s (c - u), with u the
    null-class logits (needs `layout.null_class`); 1.0 everywhere = off (the
    conditional logits, one forward), 0.0 = the null-class logits.
  min_codes / max_codes: per-granularity floors / caps on the number of
    tokens (None = 0 / the stream capacity); see the module docstring.
  temperature must be > 0; top_k 0 and top_p 1.0 turn those filters off.
  seed: the key callers (the CLI, benchmarks) make; the compiled sampler
    itself takes the key as an argument, folding in the slot index per step
    (so the cached and naive samplers draw identically).
  """
  temperature_position: float = 1.0
  temperature_content: float = 1.0
  top_k_position: int = 0
  top_k_content: int = 0
  top_p_position: float = 1.0
  top_p_content: float = 1.0
  greedy: bool = False
  cfg_scale_position: float = 1.0
  cfg_scale_content: float = 1.0
  min_codes: tuple[int, ...] | None = None
  max_codes: tuple[int, ...] | None = None
  seed: int = 0

  def __post_init__(self):
    """Refuses settings with no meaning here, before any sampler compiles.

    Unchecked, a negative top_k or top_p of 0 would filter every token away
    and a temperature of 0 divide by zero: the sampler would still return
    streams, of whatever its masks leave. Count lists become tuples (the
    config is a cache key, so it must hash).
    """
    number = lambda v: (isinstance(v, numbers.Real) and not isinstance(
        v, (bool, np.bool_)) and math.isfinite(v))
    integer = lambda v: isinstance(v, numbers.Integral) and not isinstance(
        v, (bool, np.bool_))
    rules = {
        'temperature': (lambda v: number(v) and v > 0,
                        'a finite number > 0 (greedy=True for argmax)'),
        'top_k': (lambda v: integer(v) and v >= 0, 'an int >= 0 (0 = off)'),
        'top_p': (lambda v: number(v) and 0 < v <= 1,
                  'a number in (0, 1] (1.0 = off)'),
        'cfg_scale': (number, 'a finite number (1.0 = no guidance)'),
    }
    for prefix, (ok, want) in rules.items():
      for name in (f'{prefix}_position', f'{prefix}_content'):
        if not ok(getattr(self, name)):
          raise ValueError(f'SamplingConfig.{name}={getattr(self, name)!r}; '
                           f'give {want}.')
    if not isinstance(self.greedy, (bool, np.bool_)):
      raise ValueError(f'SamplingConfig.greedy={self.greedy!r}; give a bool.')
    if not integer(self.seed):
      raise ValueError(f'SamplingConfig.seed={self.seed!r}; give an int.')
    for name in ('min_codes', 'max_codes'):
      counts = getattr(self, name)
      if counts is None:
        continue
      counts = tuple(counts) if isinstance(
          counts, (tuple, list, np.ndarray)) else None
      if counts is None or not all(integer(c) and c >= 0 for c in counts):
        raise ValueError(f'SamplingConfig.{name}={getattr(self, name)!r}; '
                         'give None or one int >= 0 per granularity, coarse '
                         'to fine.')
      object.__setattr__(self, name, tuple(int(c) for c in counts))

  @property
  def guided(self) -> bool:
    """Whether the sampler must also run the null class (a doubled batch)."""
    return self.cfg_scale_position != 1.0 or self.cfg_scale_content != 1.0


def _below_kth(x: Array, k: int) -> Array:
  """x < (k-th largest of x along -1), exactly, without a sort.

  This is top-k's mask: the official sampler keeps logits >= the k-th
  largest, so ties with the k-th value all stay. XLA:CPU lowers `lax.top_k`
  to a full sort; instead the k-th largest value's order-preserving uint32
  key is built 4 bits at a time (8 rounds of 15 counts): the largest key r
  with #(keys >= r) >= k.
  """
  x = x.astype(jnp.float32)
  x = jnp.where(x == 0, 0.0, x)  # -0.0 -> +0.0 (they compare equal)
  i = jax.lax.bitcast_convert_type(x, jnp.uint32)
  u = jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(1 << 31))  # monotone in x
  r = jnp.zeros(x.shape[:-1] + (1,), jnp.uint32)
  digits = jnp.arange(1, 16, dtype=jnp.uint32)
  for shift in range(28, -1, -4):
    cand = r | (digits << shift)  # (..., 15)
    ok = jnp.sum(u[..., None, :] >= cand[..., None], -1) >= k
    r = r | (jnp.sum(ok, -1, keepdims=True).astype(jnp.uint32) << shift)
  return u < r


def filter_logits(logits: Array, legal: Array, temperature: float,
                  top_k: int, top_p: float) -> Array:
  """Temperature, legality mask, top-k, then top-p (the official order).

  The order matters: the mask comes before the filters so that top-k and
  top-p pick among legal tokens only (an illegal favourite must not push a
  legal token out), and every filtered token gets -inf, so the draw can
  only land on what is left.
  """
  logits = jnp.where(legal, logits / temperature, -jnp.inf)
  if top_k and top_k < logits.shape[-1]:
    logits = jnp.where(_below_kth(logits, top_k), -jnp.inf, logits)
  if top_p < 1.0:
    ordered = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative mass
    keep = before < top_p
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), -1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def choose(noise: Array | None, logits: Array) -> Array:
  """argmax(logits + Gumbel noise): `jax.random.categorical`'s draw.

  The noise comes in from `slot_noise` rather than a key, so that it can be
  drawn for many slots at once and the cached and naive samplers see the
  same draw; None is greedy (the plain argmax).
  """
  if noise is None:  # greedy
    return jnp.argmax(logits, -1).astype(jnp.int32)
  return jnp.argmax(logits + noise, -1).astype(jnp.int32)


def slot_noise(key: Array, slots: Array, b: int, p: int, c: int
               ) -> tuple[Array, Array]:
  """(S, B, P) position and (S, B, C) content Gumbel noise of `slots`.

  Slot t draws with split(fold_in(key, t)), exactly what
  `jax.random.categorical` would add at that slot; generated for a chunk of
  slots at once, since XLA:CPU runs threefry as a rolled loop whose per-op
  overhead dominates one step's small draw.
  """
  def one(t):
    kp, kc = jax.random.split(jax.random.fold_in(key, t))
    return (jax.random.gumbel(kp, (b, p), jnp.float32),
            jax.random.gumbel(kc, (b, c), jnp.float32))
  return jax.vmap(one)(slots)


def guide(logits: Array, scale: float, guided: bool) -> Array:
  """Classifier-free guidance, u + scale (c - u), of a doubled batch.

  A guided sampler runs the conditional rows and then the null-class rows in
  one batch (one forward for both); this folds them back to the conditional
  batch size before filtering. Unguided logits pass through untouched, so
  scale 1.0 costs nothing.
  """
  if not guided:
    return logits
  cond, uncond = jnp.split(logits, 2, axis=0)
  return uncond + scale * (cond - uncond)
