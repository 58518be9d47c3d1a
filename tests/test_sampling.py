"""Sampler: KV cache == full forward, cached == naive, legality, CFG, CLI.

Tiny random-param models (N(0, 0.3) weights, so every path moves the
logits) on toy layouts keep every check to a few seconds on CPU.
"""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cached_logits
from dqvq.models import transformer as tr_lib
from dqvq import sampling
from dqvq import sequence
from dqvq import stream_legality

DUAL = sequence.StreamLayout((4, 8), 16)
DUAL_CFG = sequence.StreamLayout((4, 8), 16, num_classes=3, null_class=True)
TRIPLE_CFG = sequence.StreamLayout((2, 4, 8), 16, num_classes=3,
                                   null_class=True)


@functools.lru_cache(maxsize=None)
def _model_and_params(layout, seed=0):
  kw = tr_lib.tiny_kwargs()
  kw['block_size'] = 128
  model = tr_lib.DQTransformer(layout, **kw)
  t = layout.length - 1
  ints = jnp.zeros((1, t), jnp.int32)
  x = {'content': ints, 'position': ints, 'grain': ints,
       'pad': jnp.zeros((1, t), bool)}
  shapes = nn.unbox(jax.eval_shape(model.init, {'params': jax.random.key(0)},
                                   x, ints, ints))['params']
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)
  return model, params


def _labels(layout, b):
  return jnp.arange(b, dtype=jnp.int32) % max(layout.num_classes, 1)


def _check_streams(out, layout, floors=None, caps=None):
  """Structure, legality and completeness of sampled streams (NumPy)."""
  content, position = np.asarray(out['content']), np.asarray(out['position'])
  pad = np.asarray(out['pad'])
  v, fine = layout.codebook_size, layout.grid_sizes[-1]
  for k, (s, n) in enumerate(zip(layout.stream_starts,
                                 layout.stream_lengths)):
    n_k, g = layout.num_cells[k], layout.grid_sizes[k]
    con, pos, pd = content[:, s:s + n], position[:, s:s + n], pad[:, s:s + n]
    count = np.argmax(con == v + 1, axis=1) - 1  # eos index - sos
    assert np.all((con == v + 1).sum(1) == 1), 'exactly one eos per stream'
    for b in range(con.shape[0]):
      c = count[b]
      assert not pd[b, :c + 2].any() and pd[b, c + 2:].all()
      assert pos[b, c + 1] == n_k + 1  # eos position
      cells = pos[b, 1:c + 1]
      assert np.all((cells >= 0) & (cells < n_k)), 'illegal position id'
      assert len(set(cells.tolist())) == c, 'repeated position'
      assert np.all((con[b, 1:c + 1] >= 0) & (con[b, 1:c + 1] < v))
      assert np.all(con[b, c + 2:] == v) and np.all(pos[b, c + 2:] == n_k)
    if k == layout.num_grains - 1:  # forced row-first order
      for b in range(con.shape[0]):
        cells = pos[b, 1:count[b] + 1]
        assert np.all(np.diff(cells) > 0)
    if floors is not None:
      assert np.all(count >= floors[k]) and np.all(count <= caps[k])
    del g
  _, writes = sequence.decode(out['content'], out['position'], layout)
  assert np.all(np.asarray(writes) == 1), 'incomplete or overlapping sample'
  assert fine * fine >= 1


@pytest.mark.parametrize('position_index', ['compact', 'slot'])
def test_decode_matches_full_forward(position_index):
  """KV-cached position/content logits == the teacher-forced forward."""
  layout = dataclasses.replace(TRIPLE_CFG, position_index=position_index)
  model, params = _model_and_params(layout)
  rng = np.random.default_rng(0)
  gmaps = rng.integers(0, 3, (2, 2, 2)).astype(np.int32)
  codes = rng.integers(0, 16, (2, 8, 8)).astype(np.int32)
  streams = sequence.encode(codes, gmaps, layout, jnp.array([1, 3]))
  io = sequence.model_inputs(streams, layout)
  inp, tgt = io['inputs'], io['targets']
  want_p, want_c = jax.jit(lambda p: model.apply(
      {'params': p}, inp, tgt['position'], tgt['grain'],
      next_pad=tgt['pad']))(params)
  got_p, got_c = cached_logits(model, params, io)
  np.testing.assert_allclose(got_p, want_p, atol=2e-4,
                             rtol=2e-4)
  np.testing.assert_allclose(got_c, want_c, atol=2e-4,
                             rtol=2e-4)


@pytest.mark.parametrize('layout,config', [
    (DUAL, sampling.SamplingConfig(seed=1)),
    (DUAL_CFG, sampling.SamplingConfig(greedy=True, cfg_scale_position=1.5,
                                       cfg_scale_content=3.0)),
    (TRIPLE_CFG, sampling.SamplingConfig(
        top_k_content=5, top_p_position=0.9, temperature_content=0.8,
        max_codes=(3, 10, 64))),
    (dataclasses.replace(TRIPLE_CFG, position_index='compact'),
     sampling.SamplingConfig(seed=2, max_codes=(3, 10, 64))),
    (dataclasses.replace(DUAL_CFG, position_index='compact'),
     sampling.SamplingConfig(cfg_scale_content=2.0, seed=3)),
], ids=['dual-uncond', 'dual-cfg-greedy', 'triple-cond-topkp',
        'triple-compact', 'dual-cfg-compact'])
def test_cached_equals_naive(layout, config):
  model, params = _model_and_params(layout)
  labels = _labels(layout, 4)
  key = jax.random.key(config.seed)
  cached = sampling.make_sampler(model, config)(params, labels, key)
  naive = sampling.make_naive_sampler(model, config)(params, labels, key)
  for name in ('content', 'position', 'pad', 'num_codes'):
    np.testing.assert_array_equal(cached[name], naive[name], err_msg=name)
  _check_streams(cached, layout)


def test_thousand_samples_are_legal_and_complete():
  """1000 sequences of an untrained model: legal ids, no repeats, complete."""
  layout = TRIPLE_CFG
  model, params = _model_and_params(layout, seed=1)
  out = jax.device_get(sampling.make_sampler(model, sampling.SamplingConfig())(
      params, _labels(layout, 1000), jax.random.key(3)))
  _check_streams(out, layout)
  lengths = out['num_codes']
  assert lengths.min() < lengths.max()  # samples finish at different slots


def test_budgets_and_early_eos():
  """Floors/caps hold; samples that stop early pad while others go on."""
  layout = DUAL_CFG
  model, params = _model_and_params(layout)
  floors, caps = (2, 0), (6, 64)
  config = sampling.SamplingConfig(min_codes=floors, max_codes=caps)
  out = jax.device_get(sampling.make_sampler(model, config)(
      params, _labels(layout, 64), jax.random.key(0)))
  _check_streams(out, layout, floors, caps)
  coarse = (out['content'][:, :layout.stream_lengths[0]] < 16).sum(1)
  assert coarse.min() < coarse.max()
  # Cap == floor pins the coarse count; the fine stream covers the rest.
  config = sampling.SamplingConfig(min_codes=(3, 0), max_codes=(3, 64))
  out = jax.device_get(sampling.make_sampler(model, config)(
      params, _labels(layout, 8), jax.random.key(1)))
  _check_streams(out, layout, (3, 0), (3, 64))
  np.testing.assert_array_equal(out['num_codes'], 3 + 4 * 13)
  with pytest.raises(ValueError, match='cannot cover'):
    sampling.make_sampler(model, sampling.SamplingConfig(max_codes=(4, 16)))


def test_cfg_scale_zero_is_the_null_class_path():
  layout = DUAL_CFG
  model, params = _model_and_params(layout)
  labels, key = _labels(layout, 4), jax.random.key(5)
  zero = sampling.SamplingConfig(cfg_scale_position=0.0,
                                 cfg_scale_content=0.0)
  guided = sampling.make_sampler(model, zero)(params, labels, key)
  null = jnp.full_like(labels, layout.num_classes)
  plain = sampling.make_sampler(model, sampling.SamplingConfig())(
      params, null, key)
  # Same tokens; only the sos/class slots carry the asked labels.
  relabeled = stream_legality.relabel(dict(guided), layout, null)
  for name in ('content', 'position', 'pad'):
    np.testing.assert_array_equal(relabeled[name], plain[name])
  with pytest.raises(ValueError, match='null_class'):
    sampling.make_sampler(_model_and_params(DUAL)[0], zero)


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  legal = jnp.array([[True, True, True, False]])
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(sampling.filter_logits(logits, legal, 1.0, 0, 1.0)) == [
      True, True, True, False]
  assert kept(sampling.filter_logits(logits, legal, 1.0, 2, 1.0)) == [
      True, True, False, False]
  assert kept(sampling.filter_logits(logits, legal, 1.0, 0, 0.6)) == [
      True, True, False, False]
  assert kept(sampling.filter_logits(logits, legal, 1.0, 0, 0.4)) == [
      True, False, False, False]


def test_preview_codes():
  layout = DUAL
  codes = np.zeros((1, 8, 8), np.int32)
  codes[0, :2, :2] = 7   # coarse region 0
  codes[0, 4:, 4:] = 9   # region (2, 2) and more, left fine below
  gmap = np.zeros((1, 4, 4), np.int32)
  gmap[0, 1:, :] = 1     # rows 1..3 of regions are fine
  s = sequence.encode(jnp.asarray(codes), jnp.asarray(gmap), layout)
  preview = np.asarray(sampling.preview_codes(s['content'], s['position'],
                                              layout))
  assert preview.shape == (1, 8, 8)
  np.testing.assert_array_equal(preview[0, :2, :2], 7)
  # Fine-only regions take the nearest coarse region's code.
  np.testing.assert_array_equal(preview[0, 2:4, :2], 7)


def test_cli_writes_images(stage2_workdir, tmp_path):
  from dqvq import sample  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'samples')
  sample.run(workdir=stage2_workdir, num_images=3, out=out, class_labels=[1, 2],
             config=sampling.SamplingConfig(top_k_content=50,
                                            cfg_scale_content=2.0),
             batch_size=0)
  names = set(os.listdir(out))
  assert {'grid.png', 'preview_grid.png', 'tokens.npz'} <= names
  assert len(os.listdir(os.path.join(out, 'images'))) == 3
  assert len(os.listdir(os.path.join(out, 'previews'))) == 3
  tokens = np.load(os.path.join(out, 'tokens.npz'))
  assert tokens['content'].shape[0] == 3
  np.testing.assert_array_equal(tokens['label'], [1, 2, 1])
  assert np.all(tokens['writes'] == 1)
