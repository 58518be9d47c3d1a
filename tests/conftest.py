"""Test setup: 8 fake CPU devices so sharding is exercised on any machine.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of
conftest.py, which pytest imports first.
"""

import os

from dqvq.cpu import host_allocator  # no jax: safe before XLA_FLAGS is set

# The suite compiles hundreds of toy programs whose run time is negligible:
# LLVM's optimisation passes are most of a compile, so the tests (and the
# `python -m dqvq.train` processes they start, test_train.cli_env) skip
# them: the whole suite ran 19 min 18 s -> 14 min 48 s on 2 cores. They
# change no semantics (no fast-math); jitted and eager float32 results may
# differ in the last bits, as between any two fusions.
FAST_COMPILE_XLA_FLAGS = ('--xla_backend_optimization_level=0 '
                          '--xla_llvm_disable_expensive_passes=true')
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' ' + FAST_COMPILE_XLA_FLAGS +
    ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Two pytest-xdist workers on two cores: BLAS threads would oversubscribe
# (SciPy's sqrtm / eigh in the FID tests ran 5-20x slower).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Entry points called in-process (`tokenize.main(argv)`) would replace the
# pytest worker by a restarted one with huge pages (dqvq.cpu.host_allocator),
# which xdist sees as a crashed worker. Naming the tunable tells
# prepare_process the process already has it; the `python -m dqvq.*`
# processes the tests start inherit it and get huge pages from the start,
# as a restarted entry point would.
_tunables = host_allocator.with_huge_pages(os.environ.get('GLIBC_TUNABLES', ''))
if _tunables:
  os.environ['GLIBC_TUNABLES'] = _tunables

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from dqvq.cpu import tuning as cpu_tuning  # pylint: disable=g-import-not-at-top,wrong-import-position

# XLA:CPU's library choice as every dqvq entry point makes it on CPU, so that tests
# compare in-process results with `python -m dqvq.train` processes like for
# like (tests/test_multihost.py) and run the step users run.
cpu_tuning.apply_xla_cpu_flags()

# Compiling the toy models dominates the suite's time on CPU; a persistent
# cache makes every run after the first mostly cache hits.
jax.config.update('jax_compilation_cache_dir', os.environ.get(
    'DQVQ_JAX_CACHE', os.path.expanduser('~/.cache/dqvq/jax_compilation')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: heavy checks, not in the default run')
  config.addinivalue_line(
      'markers', 'long: a default-run test of a minute or more; runs first')


def pytest_collection_modifyitems(items):
  """`long` tests first: pytest-xdist hands tests out in this order, and a
  minute-long test drawn last keeps one worker busy while the other idles."""
  items.sort(key=lambda item: item.get_closest_marker('long') is None)


@pytest.fixture(scope='session')
def num_devices() -> int:
  return jax.device_count()


@pytest.fixture(scope='session')
def demo_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding the embedded demo dataset, built once."""
  from dqvq.data import demo  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  demo.load_demo(data_dir)
  return data_dir


def load_config(name: str, arg: str = 'runlocal'):
  """`configs/NAME.py`'s get_config(arg), imported by path."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      f'cfg_{name}', os.path.join(root, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='session')
def stage1_workdir(demo_data_dir, tmp_path_factory) -> str:
  """A finished 2-step `:runlocal` demo tokenizer run (stage 2's input)."""
  from dqvq.trainers import loop  # pylint: disable=g-import-not-at-top
  c = load_config('demo').stage1_config('runlocal')
  c.data.data_dir = demo_data_dir
  c.entropy_num_images = 32  # the 'auto' entropy table from a few images
  c.eval_every = c.image_every = 1000  # no eval pass or pictures needed
  c.checkpoint_every = 2  # one save: the tokenizer is the last step
  workdir = str(tmp_path_factory.mktemp('stage1'))
  loop.train_and_evaluate(c, workdir)
  return workdir


@pytest.fixture(scope='session')
def stage2_workdir(stage1_workdir, demo_data_dir, tmp_path_factory) -> str:
  """A finished 2-step class-conditional (CFG-ready) stage-2 run on it."""
  from dqvq.trainers import loop  # pylint: disable=g-import-not-at-top
  c = load_config('imagenet_stage2').get_config('runlocal,cfg=0.1')
  c.tokenizer.workdir = stage1_workdir
  c.data.data_dir = demo_data_dir
  c.eval_every = c.image_every = 1000
  workdir = str(tmp_path_factory.mktemp('stage2'))
  loop.train_and_evaluate(c, workdir)
  return workdir


def cached_logits(model, params, io):
  """Teacher-forced logits of every input slot through the KV-cached decode
  steps, fed as the sampler feeds them: the true token at each slot, its
  `layout.absolute_index`, and the target's position for the content stack.
  `io` is `sequence.model_inputs`' output; returns (B, T, P) and (B, T, C).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  inp, tgt = io['inputs'], io['targets']
  abs_index = model.layout.absolute_index(inp['pad'])
  b, t_in = inp['pad'].shape

  @jax.jit
  def step(cache, t):
    tok = {n: inp[n][:, t] for n in inp}
    tok['abs_index'] = abs_index[:, t]
    valid = ~inp['pad'] & (jnp.arange(t_in) <= t)
    p, h, cp = model.apply({'params': params}, tok, t, valid,
                           cache['position'], method=model.decode_position)
    c, cc = model.apply({'params': params}, h, tgt['position'][:, t],
                        tgt['grain'][:, t], tgt['pad'][:, t], t, valid,
                        cache['content'], method=model.decode_content)
    return {'position': cp, 'content': cc}, p, c

  cache = model.init_cache(b, t_in)
  pos, con = [], []
  for t in range(t_in):
    cache, p, c = step(cache, jnp.int32(t))
    pos.append(p)
    con.append(c)
  return jnp.stack(pos, 1), jnp.stack(con, 1)
