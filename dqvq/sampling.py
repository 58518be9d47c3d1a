"""Coarse-to-fine sampling from a DQ-Transformer (the paper's Algorithm 1).

One compiled `lax.while_loop` walks the input slots of the whole sequence
with every sample at the same slot: granularity k's stream runs until every
sample has emitted (and fed back) its eos, then all samples jump to stream
k+1's sos slot, whose tokens (sos / class) are known and are fed without
sampling. Pads after an eos are never computed: they embed to zero and are
hidden as keys in training, so skipping them changes nothing. At each slot
t the position stack (KV-cached) gives the position of slot t+1; the content
stack, told that position, gives its code. At the eos slot the content is
the eos id (as in training; the official sampler writes a pad there).

Legality (every emitted sample is a valid, complete code map) is
`dqvq.stream_legality`. How each token is then chosen from its logits (guidance, temperature,
top-k / top-p, the slot-keyed Gumbel draw) is `dqvq.token_choice`.

`make_sampler` is the KV-cached sampler; `make_naive_sampler` its
reference: the same loop, keys and logits processing (`_SlotLoop`), but
logits from the full teacher-forced forward over the buffers at every step
(no cache), for testing the cache.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dqvq.models import transformer as transformer_lib
from dqvq import sequence
from dqvq import stream_legality
from dqvq import token_choice
# Also this module's API (users and configs name `sampling.SamplingConfig`),
# though they live with the rest of the token choice.
# pylint: disable=g-importing-member
from dqvq.token_choice import filter_logits
from dqvq.token_choice import SamplingConfig
# pylint: enable=g-importing-member

Array = jax.Array


def _teacher_forced(apply: Callable[..., Any], streams: dict[str, Array],
                    layout: sequence.StreamLayout) -> tuple[Array, Array]:
  """The full forward over (B, L) buffers, as training runs it (naive)."""
  io = sequence.model_inputs(streams, layout)
  return apply(io['inputs'], io['targets']['position'],
               io['targets']['grain'], next_pad=io['targets']['pad'])


def _column(x: Array, i: Array) -> Array:
  """(B,) slot `i` (traced) of a (B, L) buffer."""
  return jax.lax.dynamic_index_in_dim(x, i, 1, keepdims=False)


class _Slot(NamedTuple):
  """Input slot `cur` of stream `k`, as one step of the loop finds it (B,).

  live: the lane still takes part in the stream (not a pad, not the finest
  stream's eos); at_eos: it is live and at its stream's eos; sampling: live
  and not at eos, the lanes whose slot cur+1 the step writes.
  """
  cur: Array
  k: Array
  live: Array
  at_eos: Array
  sampling: Array


class _Logits(NamedTuple):
  """Where a step's logits come from: all the two samplers differ in.

  position(state, slot) -> ((B', P) logits for slot cur+1's position, a
  carry for `content`); content(state, slot, pos, carry) -> ((B', C) logits
  for its content, the loop state's next 'cache'), with `pos` the chosen
  (B,) positions. B' = 2B when guided (conditional rows, then null-class).
  """
  position: Callable[[dict[str, Any], _Slot], tuple[Array, Any]]
  content: Callable[[dict[str, Any], _Slot, Array, Any], tuple[Array, Any]]


class _SlotLoop:
  """The slot loop (module doc), shared by the cached and naive samplers.

  Everything that decides a token (legality, logits processing, the
  slot-keyed noise, buffer writes, stream jumps) lives here once, so the
  two samplers differ only in their `_Logits`: equal outputs then test the
  KV cache and nothing else.
  """

  def __init__(self, model: transformer_lib.DQTransformer,
               config: SamplingConfig, max_steps: int | None,
               noise_chunk: int):
    lay = model.layout
    if config.guided and not lay.null_class:
      raise ValueError('Classifier-free guidance needs a model trained with '
                       'label dropout (layout.null_class).')
    self.layout, self.config = lay, config
    self.max_steps, self.noise_chunk = max_steps, noise_chunk
    self.tables = stream_legality.budget_tables(lay, config)
    self.starts = jnp.asarray(self.tables['starts'])
    self.cells = jnp.asarray(self.tables['cells'])
    self.grain_ids = lay.grain_ids()
    self.content_legal = jnp.arange(lay.content_vocab_size) < (
        lay.codebook_size)

  def model_labels(self, labels: Array) -> Array:
    """(B',) labels of the model's rows: guided, the null class appended."""
    if not self.config.guided:
      return labels
    return jnp.concatenate(
        [labels, jnp.full_like(labels, self.layout.num_classes)])

  def dbl(self, x: Array) -> Array:
    """A per-sample (B, ...) value for the model's B' rows."""
    return jnp.concatenate([x, x]) if self.config.guided else x

  def _live(self, buf: dict[str, Array], i: Array, k: Array) -> Array:
    """(B,) whether slot i of stream k is live (see `_Slot`)."""
    content = _column(buf['content'], i)
    finest_eos = (k == self.layout.num_grains - 1) & (
        content == self.layout.codebook_size + 1)
    return ~_column(buf['pad'], i) & ~finest_eos

  def init_state(self, labels: Array, cache: Any) -> dict[str, Any]:
    """The loop state at slot 0 of stream 0, with the sampler's `cache`."""
    b, fine = labels.shape[0], self.layout.grid_sizes[-1]
    return {'cur': jnp.int32(0), 'k': jnp.int32(0),
            'buf': stream_legality.initial_streams(self.layout, labels),
            'covered': jnp.zeros((b, fine * fine), bool),
            'count': jnp.zeros((b,), jnp.int32), 'cache': cache,
            'total': jnp.zeros((b,), jnp.int32), 'steps': jnp.int32(0)}

  @staticmethod
  def result(state: dict[str, Any]) -> dict[str, Array]:
    """The sampler's output (see `make_sampler`)."""
    return dict(state['buf'], num_codes=state['total'], steps=state['steps'])

  def step(self, state: dict[str, Any], noise: tuple[Array, Array] | None,
           c0: Array | None, logits: _Logits) -> dict[str, Any]:
    """Chooses slot cur+1's position and content; moves on (module doc)."""
    lay, config = self.layout, self.config
    v = lay.codebook_size
    cur, k, buf = state['cur'], state['k'], state['buf']
    live = self._live(buf, cur, k)
    at_eos = live & (_column(buf['content'], cur) == v + 1)
    slot = _Slot(cur, k, live, at_eos, live & ~at_eos)
    noise_p, noise_c = (None, None) if noise is None else (
        jax.lax.dynamic_index_in_dim(n, cur - c0, 0, False) for n in noise)
    # Position of slot cur+1.
    pos_logits, carry = logits.position(state, slot)
    legal = stream_legality.legal_positions(state['covered'], state['count'], k, lay,
                             self.tables)
    pos_logits = filter_logits(
        token_choice.guide(pos_logits, config.cfg_scale_position,
                           config.guided),
        legal, config.temperature_position, config.top_k_position,
        config.top_p_position)
    pos = token_choice.choose(noise_p, pos_logits)
    is_eos = pos == self.cells[k] + 1
    # Its content; the eos content is forced.
    con_logits, cache = logits.content(state, slot, pos, carry)
    con_logits = filter_logits(
        token_choice.guide(con_logits, config.cfg_scale_content,
                           config.guided),
        self.content_legal[None], config.temperature_content,
        config.top_k_content, config.top_p_content)
    code = jnp.where(is_eos, v + 1, token_choice.choose(noise_c, con_logits))
    # Write slot cur+1 for the sampling lanes.
    nxt = cur + 1
    put = lambda name, new: jax.lax.dynamic_update_index_in_dim(
        buf[name], jnp.where(slot.sampling, new, _column(buf[name], nxt)),
        nxt, 1)
    buf = {'content': put('content', code), 'position': put('position', pos),
           'pad': put('pad', jnp.zeros_like(slot.sampling))}
    is_cell = slot.sampling & ~is_eos
    covered = stream_legality.cover(state['covered'], pos, is_cell, k, lay)
    count = state['count'] + is_cell
    over = ~jnp.any(self._live(buf, nxt, k)) | (nxt == self.starts[k + 1])
    k_new = jnp.where(over, k + 1, k)
    return {'cur': jnp.where(over, self.starts[k_new], nxt), 'k': k_new,
            'buf': buf, 'covered': covered,
            'count': jnp.where(over, 0, count), 'cache': cache,
            'total': state['total'] + is_cell, 'steps': state['steps'] + 1}

  def run(self, state: dict[str, Any], key: Array, logits: _Logits,
          extent: int | None = None) -> dict[str, Any]:
    """Steps until done, `max_steps`, or (if given) cur reaches `extent`."""
    def going(s):
      on = s['k'] < self.layout.num_grains
      if self.max_steps is not None:
        on &= s['steps'] < self.max_steps
      if extent is not None:
        on &= s['cur'] < extent
      return on

    if self.config.greedy:
      return jax.lax.while_loop(
          going, lambda s: self.step(s, None, None, logits), state)
    # Outer loop: Gumbel noise for the next `noise_chunk` slots from the
    # current one; inner loop: the slots while they stay inside the chunk
    # (slots only move forward, so a stream jump just ends the chunk).
    b, lay = state['count'].shape[0], self.layout

    def chunk(state):
      c0 = state['cur']
      noise = token_choice.slot_noise(
          key, c0 + jnp.arange(self.noise_chunk), b,
          lay.position_logits_size, lay.content_vocab_size)
      return jax.lax.while_loop(
          lambda s: going(s) & (s['cur'] - c0 < self.noise_chunk),
          lambda s: self.step(s, noise, c0, logits), state)
    return jax.lax.while_loop(going, chunk, state)


def _cached_logits(loop: _SlotLoop, model: transformer_lib.DQTransformer,
                   apply: Callable[..., Any], model_labels: Array,
                   extent: int) -> _Logits:
  """Logits from the KV-cached decode calls, over a cache of `extent` slots.

  Each step feeds one token per stack: slot cur to the position stack, then
  slot cur+1's position (as `sequence.model_inputs`' targets) to the
  content stack.
  """
  lay, dbl, starts, cells = loop.layout, loop.dbl, loop.starts, loop.cells
  v, t_in = lay.codebook_size, lay.length - 1

  def position(state, slot):
    buf, cur, k = state['buf'], slot.cur, slot.k
    is_sos = cur == starts[k]
    tokens = {
        'content': jnp.where(is_sos, v + 2 + model_labels,
                             dbl(_column(buf['content'], cur))),
        'position': jnp.where(is_sos, cells[k] + 2 + model_labels,
                              dbl(_column(buf['position'], cur))),
        'grain': jnp.full((model_labels.shape[0],), k, jnp.int32),
        'pad': dbl(_column(buf['pad'], cur)),
        'abs_index': dbl(_column(lay.absolute_index(buf['pad']), cur))}
    # Keys of slots 0..extent-1 (the cache's length in this phase).
    key_valid = dbl(~buf['pad'][:, :extent] & (jnp.arange(extent) <= cur))
    logits, h_p, cache_p = apply(tokens, cur, key_valid,
                                 state['cache']['position'],
                                 method=model.decode_position)
    return logits, (h_p, cache_p, key_valid)

  def content(state, slot, pos, carry):
    h_p, cache_p, key_valid = carry
    cur, k, at_eos = slot.cur, slot.k, dbl(slot.at_eos)
    # What the content stack is told at cur: the sampled position; after
    # an eos the next stream's sos (compact), or (slot) that sos when it
    # is the next slot, else a pad. `sequence.model_inputs`' targets.
    next_k = jnp.minimum(k + 1, lay.num_grains - 1)
    sos_next = cells[next_k] + 2 + model_labels
    if lay.compact:
      next_pos = jnp.where(at_eos, sos_next, dbl(pos))
      next_pad = dbl(~slot.live)
      next_grain = jnp.where(at_eos, next_k, k)
    else:
      boundary = cur + 1 == starts[k + 1]
      next_pos = jnp.where(at_eos, jnp.where(boundary, sos_next, cells[k]),
                           dbl(pos))
      next_pad = dbl(~slot.sampling) & ~(at_eos & boundary)
      next_grain = jnp.full_like(
          next_pos, loop.grain_ids[jnp.minimum(cur + 1, t_in)])
    logits, cache_c = apply(h_p, next_pos, next_grain, next_pad, cur,
                            key_valid, state['cache']['content'],
                            method=model.decode_content)
    return logits, {'position': cache_p, 'content': cache_c}

  return _Logits(position, content)


def _naive_logits(loop: _SlotLoop, apply: Callable[..., Any],
                  model_labels: Array) -> _Logits:
  """Logits from the full teacher-forced forward over the buffers, no cache.

  The position logits of slot cur+1 are the forward's at cur over the
  buffers as they stand; the content logits, a second forward's with slot
  cur+1's chosen position written in (what training's targets show there).
  """
  lay, dbl = loop.layout, loop.dbl

  def position(state, slot):
    full = {n: dbl(state['buf'][n]) for n in ('content', 'position', 'pad')}
    full = stream_legality.relabel(full, lay, model_labels)
    full['grain'] = jnp.broadcast_to(loop.grain_ids, full['pad'].shape)
    return _teacher_forced(apply, full, lay)[0][:, slot.cur], full

  def content(state, slot, pos, full):
    # Slot cur+1 as the sampling lanes will write it.
    nxt = slot.cur + 1
    write = lambda name, new: jax.lax.dynamic_update_index_in_dim(
        full[name], jnp.where(dbl(slot.sampling), new, full[name][:, nxt]),
        nxt, 1)
    full = dict(full, position=write('position', dbl(pos)),
                pad=write('pad', False))
    return _teacher_forced(apply, full, lay)[1][:, slot.cur], state['cache']

  return _Logits(position, content)


def make_sampler(model: transformer_lib.DQTransformer, config: SamplingConfig,
                 *, max_steps: int | None = None, key_bucket: int = 256,
                 noise_chunk: int = 64
                 ) -> Callable[[Any, Array, Array], dict[str, Array]]:
  """The KV-cached sampler: a jitted fn(params, labels (B,), key) -> streams.

  Returns a dict of (B, L) 'content', 'position' (int32) and 'pad' (bool),
  (B,) 'num_codes' and the scalar 'steps' (loop iterations). `max_steps`
  stops early (the streams are then partial). `key_bucket` > 0 runs the
  loop in phases of static cache length key_bucket, 2 key_bucket, ... (one
  compiled loop each: compile time grows with their number), so early slots
  attend over few keys; 0 = one phase over the whole cache. `noise_chunk`:
  slots whose sampling noise is drawn at once. `make_naive_sampler` is its
  uncached reference.
  """
  loop = _SlotLoop(model, config, max_steps, noise_chunk)
  t_in = model.layout.length - 1
  # Phases with a static cache length: keys only exist at slots <= cur, so
  # while cur < extent the cache (and every attention) needs only `extent`
  # slots. Each phase grows the cache with zero (masked) slots.
  extents = ([e for e in range(key_bucket, t_in, key_bucket)]
             if key_bucket > 0 else []) + [t_in]
  grow = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, n - x.shape[2]),
                                  (0, 0)))

  def sample(params, labels, key):
    labels = jnp.asarray(labels, jnp.int32)
    model_labels = loop.model_labels(labels)
    apply = functools.partial(model.apply, {'params': params})
    state = loop.init_state(labels, model.init_cache(
        model_labels.shape[0], min(key_bucket or t_in, t_in)))
    for extent in extents:
      state['cache'] = jax.tree.map(lambda x: grow(x, extent),
                                    state['cache'])
      logits = _cached_logits(loop, model, apply, model_labels, extent)
      state = loop.run(state, key, logits, extent)
    return loop.result(state)

  return jax.jit(sample)


def make_naive_sampler(model: transformer_lib.DQTransformer,
                       config: SamplingConfig, *,
                       max_steps: int | None = None, noise_chunk: int = 64
                       ) -> Callable[[Any, Array, Array], dict[str, Array]]:
  """The reference for `make_sampler`: the same fn and outputs, no cache.

  Same loop, keys and logits processing (`_SlotLoop`), but each step's
  logits come from two full teacher-forced forwards over the (B, L)
  buffers, as training computes them; with the same key it must give the
  cached sampler's tokens exactly, which is how the cache is tested. Each
  step costs two L-slot forwards, so `max_steps` (stop early, the streams
  then partial) keeps timing it affordable.
  """
  loop = _SlotLoop(model, config, max_steps, noise_chunk)

  def sample(params, labels, key):
    labels = jnp.asarray(labels, jnp.int32)
    apply = functools.partial(model.apply, {'params': params})
    logits = _naive_logits(loop, apply, loop.model_labels(labels))
    return loop.result(loop.run(loop.init_state(labels, {}), key, logits))

  return jax.jit(sample)


def preview_codes(content: Array, position: Array,
                  layout: sequence.StreamLayout) -> Array:
  """(B, G, G) code map of the coarsest stream alone (a progressive preview).

  Coarse regions keep their code; every region the coarse stream left to
  finer granularities takes the code of the nearest coarse region (what the
  image looks like once the coarse phase is done). No coarse region: code 0.
  """
  b, r = content.shape[0], layout.grid_sizes[0]
  s, n = layout.stream_starts[0], layout.stream_lengths[0]
  pos, con = position[:, s:s + n], content[:, s:s + n]
  ok = (pos < r * r) & (con < layout.codebook_size)
  rows = jnp.arange(b)[:, None]
  target = jnp.where(ok, pos, r * r)
  codes = jnp.zeros((b, r * r), jnp.int32).at[rows, target].set(
      con, mode='drop')
  have = jnp.zeros((b, r * r), bool).at[rows, target].set(True, mode='drop')
  yx = jnp.stack(jnp.divmod(jnp.arange(r * r), r), -1)
  dist = jnp.sum((yx[:, None] - yx[None]) ** 2, -1)  # (R^2, R^2)
  dist = jnp.where(have[:, None, :], dist[None], jnp.iinfo(jnp.int32).max)
  nearest = jnp.argmin(dist, -1)
  filled = jnp.take_along_axis(codes, nearest, 1).reshape(b, r, r)
  rep = layout.grid_sizes[-1] // r
  return jnp.repeat(jnp.repeat(filled, rep, 1), rep, 2)
