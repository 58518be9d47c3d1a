"""The one switch for dqvq's CPU-only tuning.

dqvq trains its small configurations on laptop CPUs, and three things make
XLA:CPU fast enough for that. None of them helps an accelerator, so none of
them may reach one:

* the process's allocator: glibc huge pages for XLA:CPU's large buffers,
  which needs a restart of the process (`host_allocator`);
* XLA:CPU's library choice for convolutions, dots and reductions, an
  XLA_FLAGS entry read when jax creates its backends (`XLA_CPU_FLAG`);
* the convolution gradients of the DQ-VAE, its discriminator and LPIPS as
  matmuls (`dqvq.cpu.fast_conv`), carried by every conv layer as the
  model field `cpu_kernels`.

The first two are process settings, decided once by `prepare_process()`,
which every `python -m dqvq.<verb>` calls first (after its flags are parsed,
before anything touches a device). A process is a CPU run when JAX_PLATFORMS
puts cpu first, or when no accelerator plugin for jax is installed; jax's
backends are not created to find out (they would read XLA_FLAGS too early).
The third is decided from the devices a model runs on (`cpu_kernels(mesh)`),
so `python -m dqvq.tools.aot --topology` on a CPU host compiles, and an export
for cuda/tpu holds, the accelerator's program. `--nocpu_tuning` turns all
three off; every decision is logged.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import shlex
from typing import Any, Iterable

from absl import flags
from absl import logging
import jax
from jax._src import xla_bridge  # pylint: disable=g-direct-tensorflow-import

from dqvq.cpu import host_allocator

_CPU_TUNING = flags.DEFINE_bool(
    'cpu_tuning', True,
    'On CPU runs: restart with glibc huge pages, set the XLA:CPU library '
    'choice and use the matmul convolution gradients (dqvq.cpu.tuning). '
    'Accelerator runs never use them; --nocpu_tuning turns them off on CPU '
    'too (to rule them out when debugging).')

# XLA:CPU hands convolutions and fusions to YNNPACK by default. On the
# 2-core AVX2 EPYC the project is measured on, YNNPACK's 3x3 convolutions
# run at ~70 GFLOP/s where XLA's Eigen ones run at ~100, and its elementwise
# fusions are slower, while its reductions are ~3x faster (GroupNorm
# statistics) and fusing dots with their neighbours pays (benchmarks/
# README.md has the stage-1 step timings of each choice).
YNN_FUSION_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
CPU_YNN_FUSIONS = 'dot,individual_dot,reduce'

_ACCELERATOR_PLUGINS = ('cuda', 'rocm', 'tpu', 'metal')


def enabled() -> bool:
  """The `--cpu_tuning` flag; True for libraries whose flags are unparsed."""
  return _CPU_TUNING.value if flags.FLAGS.is_parsed() else True


def _installed_plugins() -> list[str]:
  """Names of the PJRT plugins jax would load, without loading them."""
  names = [e.name for e in importlib.metadata.entry_points(
      group='jax_plugins')]
  spec = importlib.util.find_spec('jax_plugins')
  if spec is not None and spec.submodule_search_locations:
    names += [m.name for m in pkgutil.iter_modules(
        spec.submodule_search_locations)]
  if importlib.util.find_spec('libtpu') is not None:
    names.append('tpu')
  return names


def process_platform() -> str:
  """The platform this process computes on: 'cpu' or the accelerator's.

  Once jax has backends, their default; before, JAX_PLATFORMS's first entry
  when it is set, else the first installed accelerator plugin (jax prefers
  any accelerator to the CPU), else 'cpu'.
  """
  if xla_bridge.backends_are_initialized():
    return jax.default_backend()
  chosen = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
  if chosen:
    return chosen.split(',')[0].strip().lower()
  for name in _installed_plugins():
    for kind in _ACCELERATOR_PLUGINS:
      if kind in name.lower():
        return kind
  return 'cpu'


def _sets_flag(xla_flags: str, flag: str) -> bool:
  return any(arg == flag or arg.startswith(flag + '=')
             for arg in shlex.split(xla_flags))


def apply_xla_cpu_flags() -> bool:
  """Adds dqvq's XLA:CPU library choice to XLA_FLAGS; True when it did.

  Nothing when XLA_FLAGS already names the flag (the user's choice wins; an
  empty value is Eigen throughout) or when the backends already exist
  (logged, so that a slower step is explained).
  """
  current = os.environ.get('XLA_FLAGS', '')
  if _sets_flag(current, YNN_FUSION_FLAG):
    return False
  if xla_bridge.backends_are_initialized():
    logging.warning(
        'jax backends were created before dqvq could set %s=%s; XLA:CPU '
        'keeps its defaults (slower convolutions). Call dqvq.cpu.tuning.'
        'prepare_process() before the first jax computation, or set the flag '
        'in XLA_FLAGS.', YNN_FUSION_FLAG, CPU_YNN_FUSIONS)
    return False
  os.environ['XLA_FLAGS'] = (
      f'{current} {YNN_FUSION_FLAG}={CPU_YNN_FUSIONS}'.strip())
  return True


def prepare_process(enable: bool | None = None) -> bool:
  """The process settings of a CPU run; True when this is a tuned CPU run.

  Call it first in an entry point's main. On a CPU run (see module doc), it
  may replace the process by a restarted one with huge pages (logged; the
  new process returns from here without restarting again), then sets the
  XLA:CPU flags. Elsewhere, and with --nocpu_tuning, it changes nothing.
  `enable` overrides the flag (for entry points that parse their own).
  """
  platform = process_platform()
  if platform != 'cpu':
    logging.info('Platform %s: no CPU tuning.', platform)
    return False
  if not (enabled() if enable is None else enable):
    logging.info('CPU run, --nocpu_tuning: XLA:CPU defaults, no huge pages, '
                 "XLA's convolution gradients.")
    return False
  tunables = host_allocator.restart_tunables()
  if tunables is not None:
    logging.info('CPU run: restarting this process with GLIBC_TUNABLES=%s '
                 '(huge pages for XLA:CPU buffers; --nocpu_tuning skips it).',
                 tunables)
    host_allocator.restart_with(tunables)  # does not return
  if apply_xla_cpu_flags():
    logging.info('CPU run: XLA_FLAGS += %s=%s.', YNN_FUSION_FLAG,
                 CPU_YNN_FUSIONS)
  return True


def cpu_kernels(devices: jax.sharding.Mesh | Iterable[Any]) -> bool:
  """Whether models on these devices (a mesh, or devices) use fast_conv.

  True only when every device is a CPU and --cpu_tuning is on: the
  decision each trainer makes once and hands to its models.
  """
  if isinstance(devices, jax.sharding.Mesh):
    devices = devices.devices.flat
  platforms = {d.platform for d in devices}
  return platforms == {'cpu'} and enabled()
