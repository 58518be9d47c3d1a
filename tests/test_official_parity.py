"""Converted official models compute what the official PyTorch code computes.

Against tests/data/official_reference.npz, written once with the authors' own
modules by tests/data/make_official_reference.py (its docstring says what
ran): tiny random-weight dual-grain and triple-grain DQ-VAEs with the feature
router, and a class-conditional StackGPT, with their official outputs. The
models go through the user's path (`official_bundle.convert_*`, then
`dqvq.load_tokenizer` / `dqvq.load_generator`); no torch is needed here.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cached_logits
import dqvq
from dqvq.interop import official_bundle
from dqvq import sequence

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                         'official_reference.npz')


@pytest.fixture(scope='module')
def reference():
  with np.load(REFERENCE) as f:
    return {k: f[k] for k in f.files}


def _state_dict(ref, model):
  prefix = f'{model}/sd/'
  return {k[len(prefix):]: (v.astype(np.float32) if v.dtype == np.float16
                            else v)
          for k, v in ref.items() if k.startswith(prefix)}


@pytest.fixture(scope='module')
def bundles(reference, tmp_path_factory):
  tmp = tmp_path_factory.mktemp('parity')
  paths = {}
  for kind in ('dual', 'triple'):
    paths[kind], _ = official_bundle.convert_dqvae(
        _state_dict(reference, kind), str(tmp / kind))
  paths['stackgpt'], _ = official_bundle.convert_transformer(
      _state_dict(reference, 'stackgpt'), str(tmp / 'gpt'), paths['dual'],
      num_heads=4)
  return paths


@pytest.mark.parametrize('kind', ['dual', 'triple'])
def test_dqvae_grain_maps_codes_and_decoder_match(reference, bundles, kind):
  tok = dqvq.load_tokenizer(bundles[kind])
  assert tok.config.model.router == 'feature'
  assert len(tok.vae.grain_factors) == {'dual': 2, 'triple': 3}[kind]
  out = jax.jit(lambda t, x: t.encode(x))(tok, reference[f'{kind}/images'])
  want_grains = reference[f'{kind}/grain_map']
  assert len(np.unique(want_grains)) == len(tok.vae.grain_factors)
  np.testing.assert_array_equal(out['grain_map'], want_grains)
  np.testing.assert_array_equal(out['codes'], reference[f'{kind}/codes'])
  # The decoder's raw output (official: no clip) within 1e-4; `decode`
  # clips it to [-1, 1], which the random reference exceeds.
  codes = jnp.asarray(reference[f'{kind}/codes'])
  raw = jax.jit(lambda t, c: t.vae.apply(t.variables, c,
                                         method=t.vae.decode_codes))(tok, codes)
  want = reference[f'{kind}/decoded']
  np.testing.assert_allclose(np.asarray(raw), want, atol=1e-4, rtol=0)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(np.asarray(tok.decode(codes)),
                             np.clip(want, -1, 1), atol=1e-4, rtol=0)


def _streams(gen, reference):
  return sequence.encode(jnp.asarray(reference['stackgpt/codes']),
                         jnp.asarray(reference['stackgpt/grain_map']),
                         gen.layout, jnp.asarray(reference['stackgpt/labels']))


def _per_image(logits, keep):
  """Logits at each image's slots that have a target, in order: the
  official rows (its inputs stop before the last eos)."""
  return [np.asarray(logits[i])[np.asarray(keep[i])] for i in range(len(keep))]


def _check(got_pos, got_con, reference, atol=1e-4):
  for i, (p, c) in enumerate(zip(got_pos, got_con)):
    want_p = reference[f'stackgpt/position_logits_{i}']
    want_c = reference[f'stackgpt/content_logits_{i}']
    assert p.shape == want_p.shape and c.shape == want_c.shape, i
    np.testing.assert_allclose(p, want_p, atol=atol, rtol=0,
                               err_msg=f'position logits, image {i}')
    np.testing.assert_allclose(c, want_c, atol=atol, rtol=0,
                               err_msg=f'content logits, image {i}')


def _teacher_forced(gen, layout, streams):
  io = sequence.model_inputs(streams, layout)
  model = gen.model.clone(layout=layout)
  pos, con = jax.jit(model.apply)(
      {'params': gen.params}, io['inputs'], io['targets']['position'],
      io['targets']['grain'], next_pad=io['targets']['pad'])
  keep = ~io['targets']['pad']
  return _per_image(pos, keep), _per_image(con, keep)


def test_stackgpt_logits_match_on_a_batch_of_two(reference, bundles):
  """Two images with 5 and 11 coarse regions, in one batch, at full
  capacity (pads between each coarse eos and the fine sos)."""
  gen = dqvq.load_generator(bundles['stackgpt'])
  assert gen.layout.position_index == 'compact'  # recorded in the bundle
  assert gen.config.model.position_index == 'compact'
  streams = _streams(gen, reference)
  counts = np.sum(reference['stackgpt/grain_map'] == 0, axis=(1, 2))
  assert counts.tolist() == [5, 11]
  _check(*_teacher_forced(gen, gen.layout, streams), reference)
  # Slot positions (dqvq before) move every fine token's absolute position:
  # the fine logits then differ, so the check above can fail.
  slot = dataclasses.replace(gen.layout, position_index='slot')
  with pytest.raises(AssertionError, match='logits'):
    _check(*_teacher_forced(gen, slot, streams), reference)


def test_stackgpt_cached_decoding_matches(reference, bundles):
  """The sampler's KV-cached steps, fed the reference tokens, give the same
  logits: absolute index as `layout.absolute_index` at each slot, the eos
  slot told the next stream's sos, as `sampling.make_sampler` does."""
  gen = dqvq.load_generator(bundles['stackgpt'])
  io = sequence.model_inputs(_streams(gen, reference), gen.layout)
  pos, con = cached_logits(gen.model, gen.params, io)
  keep = ~io['targets']['pad']
  # Every official row has a cached counterpart (52 and 34 inputs).
  assert np.asarray(keep).sum(1).tolist() == [
      len(reference[f'stackgpt/content_logits_{i}']) for i in range(2)]
  _check(_per_image(pos, keep), _per_image(con, keep), reference)
