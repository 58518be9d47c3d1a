"""Stage-2 training: smoke runs, the two-stage demo, FSDP, resume, pads."""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import load_config
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq import sequence
from dqvq import sharding
from dqvq import train
from dqvq.trainers import checks
from dqvq.trainers import loop
from dqvq.trainers import optim
from dqvq.trainers import stage2


def stage2_config(stage1_workdir, data_dir, name='imagenet_stage2',
                  arg='runlocal', **overrides):
  c = load_config(name).get_config(arg)
  c.tokenizer.workdir = stage1_workdir
  c.data.data_dir = data_dir
  for k, v in overrides.items():
    c[k] = v
  return c


def _leaves_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# (`imagenet_stage2.py:runlocal,cfg=0.1` is trained in test_sampling.py.)
@pytest.mark.parametrize('name,arg', [('imagenet_stage2', 'runlocal'),
                                      ('ffhq_stage2', 'runlocal')])
def test_two_step_smoke_run_per_config(name, arg, stage1_workdir,
                                       demo_data_dir, tmp_path):
  c = stage2_config(stage1_workdir, demo_data_dir, name, arg)
  state = loop.train_and_evaluate(c, str(tmp_path))
  assert int(state.step) == 2
  assert '2' in os.listdir(tmp_path / 'checkpoints')
  assert os.listdir(tmp_path / 'pictures')
  assert np.all(np.isfinite(np.asarray(jax.tree.leaves(state.params)[0])))


def test_two_step_run_from_token_dataset(stage1_workdir, demo_data_dir,
                                         tmp_path):
  from dqvq.data import tokens  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load_stage1(stage1_workdir)
  data = ml_collections.ConfigDict(tok.config.data.to_dict())
  data.train_split, data.eval_split = 'validation[:32]', 'validation[-16:]'
  tokens_dir = str(tmp_path / 'tokens')
  tokens.write_token_dataset(tok, tokens_dir, data_config=data, batch_size=16,
                             stage1_workdir=stage1_workdir)
  c = stage2_config(stage1_workdir, demo_data_dir, tokens_dir=tokens_dir)
  state = loop.train_and_evaluate(c, str(tmp_path / 'run'))
  assert int(state.step) == 2
  assert os.listdir(tmp_path / 'run' / 'pictures')


@pytest.mark.long
def test_demo_trains_both_stages(demo_data_dir, tmp_path):
  c = load_config('demo').get_config('runlocal')
  c.data.data_dir = demo_data_dir
  c.tokenizer.stage1.data.data_dir = demo_data_dir
  train.run(c, str(tmp_path))
  for stage in ('stage1', 'stage2'):
    assert '2' in os.listdir(tmp_path / stage / 'checkpoints'), stage
    assert os.listdir(tmp_path / stage / 'pictures'), stage
  samples = os.listdir(tmp_path / 'samples' / 'images')
  assert len(samples) == c.sample_images
  assert os.path.exists(tmp_path / 'samples' / 'grid.png')
  # Class-conditional on the training photographs, cycling in order.
  labels = np.load(tmp_path / 'samples' / 'tokens.npz')['label']
  train_labels = list(c.sample_class_labels)
  assert 4 not in train_labels  # chelsea, a validation photograph
  assert labels.tolist() == [train_labels[i % len(train_labels)]
                             for i in range(c.sample_images)]
  # Running it again resumes both stages (nothing left to do) without error.
  c2 = load_config('demo').get_config('runlocal')
  c2.data.data_dir = demo_data_dir
  c2.tokenizer.stage1.data.data_dir = demo_data_dir
  train.run(c2, str(tmp_path))


def test_resume_equals_uninterrupted_bitwise(stage1_workdir, demo_data_dir,
                                             tmp_path):
  # Dropout on, so the per-step keys must replay exactly too.
  def config(**kw):
    c = stage2_config(stage1_workdir, demo_data_dir, **kw)
    c.model.embed_dropout = c.model.resid_dropout = 0.1
    return c
  straight = loop.train_and_evaluate(config(), str(tmp_path / 'a'))
  first = loop.train_and_evaluate(config(stop_at_step=1), str(tmp_path / 'b'))
  assert int(first.step) == 1
  resumed = loop.train_and_evaluate(config(), str(tmp_path / 'b'))
  assert int(resumed.step) == 2
  _leaves_equal(straight.params, resumed.params)
  _leaves_equal(straight.opt_state, resumed.opt_state)


def _models_state_batch(stage1_workdir, demo_data_dir, mesh=None):
  c = stage2_config(stage1_workdir, demo_data_dir)
  tok = tokenizer_lib.load_stage1(stage1_workdir)
  models = stage2.build_models(c, sequence.layout_from_config(c, tok.vae))
  state = jax.jit(lambda r: stage2.init_state(models, r))(jax.random.key(0))
  res = c.data.resolution
  batch = {'image': jax.random.uniform(jax.random.key(1), (8, res, res, 3),
                                       minval=-1, maxval=1),
           'label': jnp.arange(8, dtype=jnp.int32),
           'mask': jnp.ones((8,), bool)}
  return c, tok, models, state, batch


def test_fsdp_step_equals_single_device(stage1_workdir, demo_data_dir):
  c, tok, models, state, batch = _models_state_batch(stage1_workdir,
                                                     demo_data_dir)
  step = jax.jit(lambda s, b, t: stage2.train_step(models, s, b, t))
  one = step(state, batch, tok)
  mesh = sharding.create_mesh(data=1, fsdp=8)
  shardings = stage2.state_shardings(models, mesh, jax.eval_shape(
      lambda r: stage2.init_state(models, r), jax.random.key(0)))
  # The width axis of every weight matrix is split over 'fsdp', and so is
  # Adam's state for it.
  kernel = shardings.params['content_transformer_0']['mlp_0']['kernel']
  assert kernel.spec == jax.sharding.PartitionSpec('fsdp', None)
  mu = shardings.opt_state[0].mu['content_transformer_0']['mlp_0']['kernel']
  assert mu.spec == kernel.spec
  rep = sharding.replicated(mesh)
  fsdp_step = jax.jit(lambda s, b, t: stage2.train_step(models, s, b, t),
                      in_shardings=(shardings, sharding.batch_sharding(mesh),
                                    rep),
                      out_shardings=(shardings, rep))
  eight = fsdp_step(jax.device_put(state, shardings),
                    jax.device_put(batch, sharding.batch_sharding(mesh)),
                    jax.device_put(tok, rep))
  assert len(eight[0].params['content_emb']['embedding'].sharding.device_set
             ) == 8
  # Gradients (Adam's first moment after one step is 0.1 g) and metrics
  # agree to float32 summation order. The updated parameters are compared
  # to within the step's size only: where a gradient is ~1e-8, Adam's
  # m / (sqrt(v) + eps) swings between 0 and 1 on the last bits, so a
  # parameter may move by up to one learning rate on one mesh and not the
  # other (seen: 1 element of 4096, 1.3e-5 apart).
  mu = lambda s: s.opt_state[0].mu  # pylint: disable=unnecessary-lambda-assignment
  for a, b in zip(jax.tree.leaves((mu(one[0]), one[1])),
                  jax.tree.leaves((mu(eight[0]), eight[1]))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                               atol=1e-7)
  step_size = float(one[1]['learning_rate'])
  for a, b in zip(jax.tree.leaves(one[0].params),
                  jax.tree.leaves(eight[0].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                               atol=step_size + 1e-7)


def test_loss_ignores_pads(stage1_workdir, demo_data_dir):
  """More trailing pad slots and different pad embeddings change nothing."""
  c, tok, models, state, batch = _models_state_batch(stage1_workdir,
                                                     demo_data_dir)
  codes = tok.encode(batch['image'])
  assert models.layout.position_index == 'slot'  # the config's default
  lay = models.layout
  # The bottom row of regions coarse: the finest stream then needs at most
  # its capacity minus 16 slots, so the smaller layout below truncates none.
  codes['grain_map'] = codes['grain_map'].at[:, -1, :].set(0)
  drop = lay.grid_sizes[0] * (lay.grid_sizes[-1] // lay.grid_sizes[0]) ** 2

  @functools.partial(jax.jit, static_argnums=0)
  def loss(layout, params):
    streams = sequence.encode(codes['codes'], codes['grain_map'], layout,
                              batch['label'])
    io = sequence.model_inputs(streams, layout)
    model = models.model.clone(layout=layout)
    pos, con = model.apply({'params': params}, io['inputs'],
                           io['targets']['position'], io['targets']['grain'])
    from dqvq import losses  # pylint: disable=g-import-not-at-top
    return losses.token_losses(losses.token_loss_sums(
        pos, con, io['targets'], layout.num_grains), layout.num_grains)

  def assert_same(a, b):
    for k in a:
      np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]),
                                 rtol=1e-5, atol=1e-6, err_msg=k)

  noise = lambda k, shape: jax.random.normal(jax.random.key(k), shape)
  clean = jax.tree.map(lambda x: x, state.params)
  clean['pos_emb'] = noise(5, clean['pos_emb'].shape)  # init is zeros
  params = jax.tree.map(lambda x: x, clean)  # new pad rows
  emb = params['content_emb']['embedding']
  params['content_emb']['embedding'] = emb.at[lay.codebook_size].set(
      noise(3, emb.shape[1:]))
  fine = params['content_fine_pos_emb']['embedding']
  params['content_fine_pos_emb']['embedding'] = fine.at[lay.num_cells[-1]].set(
      noise(4, fine.shape[1:]))
  for mode in ('slot', 'compact'):
    full = dataclasses.replace(lay, position_index=mode)
    # The full layout has `drop` more trailing pad slots than this one.
    smaller = dataclasses.replace(
        full, capacities=lay.num_cells[:-1] + (lay.num_cells[-1] - drop,))
    assert smaller.length == lay.length - drop
    streams = sequence.encode(codes['codes'], codes['grain_map'], smaller,
                              batch['label'])
    assert not bool(streams['truncated'].any())  # the test needs none
    assert_same(loss(full, clean), loss(smaller, params))
  # Compact positions (the official's): the pads between a stream's eos and
  # the next sos change nothing either; slot positions move the fine tokens.
  coarse = int(jnp.max(jnp.sum(codes['grain_map'] == 0, axis=(1, 2))))
  assert 0 < coarse < lay.num_cells[0]
  tight = dataclasses.replace(smaller, capacities=(coarse,) + tuple(
      smaller.capacities[1:]))
  assert_same(loss(full, params), loss(tight, params))
  slot = lambda l: dataclasses.replace(l, position_index='slot')
  assert abs(float(loss(slot(full), params)['loss']) -
             float(loss(slot(tight), params)['loss'])) > 1e-4


def test_weight_decay_only_on_linear_kernels(stage1_workdir, demo_data_dir):
  _, _, _, state, _ = _models_state_batch(stage1_workdir, demo_data_dir)
  mask = optim.decay_mask(state.params)
  flat = {jax.tree_util.keystr(p): v for p, v in
          jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["['position_head']['kernel']"]
  assert flat["['content_transformer_0']['attn']['query']['kernel']"]
  assert not flat["['content_transformer_0']['attn']['query']['bias']"]
  assert not flat["['content_emb']['embedding']"]
  assert not flat["['pos_emb']"]
  assert not flat["['content_head_ln']['scale']"]


def test_stage2_config_validation_errors(stage1_workdir, demo_data_dir,
                                         tmp_path):
  c = stage2_config(None, demo_data_dir)
  with pytest.raises(ValueError, match='tokenizer.workdir'):
    checks.validate_config(c)
  c = stage2_config(str(tmp_path), demo_data_dir)
  with pytest.raises(FileNotFoundError, match='holds no checkpoints'):
    checks.validate_config(c)
  c = stage2_config(stage1_workdir, demo_data_dir, tokens_dir='/nonexistent')
  with pytest.raises(FileNotFoundError, match='dqvq.tokenize'):
    checks.validate_config(c)
  c = stage2_config(stage1_workdir, demo_data_dir)
  c.model.width = 33
  with pytest.raises(ValueError, match='num_heads'):
    checks.validate_config(c)
  c = stage2_config(stage1_workdir, demo_data_dir)
  c.model.width = 36
  c.model.num_heads = 1
  c.mesh.fsdp, c.mesh.data = 8, 1
  with pytest.raises(ValueError, match='fsdp'):
    checks.validate_config(c)
  c = stage2_config(stage1_workdir, demo_data_dir, 'ffhq_stage2')
  c.model.label_dropout = 0.1
  with pytest.raises(ValueError, match='class-conditional'):
    checks.validate_config(c)
  c = stage2_config(stage1_workdir, demo_data_dir)
  c.model.block_size = 8
  with pytest.raises(ValueError, match='block_size'):
    stage2.build_models(c, sequence.layout_from_config(
        c, tokenizer_lib.load_stage1(stage1_workdir).vae))


def test_paper_configs():
  base = load_config('imagenet_stage2').get_config('')
  assert (base.model.width, base.model.position_layers,
          base.model.content_layers, base.model.num_classes) == (1024, 6, 18,
                                                                 1000)
  assert base.optim.b1 == 0.9 and base.optim.b2 == 0.95
  assert base.optim.weight_decay == 0.01 and base.optim.base_learning_rate == 5e-4
  assert load_config('imagenet_stage2').get_config(
      'large').model.content_layers == 42
  assert load_config('ffhq_stage2').get_config('').model.num_classes == 0
  layout = sequence.StreamLayout((16, 32), 1024, 1000)
  model = stage2.transformer_lib.DQTransformer(
      layout, **stage2.transformer_lib.paper_kwargs())
  x = {k: jnp.zeros((1, layout.length - 1), jnp.int32)
       for k in ('content', 'position', 'grain')}
  x['pad'] = jnp.zeros((1, layout.length - 1), bool)
  params = nn.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, x['position'], x['grain'])))
  assert sum(p.size for p in jax.tree.leaves(params)) == 313_999_360


def test_sample_settings_refused_before_training(stage1_workdir, demo_data_dir):
  c = stage2_config(stage1_workdir, demo_data_dir, arg='runlocal,uncond')
  c.sample_class_labels = (3,)
  with pytest.raises(ValueError, match='needs a class-conditional'):
    checks.validate_config(c)
  c = stage2_config(stage1_workdir, demo_data_dir)
  c.sample_class_labels = (0, c.model.num_classes)
  with pytest.raises(ValueError, match=r'outside \[0, '):
    checks.validate_config(c)
  c = stage2_config(stage1_workdir, demo_data_dir)
  c.sampling.temperature_content = 0.0
  with pytest.raises(ValueError, match='temperature'):
    checks.validate_config(c)


def test_tokenizer_of_another_resolution_refused(stage1_workdir,
                                                 demo_data_dir, tmp_path):
  c = stage2_config(stage1_workdir, demo_data_dir)
  trained_at = tokenizer_lib.load_stage1(stage1_workdir).config.data.resolution
  c.data.resolution = 2 * trained_at
  with pytest.raises(ValueError, match=f'trained at {trained_at} px'):
    loop.train_and_evaluate(c, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints' / '0')
