"""DQ-Transformer input ablations (paper Table 7): each switch changes what it
should and nothing else.

For every ablation of `study_stage2.VARIANTS` (the study trains exactly
these): the parameters it removes or adds and no other name or shape; its
logits equal to those of a default model whose parameters do what the
variant does (so nothing else changed), and different from the default's
own; and its KV-cached decode equal to its full forward. The defaults are
checked bit for bit against the official reference by
tests/test_official_parity.py. Toy widths (`tiny_kwargs`) throughout.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import cached_logits
from dqvq import config_lib
from dqvq.eval import study_stage2
from dqvq.models import transformer as tr_lib
from dqvq import sampling
from dqvq import sequence
from dqvq.trainers import checks
from dqvq.trainers import stage2
import test_transformer as tt  # pylint: disable=g-bad-import-order

# Class-conditional, dual grain, with pad runs in both streams.
LAYOUT = sequence.StreamLayout((2, 4), 16, num_classes=3)
ABLATIONS = {n: v for n, v in study_stage2.VARIANTS.items() if n != 'paper'}
_E = tr_lib.tiny_kwargs()['width']
# What each ablation removes, and adds ({name: table shape}), at LAYOUT.
CHANGES = {
    'non_shared_content': ({'content_emb'}, {
        'content_coarse_emb': (LAYOUT.content_vocab_size, _E),
        'content_fine_emb': (LAYOUT.content_vocab_size, _E)}),
    'shared_position': ({'content_coarse_pos_emb'}, {}),
    'no_granularity': ({'seg_emb'}, {}),
    'no_absolute_position': ({'pos_emb'}, {}),
}


@functools.lru_cache(maxsize=None)
def _data():
  """Model arguments, `model_inputs` and random default params, built once."""
  streams = tt._streams(LAYOUT, labels=np.array([0, 1, 2]))
  args = tt._model_args(streams, LAYOUT)
  io = sequence.model_inputs(streams, LAYOUT)
  return args, io, tt._randomized_params(tt._tiny(LAYOUT), args)['params']


@functools.lru_cache(maxsize=None)
def _apply(**switches):
  """The jitted full forward of a tiny model with `switches` (one compile
  per model)."""
  return jax.jit(tt._tiny(LAYOUT, **switches).apply)


def _logits(params, **switches):
  args, _, _ = _data()
  return [np.asarray(a) for a in _apply(**switches)({'params': params},
                                                    *args)]


def _shapes(**switches):
  model = tt._tiny(LAYOUT, **switches)
  args, _, _ = _data()
  boxed = jax.eval_shape(model.init, {'params': jax.random.key(0)}, *args)
  return jax.tree.map(lambda x: x.shape, nn.unbox(boxed)['params'])


@pytest.mark.parametrize('name', ABLATIONS)
def test_parameters_change_only_where_the_switch_says(name):
  default, variant = _shapes(), _shapes(**ABLATIONS[name])
  removed, added = CHANGES[name]
  assert set(default) - set(variant) == removed
  assert {k: variant[k] for k in set(variant) - set(default)} == {
      k: {'embedding': shape} for k, shape in added.items()}
  for k in set(default) & set(variant):  # every other name and shape
    assert variant[k] == default[k], k
  size = lambda tree: sum(int(np.prod(s)) for s in jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, tuple)))
  assert size(variant) - size(default) == (
      sum(int(np.prod(s)) for s in added.values())
      - sum(size(default[k]) for k in removed))


def test_defaults_are_the_papers_input_layers():
  """No switch given = the switches at their defaults = the paper's row."""
  assert tr_lib.input_layer_kwargs() == dict(
      content_sharing='shared', position_sharing='non_shared',
      granularity_embedding=True, absolute_position_embedding=True)
  assert _shapes() == _shapes(**tr_lib.input_layer_kwargs())
  assert study_stage2.VARIANTS['paper'] == {}


def _twins(name, params):
  """(variant params, default params) that give the same logits.

  Built from the default's random `params`: the variant gets no new
  randomness, and the default's layer that the switch replaces is set to
  what the variant does in its place.
  """
  without = lambda *names: {k: v for k, v in params.items() if k not in names}
  if name == 'non_shared_content':
    table = params['content_emb']
    return ({**without('content_emb'), 'content_coarse_emb': table,
             'content_fine_emb': table}, params)
  if name == 'shared_position':
    # Every grain reads the finest table at its own ids.
    fine = params['content_fine_pos_emb']['embedding']
    rows = params['content_coarse_pos_emb']['embedding'].shape[0]
    return (without('content_coarse_pos_emb'),
            {**params, 'content_coarse_pos_emb': {'embedding': fine[:rows]}})
  (gone,) = CHANGES[name][0]  # seg_emb or pos_emb: zero in the default
  return without(gone), {**params,
                         gone: jax.tree.map(jnp.zeros_like, params[gone])}


@pytest.mark.parametrize('name', ABLATIONS)
def test_switch_changes_only_its_layer(name):
  """The variant's logits are a default model's with its layer replaced by
  what the variant does instead; and they differ from the default's own
  (except non-shared content with equal tables, checked below)."""
  _, _, params = _data()
  variant_params, twin = _twins(name, params)
  got = _logits(variant_params, **ABLATIONS[name])
  want = _logits(twin)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-6)
  if name != 'non_shared_content':
    for g, base in zip(got, _logits(params)):
      assert np.abs(g - base).max() > 1e-3


def test_non_shared_content_reads_each_granularitys_table():
  """A different fine content table changes nothing before the first fine
  input slot (the fine sos) and every position logit after it."""
  _, _, params = _data()
  variant_params, _ = _twins('non_shared_content', params)
  rng = np.random.default_rng(5)
  table = variant_params['content_fine_emb']['embedding']
  variant_params['content_fine_emb'] = {'embedding': jnp.asarray(
      0.3 * rng.normal(size=table.shape), table.dtype)}
  pos, con = _logits(variant_params, content_sharing='non_shared')
  base_pos, base_con = _logits(params)
  fine = LAYOUT.stream_starts[1]
  np.testing.assert_allclose(pos[:, :fine], base_pos[:, :fine], atol=1e-6)
  np.testing.assert_allclose(con[:, :fine], base_con[:, :fine], atol=1e-6)
  assert np.abs(pos[:, fine:] - base_pos[:, fine:]).max(-1).min() > 1e-4


@pytest.mark.parametrize('name', list(study_stage2.VARIANTS))
def test_cached_decode_equals_full_forward(name):
  """The sampler's KV-cached steps honour every switch."""
  model = tt._tiny(LAYOUT, **study_stage2.VARIANTS[name])
  args, io, _ = _data()
  params = tt._randomized_params(model, args, seed=1)['params']
  tgt = io['targets']
  want = _apply(**study_stage2.VARIANTS[name])(
      {'params': params}, io['inputs'], tgt['position'], tgt['grain'],
      next_pad=tgt['pad'])
  got = cached_logits(model, params, io)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-4, rtol=2e-4)


def test_sampler_with_every_switch_flipped():
  """Cached and naive samplers draw the same streams from the model with
  all four ablations at once."""
  flipped = {k: v for change in ABLATIONS.values() for k, v in change.items()}
  layout = sequence.StreamLayout((2, 4), 16)
  model = tt._tiny(layout, **flipped)
  args = tt._model_args(tt._streams(layout), layout)
  params = tt._randomized_params(model, args, seed=2)['params']
  labels = jnp.zeros((3,), jnp.int32)
  config = sampling.SamplingConfig(seed=4)
  key = jax.random.key(config.seed)
  cached = sampling.make_sampler(model, config)(params, labels, key)
  naive = sampling.make_naive_sampler(model, config)(params, labels, key)
  for name in ('content', 'position', 'pad', 'num_codes'):
    np.testing.assert_array_equal(cached[name], naive[name], err_msg=name)


def test_block_size_bounds_only_the_absolute_table():
  short = LAYOUT.length - 2
  with pytest.raises(ValueError, match='block_size'):
    tt._tiny(LAYOUT, block_size=short).validate()
  tt._tiny(LAYOUT, block_size=short,
           absolute_position_embedding=False).validate()


@pytest.mark.parametrize('field,value', [
    ('content_sharing', 'both'), ('position_sharing', 'nonshared'),
    ('granularity_embedding', 'yes'), ('absolute_position_embedding', 1)])
def test_invalid_switch_names_the_field(field, value):
  model = tt._tiny(LAYOUT, **{field: value})
  with pytest.raises(ValueError, match=f'config.model.{field}='):
    model.validate()
  args, _, _ = _data()
  with pytest.raises(ValueError, match=f'config.model.{field}='):
    jax.eval_shape(model.init, {'params': jax.random.key(0)}, *args)


@pytest.mark.parametrize('field', ['content_sharing', 'position_sharing'])
def test_config_validation_refuses_a_bad_switch_before_training(field):
  """`validate_config` runs before a two-stage run trains its tokenizer."""
  c = config_lib.stage2_config('runlocal')
  c.model[field] = 'half'
  with pytest.raises(ValueError, match=f'config.model.{field}=.half.'):
    checks.validate_config(c, num_devices=1, tokenizer_ready=False)


def test_config_fields_reach_the_model():
  """`config.model.*` -> `build_models`; a config saved before the fields
  existed builds the paper's model."""
  c = config_lib.stage2_config('runlocal')
  assert tr_lib.input_layer_kwargs(c.model) == tr_lib.input_layer_kwargs()
  for change in study_stage2.VARIANTS.values():
    v = c.copy_and_resolve_references()
    v.model.update(change)
    model = stage2.build_models(v, LAYOUT).model
    assert {f: getattr(model, f) for f in tr_lib.INPUT_LAYER_FIELDS} == (
        tr_lib.input_layer_kwargs(change))
  old = ml_collections.ConfigDict(c.to_dict())
  for field in tr_lib.INPUT_LAYER_FIELDS:
    del old.model[field]
  model = stage2.build_models(old, LAYOUT).model
  assert {f: getattr(model, f) for f in tr_lib.INPUT_LAYER_FIELDS} == (
      tr_lib.input_layer_kwargs())


# ----------------------------------------------------------------------------
# The study (`python -m dqvq.eval.study_stage2`): its rows and its configs.
# ----------------------------------------------------------------------------


def test_study_rows_are_table7():
  """The study's variants are the paper's rows, with the paper's FIDs."""
  table7 = [  # paper.txt, Table 7, top to bottom
      (['shared', 'non-shared', '✓', '✓'], 4.91),
      (['non-shared', 'non-shared', '✓', '✓'], 5.54),
      (['shared', 'shared', '✓', '✓'], 18.28),
      (['shared', 'non-shared', '✗', '✓'], 16.87),
      (['shared', 'non-shared', '✓', '✗'], 5.06)]
  got = [(study_stage2._switch_cells(n), study_stage2.PAPER_FID[n])
         for n in study_stage2.VARIANTS]
  assert got == table7


def test_study_variant_configs(tmp_path):
  """Stage 2 only, on the given tokenizer, each variant's switches, equal
  steps; no sampling."""
  base = study_stage2.load_config()
  assert base.tokenizer.stage1 is not None  # the demo trains both stages
  for name, change in study_stage2.VARIANTS.items():
    c = study_stage2.variant_config(base, str(tmp_path), name, 7)
    assert c.tokenizer.stage1 is None
    assert c.tokenizer.workdir == str(tmp_path)
    assert c.num_train_steps == 7 and c.sample_images == 0
    assert c.eval_every == c.checkpoint_every == 7
    assert tr_lib.input_layer_kwargs(c.model) == tr_lib.input_layer_kwargs(
        change)
    assert c.model.width == base.model.width  # the demo's model otherwise
  assert base.tokenizer.stage1 is not None  # the base is left as it was


def test_study_markdown():
  row = lambda loss: dict(loss=loss, position_loss=loss / 4,
                          content_loss=loss * 3 / 4, params=1234)
  results = {'tokenizer_run': '/t', 'steps': 9, 'config': 'configs/demo.py',
             'set': [], 'stopped': 'no_granularity',
             'variants': {'paper': row(4.0), 'non_shared_content': row(4.5),
                          'shared_position': row(5.0)}}
  md = study_stage2.markdown(results)
  lines = [l for l in md.splitlines() if l.startswith('| ')]
  assert len(lines) == 1 + len(study_stage2.VARIANTS)
  assert '| shared | shared | ✓ | ✓ | 18.28 | 5.000 | +1.000 |' in md
  assert '| shared | non-shared | ✓ | ✓ | 4.91 | 4.000 | - |' in md
  assert md.count('not run') == 2
  assert 'after 9 steps' in md and 'Stopped early in no_granularity' in md
