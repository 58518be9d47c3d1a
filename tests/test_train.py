"""Stage-1 training system: smoke runs, resume, preemption, sharding, config.

Stage 2 and the two-stage demo are in test_stage2.py.
"""

import dataclasses
import functools
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


from dqvq import losses
from dqvq import run_guards
from dqvq import sharding
from dqvq.trainers import checks
from dqvq.trainers import loop
from dqvq.trainers import stage1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str = 'runlocal'):
  """configs/NAME.py's config; 'demo' means the demo's stage-1 part."""
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if name == 'demo':
    return module.stage1_config(arg)
  return module.get_config(arg)


def tiny(data_dir, name='demo', **overrides):
  c = load_config(name)
  c.data.data_dir = data_dir
  for k, v in overrides.items():
    c[k] = v
  return c


def restored_states(config, *workdirs) -> list[dict]:
  """Every saved step of each run, restored (checksums verified) into the
  shardings this process would train `config` with."""
  from dqvq import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  task = loop.make_task(config, str(workdirs[0]), mesh)
  abstract = jax.eval_shape(task.init, jax.random.key(0))
  target = sharding.with_shardings(abstract, task.state_shardings(abstract))
  runs = []
  for workdir in workdirs:
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=1)
    try:
      runs.append({s: ckpt.restore_step(s, target)[0]
                   for s in ckpt.all_steps()})
    finally:
      ckpt.close()
  return runs


def _leaves_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_finished_two_step_run(workdir, caplog) -> None:
  """What a finished 2-step run leaves: checkpoints, TensorBoard events,
  pictures, and the end-of-run summary naming them."""
  assert {'1', '2'} <= set(os.listdir(workdir / 'checkpoints'))
  assert any(f.startswith('events') for f in os.listdir(workdir))
  assert os.listdir(workdir / 'pictures')
  summary = [r.getMessage() for r in caplog.records
             if r.filename == 'loop.py'][-3:]
  assert summary[0].startswith('Finished 2 steps in ')
  assert summary[1].startswith('Final: train/l1_loss=') and (
      'val/l1_loss=' in summary[1])
  assert summary[2].startswith(
      f'Checkpoints: {workdir}/checkpoints (steps 1, 2); pictures: '
      f'{workdir}/pictures; curves: tensorboard --logdir {workdir}')


# One smoke run per stage-1 config: ffhq_stage1's is the uninterrupted run
# of test_resume_equals_uninterrupted_bitwise, the demo's runs in
# test_stage2.py::test_demo_trains_both_stages.
def test_two_step_smoke_run_imagenet_stage1(demo_data_dir, tmp_path, caplog):
  c = tiny(demo_data_dir, 'imagenet_stage1')
  with caplog.at_level(logging.INFO):
    state = loop.train_and_evaluate(c, str(tmp_path))
  assert int(state.step) == 2
  _assert_finished_two_step_run(tmp_path, caplog)


def _tracing_order(monkeypatch) -> list[str]:
  """Makes the loop's tasks record 'train' / 'eval' whenever jit traces
  (so compiles) their steps, and the checkpointer 'finite' for its check of
  the state: a jitted function's body runs only then."""
  traced, make_task = [], loop.make_task

  def spy(name, fn):
    def traced_fn(*args):
      traced.append(name)
      return fn(*args)
    return traced_fn

  def spied(*args):
    task = make_task(*args)
    return dataclasses.replace(task, train_step=spy('train', task.train_step),
                               eval_step=spy('eval', task.eval_step))

  monkeypatch.setattr(loop, 'make_task', spied)
  monkeypatch.setattr(run_guards, '_finite_per_leaf', jax.jit(
      spy('finite', run_guards._finite_per_leaf.__wrapped__)))  # pylint: disable=protected-access
  return traced


@pytest.mark.long
def test_resume_equals_uninterrupted_bitwise(demo_data_dir, tmp_path,
                                             monkeypatch, caplog):
  # ffhq's runlocal trains the GAN too, so its state is covered. Same config
  # in all runs (one compiled program); the interrupted run stops after step 1
  # exactly as on preemption, then a second invocation finishes it.
  c = tiny(demo_data_dir, 'ffhq_stage1')
  with caplog.at_level(logging.INFO):
    straight = loop.train_and_evaluate(c, str(tmp_path / 'a'))
  _assert_finished_two_step_run(tmp_path / 'a', caplog)  # ffhq's smoke run
  interrupted = tiny(demo_data_dir, 'ffhq_stage1', stop_at_step=1)
  assert int(loop.train_and_evaluate(interrupted, str(tmp_path / 'b')).step) == 1
  traced = _tracing_order(monkeypatch)
  resumed = loop.train_and_evaluate(c, str(tmp_path / 'b'))
  assert int(resumed.step) == c.num_train_steps == 2
  # Every save first checks its state (finite leaves, the loss on a
  # validation batch). Those programs must compile before the first step,
  # or the first SIGTERM's save would wait for compiles inside the
  # scheduler's grace period.
  assert traced == ['finite', 'eval', 'train']
  _leaves_equal(straight.params, resumed.params)
  _leaves_equal(straight.codebook, resumed.codebook)
  _leaves_equal(straight.opt_state, resumed.opt_state)
  _leaves_equal(straight.disc_params, resumed.disc_params)
  _leaves_equal(straight.disc_batch_stats, resumed.disc_batch_stats)
  assert jax.tree.leaves(resumed.disc_params)  # the GAN was trained


@pytest.mark.slow  # minutes: test_preemption.py signals the real trainer
# in the default run and restores what it saved; this one trains on from it.
def test_sigterm_leaves_restorable_checkpoint(demo_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  cmd = cli_command('ffhq_stage1.py:runlocal', workdir,
                    f'--config.data.data_dir={demo_data_dir}',
                    '--config.num_train_steps=10000',
                    '--config.checkpoint_every=10000',
                    '--config.eval_every=10000', '--config.image_every=10000')
  proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 400
  events = None
  while time.time() < deadline:
    if os.path.isdir(workdir) and any(
        f.startswith('events') for f in os.listdir(workdir)):
      events = True
      break
    time.sleep(2)
  assert events, 'training never started'
  time.sleep(5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  steps = [int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()]
  assert steps and max(steps) < 10000
  # The run resumes from it.
  c = tiny(demo_data_dir, 'ffhq_stage1', num_train_steps=max(steps) + 1,
           eval_every=10000, image_every=10000)
  state = loop.train_and_evaluate(c, str(workdir))
  assert int(state.step) == max(steps) + 1


def test_sharded_step_equals_single_device(demo_data_dir):
  c = tiny(demo_data_dir, 'ffhq_stage1')
  models = stage1.build_models(c)
  res = c.data.resolution
  init = functools.partial(stage1.init_state, models, image_shape=(1, res, res, 3))
  state = jax.jit(init)(jax.random.key(0))
  lpips = stage1.lpips_params_for(c)
  images = jax.random.uniform(jax.random.key(1), (8, res, res, 3), minval=-1,
                              maxval=1)
  batch = {'image': images, 'label': jnp.zeros((8,), jnp.int32),
           'mask': jnp.ones((8,), bool)}
  step = functools.partial(stage1.train_step, models)
  one = jax.jit(step)(state, batch, lpips)
  mesh = sharding.create_mesh()
  assert mesh.shape['data'] == 8
  sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  rep_state = jax.device_put(state, sharding.replicated(mesh))
  eight = jax.jit(step)(rep_state, sharded_batch, lpips)
  assert len(eight[0].params['encoder']['conv_in']['conv']['kernel']
             .sharding.device_set) == 8
  drop_key = lambda out: (out[0].replace(rng=None), out[1])
  for a, b in zip(jax.tree.leaves(drop_key(one)),
                  jax.tree.leaves(drop_key(eight))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                               atol=2e-5)


def test_generator_update_is_the_gradient_of_the_total_loss(demo_data_dir):
  """The step's hand-assembled VJP equals jax.grad of the whole loss.

  The reference below is the loss written out plainly (nll + lambda * g + L_q
  + L_budget, lambda held constant), which runs LPIPS and the discriminator
  twice; the step must reach the same loss, weight and gradient norm.
  """
  c = tiny(demo_data_dir, 'ffhq_stage1')
  c.loss.disc_weight_max = None  # An unclamped weight shows any error in it.
  c.loss.perceptual_weight, c.lpips_weights = 1.0, 'random'
  models = stage1.build_models(c)
  assert models.disc is not None and models.lpips is not None
  res = c.data.resolution
  state = jax.jit(functools.partial(stage1.init_state, models,
                                    image_shape=(1, res, res, 3)))(
                                        jax.random.key(0))
  lpips = stage1.lpips_params_for(c)
  x = jax.random.uniform(jax.random.key(1), (2, res, res, 3), minval=-1,
                         maxval=1)
  batch = {'image': x, 'label': jnp.zeros((2,), jnp.int32),
           'mask': jnp.ones((2,), bool)}
  _, metrics = jax.jit(functools.partial(stage1.train_step, models))(
      state, batch, lpips)

  rngs = stage1._rngs(state)  # pylint: disable=protected-access
  vae = models.vae

  def nll_fn(y):
    p = models.lpips.apply({'params': lpips}, x, y)
    return losses.l1_loss(x, y) + c.loss.perceptual_weight * jnp.mean(p)

  def g_fn(y):
    logits, _ = models.disc.apply(
        {'params': state.disc_params, 'batch_stats': state.disc_batch_stats},
        y, train=True, mutable=['batch_stats'])
    return losses.hinge_g_loss(logits.astype(jnp.float32))

  def total(params):
    out, _ = vae.apply({'params': params, 'codebook': state.codebook}, x,
                       train=True, rngs=rngs, mutable=['codebook'])
    y = out['reconstruction']
    weight = losses.adaptive_gan_weight(
        out['decoder_features'], jax.grad(nll_fn)(y), jax.grad(g_fn)(y),
        c.loss.disc_weight, None)
    budget = losses.budget_loss(out['gate'], vae.grain_factors,
                                vae.grain_ratios, c.loss.budget_kind,
                                c.loss.budget_weight)
    loss = (nll_fn(y) + c.loss.codebook_weight * out['q_loss'] + budget +
            weight * g_fn(y))
    return loss, weight

  (loss, weight), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(
      state.params)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['adaptive_weight'], weight, rtol=1e-5)
  assert float(weight) > 0
  np.testing.assert_allclose(metrics['grad_norm'], optax.global_norm(grads),
                             rtol=1e-4)


@pytest.mark.parametrize('field,value,exc,match', [
    ('batch_size', 12, ValueError, 'divisible by the 8 devices'),
    ('num_train_steps', 0, ValueError, 'num_train_steps'),
    ('lpips_weights', '', ValueError, 'lpips_weights'),
    ('lpips_weights', '/nonexistent/lpips', FileNotFoundError, 'convert lpips'),
])
def test_config_validation_errors(field, value, exc, match, demo_data_dir):
  c = tiny(demo_data_dir)
  c.loss.perceptual_weight = 1.0
  c.lpips_weights = 'random'
  c[field] = value
  with pytest.raises(exc, match=match):
    checks.validate_config(c)


def test_config_validation_model_and_data_errors(demo_data_dir):
  c = tiny(demo_data_dir)
  c.data.resolution = 36
  with pytest.raises(ValueError, match='multiple of the largest'):
    checks.validate_config(c)
  c = tiny(demo_data_dir)
  c.data.name = 'image_folder'
  c.data.image_folder_root = '/nonexistent/ffhq'
  with pytest.raises(FileNotFoundError, match='image_folder_root'):
    checks.validate_config(c)
  c = tiny(demo_data_dir)
  c.mesh.data = 3
  with pytest.raises(ValueError, match='mesh'):
    checks.validate_config(c)
  c = tiny(demo_data_dir)
  c.model.unknown_field = 1
  with pytest.raises(ValueError, match='Unknown config.model'):
    checks.validate_config(c)
  with pytest.raises(ValueError, match='Unknown config argument'):
    load_config('imagenet_stage1', 'runlocal,bogus')


def test_config_arguments_select_models():
  assert load_config('imagenet_stage1', '').model.grain_factors == (16, 8)
  triple = load_config('imagenet_stage1', 'triple')
  assert triple.model.grain_factors == (32, 16, 8)
  ent = load_config('imagenet_stage1', 'entropy,ratio=0.3')
  assert ent.model.router == 'entropy' and ent.loss.budget_kind == 'none'
  np.testing.assert_allclose(ent.model.grain_ratios, (0.7, 0.3))
  assert load_config('imagenet_stage1', 'vqgan').model.grain_factors == (16,)


def test_learning_rate_schedule_official():
  c = load_config('imagenet_stage1', '')
  from dqvq.trainers import optim  # pylint: disable=g-import-not-at-top
  sched = optim.learning_rate_schedule(c)
  peak = 4.5e-6 * 240
  np.testing.assert_allclose(sched(0), 0.0)
  np.testing.assert_allclose(sched(267), peak * 267 / 534, rtol=1e-6)
  np.testing.assert_allclose(sched(534), peak, rtol=1e-6)
  mid = (534 + 266_912) / 2
  np.testing.assert_allclose(sched(mid), peak / 2, rtol=1e-4)
  np.testing.assert_allclose(sched(266_912), 0.0, atol=1e-9)


def cli_env() -> dict[str, str]:
  """The environment of a `python -m dqvq.train` test subprocess: one CPU
  device (a toy step runs faster than on eight fake ones), no huge-page
  restart (a hugetlb tunable of the user's own wins, dqvq.cpu.tuning), and
  this suite's persistent compilation cache, every program in
  it, so that warm runs skip compiling."""
  # pylint: disable-next=g-import-not-at-top
  from conftest import FAST_COMPILE_XLA_FLAGS
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=FAST_COMPILE_XLA_FLAGS,
              GLIBC_TUNABLES='glibc.malloc.hugetlb=0',
              JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def cli_command(config: str, workdir, *overrides) -> list[str]:
  """`python -m dqvq.train --config configs/CONFIG --workdir WORKDIR ...`."""
  return [sys.executable, '-u', '-m', 'dqvq.train',
          f'--config={ROOT}/configs/{config}', f'--workdir={workdir}',
          *overrides]


def _train_cli(*overrides):
  return subprocess.run(
      cli_command('imagenet_stage1.py:runlocal', '/tmp/dqvq_cli_test_unused',
                  *overrides),
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=cli_env())


def test_every_model_field_overridable_from_the_command_line():
  # Parsing succeeds (the run then stops at config validation, before any
  # compile, on the deliberately invalid step count).
  ok = _train_cli('--config.model.router=entropy',
                  '--config.model.entropy_thresholds=auto',
                  '--config.model.position_embedding=none',
                  '--config.num_train_steps=0')
  assert ok.returncode != 0
  assert 'num_train_steps must be positive' in ok.stderr + ok.stdout
  bad = _train_cli('--config.model.no_such_field=1')
  assert bad.returncode != 0
  assert 'no_such_field' in bad.stderr + bad.stdout


def test_router_lr_multiplier_scales_only_the_feature_router(demo_data_dir):
  """optim.router_lr_multiplier: the feature router's Adam updates times m,
  every other update as with m = 1; models without a learned router keep
  the plain optimizer (and so their checkpoints' tree)."""
  c = tiny(demo_data_dir)
  c.model.router = 'feature'
  size = c.data.resolution
  plain = stage1.build_models(c)
  state = jax.jit(functools.partial(stage1.init_state, plain,
                                    image_shape=(1, size, size, 3)))(
                                        jax.random.key(0))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), state.params)
  # Jitted: eager, optax's per-leaf ops would compile one by one.
  want, _ = jax.jit(plain.tx.update)(grads, state.opt_state, state.params)
  c.optim.router_lr_multiplier = 10.0
  fast = stage1.build_models(c)
  got, _ = jax.jit(lambda g, p: fast.tx.update(g, fast.tx.init(p), p))(
      grads, state.params)
  for name in state.params:
    factor = 10.0 if name == 'grain_router' else 1.0
    for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name])):
      np.testing.assert_allclose(a, factor * b, rtol=1e-6)
  assert 'grain_router' in state.params
  c.model.router = 'entropy'
  entropy = stage1.build_models(c)
  assert (jax.tree.structure(entropy.tx.init(state.params)) ==
          jax.tree.structure(plain.tx.init(state.params)))
