"""Coarse-to-fine token streams: layout, ids, round trip, static positions.

The expectations come from an independent pure-NumPy/Python construction of
the official `DualGrainSeperatePermuter` + `Dualformer.forward` streams
(reference section 2.1-2.2), extended to any number of granularities and to
fixed per-granularity capacities, never from the output of `dqvq.sequence`.
"""

import dataclasses
import jax
import numpy as np
import pytest

from dqvq import sequence

# Jitted once per (shape, layout): op-by-op dispatch would compile every
# small op separately, which dominates the run time on CPU.
_encode = jax.jit(sequence.encode, static_argnums=(2,))
_decode = jax.jit(sequence.decode, static_argnums=(2,))
_grain_map = jax.jit(sequence.grain_map_from_streams, static_argnums=(1,))


# ----------------------------------------------------------------------------
# Independent reference.
# ----------------------------------------------------------------------------


def _ref_specials(n, label):
  """(pad, eos, sos) of a stream with regular ids 0..n-1 (official table)."""
  return n, n + 1, n + 2 + label


def _ref_streams(codes, grain_map, grid_sizes, codebook_size, capacities=None,
                 label=0):
  """One image's streams, built cell by cell as the official permuter does.

  Args:
    codes: (G, G) code map on the finest grid.
    grain_map: (R, R) grain of each region (0 = coarsest).
    grid_sizes: side of each granularity's grid, coarse to fine.
    codebook_size: V.
    capacities: tokens per granularity (None: all cells of its grid).
    label: class label (0 for unconditional).

  Returns:
    dict of python lists 'content', 'position', 'grain', 'pad' plus
    'truncated' (bool), 'num_codes' (int), 'starts' (sos slot of each stream).
  """
  r, fine = grid_sizes[0], grid_sizes[-1]
  out = {'content': [], 'position': [], 'grain': [], 'pad': [], 'starts': []}
  truncated, num_codes = False, 0
  for k, g in enumerate(grid_sizes):
    n_k = g * g
    cap = n_k if capacities is None else capacities[k]
    # Cells of grid k whose region has grain k, raster order over grid k.
    cells = []
    for cell in range(n_k):
      y, x = divmod(cell, g)
      region_y, region_x = y * r // g, x * r // g
      if grain_map[region_y, region_x] == k:
        step = fine // g
        cells.append((cell, int(codes[y * step, x * step])))
    kept = cells[:cap]
    truncated |= len(cells) > cap
    num_codes += len(kept)
    vpad, veos, vsos = _ref_specials(codebook_size, label)
    ppad, peos, psos = _ref_specials(n_k, label)
    con = [vsos] + [c for _, c in kept]
    pos = [psos] + [p for p, _ in kept]
    if len(cells) <= cap:
      con.append(veos)
      pos.append(peos)
    real = len(con)
    con += [vpad] * (cap + 2 - real)
    pos += [ppad] * (cap + 2 - real)
    out['starts'].append(len(out['content']))
    out['content'] += con
    out['position'] += pos
    out['grain'] += [k] * (cap + 2)
    out['pad'] += [False] * real + [True] * (cap + 2 - real)
  out['truncated'] = truncated
  out['num_codes'] = num_codes
  return out


def _block_constant_codes(rng, grain_map, grid_sizes, codebook_size):
  """(G, G) codes constant over each region's cells at its granularity.

  As a DQ-VAE produces them: a region of grain k is split into cells of grid
  k, each cell gets one code, repeated over the finest cells it covers.
  """
  r, fine = grid_sizes[0], grid_sizes[-1]
  per_grain = []
  for g in grid_sizes:
    c = rng.integers(0, codebook_size, (g, g))
    per_grain.append(np.repeat(np.repeat(c, fine // g, 0), fine // g, 1))
  region_grain = np.repeat(np.repeat(grain_map, fine // r, 0), fine // r, 1)
  return np.choose(region_grain, per_grain)


def _grain_maps(rng, batch, num_grains, r):
  """Random maps plus the all-coarse and all-finest maps."""
  maps = [np.zeros((r, r), np.int64), np.full((r, r), num_grains - 1)]
  maps += [rng.integers(0, num_grains, (r, r)) for _ in range(batch - 2)]
  return np.stack(maps).astype(np.int32)


def _random_batch(seed, grid_sizes, codebook_size, batch=6):
  rng = np.random.default_rng(seed)
  gmaps = _grain_maps(rng, batch, len(grid_sizes), grid_sizes[0])
  codes = np.stack([_block_constant_codes(rng, m, grid_sizes, codebook_size)
                    for m in gmaps]).astype(np.int32)
  return codes, gmaps


def _np(streams):
  return {k: np.asarray(v) for k, v in streams.items()}


GRIDS = [(4, 8), (2, 4, 8)]


# ----------------------------------------------------------------------------
# Layout and vocabulary.
# ----------------------------------------------------------------------------


def test_imagenet_dual_vocab_sizes_and_length_match_official_table():
  """The official dual ImageNet model's vocab sizes (reference 2.1 table)."""
  uncond = sequence.StreamLayout((16, 32), 1024)
  cond = sequence.StreamLayout((16, 32), 1024, num_classes=1000)
  assert uncond.content_vocab_size == 1027
  assert cond.content_vocab_size == 2026
  assert (uncond.position_vocab_size(0), uncond.position_vocab_size(1)) == (
      259, 1027)
  assert (cond.position_vocab_size(0), cond.position_vocab_size(1)) == (
      1258, 2026)
  # The position head scores every grain over the fine vocabulary.
  assert uncond.position_logits_size == 1027
  assert cond.position_logits_size == 2026
  # Max length 258 + 1026 = 1284 (1283 inputs under block_size 2048).
  assert uncond.length == cond.length == 1284
  assert uncond.stream_starts == (0, 258)
  # One more sos id for the classifier-free-guidance null class.
  cfg = sequence.StreamLayout((16, 32), 1024, num_classes=1000,
                              null_class=True)
  assert cfg.content_vocab_size == 2027
  assert cfg.position_vocab_size(0) == 1259
  # layout_for: 256px images, grain factors 16 and 8 -> grids 16 and 32.
  assert sequence.layout_for((16, 8), 256, 1024, 1000) == cond


def test_imagenet_dual_worked_example():
  """Reference 2.3 worked example: coarse regions 3 and 7, the rest fine.

  Cc = [1026, a, b, 1025, pad...], Pc = [258, 3, 7, 257, pad...],
  Cf = [1026, f..., 1025], Pf = [1026, p..., 1025] with the fine cells in
  raster order over the 32x32 grid; the class model adds the label to every
  sos. Written out by hand rather than through the NumPy reference.
  """
  rng = np.random.default_rng(0)
  gmap = np.ones((1, 16, 16), np.int32)
  gmap[0, 0, 3] = gmap[0, 0, 7] = 0
  codes = rng.integers(0, 1024, (1, 32, 32)).astype(np.int32)
  a, b = 11, 22
  codes[0, 0:2, 6:8] = a
  codes[0, 0:2, 14:16] = b
  for label in (None, 417):
    lay = sequence.StreamLayout((16, 32), 1024,
                                num_classes=0 if label is None else 1000)
    c = 0 if label is None else label
    s = _np(_encode(codes, gmap, lay,
                    None if label is None else np.array([label])))
    assert s['content'].shape == (1, 1284)
    np.testing.assert_array_equal(s['content'][0, :4], [1026 + c, a, b, 1025])
    np.testing.assert_array_equal(s['position'][0, :4], [258 + c, 3, 7, 257])
    np.testing.assert_array_equal(s['content'][0, 4:258], 1024)
    np.testing.assert_array_equal(s['position'][0, 4:258], 256)
    fine_cells = [32 * y + x for y in range(32) for x in range(32)
                  if not (y < 2 and (6 <= x < 8 or 14 <= x < 16))]
    assert len(fine_cells) == 1016
    # The fine stream has capacity 1024: 1016 cells, then eos, then 8 pads.
    np.testing.assert_array_equal(
        s['position'][0, 258:],
        [1026 + c] + fine_cells + [1025] + [1024] * 8)
    np.testing.assert_array_equal(
        s['content'][0, 258:],
        [1026 + c] + [codes[0, p // 32, p % 32] for p in fine_cells] + [1025]
        + [1024] * 8)
    np.testing.assert_array_equal(s['grain'][0], [0] * 258 + [1] * 1026)
    np.testing.assert_array_equal(
        s['pad'][0],
        [False] * 4 + [True] * 254 + [False] * 1018 + [True] * 8)
    assert not s['truncated'][0] and s['num_codes'][0] == 2 + 1016


@pytest.mark.parametrize('grid_sizes', GRIDS)
def test_stream_lengths_and_starts(grid_sizes):
  """Full length = sum(capacity_k + 2); stream k starts after streams < k."""
  lay = sequence.StreamLayout(grid_sizes, 16)
  cells = [g * g for g in grid_sizes]
  assert lay.length == sum(n + 2 for n in cells)
  assert lay.stream_starts == tuple(int(x) for x in np.cumsum(
      [0] + [n + 2 for n in cells[:-1]]))
  caps = tuple(max(1, n // 3) for n in cells)
  capped = sequence.StreamLayout(grid_sizes, 16, capacities=caps)
  assert capped.length == sum(c + 2 for c in caps)
  np.testing.assert_array_equal(
      np.asarray(capped.grain_ids()),
      np.concatenate([[k] * (c + 2) for k, c in enumerate(caps)]))


# ----------------------------------------------------------------------------
# Against the reference.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('grid_sizes', GRIDS)
@pytest.mark.parametrize('num_classes,null_class', [(0, False), (5, False),
                                                    (5, True)])
def test_encode_matches_numpy_reference(grid_sizes, num_classes, null_class):
  """Every array of `encode` equals the cell-by-cell official construction."""
  v = 16
  codes, gmaps = _random_batch(1, grid_sizes, v)
  lay = sequence.StreamLayout(grid_sizes, v, num_classes, null_class)
  labels = None
  if num_classes:
    # Include the largest label (the null class when reserved).
    labels = np.arange(len(gmaps)) % lay.num_sos
    labels[-1] = lay.num_sos - 1
  s = _np(_encode(codes, gmaps, lay, labels))
  for i in range(len(gmaps)):
    ref = _ref_streams(codes[i], gmaps[i], grid_sizes, v,
                       label=0 if labels is None else int(labels[i]))
    for key in ('content', 'position', 'grain', 'pad'):
      np.testing.assert_array_equal(s[key][i], ref[key], err_msg=key)
      assert s[key].shape == (len(gmaps), lay.length)
    assert tuple(ref['starts']) == lay.stream_starts
    assert not s['truncated'][i] and not ref['truncated']
    assert s['num_codes'][i] == ref['num_codes']


@pytest.mark.parametrize('grid_sizes', GRIDS)
def test_token_ids_within_vocab(grid_sizes):
  """Content ids < content vocab; grain-k position ids < grain k's vocab."""
  v = 16
  codes, gmaps = _random_batch(2, grid_sizes, v)
  lay = sequence.StreamLayout(grid_sizes, v, num_classes=3, null_class=True)
  labels = np.full((len(gmaps),), 3)  # the null class: largest sos ids
  s = _np(_encode(codes, gmaps, lay, labels))
  assert s['content'].min() >= 0
  assert s['content'].max() < lay.content_vocab_size
  # The null-class sos is the largest content id there is.
  assert s['content'].max() == lay.content_vocab_size - 1
  for k in range(lay.num_grains):
    pos = s['position'][s['grain'] == k]
    assert pos.min() >= 0
    assert pos.max() == lay.position_vocab_size(k) - 1
    assert pos.max() < lay.position_logits_size


# ----------------------------------------------------------------------------
# Round trip.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('grid_sizes', GRIDS)
def test_round_trip(grid_sizes):
  """decode(encode(x)) == x, every cell written once, grain map recovered."""
  v = 32
  codes, gmaps = _random_batch(3, grid_sizes, v, batch=6)
  lay = sequence.StreamLayout(grid_sizes, v)
  s = _encode(codes, gmaps, lay)
  out, writes = _decode(s['content'], s['position'], lay)
  np.testing.assert_array_equal(np.asarray(out), codes)
  np.testing.assert_array_equal(np.asarray(writes), 1)
  np.testing.assert_array_equal(
      np.asarray(_grain_map(s['position'], lay)), gmaps)
  # Sanity of the generated data: the all-fine map needs every finest cell.
  assert int(np.asarray(s['num_codes'])[1]) == grid_sizes[-1] ** 2
  assert int(np.asarray(s['num_codes'])[0]) == grid_sizes[0] ** 2


def test_round_trip_class_conditional():
  """Class sos ids are specials too: decode ignores them whatever the label."""
  v, grid_sizes = 16, (4, 8)
  codes, gmaps = _random_batch(4, grid_sizes, v)
  lay = sequence.StreamLayout(grid_sizes, v, num_classes=40)
  labels = np.array([0, 39, 7, 20, 33, 1])
  s = _encode(codes, gmaps, lay, labels)
  out, writes = _decode(s['content'], s['position'], lay)
  np.testing.assert_array_equal(np.asarray(out), codes)
  np.testing.assert_array_equal(np.asarray(writes), 1)
  np.testing.assert_array_equal(
      np.asarray(_grain_map(s['position'], lay)), gmaps)


def test_decode_counts_overlapping_writes():
  """A cell written by two granularities reports writes == 2, finer wins.

  This is how a sampler detects an illegal sample (both a coarse region and
  fine cells inside it).
  """
  lay = sequence.StreamLayout((2, 4), 8)
  cpad, ceos, csos = 8, 9, 10
  # Coarse: region 0 with code 3. Fine: cell 0 (inside region 0) with code 5.
  content = np.array([[csos, 3, ceos, cpad, cpad, cpad,
                       csos, 5, ceos] + [cpad] * 15])
  position = np.array([[6, 0, 5, 4, 4, 4,
                        18, 0, 17] + [16] * 15])
  out, writes = _decode(content, position, lay)
  out, writes = np.asarray(out)[0], np.asarray(writes)[0]
  want_writes = np.zeros((4, 4), int)
  want_writes[:2, :2] = 1
  want_writes[0, 0] = 2
  np.testing.assert_array_equal(writes, want_writes)
  want = np.zeros((4, 4), int)
  want[:2, :2] = 3
  want[0, 0] = 5
  np.testing.assert_array_equal(out, want)


# ----------------------------------------------------------------------------
# Static positions and capacities.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('grid_sizes', GRIDS)
def test_slots_do_not_depend_on_batch(grid_sizes):
  """An image's streams are identical alone and inside any batch.

  The official code pads the coarse stream to the batch max, which moves the
  fine tokens' absolute slots; fixed capacities must not.
  """
  v = 16
  codes, gmaps = _random_batch(5, grid_sizes, v)
  lay = sequence.StreamLayout(grid_sizes, v)
  batch = _np(_encode(codes, gmaps, lay))
  reverse = _np(_encode(codes[::-1], gmaps[::-1], lay))
  for i in range(len(gmaps)):
    alone = _np(_encode(codes[i:i + 1], gmaps[i:i + 1], lay))
    for key in ('content', 'position', 'grain', 'pad', 'num_codes'):
      np.testing.assert_array_equal(alone[key][0], batch[key][i], err_msg=key)
      np.testing.assert_array_equal(reverse[key][len(gmaps) - 1 - i],
                                    batch[key][i], err_msg=key)
    # Each stream's sos always sits at the layout's static start.
    for k, start in enumerate(lay.stream_starts):
      assert alone['content'][0, start] == v + 2
      assert alone['position'][0, start] == grid_sizes[k] ** 2 + 2


@pytest.mark.parametrize('grid_sizes,capacities', [((4, 8), (10, 40)),
                                                   ((2, 4, 8), (2, 8, 32))])
def test_capacities_truncate(grid_sizes, capacities):
  """Streams longer than their capacity are cut (no eos) and flagged."""
  v = 16
  codes, gmaps = _random_batch(6, grid_sizes, v, batch=6)
  lay = sequence.StreamLayout(grid_sizes, v, capacities=capacities)
  s = _np(_encode(codes, gmaps, lay))
  assert s['content'].shape == (6, sum(c + 2 for c in capacities))
  any_truncated = any_kept = False
  for i in range(len(gmaps)):
    ref = _ref_streams(codes[i], gmaps[i], grid_sizes, v, capacities)
    # ('pad' of truncated streams: see test_pad_flag_marks_pad_id_slots.)
    for key in ('content', 'position', 'grain'):
      np.testing.assert_array_equal(s[key][i], ref[key], err_msg=key)
    # Independent count: cells of grid k in regions of grain k.
    counts = [int((gmaps[i] == k).sum()) * (g // grid_sizes[0]) ** 2
              for k, g in enumerate(grid_sizes)]
    over = [n > c for n, c in zip(counts, capacities)]
    assert bool(s['truncated'][i]) == any(over)
    assert s['num_codes'][i] == sum(min(n, c)
                                    for n, c in zip(counts, capacities))
    for k, start in enumerate(lay.stream_starts):
      stream = s['content'][i, start:start + capacities[k] + 2]
      has_eos = (stream == v + 1).any()
      assert has_eos != over[k]
      if over[k]:
        # Full stream: sos then `capacity` codes, and no eos anywhere.
        assert (stream[1:capacities[k] + 1] < v).all()
    any_truncated |= any(over)
    any_kept |= not any(over)
  assert any_truncated and any_kept  # the data exercises both branches


@pytest.mark.parametrize('capacities', [None, (5, 20)])
def test_pad_flag_marks_pad_id_slots(capacities):
  """'pad' is True exactly where a slot holds the pad ids (V, N_k).

  The flag is what hides a slot as an attention key and drops it as a loss
  target (`losses.token_loss_sums` uses ~targets['pad']), so a slot holding
  pad ids but not flagged would be trained as a target ("predict pad after
  the last kept token") and attended to. A truncated stream has no eos, so
  its last slot (the eos slot of a full stream) holds pad ids and must be
  flagged like every other pad; the reference builds it that way.
  """
  v, grid_sizes = 16, (4, 8)
  codes, gmaps = _random_batch(6, grid_sizes, v, batch=6)
  lay = sequence.StreamLayout(grid_sizes, v, capacities=capacities)
  s = _np(_encode(codes, gmaps, lay))
  is_pad_id = np.zeros_like(s['pad'])
  for k, (start, n) in enumerate(zip(lay.stream_starts, lay.stream_lengths)):
    sl = slice(start, start + n)
    is_pad_id[:, sl] = ((s['content'][:, sl] == v) &
                        (s['position'][:, sl] == grid_sizes[k] ** 2))
  for i in range(len(gmaps)):
    ref = _ref_streams(codes[i], gmaps[i], grid_sizes, v, capacities)
    np.testing.assert_array_equal(
        s['pad'][i], is_pad_id[i],
        err_msg=f'image {i} (truncated={bool(s["truncated"][i])}): pad flag '
        'differs from the slots holding pad ids')
    np.testing.assert_array_equal(s['pad'][i], ref['pad'])


# ----------------------------------------------------------------------------
# Teacher forcing and errors.
# ----------------------------------------------------------------------------


def test_model_inputs_shift_by_one():
  v, grid_sizes = 16, (2, 4, 8)
  codes, gmaps = _random_batch(7, grid_sizes, v)
  lay = sequence.StreamLayout(grid_sizes, v, position_index='slot')
  s = _encode(codes, gmaps, lay)
  mi = sequence.model_inputs(s, lay)
  for key in ('content', 'position', 'grain', 'pad'):
    full = np.asarray(s[key])
    inp, tgt = np.asarray(mi['inputs'][key]), np.asarray(mi['targets'][key])
    assert inp.shape == tgt.shape == (len(gmaps), lay.length - 1)
    np.testing.assert_array_equal(inp, full[:, :-1])
    np.testing.assert_array_equal(tgt, full[:, 1:])
    # Target t is input t + 1.
    np.testing.assert_array_equal(tgt[:, :-1], inp[:, 1:])


@pytest.mark.parametrize('grid_sizes,capacities', [
    ((2, 4, 8), None), ((2, 4, 8), (3, 9, 64)), ((4, 8), (5, 64))])
def test_compact_model_inputs_are_the_official_sequence(grid_sizes,
                                                        capacities):
  """Compact teacher forcing is the official one on each image alone.

  Dropping every pad slot from an image's inputs and targets leaves, in
  order, its compact sequence s (sos, tokens, eos per stream) as inputs
  s[:-1] and targets s[1:]; the absolute index counts those inputs 0, 1, ...
  Pad slots target nothing. This is the official StackGPT on an unpadded
  image (reference 2.3, the worked alignment table).
  """
  v = 16
  codes, gmaps = _random_batch(7, grid_sizes, v)
  lay = sequence.StreamLayout(grid_sizes, v, capacities=capacities,
                              position_index='compact')
  s = _encode(codes, gmaps, lay)
  mi = sequence.model_inputs(s, lay)
  index = np.asarray(lay.absolute_index(mi['inputs']['pad']))
  in_pad = np.asarray(mi['inputs']['pad'])
  tgt_pad = np.asarray(mi['targets']['pad'])
  assert np.all(tgt_pad[in_pad])  # pads predict nothing
  for i in range(len(gmaps)):
    real = ~np.asarray(s['pad'][i])
    for key in ('content', 'position', 'grain'):
      seq = np.asarray(s[key][i])[real]
      keep = ~tgt_pad[i]
      np.testing.assert_array_equal(
          np.asarray(mi['inputs'][key][i])[keep], seq[:-1], err_msg=key)
      np.testing.assert_array_equal(
          np.asarray(mi['targets'][key][i])[keep], seq[1:], err_msg=key)
    np.testing.assert_array_equal(index[i][~tgt_pad[i]],
                                  np.arange(real.sum() - 1))
  # Some image has pads between a stream's eos and the next sos, so the
  # compact targets differ from the slot shift.
  slot = sequence.model_inputs(s, dataclasses.replace(lay,
                                                      position_index='slot'))
  assert np.any(np.asarray(slot['targets']['content']) !=
                np.asarray(mi['targets']['content']))


@pytest.mark.parametrize('kwargs', [
    dict(grid_sizes=(4, 6), codebook_size=8),        # 4 does not divide 6
    dict(grid_sizes=(8, 4), codebook_size=8),        # fine to coarse
    dict(grid_sizes=(), codebook_size=8),
    dict(grid_sizes=(0, 4), codebook_size=8),
    dict(grid_sizes=(4, 8), codebook_size=8, capacities=(0, 10)),
    dict(grid_sizes=(4, 8), codebook_size=8, capacities=(17, 10)),
    dict(grid_sizes=(4, 8), codebook_size=8, capacities=(4, 65)),
    dict(grid_sizes=(4, 8), codebook_size=8, capacities=(4,)),
    dict(grid_sizes=(4, 8), codebook_size=8, null_class=True),
    dict(grid_sizes=(4, 8), codebook_size=8, position_index='row'),
])
def test_bad_layouts_raise(kwargs):
  with pytest.raises(ValueError):
    sequence.StreamLayout(**kwargs)


def test_bad_layout_for_and_encode_inputs_raise():
  with pytest.raises(ValueError):
    sequence.layout_for((16, 8), 100, 16)  # 100 % 16 != 0
  lay = sequence.StreamLayout((4, 8), 16)
  good_codes = np.zeros((2, 8, 8), np.int32)
  good_grain = np.zeros((2, 4, 4), np.int32)
  _encode(good_codes, good_grain, lay)  # the baseline is accepted
  with pytest.raises(ValueError):
    sequence.encode(np.zeros((2, 4, 4), np.int32), good_grain, lay)
  with pytest.raises(ValueError):
    sequence.encode(good_codes, np.zeros((2, 8, 8), np.int32), lay)
  with pytest.raises(ValueError):
    sequence.encode(np.zeros((2, 8, 4), np.int32), good_grain, lay)
  cond = sequence.StreamLayout((4, 8), 16, num_classes=10)
  with pytest.raises(ValueError):
    sequence.encode(good_codes, good_grain, cond)
  _encode(good_codes, good_grain, cond, np.array([1, 2]))
