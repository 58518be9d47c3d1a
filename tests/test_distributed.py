"""Process start-up: the XLA:CPU library choice reaches XLA, or says why not.

Each case runs in a fresh interpreter: XLA reads XLA_FLAGS once, when jax
creates its backends, and this test process's backends already exist.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints whether the defaults were applied, XLA_FLAGS, whether a compiled conv
# runs as a YNNPACK fusion and whether a reduction does, then tries again
# with the flag gone from XLA_FLAGS but the backends created.
_PROBE = r'''
import os
import jax, jax.numpy as jnp
from dqvq import distributed
applied = distributed.apply_cpu_defaults()
x = jnp.ones((1, 32, 32, 32)); w = jnp.ones((3, 3, 32, 32))
conv = lambda x: jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
def ynn(f):
  return '__ynn_fusion' in jax.jit(f).lower(x).compile().as_text()
flags = repr(os.environ.get('XLA_FLAGS', ''))
conv_ynn, reduce_ynn = ynn(conv), ynn(lambda x: jnp.sum(x, axis=(1, 2)))
os.environ.pop('XLA_FLAGS', None)
print(applied, flags, conv_ynn, reduce_ynn, distributed.apply_cpu_defaults(),
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
