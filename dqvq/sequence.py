"""Code map + grain map <-> coarse-to-fine token streams (DQ-Transformer input).

Each granularity k (0 = coarsest) contributes two aligned streams: the code
ids of the cells it covers (content) and their indices in granularity k's own
grid, raster order over the whole image (position; the official "row-first"
order). Each stream is framed as [sos, tokens..., eos, pad...] and the
streams are concatenated coarse to fine, as in the official
`DualGrainSeperatePermuter` plus `Dualformer.forward`.

Token ids follow the official dual model and extend to any K:

  content of every grain:  codes 0..V-1, pad V, eos V+1, sos V+2 (+class)
  positions of grain k:    cells 0..N_k-1, pad N_k, eos N_k+1, sos N_k+2 (+class)

so the dual ImageNet model has content 1024/1025/1026, coarse positions
256/257/258 and fine positions 1024/1025/1026, and a class label c replaces
every sos by sos + c (the official `ClassAwareSOSProvider`). With label
dropout the class id `num_classes` is the null class used for classifier-free
guidance.

Unlike the official code, which pads the coarse stream to the longest one in
the batch, every granularity has a fixed capacity, so the shapes are static
under jit. The default capacity is the largest possible count (every region
at that granularity); a smaller capacity truncates longer streams (no eos is
written) and the `truncated` flag reports it.

Slots need not be positions (`position_index`). With 'slot' (dqvq's
default) a token's absolute position (the row of the learned `pos_emb` table
it reads) is its slot, so every stream starts at a fixed row, and each slot
predicts slot + 1 (the last pad of a stream predicts the next stream's sos).
With 'compact' the absolute position is the token's index in its own
image's sequence with the pads left out, and each token predicts the next
non-pad token (after an eos: the next stream's sos). That is exactly what
the official StackGPT sees for every single image, so converted official
generators use it (`dqvq.interop.official`), and it never depends on the other
images in the batch (the official pads the coarse stream to the batch's
longest, a batch-dependent quirk not copied). Trained from scratch on the
demo, compact lost a little: stage-2 validation loss 4.798 against 4.773
for slot, almost all of it in the fine positions (0.785 against 0.750),
which under slot positions can read their index within the fine stream
straight off the table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StreamLayout:
  """The static shape and token ids of a coarse-to-fine sequence.

  Attributes:
    grid_sizes: side of each granularity's grid, coarse to fine (the dual
      ImageNet model: (16, 32)).
    codebook_size: V, the number of codes.
    num_classes: 0 for an unconditional model, else the number of classes.
    null_class: reserve one more class id (`num_classes`) for classifier-free
      guidance (the label-dropout token).
    capacities: max tokens per granularity, excluding sos/eos; None = all
      cells of that granularity's grid (never truncates).
    position_index: 'slot' (absolute position = slot, dqvq's own) or
      'compact' (only non-pad tokens count, as the official does on each
      image); see the module docstring.
  """
  grid_sizes: tuple[int, ...]
  codebook_size: int
  num_classes: int = 0
  null_class: bool = False
  capacities: tuple[int, ...] | None = None
  position_index: str = 'slot'

  def __post_init__(self):
    sizes = tuple(self.grid_sizes)
    if not sizes or any(s <= 0 for s in sizes) or any(
        b % a for a, b in zip(sizes, sizes[1:])):
      raise ValueError(f'grid_sizes={sizes} must be positive, coarse to fine, '
                       'each dividing the next (e.g. (16, 32)).')
    if self.capacities is not None:
      if len(self.capacities) != len(sizes) or any(
          not 0 < c <= s * s for c, s in zip(self.capacities, sizes)):
        raise ValueError(
            f'capacities={self.capacities} needs one entry per granularity, '
            f'each in 1..cells of its grid {[s * s for s in sizes]}.')
    if self.null_class and not self.num_classes:
      raise ValueError('null_class (label dropout) needs num_classes > 0.')
    if self.position_index not in POSITION_INDEX:
      raise ValueError(f'position_index={self.position_index!r}; choose one of '
                       f'{POSITION_INDEX} (config.model.position_index).')

  @property
  def num_grains(self) -> int:
    return len(self.grid_sizes)

  @property
  def num_cells(self) -> tuple[int, ...]:
    return tuple(s * s for s in self.grid_sizes)

  @property
  def stream_capacities(self) -> tuple[int, ...]:
    return tuple(self.capacities) if self.capacities else self.num_cells

  @property
  def stream_lengths(self) -> tuple[int, ...]:
    """Slots per granularity: sos + capacity + eos."""
    return tuple(c + 2 for c in self.stream_capacities)

  @property
  def stream_starts(self) -> tuple[int, ...]:
    """Index of each granularity's sos in the full sequence."""
    lengths = self.stream_lengths
    return tuple(sum(lengths[:k]) for k in range(self.num_grains))

  @property
  def length(self) -> int:
    """Full sequence length; the model sees length - 1 inputs."""
    return sum(self.stream_lengths)

  @property
  def num_sos(self) -> int:
    """How many sos ids each stream has (one per class, or one)."""
    return max(1, self.num_classes + int(self.null_class))

  @property
  def content_vocab_size(self) -> int:
    return self.codebook_size + 2 + self.num_sos

  def position_vocab_size(self, k: int) -> int:
    return self.num_cells[k] + 2 + self.num_sos

  @property
  def position_logits_size(self) -> int:
    """The position head scores every grain over the finest vocabulary."""
    return self.position_vocab_size(self.num_grains - 1)

  def grain_ids(self) -> Array:
    """(length,) granularity of every slot."""
    return jnp.concatenate([jnp.full((n,), k, jnp.int32)
                            for k, n in enumerate(self.stream_lengths)])

  @property
  def compact(self) -> bool:
    return self.position_index == 'compact'

  def absolute_index(self, pad: Array) -> Array:
    """(B, T) row of the absolute position table for slots 0..T-1.

    Compact: the number of non-pad slots before each slot (pad slots get
    their predecessor's index; they embed to zero anyway). Slot: the slot.
    """
    t = pad.shape[-1]
    if not self.compact:
      return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), pad.shape)
    return jnp.maximum(jnp.cumsum(~pad, axis=-1, dtype=jnp.int32) - 1, 0)


POSITION_INDEX = ('compact', 'slot')


def layout_for(grain_factors: Sequence[int], resolution: int,
               codebook_size: int, num_classes: int = 0,
               null_class: bool = False,
               capacities: Sequence[int] | None = None,
               position_index: str = 'slot') -> StreamLayout:
  """The layout of a DQ-VAE with `grain_factors` (coarse to fine)."""
  for f in grain_factors:
    if resolution % f:
      raise ValueError(f'resolution {resolution} is not a multiple of the '
                       f'grain factor {f}.')
  return StreamLayout(tuple(resolution // f for f in grain_factors),
                      codebook_size, num_classes, null_class,
                      tuple(capacities) if capacities else None,
                      position_index)


def layout_from_config(config: Any, vae: Any) -> StreamLayout:
  """The stage-2 layout of a run's config over its tokenizer's DQ-VAE.

  `vae` is anything with `grain_factors` and `codebook_size` (a DQVAE).
  """
  m = config.model
  return layout_for(
      vae.grain_factors, config.data.resolution, vae.codebook_size,
      num_classes=m.num_classes, null_class=m.label_dropout > 0,
      capacities=tuple(m.capacities) if m.capacities else None,
      # A config from before the field trained with slot positions.
      position_index=m.get('position_index', 'slot'))


def _grain_of_cells(grain_map: Array, layout: StreamLayout, k: int) -> Array:
  """(B, N_k) bool: which cells of grid k belong to regions of grain k."""
  rep = layout.grid_sizes[k] // layout.grid_sizes[0]
  g = jnp.repeat(jnp.repeat(grain_map, rep, axis=1), rep, axis=2)
  return (g == k).reshape(grain_map.shape[0], -1)


def _cell_codes(codes: Array, layout: StreamLayout, k: int) -> Array:
  """(B, N_k) code of each cell of grid k: its top-left finest cell."""
  step = layout.grid_sizes[-1] // layout.grid_sizes[k]
  return codes[:, ::step, ::step].reshape(codes.shape[0], -1)


def encode(codes: Array, grain_map: Array, layout: StreamLayout,
           labels: Array | None = None) -> dict[str, Array]:
  """Code map (B, G, G) and grain map (B, R, R) -> full-length streams.

  Returns a dict of (B, layout.length) int32 arrays 'content', 'position',
  'grain' and bool 'pad', plus (B,) bool 'truncated' (some stream exceeded
  its capacity) and (B,) int32 'num_codes'.
  """
  b = codes.shape[0]
  if codes.shape[1:] != (layout.grid_sizes[-1],) * 2 or grain_map.shape[
      1:] != (layout.grid_sizes[0],) * 2:
    raise ValueError(f'codes {codes.shape} / grain_map {grain_map.shape} do '
                     f'not match grid sizes {layout.grid_sizes}.')
  if layout.num_classes and labels is None:
    raise ValueError('A class-conditional layout needs labels.')
  cls = (jnp.zeros((b,), jnp.int32) if labels is None
         else jnp.asarray(labels, jnp.int32))
  v = layout.codebook_size
  contents, positions, pads = [], [], []
  truncated = jnp.zeros((b,), bool)
  num_codes = jnp.zeros((b,), jnp.int32)
  for k, cap in enumerate(layout.stream_capacities):
    n_k = layout.num_cells[k]
    sel = _grain_of_cells(grain_map, layout, k)
    count = sel.sum(axis=1)
    # Compact the selected cells to the front, keeping raster order.
    slot = jnp.where(sel, jnp.cumsum(sel, axis=1) - 1, cap)
    rows = jnp.arange(b)[:, None]
    cell_ids = jnp.broadcast_to(jnp.arange(n_k, dtype=jnp.int32), (b, n_k))
    pos = jnp.full((b, cap), n_k, jnp.int32).at[rows, slot].set(
        cell_ids, mode='drop')
    con = jnp.full((b, cap), v, jnp.int32).at[rows, slot].set(
        _cell_codes(codes, layout, k).astype(jnp.int32), mode='drop')
    # Frame: [sos, cap slots, one extra slot]; eos sits right after the last
    # token (slot count + 1), unless the stream was truncated.
    idx = jnp.arange(cap + 2)[None]
    eos_here = idx == (count + 1)[:, None]
    pos = jnp.concatenate([(n_k + 2 + cls)[:, None], pos,
                           jnp.full((b, 1), n_k, jnp.int32)], axis=1)
    con = jnp.concatenate([(v + 2 + cls)[:, None], con,
                           jnp.full((b, 1), v, jnp.int32)], axis=1)
    pos = jnp.where(eos_here, n_k + 1, pos)
    con = jnp.where(eos_here, v + 1, con)
    positions.append(pos)
    contents.append(con)
    # A truncated stream has no eos; its extra last slot is a pad.
    pads.append(idx > jnp.where(count > cap, cap, count + 1)[:, None])
    truncated |= count > cap
    num_codes += jnp.minimum(count, cap)
  grain = jnp.broadcast_to(layout.grain_ids(), (b, layout.length))
  return {'content': jnp.concatenate(contents, 1),
          'position': jnp.concatenate(positions, 1),
          'grain': grain, 'pad': jnp.concatenate(pads, 1),
          'truncated': truncated, 'num_codes': num_codes}


def decode(content: Array, position: Array,
           layout: StreamLayout) -> tuple[Array, Array]:
  """Full streams -> (code map (B, G, G), writes per finest cell (B, G, G)).

  Each (position, content) pair of granularity k writes its code over that
  cell's block of the finest grid, coarse first (the official
  `forward_back`). Special tokens, and codes outside the codebook, write
  nothing; cells nobody writes keep code 0. `writes` counts how many
  granularities wrote each cell: 1 everywhere for a complete, legal sample.
  """
  b = content.shape[0]
  fine = layout.grid_sizes[-1]
  codes = jnp.zeros((b, fine, fine), jnp.int32)
  writes = jnp.zeros((b, fine, fine), jnp.int32)
  rows = jnp.arange(b)[:, None]
  for k, (start, n) in enumerate(zip(layout.stream_starts,
                                     layout.stream_lengths)):
    g, n_k = layout.grid_sizes[k], layout.num_cells[k]
    pos = position[:, start:start + n]
    con = content[:, start:start + n]
    ok = (pos < n_k) & (con < layout.codebook_size) & (pos >= 0) & (con >= 0)
    target = jnp.where(ok, pos, n_k)  # out of range -> dropped
    grid = jnp.zeros((b, n_k), jnp.int32).at[rows, target].set(
        con, mode='drop')
    hit = jnp.zeros((b, n_k), jnp.int32).at[rows, target].add(1, mode='drop')
    rep = fine // g
    up = lambda a: jnp.repeat(jnp.repeat(a.reshape(b, g, g), rep, 1), rep, 2)
    codes = jnp.where(up(hit) > 0, up(grid), codes)
    writes = writes + jnp.minimum(up(hit), 1)
  return codes, writes


def grain_map_from_streams(position: Array, layout: StreamLayout) -> Array:
  """(B, R, R) grain of each region (the finest grain that wrote into it)."""
  b = position.shape[0]
  r = layout.grid_sizes[0]
  out = jnp.zeros((b, r, r), jnp.int32)
  rows = jnp.arange(b)[:, None]
  for k, (start, n) in enumerate(zip(layout.stream_starts,
                                     layout.stream_lengths)):
    g = layout.grid_sizes[k]
    pos = position[:, start:start + n]
    region = (pos // g) // (g // r) * r + (pos % g) // (g // r)
    region = jnp.where(pos < layout.num_cells[k], region, r * r)
    hit = jnp.zeros((b, r * r), bool).at[rows, region].set(True, mode='drop')
    out = jnp.where(hit.reshape(b, r, r), k, out)
  return out


def model_inputs(streams: dict[str, Array],
                 layout: StreamLayout) -> dict[str, Array]:
  """Teacher forcing: inputs are slots 0..T-2 and their targets.

  Slot layouts target slots 1..T-1. Compact layouts target, for every
  non-pad slot, the next non-pad slot (after an eos: the next stream's sos,
  the official's boundary); pad slots and the last token target nothing
  (their target is flagged pad). The content stack is told each target's
  position, so the eos slot is told the next stream's sos, as in the
  official.
  """
  names = ('content', 'position', 'grain', 'pad')
  inputs = {k: streams[k][:, :-1] for k in names}
  if not layout.compact:
    return {'inputs': inputs, 'targets': {k: streams[k][:, 1:] for k in names}}
  pad = streams['pad']
  t = pad.shape[1]
  # nxt[s] = the first non-pad slot after s (t if none).
  real = jnp.where(pad, t, jnp.arange(t, dtype=jnp.int32))
  after = jax.lax.cummin(real, axis=1, reverse=True)
  nxt = jnp.concatenate([after[:, 1:], jnp.full_like(after[:, :1], t)], 1)
  nxt = nxt[:, :-1]
  gather = lambda a: jnp.take_along_axis(a, jnp.minimum(nxt, t - 1), axis=1)
  targets = {k: gather(streams[k]) for k in ('content', 'position', 'grain')}
  targets['pad'] = inputs['pad'] | (nxt >= t)
  return {'inputs': inputs, 'targets': targets}


def bits_per_image(code_length_mean: float, codebook_size: int,
                   num_regions: int, num_grains: int) -> dict[str, float]:
  """Mean bits per image: codes at log2(codebook) + the grain map.

  The grain map costs log2(num_grains) bits per region (0 for one grain),
  what a decoder needs to place variable-length codes.
  """
  codes = code_length_mean * math.log2(codebook_size)
  grain_map = num_regions * math.log2(num_grains) if num_grains > 1 else 0.0
  return {'bits_per_image': codes + grain_map, 'bits_codes': codes,
          'bits_grain_map': grain_map}
