"""Multi-process start-up: one call before anything touches a device.

Every dqvq entry point (train, sample, evaluate, export) calls `initialize`
first. Three cases:

* Flags `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`
  (all three): any set of processes, e.g. `launch/local.sh` on one machine
  (CPU collectives run over gloo) or hand-started GPU hosts.
* A detected cluster: Cloud TPU pods (several TPU workers) and Slurm jobs
  with more than one task; `jax.distributed.initialize()` reads the
  coordinator, process count and id (and, on Slurm, the local GPUs) from the
  environment, so `launch/tpu_pod.sh` and `launch/slurm.sh` pass no flags.
* Otherwise a single process: nothing to do.

After it, `jax.devices()` spans every host; each host feeds its own data
shard (`dqvq.data.pipeline`), only process 0 writes summaries and pictures,
and Orbax checkpoints are written and restored by all hosts together.

Before any of that, `initialize` sets XLA:CPU's library choice for the
training step's speed (`apply_cpu_defaults`): jaxlib 0.10's XLA:CPU hands
convolutions and fusions to YNNPACK by default. On the 2-core AVX2 EPYC this
project is measured on, YNNPACK's 3x3 convolutions run at ~70 GFLOP/s where
XLA's Eigen convolutions run at ~100 (forward and input gradient alike,
2x256x256x128; with YNNPACK's, XLA's own weight gradient drops to 15), and
YNNPACK's elementwise fusions are slower, while its reductions run ~3x
faster than Eigen's (GroupNorm statistics), and fusing dots (fast_conv's
weight-gradient matmuls among them) with their neighbours pays. Dots and
reductions only measured fastest for the full stage-1 step
(`benchmarks/stage1_step.py`, batch 2, 256 px, s/step, one process per
setting in turn): default 44.7, none 39.0, reductions 38.4, single dots and
reductions 36.5, plus elementwise 41.6, plus dot fusions 31.9; again,
alternating: single dots and reductions 35.1, plus dot fusions 32.1.
Accelerator backends ignore the flag; libraries that import dqvq are left
alone (the setting is the process's, made by its entry point).
"""

from __future__ import annotations

import os
import shlex

from absl import flags
from absl import logging
import jax
from jax._src import xla_bridge  # pylint: disable=g-direct-tensorflow-import

YNN_FUSION_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
CPU_YNN_FUSIONS = 'dot,individual_dot,reduce'

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'HOST:PORT of process 0, for multi-process runs outside TPU pods and '
    'Slurm (which are detected); needs --num_processes and --process_id.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes in the run (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0..num_processes-1.')


def _sets_flag(xla_flags: str, flag: str) -> bool:
  return any(arg == flag or arg.startswith(flag + '=')
             for arg in shlex.split(xla_flags))


def apply_cpu_defaults() -> bool:
  """Adds dqvq's XLA:CPU library choice to XLA_FLAGS; True when it did.

  XLA reads the variable when jax creates its backends, so this must run
  before the first computation. Does nothing when XLA_FLAGS already names
  the flag (the user's choice wins; an empty value,
  `--xla_cpu_experimental_ynn_fusion_type=`, is Eigen throughout) or when
  the backends already exist (logged, so that a slower step is explained).
  """
  current = os.environ.get('XLA_FLAGS', '')
  if _sets_flag(current, YNN_FUSION_FLAG):
    return False
  if xla_bridge.backends_are_initialized():
    logging.warning(
        'jax backends were created before dqvq could set %s=%s; XLA:CPU '
        'keeps its defaults (slower convolutions). Call dqvq.distributed.'
        'apply_cpu_defaults() before the first jax computation, or set the '
        'flag in XLA_FLAGS.', YNN_FUSION_FLAG, CPU_YNN_FUSIONS)
    return False
  os.environ['XLA_FLAGS'] = (
      f'{current} {YNN_FUSION_FLAG}={CPU_YNN_FUSIONS}'.strip())
  return True


def detected_cluster() -> str | None:
  """'tpu' or 'slurm' when this process is one of several in such a job."""
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in hosts.split(',') if h]) > 1:
    return 'tpu'
  if 'SLURM_JOB_ID' in os.environ and int(
      os.environ.get('SLURM_NTASKS', os.environ.get('SLURM_NPROCS', '1'))) > 1:
    return 'slurm'
  return None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the multi-process run this process belongs to (see module doc).

  Arguments default to the absl flags (when parsed). Raises ValueError,
  naming the missing flags, for an incomplete set. Sets the XLA:CPU defaults
  first (`apply_cpu_defaults`).
  """
  apply_cpu_defaults()
  if flags.FLAGS.is_parsed():
    coordinator_address = coordinator_address or _COORDINATOR.value
    num_processes = num_processes if num_processes is not None else (
        _NUM_PROCESSES.value)
    process_id = process_id if process_id is not None else _PROCESS_ID.value
  given = {'--coordinator_address': coordinator_address,
           '--num_processes': num_processes, '--process_id': process_id}
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ValueError(f'Multi-process flags need all three: also give '
                       f'{", ".join(missing)}.')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in 0..'
                       f'{num_processes - 1} (--num_processes={num_processes}).')
    if num_processes == 1:
      return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  elif (cluster := detected_cluster()) is not None:
    logging.info('Detected a %s job: jax.distributed.initialize().', cluster)
    jax.distributed.initialize()
  else:
    return
  logging.info('Process %d of %d; %d local of %d devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
