"""The pluggable quantizer (config.model.quantizer): FSQ, the cosine codebook,
and every user of the quantizer with each choice. The official EMA quantizer
has its own tests (tests/test_quantizer.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dqvq import config_lib
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq.models import dqvae
from dqvq.models import fsq
from dqvq.models import quantizer as q_lib
from dqvq.trainers import stage1

RNGS = {'params': jax.random.key(0), 'gumbel': jax.random.key(1),
        'restart': jax.random.key(2), 'router': jax.random.key(3)}
# 32 codes: the small model's codebook_size, and FSQ's (4 * 4 * 2).
SMALL_LEVELS = (4, 4, 2)


def _small_kwargs(quantizer, **kw):
  """A dual-grain DQ-VAE that compiles in seconds (16 px, 4 x 4 regions),
  the one of tests/test_dqvae.py, trained with the gain router target so the
  quantizer's `nearest` runs in training too."""
  return dict(
      grain_factors=(4, 2), ch=16, ch_mult=(1, 1, 2), num_res_blocks=1,
      attn_factors=(), z_channels=16, dec_ch=16, dec_ch_mult=(1, 2),
      dec_num_res_blocks=0, dec_attn_factors=(), codebook_size=32,
      codebook_dim=16, norm_groups=4, router_target='gain',
      quantizer=quantizer, fsq_levels=SMALL_LEVELS, **kw)


def _images(batch=2, size=16, seed=1):
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3),
                            minval=-1, maxval=1)


# FSQ.


def test_fsq_rounds_to_the_level_grid():
  levels = (3, 4, 2, 5)
  z = 2.0 * jax.random.normal(jax.random.key(0), (500, len(levels)))
  values, digits = fsq.quantize(z, levels)
  values, digits = np.asarray(values), np.asarray(digits)
  bounded = np.tanh(np.asarray(z, np.float64))
  for i, num in enumerate(levels):
    grid = np.linspace(-1.0, 1.0, num)
    # The nearest of the channel's L_i levels to the bounded value.
    want = np.argmin(np.abs(bounded[:, i, None] - grid[None]), axis=1)
    np.testing.assert_array_equal(digits[:, i], want)
    np.testing.assert_allclose(values[:, i], grid[want], atol=1e-6)
    assert set(np.unique(digits[:, i])) == set(range(num))  # all reached


def test_fsq_straight_through_gradient_is_identity_inside_the_bound():
  x = jnp.linspace(-3.0, 3.0, 101)
  np.testing.assert_array_equal(
      jax.grad(lambda x: jnp.sum(fsq.round_straight_through(x)))(x), 1.0)
  levels = (8, 5, 2)
  z = jax.random.normal(jax.random.key(0), (64, 3))
  w = jax.random.normal(jax.random.key(1), (64, 3))
  got = jax.grad(lambda z: jnp.sum(fsq.quantize(z, levels)[0] * w))(z)
  # The rounding passes the bound's own gradient unchanged.
  want = jax.grad(lambda z: jnp.sum(jnp.tanh(z) * w))(z)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('levels', [(8, 8, 4), (3, 2, 5), (7,)])
def test_fsq_code_ids_and_values_round_trip_for_every_code(levels):
  size = math.prod(levels)
  codes = jnp.arange(size, dtype=jnp.int32)
  values = fsq.codes_to_values(codes, levels)
  assert values.shape == (size, len(levels))
  assert len({tuple(v) for v in np.asarray(values).tolist()}) == size
  # Latents whose bound is exactly each grid point code back to its id.
  z = jnp.arctanh(jnp.clip(values, -1.0 + 1e-6, 1.0 - 1e-6))
  got_values, digits = fsq.quantize(z, levels)
  got = fsq.digits_to_codes(digits, levels)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, codes)
  np.testing.assert_allclose(got_values, values, atol=1e-6)


def test_fsq_module_codes_usage_and_no_losses():
  vq = fsq.FiniteScalarQuantizer(SMALL_LEVELS)
  z = 3.0 * jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = vq.init({'params': jax.random.key(1)}, z)
  assert set(variables) == {'codebook'}  # nothing trainable
  np.testing.assert_array_equal(variables['codebook']['levels'], SMALL_LEVELS)
  z_q, codes, aux = vq.apply(variables, z)
  assert codes.shape == (2, 8, 8) and codes.dtype == jnp.int32
  assert 0 <= int(codes.min()) and int(codes.max()) < 32
  np.testing.assert_allclose(vq.apply(variables, codes, method=vq.lookup),
                             z_q, atol=1e-6)
  np.testing.assert_array_equal(vq.apply(variables, z, method=vq.nearest),
                                z_q)
  counts = np.bincount(np.asarray(codes).ravel(), minlength=32)
  np.testing.assert_allclose(aux['codebook_usage'], np.mean(counts > 0))
  assert float(aux['q_loss']) == float(aux['commitment_loss']) == 0.0


# The cosine codebook.


def test_cosine_picks_the_max_cosine_code():
  rng = np.random.default_rng(0)
  k, d = 16, 4
  # Codes and features of very different norms: the Euclidean nearest code
  # is often not the one of the closest direction.
  book = rng.normal(size=(k, d)) * rng.uniform(0.1, 5.0, (k, 1))
  x = rng.normal(size=(6, 5, d)) * rng.uniform(0.1, 5.0, (6, 5, 1))
  cos = (x @ book.T) / (np.linalg.norm(x, axis=-1, keepdims=True) *
                        np.linalg.norm(book, axis=-1))
  want = cos.argmax(-1)
  got = q_lib.max_cosine_codes(jnp.asarray(x, jnp.float32),
                               jnp.asarray(book, jnp.float32))
  np.testing.assert_array_equal(got, want)
  euclid = q_lib.nearest_codes(jnp.asarray(x.reshape(-1, d), jnp.float32),
                               jnp.asarray(book, jnp.float32))
  assert np.any(np.asarray(euclid) != want.reshape(-1))

  vq = q_lib.CosineQuantizer(codebook_size=k, codebook_dim=d, decay=0.9)
  z = jnp.asarray(x.reshape(2, 3, 5, d), jnp.float32)
  variables = vq.init({'params': jax.random.key(1)}, z)
  np.testing.assert_allclose(
      np.linalg.norm(variables['codebook']['embedding'], axis=-1), 1.0,
      rtol=1e-6)
  unit = book / np.linalg.norm(book, axis=-1, keepdims=True)
  variables = {'codebook': {**variables['codebook'],
                            'embedding': jnp.asarray(unit, jnp.float32)}}
  z_q, codes, _ = vq.apply(variables, z)
  np.testing.assert_array_equal(codes, want.reshape(2, 3, 5))
  np.testing.assert_allclose(np.linalg.norm(z_q, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(z_q, unit[want.reshape(2, 3, 5)], atol=1e-6)
  # A training step keeps the codebook on the sphere (EMA, then restart).
  _, state = vq.apply(variables, z, train=True, mutable=['codebook'],
                      rngs={'restart': jax.random.key(2)})
  np.testing.assert_allclose(
      np.linalg.norm(state['codebook']['embedding'], axis=-1), 1.0,
      rtol=1e-5)


# Every quantizer in the DQ-VAE, the tokenizer and the stage-1 step.


def _stage1_config(quantizer):
  """The imagenet runlocal stage-1 config on the small model: no GAN and no
  LPIPS (their code paths do not depend on the quantizer)."""
  c = config_lib.stage1_config('runlocal')
  c.model.update(_small_kwargs(quantizer))
  c.data.resolution = 16
  c.loss.disc_weight = 0.0
  return c


@pytest.mark.parametrize('quantizer', dqvae.QUANTIZERS)
def test_each_quantizer_encodes_decodes_and_trains(quantizer):
  c = _stage1_config(quantizer)
  models = stage1.build_models(c)
  state = jax.jit(functools.partial(stage1.init_state, models,
                                    image_shape=(1, 16, 16, 3)))(
                                        jax.random.key(0))
  vae, x = models.vae, _images()
  variables = {'params': state.params, 'codebook': state.codebook}

  enc = jax.jit(functools.partial(vae.apply, method=vae.encode))(variables, x)
  codes = np.asarray(enc['codes'])
  assert codes.shape == (2, 8, 8)
  assert 0 <= codes.min() and codes.max() < c.model.codebook_size
  assert enc['quantized'].shape == (2, 8, 8, vae.latent_dim)
  # One code per coarse region, on the finest grid.
  coarse = np.asarray(enc['grain_map']) == 0
  blocks = codes.reshape(2, 4, 2, 4, 2)
  assert np.all((blocks == blocks[:, :, :1, :, :1])[:, :, 0, :, 0][coarse])
  decode = jax.jit(functools.partial(vae.apply, method=vae.decode))
  decode_codes = jax.jit(functools.partial(vae.apply,
                                           method=vae.decode_codes))
  from_latents = decode(variables, enc['quantized'])
  np.testing.assert_allclose(decode_codes(variables, enc['codes']),
                             from_latents, atol=1e-5)

  tok = tokenizer_lib.Tokenizer(params=state.params, codebook=state.codebook,
                                vae=vae, config=c)
  tok_codes = jax.jit(lambda t, x: t.encode(x)['codes'])(tok, x)
  np.testing.assert_array_equal(tok_codes, codes)
  np.testing.assert_allclose(jax.jit(lambda t, c: t.decode(c))(tok, tok_codes),
                             np.clip(from_latents, -1, 1), atol=1e-5)
  assert tokenizer_lib.fingerprint((tok.params, tok.codebook))

  batch = {'image': x, 'label': jnp.zeros((2,), jnp.int32),
           'mask': jnp.ones((2,), bool)}
  new, metrics = jax.jit(functools.partial(stage1.train_step, models))(
      state, batch, None)
  for name in ('loss', 'q_loss', 'router_loss', 'codebook_usage',
               'perplexity'):
    assert np.isfinite(float(metrics[name])), name
  assert 0 < float(metrics['codebook_usage']) <= 1
  assert (jax.tree.structure(new.codebook) ==
          jax.tree.structure(state.codebook))
  if quantizer == 'fsq':
    assert float(metrics['q_loss']) == 0.0
    np.testing.assert_array_equal(new.codebook['quantize']['levels'],
                                  SMALL_LEVELS)
  else:
    assert float(metrics['q_loss']) > 0
    emb = np.asarray(new.codebook['quantize']['embedding'])
    assert not np.array_equal(emb, state.codebook['quantize']['embedding'])
    if quantizer == 'cosine':
      np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)

  sums = jax.device_get(jax.jit(functools.partial(stage1.eval_step, models))(
      new, batch))
  summary = stage1.summarize(sums)
  assert 0 < summary['val/codebook_usage'] <= 1
  assert np.isfinite(summary['val/perplexity'])


def _tree(model, size=16):
  shapes = jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((1, size, size,
                                                              3))))
  return {jax.tree_util.keystr(p): (l.shape, l.dtype)
          for p, l in jax.tree_util.tree_leaves_with_path(shapes)}


def test_ema_is_the_default_and_cosine_keeps_its_tree():
  kw = _small_kwargs('ema')
  del kw['quantizer'], kw['fsq_levels']
  default = _tree(dqvae.DQVAE(**kw))
  assert _tree(dqvae.DQVAE(**kw, quantizer='ema')) == default
  assert _tree(dqvae.DQVAE(**kw, quantizer='cosine')) == default
  assert {k: v[0] for k, v in default.items()
          if 'quantize' in k or 'quant_conv' in k} == {
      "['codebook']['quantize']['cluster_size']": (32,),
      "['codebook']['quantize']['embed_sum']": (32, 16),
      "['codebook']['quantize']['embedding']": (32, 16),
      "['params']['post_quant_conv']['conv']['bias']": (16,),
      "['params']['post_quant_conv']['conv']['kernel']": (1, 1, 16, 16),
      "['params']['quant_conv']['conv']['bias']": (16,),
      "['params']['quant_conv']['conv']['kernel']": (1, 1, 16, 16)}
  # FSQ: quant_conv projects to one channel per level count.
  tree = _tree(dqvae.DQVAE(**kw, quantizer='fsq', fsq_levels=SMALL_LEVELS))
  assert {k: v[0] for k, v in tree.items()
          if 'quantize' in k or 'quant_conv' in k} == {
      "['codebook']['quantize']['levels']": (3,),
      "['params']['post_quant_conv']['conv']['bias']": (16,),
      "['params']['post_quant_conv']['conv']['kernel']": (1, 1, 3, 16),
      "['params']['quant_conv']['conv']['bias']": (3,),
      "['params']['quant_conv']['conv']['kernel']": (1, 1, 16, 3)}


def test_config_fields_and_configs_saved_without_them():
  m = config_lib.stage1_config('runlocal').model
  assert m.quantizer == 'ema' and tuple(m.fsq_levels) == (8, 8, 4)
  # The config stored with a checkpoint from before the fields: 'ema'.
  old = ml_collections.ConfigDict(
      {k: v for k, v in m.to_dict().items()
       if k not in ('quantizer', 'fsq_levels')})
  assert dqvae.from_config(old).quantizer == 'ema'
  m.update(quantizer='fsq', fsq_levels=[4, 4, 4])  # 64 codes, as runlocal
  assert dqvae.from_config(m).latent_dim == 3


@pytest.mark.parametrize('fields,match', [
    (dict(quantizer='lfq'), r"Unknown quantizer 'lfq'.*'ema', 'cosine', 'fsq'"),
    (dict(quantizer='fsq', codebook_size=1024),
     r'codebook_size=1024 does not match config.model.fsq_levels=\(4, 4, 2\)'
     r'.*product.* is 32'),
    (dict(quantizer='fsq', fsq_levels=(8, 1, 4)), 'integer >= 2'),
    (dict(quantizer='fsq', fsq_levels=()), 'integer >= 2'),
    (dict(quantizer='fsq', fsq_levels=(4.0, 4, 2)), 'integer >= 2'),
])
def test_bad_quantizer_settings_are_refused(fields, match):
  with pytest.raises(ValueError, match=match):
    dqvae.DQVAE(**{**_small_kwargs('ema'), **fields}).validate()
