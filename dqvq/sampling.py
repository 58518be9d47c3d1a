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

Legality (every emitted sample is a valid, complete code map):
  * positions: only cells 0..N_k-1 of the stream's own grid that no earlier
    token covers (no repeats, nothing inside a coarser chosen region), plus
    eos; never pad/sos/class ids.
  * contents: only codes 0..V-1 (the eos content is forced, not sampled).
  * completeness: the finest stream's positions are forced, every uncovered
    cell in row-first order (the official `fix_fine_position`, generalised),
    and its eos is legal only once nothing is left uncovered.
  * budgets: with A the uncovered area (in finest cells), area_k one cell of
    grid k, hi_k / lo_k the most / least area the finer streams may cover
    (their caps / floors): eos of stream k is legal once its count reaches
    its floor and A <= hi_k; a cell is legal while the count is under the
    cap and either A - area_k >= lo_k or A > hi_k (completeness beats
    floors). If no cell is legal the eos is forced, which also happens at
    the stream's capacity (its last slot is always free for the eos).

How each token is then chosen from its logits (guidance, temperature,
top-k / top-p, the slot-keyed Gumbel draw) is `dqvq.token_choice`.

`naive=True` gives the reference sampler: the same loop, keys and logits
processing, but logits from the full teacher-forced forward over the
buffers at every step (no cache), for testing the cache.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dqvq import sequence
from dqvq import token_choice
from dqvq.models import transformer as transformer_lib
# Also this module's API (users and configs name `sampling.SamplingConfig`),
# though they live with the rest of the token choice.
# pylint: disable=g-importing-member
from dqvq.token_choice import filter_logits
from dqvq.token_choice import SamplingConfig
# pylint: enable=g-importing-member

Array = jax.Array


def _budget_tables(layout: sequence.StreamLayout, config: SamplingConfig
                   ) -> dict[str, np.ndarray]:
  """Static per-granularity constants, checked for feasibility."""
  k_all = layout.num_grains
  fine = layout.grid_sizes[-1]
  area = np.array([(fine // g) ** 2 for g in layout.grid_sizes], np.int64)
  caps = np.array(layout.stream_capacities, np.int64)
  if config.max_codes is not None:
    caps = np.minimum(caps, np.array(config.max_codes, np.int64))
  floors = np.zeros(k_all, np.int64) if config.min_codes is None else (
      np.array(config.min_codes, np.int64))
  if len(caps) != k_all or len(floors) != k_all or np.any(floors > caps):
    raise ValueError(f'min_codes={config.min_codes} / max_codes='
                     f'{config.max_codes} need {k_all} entries, floor <= cap.')
  if int(np.sum(caps * area)) < fine * fine:
    raise ValueError(
        f'Caps {caps.tolist()} (with the stream capacities) cannot cover the '
        f'{fine}x{fine} grid: raise max_codes or the layout capacities.')
  hi = np.array([np.sum((caps * area)[k + 1:]) for k in range(k_all)])
  lo = np.array([np.sum((floors * area)[k + 1:]) for k in range(k_all)])
  return dict(area=area, caps=caps, floors=floors, hi=hi, lo=lo,
              starts=np.array(layout.stream_starts + (layout.length,)),
              cells=np.array(layout.num_cells), grids=np.array(
                  layout.grid_sizes))


def initial_streams(layout: sequence.StreamLayout, labels: Array
                    ) -> dict[str, Array]:
  """(B, L) buffers: every slot a pad except each stream's sos/class slot."""
  b = labels.shape[0]
  v = layout.codebook_size
  content, position, pad = [], [], []
  for n_k, n in zip(layout.num_cells, layout.stream_lengths):
    first = jnp.arange(n) == 0
    content.append(jnp.where(first, v + 2 + labels[:, None], v))
    position.append(jnp.where(first, n_k + 2 + labels[:, None], n_k))
    pad.append(jnp.broadcast_to(~first, (b, n)))
  return {'content': jnp.concatenate(content, 1).astype(jnp.int32),
          'position': jnp.concatenate(position, 1).astype(jnp.int32),
          'pad': jnp.concatenate(pad, 1)}


def relabel(streams: dict[str, Array], layout: sequence.StreamLayout,
            labels: Array) -> dict[str, Array]:
  """The same streams with every sos/class slot set for `labels`."""
  out = dict(streams)
  for n_k, s in zip(layout.num_cells, layout.stream_starts):
    out['content'] = out['content'].at[:, s].set(
        layout.codebook_size + 2 + labels)
    out['position'] = out['position'].at[:, s].set(n_k + 2 + labels)
  return out


def _legal_positions(covered: Array, count: Array, k: Array, layout,
                     tables) -> Array:
  """(B, P) legal position ids of slot t+1 in stream k (see module doc)."""
  b, (fine, p) = covered.shape[0], (layout.grid_sizes[-1],
                                    layout.position_logits_size)
  grid = covered.reshape(b, fine, fine)
  free, eos_ids = [], []
  for j, g in enumerate(layout.grid_sizes):
    s = fine // g
    cells = ~grid[:, ::s, ::s].reshape(b, g * g)
    free.append(jnp.pad(cells, ((0, 0), (0, p - g * g))))
    eos_ids.append(layout.num_cells[j] + 1)
  free = jnp.stack(free)[k]
  t = {name: jnp.asarray(v)[k] for name, v in tables.items()
       if name in ('area', 'caps', 'floors', 'hi', 'lo')}
  uncovered = jnp.sum(~covered, -1)
  budget = (count < t['caps']) & ((uncovered - t['area'] >= t['lo']) |
                                  (uncovered > t['hi']))
  cells = free & budget[:, None]
  finest = k == layout.num_grains - 1
  cells = jnp.where(finest, cells & (jnp.cumsum(cells, -1) == 1), cells)
  eos_ok = ((count >= t['floors']) & (uncovered <= t['hi'])) | ~cells.any(-1)
  eos = jnp.arange(p) == jnp.asarray(eos_ids)[k]
  return cells | (eos[None] & eos_ok[:, None])


def _cover(covered: Array, cell: Array, hit: Array, k: Array,
           layout) -> Array:
  """Marks the finest cells under grid-k cell `cell` (where `hit`)."""
  fine = layout.grid_sizes[-1]
  g = jnp.asarray(layout.grid_sizes)[k]
  s = fine // g
  idx = jnp.arange(fine * fine)
  under = ((idx // fine) // s == (cell // g)[:, None]) & (
      (idx % fine) // s == (cell % g)[:, None])
  return covered | (under & hit[:, None])


def _teacher_forced(apply: Callable[..., Any], streams: dict[str, Array],
                    layout: sequence.StreamLayout) -> tuple[Array, Array]:
  """The full forward over (B, L) buffers, as training runs it (naive)."""
  io = sequence.model_inputs(streams, layout)
  return apply(io['inputs'], io['targets']['position'],
               io['targets']['grain'], next_pad=io['targets']['pad'])


def make_sampler(model: transformer_lib.DQTransformer, config: SamplingConfig,
                 naive: bool = False, max_steps: int | None = None,
                 key_bucket: int = 256, noise_chunk: int = 64
                 ) -> Callable[[Any, Array, Array], dict[str, Array]]:
  """A jitted fn(params, labels (B,), key) -> full streams and counts.

  Returns a dict of (B, L) 'content', 'position' (int32) and 'pad' (bool),
  (B,) 'num_codes' and the scalar 'steps' (loop iterations). `max_steps`
  stops early (for timing the naive sampler; the streams are then partial).
  `key_bucket` > 0 runs the cached loop in phases of static cache length
  key_bucket, 2 key_bucket, ... (one compiled loop each: compile time grows
  with their number), so early slots attend over few keys; 0 = one phase
  over the whole cache. `noise_chunk`: slots whose sampling noise is drawn
  at once.
  """
  lay = model.layout
  if config.guided and not lay.null_class:
    raise ValueError('Classifier-free guidance needs a model trained with '
                     'label dropout (layout.null_class).')
  tables = _budget_tables(lay, config)
  v, k_all, t_in = lay.codebook_size, lay.num_grains, lay.length - 1
  grain_ids = lay.grain_ids()
  starts = jnp.asarray(tables['starts'])
  guided = config.guided
  content_legal = jnp.arange(lay.content_vocab_size) < v
  cells = jnp.asarray(tables['cells'])

  def sample(params, labels, key):
    labels = jnp.asarray(labels, jnp.int32)
    b = labels.shape[0]
    model_labels = labels
    if guided:
      model_labels = jnp.concatenate([labels, jnp.full_like(labels,
                                                            lay.num_classes)])
    dbl = (lambda x: jnp.concatenate([x, x])) if guided else (lambda x: x)
    apply = functools.partial(model.apply, {'params': params})

    def body(state, noise, c0, extent):
      cur, k, buf = state['cur'], state['k'], state['buf']
      col = lambda name, i: jax.lax.dynamic_index_in_dim(buf[name], i, 1,
                                                         keepdims=False)
      is_sos = cur == starts[k]
      live = ~col('pad', cur) & ~((k == k_all - 1) & (col('content', cur) ==
                                                      v + 1))
      at_eos = live & (col('content', cur) == v + 1)
      sampling = live & ~at_eos
      tokens = {
          'content': jnp.where(is_sos, v + 2 + model_labels,
                               dbl(col('content', cur))),
          'position': jnp.where(is_sos, cells[k] + 2 +
                                model_labels, dbl(col('position', cur))),
          'grain': jnp.full((model_labels.shape[0],), k, jnp.int32),
          'pad': dbl(col('pad', cur)),
          'abs_index': dbl(jax.lax.dynamic_index_in_dim(
              lay.absolute_index(buf['pad']), cur, 1, keepdims=False))}
      # Keys of slots 0..extent-1 (the cache's length in this phase).
      key_valid = dbl(~buf['pad'][:, :extent] & (jnp.arange(extent) <= cur))
      if noise is None:
        np_, nc_ = None, None
      else:
        np_ = jax.lax.dynamic_index_in_dim(noise[0], cur - c0, 0, False)
        nc_ = jax.lax.dynamic_index_in_dim(noise[1], cur - c0, 0, False)
      # Position of slot cur+1.
      if naive:
        full = {n: dbl(buf[n]) for n in ('content', 'position', 'pad')}
        full = relabel(full, lay, model_labels)
        full['grain'] = jnp.broadcast_to(grain_ids, full['pad'].shape)
        pos_logits = _teacher_forced(apply, full, lay)[0][:, cur]
      else:
        pos_logits, h_p, cache_p = apply(
            tokens, cur, key_valid, state['cache']['position'],
            method=model.decode_position)
      legal = _legal_positions(state['covered'], state['count'], k, lay,
                               tables)
      pos_logits = filter_logits(
          token_choice.guide(pos_logits, config.cfg_scale_position, guided),
          legal, config.temperature_position, config.top_k_position,
          config.top_p_position)
      pos = token_choice.choose(np_, pos_logits)
      is_eos = pos == cells[k] + 1
      # What the content stack is told at cur: the sampled position; after
      # an eos the next stream's sos (compact), or (slot) that sos when it
      # is the next slot, else a pad. `sequence.model_inputs`' targets.
      next_k = jnp.minimum(k + 1, k_all - 1)
      sos_next = cells[next_k] + 2 + model_labels
      if lay.compact:
        next_pos = jnp.where(dbl(at_eos), sos_next, dbl(pos))
        next_pad = dbl(~live)
        next_grain = jnp.where(dbl(at_eos), next_k, k)
      else:
        boundary = cur + 1 == starts[k + 1]
        next_pos = jnp.where(dbl(at_eos), jnp.where(
            boundary, sos_next, cells[k]), dbl(pos))
        next_pad = dbl(~sampling) & ~(dbl(at_eos) & boundary)
        next_grain = jnp.full_like(next_pos, grain_ids[jnp.minimum(cur + 1,
                                                                   t_in)])
      if naive:
        # Slot cur+1 as the sampling lanes will write it below.
        write = lambda name, new: jax.lax.dynamic_update_index_in_dim(
            full[name], jnp.where(dbl(sampling), new, full[name][:, cur + 1]),
            cur + 1, 1)
        full['position'] = write('position', dbl(pos))
        full['pad'] = write('pad', False)
        con_logits = _teacher_forced(apply, full, lay)[1][:, cur]
        cache = state['cache']
      else:
        con_logits, cache_c = apply(
            h_p, next_pos, next_grain, next_pad, cur, key_valid,
            state['cache']['content'],
            method=model.decode_content)
        cache = {'position': cache_p, 'content': cache_c}
      con_logits = filter_logits(
          token_choice.guide(con_logits, config.cfg_scale_content, guided),
          content_legal[None], config.temperature_content,
          config.top_k_content, config.top_p_content)
      code = jnp.where(is_eos, v + 1, token_choice.choose(nc_, con_logits))
      # Write slot cur+1 for the sampling lanes.
      nxt = cur + 1
      put = lambda name, new: jax.lax.dynamic_update_index_in_dim(
          buf[name], jnp.where(sampling, new, col(name, nxt)), nxt, 1)
      buf = {'content': put('content', code), 'position': put('position', pos),
             'pad': put('pad', jnp.zeros_like(sampling))}
      is_cell = sampling & ~is_eos
      covered = _cover(state['covered'], pos, is_cell, k, lay)
      count = state['count'] + is_cell
      nxt_live = ~buf['pad'][:, nxt] & ~((k == k_all - 1) & (
          buf['content'][:, nxt] == v + 1))
      over = ~jnp.any(nxt_live) | (nxt == starts[k + 1])
      k_new = jnp.where(over, k + 1, k)
      return {'cur': jnp.where(over, starts[k_new], nxt), 'k': k_new,
              'buf': buf, 'covered': covered,
              'count': jnp.where(over, 0, count), 'cache': cache,
              'total': state['total'] + is_cell, 'steps': state['steps'] + 1}

    def cond(state):
      going = state['k'] < k_all
      if max_steps is not None:
        going &= state['steps'] < max_steps
      return going

    fine = lay.grid_sizes[-1]
    state = {'cur': jnp.int32(0), 'k': jnp.int32(0),
             'buf': initial_streams(lay, labels),
             'covered': jnp.zeros((b, fine * fine), bool),
             'count': jnp.zeros((b,), jnp.int32),
             'cache': {} if naive else model.init_cache(
                 model_labels.shape[0], min(key_bucket or t_in, t_in)),
             'total': jnp.zeros((b,), jnp.int32), 'steps': jnp.int32(0)}

    def run(state, extent):
      """Steps while cur < extent (all of them when naive)."""
      in_phase = lambda s: cond(s) & (naive or s['cur'] < extent)
      if config.greedy:
        return jax.lax.while_loop(
            in_phase, lambda s: body(s, None, None, extent), state)
      # Outer loop: Gumbel noise for the next `noise_chunk` slots from the
      # current one; inner loop: the slots while they stay inside the chunk
      # (slots only move forward, so a stream jump just ends the chunk).
      def chunk(state):
        c0 = state['cur']
        noise = token_choice.slot_noise(
            key, c0 + jnp.arange(noise_chunk), b, lay.position_logits_size,
            lay.content_vocab_size)
        return jax.lax.while_loop(
            lambda s: in_phase(s) & (s['cur'] - c0 < noise_chunk),
            lambda s: body(s, noise, c0, extent), state)
      return jax.lax.while_loop(in_phase, chunk, state)

    if naive:
      state = run(state, t_in)
    else:
      # Phases with a static cache length: keys only exist at slots <= cur,
      # so while cur < extent the cache (and every attention) needs only
      # `extent` slots. Each phase grows the cache with zero (masked) slots.
      extents = ([e for e in range(key_bucket, t_in, key_bucket)]
                 if key_bucket > 0 else []) + [t_in]
      grow = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, n - x.shape[2]),
                                      (0, 0)))
      for extent in extents:
        state['cache'] = jax.tree.map(lambda x: grow(x, extent),
                                      state['cache'])
        state = run(state, extent)
    return dict(state['buf'], num_codes=state['total'], steps=state['steps'])

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
