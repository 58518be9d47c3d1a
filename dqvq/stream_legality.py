"""Which tokens a coarse-to-fine stream may take next, and the budgets.

The sampler (`dqvq.sampling`) and the image codec's coder
(`dqvq.inference.stream_coder`) follow the same rules, so a sampled stream
and a decoded one are legal in the same way.

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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dqvq import sequence
from dqvq.token_choice import SamplingConfig  # pylint: disable=g-importing-member

Array = jax.Array


def budget_tables(layout: sequence.StreamLayout, config: SamplingConfig
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


def legal_positions(covered: Array, count: Array, k: Array, layout,
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


def cover(covered: Array, cell: Array, hit: Array, k: Array,
           layout) -> Array:
  """Marks the finest cells under grid-k cell `cell` (where `hit`)."""
  fine = layout.grid_sizes[-1]
  g = jnp.asarray(layout.grid_sizes)[k]
  s = fine // g
  idx = jnp.arange(fine * fine)
  under = ((idx // fine) // s == (cell // g)[:, None]) & (
      (idx % fine) // s == (cell % g)[:, None])
  return covered | (under & hit[:, None])
