"""DQ-Transformer (StackGPT): sizes, causality, pad masking, sharding, dropout.

Every check uses a toy model (`tiny_kwargs`) on small layouts except the
parameter counts, which only trace the paper configs with `jax.eval_shape`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq.models import attention
from dqvq.models import transformer as tr_lib
from dqvq import sequence

_encode = jax.jit(sequence.encode, static_argnums=(2,))


def _streams(layout, batch=3, seed=0, labels=None):
  """Encoded streams of random (block-constant) codes and grain maps."""
  rng = np.random.default_rng(seed)
  r, fine = layout.grid_sizes[0], layout.grid_sizes[-1]
  gmaps = rng.integers(0, layout.num_grains, (batch, r, r)).astype(np.int32)
  gmaps[0] = 0  # all coarse: long pad runs in the finer streams
  codes = rng.integers(0, layout.codebook_size,
                       (batch, fine, fine)).astype(np.int32)
  return _encode(codes, gmaps, layout, labels)


def _model_args(streams, layout):
  """(inputs, next_position, next_grain) for teacher forcing."""
  io = sequence.model_inputs(streams, layout)
  return io['inputs'], io['targets']['position'], io['targets']['grain']


def _tiny(layout, **overrides):
  kw = tr_lib.tiny_kwargs()
  kw.update(overrides)
  return tr_lib.DQTransformer(layout, **kw)


def _randomized_params(model, args, seed=0, scale=0.3, **kwargs):
  """Random params of the model's shapes, drawn with NumPy.

  The real init has zero pos_emb and tiny N(0, 0.02) weights; larger random
  values make every path (absolute positions included) visibly change the
  logits, so the "unchanged" checks below are not trivially passing. Shapes
  come from `jax.eval_shape`, which compiles nothing (compiling the init's
  many threefry draws would dominate this file's time on CPU).
  """
  shapes = nn.unbox(jax.eval_shape(functools.partial(model.init, **kwargs),
                                   {'params': jax.random.key(0)}, *args))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), shapes)


def _dropout_key(seed):
  """A dropout key whose bit generator compiles fast on CPU.

  Threefry's unrolled rounds make every compiled train-mode apply take
  seconds to build; the RngBitGenerator-based key draws masks just as well.
  """
  return jax.random.key(seed, impl='unsafe_rbg')


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# Parameter counts of the paper configs.
# ----------------------------------------------------------------------------


def _expected_count(e, blocks, content_vocab, position_vocabs, grains,
                    block_size=2048):
  """StackGPT parameter count written out from the module structure.

  Per block: q, k, v, proj (E*E + E each), MLP (E*4E + 4E, 4E*E + E) and two
  LayerNorms (2E each) = 12E^2 + 13E. Plus the token tables, the segment
  table, the absolute position table, two head LayerNorms and two bias-free
  heads (the position head over the finest position vocabulary).
  """
  per_block = 12 * e * e + 13 * e
  embeddings = (content_vocab + sum(position_vocabs) + grains) * e
  heads = 2 * 2 * e + e * position_vocabs[-1] + e * content_vocab
  return blocks * per_block + embeddings + block_size * e + heads


def _param_shapes(layout, size):
  model = tr_lib.DQTransformer(layout, **tr_lib.paper_kwargs(size))
  model.validate()
  t = layout.length - 1
  inputs = {'content': jnp.zeros((1, t), jnp.int32),
            'position': jnp.zeros((1, t), jnp.int32),
            'grain': jnp.zeros((1, t), jnp.int32),
            'pad': jnp.zeros((1, t), bool)}
  variables = jax.eval_shape(
      model.init, {'params': jax.random.key(0)}, inputs,
      jnp.zeros((1, t), jnp.int32), jnp.zeros((1, t), jnp.int32))
  return nn.unbox(variables)['params']


def test_paper_parameter_counts():
  """308,884,480 (uncond) / 313,999,360 (class) as the official StackGPT."""
  uncond = sequence.StreamLayout((16, 32), 1024)
  cond = sequence.StreamLayout((16, 32), 1024, num_classes=1000)
  p_uncond = _param_shapes(uncond, 'base')
  p_cond = _param_shapes(cond, 'base')
  # Official vocab sizes (reference 2.1): content 1027 / 2026, positions
  # 259 + 1027 / 1258 + 2026, two segments.
  want_uncond = _expected_count(1024, 24, 1027, (259, 1027), 2)
  want_cond = _expected_count(1024, 24, 2026, (1258, 2026), 2)
  assert want_uncond == 308_884_480  # the reference's count of the official
  assert want_cond == 313_999_360
  assert _count(p_uncond) == want_uncond
  assert _count(p_cond) == want_cond
  # Official parameter names, so checkpoints map one to one.
  names = set(p_uncond)
  assert {'content_emb', 'content_coarse_pos_emb', 'content_fine_pos_emb',
          'seg_emb', 'pos_emb', 'position_head', 'content_head',
          'position_head_ln', 'content_head_ln'} <= names
  assert sum(n.startswith('position_transformer_') for n in names) == 6
  assert sum(n.startswith('content_transformer_') for n in names) == 18
  assert p_uncond['pos_emb'].shape == (1, 2048, 1024)
  assert p_uncond['position_head']['kernel'].shape == (1024, 1027)
  assert 'bias' not in p_uncond['position_head']
  assert 'bias' not in p_uncond['content_head']


def test_large_parameter_count():
  """6 + 42 blocks: 611.2M unconditional (reference 2.3)."""
  layout = sequence.StreamLayout((16, 32), 1024)
  params = _param_shapes(layout, 'large')
  want = _expected_count(1024, 48, 1027, (259, 1027), 2)
  assert round(want / 1e5) == 6112
  assert _count(params) == want
  assert sum(n.startswith('content_transformer_') for n in params) == 42


# ----------------------------------------------------------------------------
# Causality.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('grid_sizes', [(2, 4), (2, 4, 8)])
def test_no_information_from_the_future(grid_sizes):
  """Logits at slots <= t ignore everything at slots > t.

  The position stack at t sees inputs 0..t; the content stack at t also sees
  next_position[0..t] (the position of step t + 1) and nothing later. And
  next_position[t] reaches the content logits at t but never the position
  logits.
  """
  layout = sequence.StreamLayout(grid_sizes, 16)
  model = _tiny(layout)
  args = _model_args(_streams(layout), layout)
  params = _randomized_params(model, args)
  apply = jax.jit(model.apply)
  inputs, next_pos, next_grain = args
  pos0, con0 = (np.asarray(a) for a in apply(params, inputs, next_pos,
                                             next_grain))
  b, t_len = inputs['content'].shape
  rng = np.random.default_rng(1)
  for t in (0, layout.stream_starts[1] - 1, layout.stream_starts[1],
            t_len // 2, t_len - 2):
    later = np.arange(t_len) > t
    swap = lambda a, new, m=later: np.where(m[None], new, np.asarray(a))
    rand = lambda hi: rng.integers(0, hi, (b, t_len)).astype(np.int32)
    grain = rand(layout.num_grains)
    pert = {'content': swap(inputs['content'],
                            rand(layout.content_vocab_size)),
            'position': swap(inputs['position'],
                             rand(layout.position_logits_size)),
            'grain': swap(inputs['grain'], grain),
            'pad': swap(inputs['pad'], rng.random((b, t_len)) < 0.5)}
    npos = swap(next_pos, rand(layout.position_logits_size))
    ngrain = swap(next_grain, rand(layout.num_grains))
    pos1, con1 = (np.asarray(a) for a in apply(params, pert, npos, ngrain))
    np.testing.assert_allclose(pos1[:, :t + 1], pos0[:, :t + 1], atol=1e-5,
                               err_msg=f'position logits leak, t={t}')
    np.testing.assert_allclose(con1[:, :t + 1], con0[:, :t + 1], atol=1e-5,
                               err_msg=f'content logits leak, t={t}')
    if t < t_len - 1:  # the perturbation is real: later logits move
      assert np.abs(con1[:, t + 1:] - con0[:, t + 1:]).max() > 1e-3

  # next_position at t: content logits at t move, position logits do not.
  for t in (0, layout.stream_starts[1] - 1, t_len // 2):
    npos = np.asarray(next_pos).copy()
    ngrain = np.asarray(next_grain)
    k = ngrain[:, t]
    npos[:, t] = (npos[:, t] + 1) % np.array(
        [layout.position_vocab_size(int(g)) for g in k])
    pos1, con1 = (np.asarray(a) for a in apply(params, inputs, npos, ngrain))
    np.testing.assert_allclose(pos1, pos0, atol=1e-5)
    np.testing.assert_allclose(con1[:, :t], con0[:, :t], atol=1e-5)
    assert np.abs(con1[:, t] - con0[:, t]).max(axis=-1).min() > 1e-3


def test_attention_mask_is_causal_and_hides_pad_keys():
  pad = jnp.array([[False, False, True, False], [False, True, True, True]])
  m = np.asarray(attention.attention_mask(pad))
  assert m.shape == (2, 1, 4, 4)
  for b in range(2):
    for q in range(4):
      for k in range(4):
        assert m[b, 0, q, k] == (k <= q and not bool(pad[b, k]))


# ----------------------------------------------------------------------------
# Pads.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('position_index', ['compact', 'slot'])
def test_pads_do_not_affect_real_tokens(position_index):
  """Pad keys are masked, so nothing about a pad slot reaches real tokens.

  Checked at every slot that matters: real inputs, and slots whose target
  counts in the loss (slot layouts: the last pad of a stream predicts the
  next stream's sos). With slot positions one path is by design and
  excluded: the content stack at slot t is given next_position[t], which at
  a stream's eos slot is the following pad, so the position tables' pad rows
  reach the eos slot's content state and, through it as a key, later content
  logits. Compact layouts give the eos slot the next stream's sos (the
  official alignment table, reference 2.3), so there no pad row reaches
  anything. Each perturbation is shown to matter once the pad flags are
  cleared, so the checks pass because of the masking.
  """
  layout = sequence.StreamLayout((2, 4), 16, num_classes=3,
                                 position_index=position_index)
  streams = _streams(layout, batch=4, labels=np.array([0, 1, 2, 1]))
  model = _tiny(layout)
  args = _model_args(streams, layout)
  params = _randomized_params(model, args)
  apply = jax.jit(model.apply)
  run = lambda p, a: tuple(np.asarray(x) for x in apply(p, *a))
  unflag = lambda a: ({**a[0], 'pad': np.zeros_like(a[0]['pad'])},) + a[1:]
  pos0, con0 = run(params, args)
  pos0_u, con0_u = run(params, unflag(args))
  io = sequence.model_inputs(streams, layout)
  in_pad = np.asarray(io['inputs']['pad'])
  next_pad = np.asarray(io['targets']['pad'])
  keep = ~in_pad | ~next_pad  # real input, or a target the loss counts
  assert in_pad.sum() > 4 and (~in_pad).sum() > 4
  # Slot: a last pad predicts the next sos; compact: pads predict nothing.
  assert (in_pad & ~next_pad).any() == (position_index == 'slot')
  rng = np.random.default_rng(3)

  def with_row(p, name, row):
    p = jax.tree.map(lambda x: x, p)  # new dicts, same leaves
    emb = np.asarray(p['params'][name]['embedding']).copy()
    emb[row] = rng.normal(size=emb[row].shape) * 3  # not a constant shift,
    p['params'][name]['embedding'] = jnp.asarray(emb)  # which LN would hide
    return p

  # (a) The content pad row (id V) changes nothing that matters.
  p = with_row(params, 'content_emb', layout.codebook_size)
  pos1, con1 = run(p, args)
  np.testing.assert_allclose(pos1[keep], pos0[keep], atol=1e-5)
  np.testing.assert_allclose(con1[keep], con0[keep], atol=1e-5)
  pos1_u, _ = run(p, unflag(args))
  assert np.abs(pos1_u[keep] - pos0_u[keep]).max() > 1e-3  # were it a key

  # (a') Position pad rows (id N_k): position logits exact everywhere that
  # matters; content logits exact up to the first eos slot whose next
  # position is a pad (see the docstring).
  p = params
  roles = ('coarse', 'fine')
  for k in range(layout.num_grains):
    p = with_row(p, f'content_{roles[k]}_pos_emb', layout.num_cells[k])
  pos1, con1 = run(p, args)
  np.testing.assert_allclose(pos1[keep], pos0[keep], atol=1e-5)
  before_eos = np.cumsum(~in_pad & next_pad, axis=1) == 0
  if position_index == 'compact':
    # Only the last stream's eos, which predicts nothing, is told a pad:
    # every logit the loss counts is exact.
    before_eos = ~next_pad
  assert (keep & before_eos).sum() > 4
  np.testing.assert_allclose(con1[keep & before_eos], con0[keep & before_eos],
                             atol=1e-5)
  pos1_u, _ = run(p, unflag(args))
  assert np.abs(pos1_u[keep] - pos0_u[keep]).max() > 1e-3

  # (b) Pad slots filled with garbage tokens (still flagged as pads), and
  # garbage next positions wherever the next slot is a pad too.
  inputs, next_pos, next_grain = (jax.tree.map(np.asarray, a) for a in args)
  garbage = dict(inputs)
  for key, hi in (('content', layout.content_vocab_size),
                  ('position', layout.position_logits_size),
                  ('grain', layout.num_grains)):
    garbage[key] = np.where(
        in_pad, rng.integers(0, hi, in_pad.shape), inputs[key]).astype(np.int32)
  both_pad = in_pad & next_pad
  g_pos = np.where(both_pad, rng.integers(0, layout.position_logits_size,
                                          in_pad.shape), next_pos)
  g_grain = np.where(both_pad,
                     rng.integers(0, layout.num_grains, in_pad.shape),
                     next_grain)
  g_args = (garbage, g_pos.astype(np.int32), g_grain.astype(np.int32))
  pos2, con2 = run(params, g_args)
  np.testing.assert_allclose(pos2[keep], pos0[keep], atol=1e-5)
  np.testing.assert_allclose(con2[keep], con0[keep], atol=1e-5)
  pos2_u, _ = run(params, unflag(g_args))
  assert np.abs(pos2_u[keep] - pos0_u[keep]).max() > 1e-3


# ----------------------------------------------------------------------------
# Logical partitioning.
# ----------------------------------------------------------------------------


def test_every_matrix_and_table_is_sharded_over_embed():
  """FSDP shards the model width: every weight matrix/table names 'embed'."""
  layout = sequence.StreamLayout((2, 4, 8), 16, num_classes=2)
  model = _tiny(layout)
  args = _model_args(_streams(layout, labels=np.array([0, 1, 1])), layout)
  boxed = jax.eval_shape(model.init, {'params': jax.random.key(0)}, *args)
  specs = nn.get_partition_spec(boxed)['params']
  shapes = nn.unbox(boxed)['params']
  flat_specs = dict(jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0])
  flat_shapes = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
  assert flat_specs.keys() == flat_shapes.keys()
  matrices = 0
  for path, shape in flat_shapes.items():
    name = jax.tree_util.keystr(path)
    spec = flat_specs[path]
    assert len(spec) == len(shape.shape), name
    if len(shape.shape) >= 2:
      matrices += 1
      assert 'embed' in tuple(spec), f'{name}: {spec}'
    # Under the rules, 'embed' is the only axis that maps to a mesh axis.
    mesh = nn.logical_to_mesh(spec, tr_lib.LOGICAL_AXIS_RULES)
    want = tuple('fsdp' if a == 'embed' else None for a in spec)
    assert tuple(mesh) == want, name
  # 3 token tables per grain + content + seg, pos_emb, heads and 6 per block.
  assert matrices == 1 + 3 + 1 + 1 + 2 + 6 * 2


# ----------------------------------------------------------------------------
# Dropout and the two attention paths.
# ----------------------------------------------------------------------------


def _reference_attention(params, x, mask, num_heads):
  """NumPy multi-head attention with the module's q/k/v/proj weights."""
  p = jax.tree.map(np.asarray, params)
  x = np.asarray(x, np.float64)
  b, t, e = x.shape
  d = e // num_heads
  lin = lambda n, y: y @ p[n]['kernel'] + p[n]['bias']
  heads = lambda y: y.reshape(b, t, num_heads, d).transpose(0, 2, 1, 3)
  q, k, v = (heads(lin(n, x)) for n in ('query', 'key', 'value'))
  s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
  s = np.where(np.asarray(mask), s, -np.inf)
  s = np.exp(s - s.max(-1, keepdims=True))
  w = s / s.sum(-1, keepdims=True)
  out = (w @ v).transpose(0, 2, 1, 3).reshape(b, t, e)
  return lin('proj', out)


def test_self_attention_paths_match_reference():
  """Fused (eval) and explicit-softmax (train) paths both equal NumPy.

  The explicit path is checked with a dropout rate so small that no
  probability is dropped in float32, so it differs from the fused path only
  in how the softmax is computed.
  """
  b, t, e, h = 2, 6, 16, 4
  x = np.random.default_rng(0).normal(size=(b, t, e)).astype(np.float32)
  pad = jnp.array([[False] * 4 + [True] * 2, [False, True, False, False,
                                               True, False]])
  mask = attention.attention_mask(pad)
  attn = attention.SelfAttention(h, dropout=0.5)
  params = _randomized_params(attn, (x, mask), scale=0.5, train=False)
  want = _reference_attention(params['params'], x, mask, h)
  fused = jax.jit(attn.apply, static_argnums=3)(params, x, mask, False)
  np.testing.assert_allclose(fused, want, atol=2e-5, rtol=1e-4)

  explicit = jax.jit(attention.SelfAttention(h, dropout=1e-9).apply,
                     static_argnums=3)(params, x, mask, True,
                                       rngs={'dropout': _dropout_key(2)})
  np.testing.assert_allclose(explicit, want, atol=2e-5, rtol=1e-4)

  train_apply = jax.jit(attn.apply, static_argnums=3)
  drop = lambda seed: np.asarray(train_apply(
      params, x, mask, True, rngs={'dropout': _dropout_key(seed)}))
  assert np.abs(drop(3) - drop(4)).max() > 1e-3
  np.testing.assert_array_equal(drop(3), drop(3))
  assert np.abs(drop(3) - np.asarray(fused)).max() > 1e-3


def test_model_dropout():
  """train=True draws new dropout masks per key; train=False is exact."""
  layout = sequence.StreamLayout((2, 4), 16)
  args = _model_args(_streams(layout), layout)
  drop_model = _tiny(layout, embed_dropout=0.1, attn_dropout=0.1,
                     resid_dropout=0.1)
  plain = _tiny(layout)
  params = _randomized_params(plain, args)
  applies = {(m, train): jax.jit(functools.partial(m.apply, train=train))
             for m in (drop_model, plain) for train in (False, True)}
  run = lambda m, train, seed=0: tuple(np.asarray(a) for a in applies[
      m, train](params, *args, rngs={'dropout': _dropout_key(seed)}))
  eval_a, eval_b = run(drop_model, False, 1), run(drop_model, False, 2)
  base = run(plain, False)
  for a, b_, c in zip(eval_a, eval_b, base):
    np.testing.assert_array_equal(a, b_)
    np.testing.assert_allclose(a, c, atol=1e-6)
  # Zero rates: training mode is the eval computation.
  for a, c in zip(run(plain, True, 5), base):
    np.testing.assert_allclose(a, c, atol=1e-6)
  train_1, train_2 = run(drop_model, True, 1), run(drop_model, True, 2)
  for a, b_, c in zip(train_1, train_2, base):
    assert np.abs(a - b_).max() > 1e-3
    assert np.abs(a - c).max() > 1e-3
  for a, b_ in zip(train_1, run(drop_model, True, 1)):
    np.testing.assert_array_equal(a, b_)


# ----------------------------------------------------------------------------
# validate().
# ----------------------------------------------------------------------------


def test_validate():
  layout = sequence.StreamLayout((2, 4), 16)  # length 24: 23 inputs
  _tiny(layout).validate()
  _tiny(layout, block_size=layout.length - 1).validate()  # exactly enough
  with pytest.raises(ValueError):
    _tiny(layout, width=30, num_heads=4).validate()
  with pytest.raises(ValueError):
    _tiny(layout, block_size=layout.length - 2).validate()
  big = sequence.StreamLayout((16, 32), 1024)
  with pytest.raises(ValueError):
    tr_lib.DQTransformer(big, **dict(tr_lib.paper_kwargs(),
                                     block_size=1024)).validate()
  with pytest.raises(ValueError):
    tr_lib.paper_kwargs('huge')


def test_remat_keeps_params_outputs_and_gradients():
  """`remat=True` only changes what the backward pass stores: the same
  parameter tree (checkpoints interchange), logits and gradients, and the
  KV-cached decode path still runs."""
  layout = sequence.StreamLayout((2, 4), 16, num_classes=3)
  args = _model_args(_streams(layout, batch=2, labels=np.array([0, 2])),
                     layout)
  plain, remat = _tiny(layout), _tiny(layout, remat=True)
  params = _randomized_params(plain, args)
  shapes = jax.eval_shape(functools.partial(remat.init),
                          {'params': jax.random.key(0)}, *args)
  assert (jax.tree.structure(nn.unbox(shapes)) ==
          jax.tree.structure(params))

  def loss(model, p):
    pos, con = model.apply(p, *args)
    return jnp.mean(pos ** 2) + jnp.mean(con ** 2)

  (l0, g0), (l1, g1) = [jax.jit(jax.value_and_grad(
      functools.partial(loss, m)))(params) for m in (plain, remat)]
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
  cache = remat.init_cache(2, layout.length - 1)
  assert jax.tree.leaves(cache)
