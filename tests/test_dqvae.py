"""DQ-VAE end to end: parameter counts, shapes, grain maps, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq.models import dqvae
from dqvq.models import granularity as grain_lib
from dqvq.models import layers

RNGS = {'params': jax.random.key(0), 'gumbel': jax.random.key(1),
        'restart': jax.random.key(2), 'router': jax.random.key(3)}


def _small_dual(**kw):
  """A dual-grain DQ-VAE small enough to compile in seconds (16 px: 4 x 4
  regions of 4 x 4 pixels)."""
  return dqvae.DQVAE(
      grain_factors=(4, 2), ch=16, ch_mult=(1, 1, 2), num_res_blocks=1,
      attn_factors=(), z_channels=16, dec_ch=16, dec_ch_mult=(1, 2),
      dec_num_res_blocks=0, dec_attn_factors=(), codebook_size=32,
      codebook_dim=16, norm_groups=4, **kw)


def _uniform_reconstruction(model, variables, x, grain: int):
  """The unclipped reconstruction with every region at `grain` (jitted: run
  op by op, the model's ops would each compile on their own)."""
  from dqvq.eval import allocation  # pylint: disable=g-import-not-at-top
  grid = (x.shape[1] // model.grain_factors[0],
          x.shape[2] // model.grain_factors[0])

  @jax.jit
  def run(v):
    q = model.apply(v, x, grain_map=allocation.uniform_grain_map(
        x.shape[0], grid, grain), method=model.encode)
    return model.apply(v, q['quantized'], method=model.decode)
  return run(variables)


def _param_count(kwargs, size=256):
  model = dqvae.DQVAE(**kwargs)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(RNGS, x), x)
  return layers.count_params(shapes['params'])


@pytest.mark.parametrize('variant,expected', [
    ('entropy_dual', 47_571_331),
    ('feature_dual', 47_836_037),
    ('triple', 73_748_102),
])
def test_parameter_counts_equal_official(variant, expected):
  kwargs = dqvae.paper_kwargs(variant)
  if variant == 'entropy_dual':
    kwargs['entropy_thresholds'] = tuple(np.linspace(1.0, 3.0, 99))
  assert _param_count(kwargs) == expected


def test_codebook_is_not_a_trainable_parameter():
  model = dqvae.DQVAE(**dqvae.tiny_kwargs())
  variables = jax.eval_shape(lambda x: model.init(RNGS, x),
                             jnp.zeros((1, 32, 32, 3)))
  assert set(variables) == {'params', 'codebook'}
  assert variables['codebook']['quantize']['embedding'].shape == (64, 32)
  flat = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  assert not any('quantize' in jax.tree_util.keystr(p) for p, _ in flat)


@pytest.mark.parametrize('variant', ['feature_dual', 'triple'])
@pytest.mark.parametrize('size', [64, 128, 256])
def test_shapes(variant, size):
  kwargs = dqvae.tiny_kwargs(variant)
  model = dqvae.DQVAE(**kwargs)
  x = jax.random.uniform(jax.random.key(0), (2, size, size, 3), minval=-1,
                         maxval=1)

  def run(x):
    variables = model.init(RNGS, x)
    return model.apply(variables, x, train=True, rngs=RNGS,
                       mutable=['codebook'])[0]

  # Shapes at every size come from tracing; one size also runs for real.
  out = jax.jit(run)(x) if size == 64 else jax.eval_shape(run, x)
  coarse = kwargs['grain_factors'][0]
  fine = size // 8
  k = len(kwargs['grain_factors'])
  assert out['reconstruction'].shape == x.shape
  assert out['codes'].shape == (2, fine, fine)
  assert out['grain_map'].shape == (2, size // coarse, size // coarse)
  assert out['gate'].shape == (2, size // coarse, size // coarse, k)
  assert out['quantized'].shape == (2, fine, fine, kwargs['codebook_dim'])
  if size != 64:
    return
  assert np.all(np.isfinite(np.asarray(out['reconstruction'])))
  # Code length = sum over regions of codes per region.
  per = np.asarray(grain_lib.codes_per_region(kwargs['grain_factors']))
  np.testing.assert_array_equal(out['code_length'],
                                per[np.asarray(out['grain_map'])].sum((1, 2)))


def test_vqgan_single_grain_is_fixed_length():
  kwargs = dqvae.tiny_kwargs('vqgan')
  model = dqvae.DQVAE(**kwargs)
  x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
  variables = jax.jit(model.init)(RNGS, x)
  out = jax.jit(model.apply)(variables, x)
  assert out['codes'].shape == (2, 4, 4)
  np.testing.assert_array_equal(out['code_length'], [16, 16])
  assert out['reconstruction'].shape == x.shape


@pytest.mark.parametrize('variant', ['feature_dual', 'triple'])
def test_merged_code_map_one_code_per_region(variant):
  """A coarse region holds one code repeated over its cells, a fine one may
  hold f_0^2/f^2 different codes."""
  kwargs = dqvae.tiny_kwargs(variant)
  model = dqvae.DQVAE(**kwargs)
  x = jax.random.uniform(jax.random.key(5), (2, 64, 64, 3), minval=-1, maxval=1)
  variables = jax.jit(model.init)(RNGS, x)
  out = jax.jit(model.apply)(variables, x)
  factors = kwargs['grain_factors']
  codes = np.asarray(out['codes'])
  gmap = np.asarray(out['grain_map'])
  r = factors[0] // factors[-1]
  for b in range(codes.shape[0]):
    for i in range(gmap.shape[1]):
      for j in range(gmap.shape[2]):
        block = codes[b, i * r:(i + 1) * r, j * r:(j + 1) * r]
        side = factors[gmap[b, i, j]] // factors[-1]
        # Each side x side sub-block is constant (one code per cell of its grain).
        sub = block.reshape(r // side, side, r // side, side)
        assert np.all(sub == sub[:, :1, :, :1])


def test_decode_codes_matches_forward():
  # Same shapes as the code-map test: the compiled programs are shared.
  model = dqvae.DQVAE(**dqvae.tiny_kwargs())
  x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3), minval=-1, maxval=1)
  variables = jax.jit(model.init)(RNGS, x)
  out = jax.jit(model.apply)(variables, x)
  img = jax.jit(lambda v, c: model.apply(v, c, method=dqvae.DQVAE.decode_codes))(
      variables, out['codes'])
  np.testing.assert_allclose(img, out['reconstruction'], atol=1e-5)


def test_reconstruction_gradient_reaches_gate():
  """Both gate gradients reach the router with the same forward pass.

  'scale' (paper Eq. 6): the chosen soft score scales the merged features;
  'mixture': the straight-through mix of every grain's features. The
  training forward is the same hard choice, so the loss is identical while
  the router's gradient differs.
  """
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  values, grads = {}, {}
  for mode in ('scale', 'mixture'):  # 'codes': the test below
    model = dqvae.DQVAE(**dqvae.tiny_kwargs(), gate_gradient=mode)
    variables = jax.jit(model.init)(RNGS, x)

    def loss(params, model=model, variables=variables):
      out, _ = model.apply({**variables, 'params': params}, x, train=True,
                           rngs=RNGS, mutable=['codebook'])
      return jnp.mean(jnp.abs(out['reconstruction'] - x))

    values[mode], g = jax.jit(jax.value_and_grad(loss))(variables['params'])
    grads[mode] = np.asarray(g['grain_router']['gate_2']['linear']['kernel'])
    assert np.abs(grads[mode]).sum() > 0
  np.testing.assert_allclose(values['scale'], values['mixture'], rtol=1e-6)
  assert np.abs(grads['scale'] - grads['mixture']).max() > 1e-3 * np.abs(
      grads['scale']).max()


def test_codes_gate_gradient_compares_each_grains_codes():
  """gate_gradient='codes': the router's gradient from the decoder input is
  that of sum_k gate_k * q_k, q_k being grain k's own nearest codes: each
  region's gate is told <dL/dq, q_k> for every grain, not only the chosen."""
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  model = _small_dual(gate_gradient='codes')
  variables = jax.jit(model.init)(RNGS, x)
  w = jax.random.normal(jax.random.key(7), (2, 8, 8, 16))

  def through_model(params):
    out, _ = model.apply({**variables, 'params': params}, x, True,
                         method=dqvae.DQVAE.encode, rngs=RNGS,
                         mutable=['codebook'])
    return jnp.sum(out['quantized'] * w)

  def written_out(params):
    def mixed(m):
      feats = m.encoder(x, True)
      routing = m.route(x, feats, True, None)
      coded = [m.quantize.nearest(m.quant_conv(f)) for f in feats]
      return jnp.sum(grain_lib.mix_grains(coded, routing.gate,
                                          m.grain_factors) * w)
    return model.apply({**variables, 'params': params}, method=mixed,
                       rngs=RNGS)

  got = jax.jit(jax.grad(through_model))(variables['params'])['grain_router']
  want = jax.jit(jax.grad(written_out))(variables['params'])['grain_router']
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.abs(np.asarray(b)).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(grain_ratios=(0.6, 0.6)), 'sum to 1'),
    (dict(router='mystery'), 'Unknown router'),
    (dict(gate_gradient='mystery'), 'Unknown gate_gradient'),
    (dict(router_target='mystery'), 'Unknown router_target'),
    (dict(router_inference='mystery'), 'Unknown router_inference'),
    (dict(router_train_routing='mystery'), 'Unknown router_train_routing'),
    (dict(grain_factors=(8, 16)), 'coarse to fine'),
    (dict(grain_factors=(16, 6)), 'power of two'),
    (dict(dec_ch_mult=(1, 2)), 'dec_ch_mult'),
    (dict(ch_mult=(1, 2, 2, 4)), 'len\\(ch_mult\\)'),
])
def test_bad_config_errors(kwargs, match):
  model = dqvae.DQVAE(**{**dqvae.tiny_kwargs(), **kwargs})
  with pytest.raises(ValueError, match=match):
    model.init(RNGS, jnp.zeros((1, 32, 32, 3)))


def test_image_size_not_multiple_of_largest_factor():
  model = dqvae.DQVAE(**dqvae.tiny_kwargs())
  with pytest.raises(ValueError, match='multiple of the largest'):
    model.init(RNGS, jnp.zeros((1, 40, 40, 3)))


@pytest.mark.parametrize('variant', ['feature_dual', 'triple'])
def test_feature_router_budget_at_inference(variant):
  """A per-call budget gives the feature router exact shares per image,
  keeping its learned ranking: the regions the gate rates finest go fine."""
  model = dqvae.DQVAE(**dqvae.tiny_kwargs(variant))
  size = 2 * model.grain_factors[0]  # 2 x 2 regions per image at least
  size = max(size, 32)
  x = jax.random.uniform(jax.random.key(3), (2, size, size, 3), minval=-1.0,
                         maxval=1.0)
  variables = jax.jit(model.init)(RNGS, x)
  k = model.num_grains
  ratios = (0.5, 0.5) if k == 2 else (0.25, 0.25, 0.5)
  out = jax.jit(lambda v: model.apply(v, x, grain_ratios=ratios,
                                      method=dqvae.DQVAE.encode))(variables)
  grain_map = np.asarray(out['grain_map'])
  n = grain_map[0].size
  for g, r in enumerate(ratios):
    np.testing.assert_array_equal((grain_map == g).sum(axis=(1, 2)),
                                  round(r * n))
  probs = jax.nn.softmax(out['logits'], axis=-1)
  score = np.asarray(probs @ jnp.arange(k, dtype=jnp.float32))
  finest = grain_map == k - 1
  for b in range(2):  # every finest region outranks every other region
    assert score[b][finest[b]].min() >= score[b][~finest[b]].max()
  with pytest.raises(ValueError, match='inference-time budget'):
    jax.eval_shape(
        lambda v: model.apply(v, x, train=True, grain_ratios=ratios,
                              method=dqvae.DQVAE.encode,
                              rngs={'gumbel': RNGS['gumbel'],
                                    'restart': RNGS['restart']}),
        variables)


def test_missing_entropy_thresholds_file_is_clear():
  model = dqvae.DQVAE(**{**dqvae.tiny_kwargs('entropy_dual'),
                         'entropy_thresholds': '/nonexistent/thresholds.json'})
  with pytest.raises(FileNotFoundError, match='entropy_thresholds'):
    jax.eval_shape(lambda x: model.init(RNGS, x), jnp.zeros((1, 32, 32, 3)))


def test_gain_router_target_is_the_oracle_allocation():
  """router_target='gain': 'router_loss' is the gate's cross-entropy towards
  the greedy oracle's allocation of this batch (all coarse vs all fine, the
  regions with the largest error drop fine, at the configured share)."""
  from dqvq.eval import allocation  # pylint: disable=g-import-not-at-top
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  model = _small_dual(router_target='gain')
  variables = jax.jit(model.init)(RNGS, x)
  out, _ = jax.jit(lambda v: model.apply(v, x, train=True, rngs=RNGS,
                                         mutable=['codebook']))(variables)
  recon = {grain: _uniform_reconstruction(model, variables, x, grain)
           for grain in (0, 1)}
  target = allocation.oracle_grain_map(
      allocation.region_gain(x, recon[0], recon[1], 4), model.grain_ratios)
  assert int(target.sum()) == 2 * 8  # half of each image's 16 regions fine
  logp = jax.nn.log_softmax(out['logits'], -1)
  want = -jnp.mean(jnp.take_along_axis(logp, target[..., None], -1))
  np.testing.assert_allclose(out['router_loss'], want, rtol=1e-5)
  # Only a training forward of the feature router has it.
  assert 'router_loss' not in jax.eval_shape(
      lambda v: model.apply(v, x), variables)
  # It trains the gate and nothing else: the router reads the encoder's
  # features without back-propagating into them.
  grads = jax.jit(jax.grad(lambda p: model.apply(
      {**variables, 'params': p}, x, train=True, rngs=RNGS,
      mutable=['codebook'])[0]['router_loss']))(variables['params'])
  for name, tree in grads.items():
    biggest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(tree))
    assert (biggest > 0) == (name == 'grain_router'), name


@pytest.mark.parametrize('scope', ['image', 'batch'])
def test_error_router_target_is_the_coarse_error_map(scope):
  """router_target='error': the gate's cross-entropy towards the regions the
  all-coarse reconstruction gets most wrong (L1, the paper's Fig. 5 map), at
  the target share in each image ('image') or over the batch ('batch')."""
  from dqvq.eval import allocation  # pylint: disable=g-import-not-at-top
  # Image 0 is flat, image 1 noise: under 'batch' the noise takes the share.
  noise = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), minval=-1,
                             maxval=1)
  x = jnp.concatenate([jnp.full_like(noise, 0.2), noise])
  model = _small_dual(router_target='error', router_target_scope=scope)
  variables = jax.jit(model.init)(RNGS, x)
  out, _ = jax.jit(lambda v: model.apply(v, x, train=True, rngs=RNGS,
                                         mutable=['codebook']))(variables)
  coarse = _uniform_reconstruction(model, variables, x, 0)
  errors = grain_lib.region_error(x, coarse, 4)
  if scope == 'image':
    target = allocation.oracle_grain_map(errors, model.grain_ratios)
    np.testing.assert_array_equal(target.sum(axis=(1, 2)), [8, 8])
  else:
    target = allocation.oracle_grain_map(
        errors.reshape(1, 8, 4), model.grain_ratios).reshape(2, 4, 4)
    assert int(target.sum()) == 16
    # Random weights still reconstruct a flat image better than noise.
    assert int(target[1].sum()) > int(target[0].sum())
  logp = jax.nn.log_softmax(out['logits'], -1)
  want = -jnp.mean(jnp.take_along_axis(logp, target[..., None], -1))
  np.testing.assert_allclose(out['router_loss'], want, rtol=1e-5)


def test_unknown_router_target_scope_is_named():
  with pytest.raises(ValueError, match='router_target_scope'):
    _small_dual(router_target='error', router_target_scope='global').init(
        RNGS, jnp.zeros((1, 16, 16, 3)))
