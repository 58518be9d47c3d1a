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

`naive=True` gives the reference sampler: the same loop, keys and logits
processing, but logits from the full teacher-forced forward over the
buffers at every step (no cache), for testing the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dqvq import sequence
from dqvq.models import transformer as transformer_lib

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
    return self.cfg_scale_position != 1.0 or self.cfg_scale_content != 1.0


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


def _below_kth(x: Array, k: int) -> Array:
  """x < (k-th largest of x along -1), exactly, without a sort.

  XLA:CPU lowers `lax.top_k` to a full sort; instead the k-th largest value's
  order-preserving uint32 key is built 4 bits at a time (8 rounds of 15
  counts): the largest key r with #(keys >= r) >= k.
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
  """Temperature, legality mask, top-k, then top-p (the official order)."""
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


def _choose(noise: Array | None, logits: Array) -> Array:
  """argmax(logits + Gumbel noise): `jax.random.categorical`'s draw."""
  if noise is None:  # greedy
    return jnp.argmax(logits, -1).astype(jnp.int32)
  return jnp.argmax(logits + noise, -1).astype(jnp.int32)


def _slot_noise(key: Array, slots: Array, b: int, p: int, c: int
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


def _guide(logits: Array, scale: float, guided: bool) -> Array:
  if not guided:
    return logits
  cond, uncond = jnp.split(logits, 2, axis=0)
  return uncond + scale * (cond - uncond)


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
          _guide(pos_logits, config.cfg_scale_position, guided), legal,
          config.temperature_position, config.top_k_position,
          config.top_p_position)
      pos = _choose(np_, pos_logits)
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
          _guide(con_logits, config.cfg_scale_content, guided),
          content_legal[None], config.temperature_content,
          config.top_k_content, config.top_p_content)
      code = jnp.where(is_eos, v + 1, _choose(nc_, con_logits))
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
        noise = _slot_noise(key, c0 + jnp.arange(noise_chunk), b,
                            lay.position_logits_size, lay.content_vocab_size)
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
