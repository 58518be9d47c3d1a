"""Ahead-of-time compile check and the per-device memory estimate."""

import os
import subprocess
import sys

import jax
import pytest

from conftest import load_config
from dqvq.tools import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fsdp_shrinks_the_transformer_state_per_device():
  """The 8-device plan of the stage-2 step: FSDP over 8 devices holds an
  eighth of the (weight-dominated) state per device, replication all of it."""
  c = load_config('imagenet_stage2').get_config('runlocal')
  c.model.width = 64  # every weight dimension divisible by 8
  replicated = aot.check(c, jax.devices(), data=8, fsdp=1)
  sharded = aot.check(c, jax.devices(), data=1, fsdp=8)
  for figures in (replicated, sharded):
    assert figures['gflop'] > 0 and figures['total_gib'] > 0
    assert figures['argument_gib'] >= figures['state_gib'] * 0.99
  ratio = sharded['state_gib'] / replicated['state_gib']
  assert 0.12 < ratio < 0.14, ratio


def test_cli_and_memory_limit():
  """The CLI sets its own device count (a fresh process, so the tiny
  transformer: the stage-1 step's compile is minutes in a cold process)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  cmd = [sys.executable, '-m', 'dqvq.tools.aot', '--config',
         'configs/imagenet_stage2.py:runlocal', '--devices', '4', '--fsdp', '2']
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  figures = dict(kv.split('=') for kv in out.stdout.split())
  assert float(figures['total_gib']) > 0 and float(figures['gflop']) > 0
  out = subprocess.run(cmd + ['--device_memory_gb', '1e-6'], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 1 and 'raise mesh.fsdp' in out.stderr


def test_bad_mesh_is_refused_before_compiling():
  c = load_config('imagenet_stage2').get_config('runlocal')
  with pytest.raises(ValueError, match='devices'):
    aot.check(c, jax.devices(), data=3, fsdp=2)
