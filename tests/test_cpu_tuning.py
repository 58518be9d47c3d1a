"""The one CPU switch (dqvq.cpu.tuning): what a CPU run sets, and that an
accelerator run, or --nocpu_tuning, sets none of it.

Each case runs in a fresh interpreter: XLA reads XLA_FLAGS once, when jax
creates its backends, and this test process's backends already exist.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dqvq.cpu import host_allocator
from dqvq.cpu import tuning as cpu_tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints whether the defaults were applied, XLA_FLAGS, whether a compiled conv
# runs as a YNNPACK fusion and whether a reduction does, then tries again
# with the flag gone from XLA_FLAGS but the backends created.
_PROBE = r'''
import os
import jax, jax.numpy as jnp
from dqvq.cpu import tuning as cpu_tuning
applied = cpu_tuning.apply_xla_cpu_flags()
x = jnp.ones((1, 32, 32, 32)); w = jnp.ones((3, 3, 32, 32))
conv = lambda x: jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
def ynn(f):
  return '__ynn_fusion' in jax.jit(f).lower(x).compile().as_text()
flags = repr(os.environ.get('XLA_FLAGS', ''))
conv_ynn, reduce_ynn = ynn(conv), ynn(lambda x: jnp.sum(x, axis=(1, 2)))
os.environ.pop('XLA_FLAGS', None)
print(applied, flags, conv_ynn, reduce_ynn, cpu_tuning.apply_xla_cpu_flags(),
      sep='|')
'''


def _probe(xla_flags):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  if xla_flags is not None:
    env['XLA_FLAGS'] = xla_flags
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, check=True,
                       capture_output=True, text=True, timeout=300)
  return out.stdout.strip().split('|'), out.stderr


def test_defaults_applied_before_backends():
  (applied, flags, conv_ynn, reduce_ynn, again), stderr = _probe(
      '--xla_force_host_platform_device_count=2')
  assert applied == 'True'
  assert flags == ("'--xla_force_host_platform_device_count=2 "
                   "--xla_cpu_experimental_ynn_fusion_type=dot,individual_dot,"
                   "reduce'")
  # Convolutions on XLA's Eigen path, reductions on YNNPACK.
  assert (conv_ynn, reduce_ynn) == ('False', 'True')
  # Once the backends exist, a second call changes nothing and says so.
  assert again == 'False' and 'backends were created before' in stderr


@pytest.mark.parametrize('value,expected', [
    ('', ('False', 'False')),  # Eigen throughout
    ('individual_convolution', ('True', 'False')),
])
def test_users_flag_wins(value, expected):
  flag = f'--xla_cpu_experimental_ynn_fusion_type={value}'
  (applied, flags, conv_ynn, reduce_ynn, _), _ = _probe(flag)
  assert applied == 'False'
  assert flags == repr(flag)
  assert (conv_ynn, reduce_ynn) == expected


# An entry point's start: parse flags (argv from the command line), then
# prepare_process; prints what it decided and saw.
_START = r"""
import os, sys
print('start', os.getpid(), flush=True)
from absl import flags, logging
from jax._src import xla_bridge
from dqvq.cpu import tuning as cpu_tuning
flags.FLAGS(['prog', *sys.argv[1:]])
logging.set_verbosity('info')
tuned = cpu_tuning.prepare_process()
print('after', os.getpid(), tuned, repr(os.environ.get('XLA_FLAGS', '')),
      repr(os.environ.get('GLIBC_TUNABLES', '')),
      xla_bridge.backends_are_initialized(), sep='|', flush=True)
import jax
print('kernels', cpu_tuning.cpu_kernels(jax.devices()), flush=True)
"""


def _start(platforms: str, *args: str) -> tuple[list[str], list[str], str]:
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'GLIBC_TUNABLES')}
  env.update(JAX_PLATFORMS=platforms, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, '-c', _START, *args], env=env,
                       capture_output=True, text=True, timeout=300)
  lines = out.stdout.split('\n')
  starts = [l for l in lines if l.startswith('start')]
  after = [l.split('|') for l in lines if l.startswith('after')]
  assert after, out.stderr[-3000:]
  return starts, after[0], out.stdout + out.stderr


def test_cpu_run_restarts_once_with_huge_pages_and_sets_xla_flags():
  starts, after, log = _start('cpu')
  restart = host_allocator.restart_tunables({}) is not None  # this kernel
  assert len(starts) == (2 if restart else 1), log
  assert len(set(starts)) == 1  # same PID: replaced, not forked
  assert after[2] == 'True'
  assert cpu_tuning.YNN_FUSION_FLAG in after[3]
  assert (host_allocator.TUNABLE in after[4]) == restart
  assert after[5] == 'False'  # decided before jax made its backends
  assert 'kernels True' in log
  if restart:
    assert 'CPU run: restarting this process with GLIBC_TUNABLES' in log


def test_accelerator_run_gets_no_cpu_tuning():
  # JAX_PLATFORMS names an accelerator: no restart, no XLA:CPU flags, and
  # no backend is created to decide (this machine has no TPU, so the first
  # jax computation would fail; the script stops before one).
  script_args = ()
  starts, after, log = _start('tpu', *script_args)
  assert len(starts) == 1, log
  assert after[2:6] == ['False', "''", "''", 'False'], log
  assert 'Platform tpu: no CPU tuning' in log


def test_nocpu_tuning_turns_all_three_off():
  starts, after, log = _start('cpu', '--nocpu_tuning')
  assert len(starts) == 1, log
  assert after[2:5] == ['False', "''", "''"], log
  assert 'kernels False' in log  # models get XLA's own conv gradients


def test_models_get_cpu_kernels_from_the_mesh_platform():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  assert cpu_tuning.cpu_kernels(mesh)
  assert cpu_tuning.cpu_kernels(jax.devices()[:1])
