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

The process settings of CPU runs (XLA:CPU flags, huge pages) are not made
here: `dqvq.cpu.tuning.prepare_process` makes them, on CPU runs only, and
entry points call it before this.
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging
import jax

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'HOST:PORT of process 0, for multi-process runs outside TPU pods and '
    'Slurm (which are detected); needs --num_processes and --process_id.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes in the run (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0..num_processes-1.')


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
  naming the missing flags, for an incomplete set.
  """
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
