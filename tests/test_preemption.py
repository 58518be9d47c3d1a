"""Preemption and stop signals: real signals, real training-loop processes.

The loop script below is what the trainers do: SIGTERM -> should_stop ->
forced save -> exit 0. It runs as 1 process, and as 2 processes of a real
jax.distributed CPU cluster where only one host is signalled, to check that
all hosts stop at, and save, the same step (with JAX's preemption service
and with the signal-flag all-gather fallback).
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from dqvq import checkpoint as ckpt_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(
      np.array(jax.devices()).reshape(8, 1), ('data', 'fsdp'),
      axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_sigint_handler_sets_flag_then_hard_interrupts():
  old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    ckpt_lib.reset_preemption_request()
    assert ckpt_lib.install_preemption_handler(sigint=True) == [
        signal.SIGTERM, signal.SIGINT]
    assert not ckpt_lib.preemption_requested()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # Python runs the handler at the next bytecode
    assert ckpt_lib.preemption_requested()
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
    ckpt_lib.reset_preemption_request()


# A training loop as the trainers run it: SIGTERM -> should_stop -> forced
# save -> exit 0. With nproc > 1 it joins a real jax.distributed CPU cluster
# (gloo collectives) and the state is sharded across the processes.
_LOOP = textwrap.dedent("""
    import os, sys, time
    workdir, ready, nproc, pid, port, service = sys.argv[1:]
    nproc, pid = int(nproc), int(pid)
    import jax
    if nproc > 1:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.config.update('jax_enable_preemption_service', service == '1')
      jax.distributed.initialize(f'localhost:{port}', num_processes=nproc,
                                 process_id=pid)
    import grain, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dqvq import checkpoint as ckpt_lib

    mesh = jax.sharding.Mesh(
        np.array(jax.devices()).reshape(-1, 1), ('data', 'fsdp'),
        axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shardings = {'w': NamedSharding(mesh, P('data', None)),
                 'count': NamedSharding(mesh, P())}
    step_fn = jax.jit(
        lambda s: {'w': s['w'] + 2.0, 'count': s['count'] + 1},
        out_shardings=shardings)
    state = jax.device_put(
        {'w': np.zeros((8, 3), np.float32), 'count': np.int32(0)}, shardings)
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=7, keep=2)
    ckpt_lib.install_preemption_handler()
    data = grain.MapDataset.range(10**6)[pid::nproc].to_iter_dataset()
    it = iter(data)
    step = 0
    while step < 100000:
      next(it)
      state = step_fn(state)
      step += 1
      if step == 1 and pid == nproc - 1:
        open(ready, 'w').close()
      if ckpt.should_stop(step):
        break
      ckpt.maybe_save(step, state, it)
      time.sleep(0.01)
    ckpt.maybe_save(step, state, it, force=True)
    ckpt.close()

    # Every process restores its own shard of the data position.
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=7)
    it = iter(data)
    _, restored_step, _ = ckpt.restore_latest(
        ckpt_lib.abstract_state_of(state), it)
    ckpt.close()
    print('STOPPED', step, restored_step, next(it), flush=True)
""")


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def _run_loops_and_sigterm_last(tmp_path, nproc: int, service: bool
                                ) -> list[tuple[int, int, int]]:
  """Starts nproc loop processes, SIGTERMs only the last one, waits."""
  ready = tmp_path / 'ready'
  # Two CPU devices per process, so the sharded state spans processes.
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  port = str(_free_port())
  procs = [subprocess.Popen(
      [sys.executable, '-c', _LOOP, str(tmp_path), str(ready), str(nproc),
       str(pid), port, str(int(service))], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for pid in range(nproc)]
  try:
    deadline = time.time() + 60
    while not ready.exists():
      for proc in procs:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.time() < deadline, 'training loop did not start'
      time.sleep(0.05)
    time.sleep(0.5)  # let it run a few save periods
    os.kill(procs[-1].pid, signal.SIGTERM)
    outputs = [proc.communicate(timeout=30) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  results = []
  for proc, (out, errs) in zip(procs, outputs):
    assert proc.returncode == 0, errs[-3000:]
    results.append(tuple(int(v) for v in out.split('STOPPED')[1].split()[:3]))
  return results


def _check_saved_state(tmp_path, step: int) -> None:
  ckpt = ckpt_lib.Checkpointer(tmp_path, save_every=7)
  # Saved from 1 or 2 processes; restored here replicated on 8 devices.
  rep = NamedSharding(_mesh(), P())
  abstract = {'w': jax.ShapeDtypeStruct((8, 3), np.float32, sharding=rep),
              'count': jax.ShapeDtypeStruct((), np.int32, sharding=rep)}
  state, restored_step, meta = ckpt.restore_latest(abstract)
  ckpt.close()
  assert restored_step == step == meta['step']
  # Summed per process at the save, verified here on one: they must agree.
  assert sorted(meta['checksums']) == ["['count']", "['w']"]
  np.testing.assert_array_equal(state['w'], np.full((8, 3), 2.0 * step))
  assert int(state['count']) == step


def test_sigterm_subprocess_saves_and_exits_cleanly(tmp_path):
  [(stopped, restored, next_item)] = _run_loops_and_sigterm_last(
      tmp_path, nproc=1, service=False)
  assert stopped > 1 and restored == stopped
  assert next_item == stopped  # the data position was saved with the state
  _check_saved_state(tmp_path, stopped)


@pytest.mark.parametrize('service', [True, False],
                         ids=['jax_preemption_service', 'signal_allgather'])
def test_multihost_sigterm_on_one_host_stops_all_at_one_step(tmp_path,
                                                             service):
  """Only host 1 is signalled; both must save the same step and exit 0.

  With JAX's preemption service, JAX owns SIGTERM and picks the sync step;
  without it, should_stop all-gathers the local flags.
  """
  results = _run_loops_and_sigterm_last(tmp_path, nproc=2, service=service)
  (stop0, restored0, next0), (stop1, restored1, next1) = results
  assert stop0 == stop1 == restored0 == restored1 > 1
  # Host p reads elements p, p + 2, ...: each resumes its own position.
  assert (next0, next1) == (2 * stop0, 2 * stop0 + 1)
  data_files = sorted(os.listdir(tmp_path / 'checkpoints' / str(stop0) /
                                 'data'))
  assert 'process_0-of-2.json' in data_files
  assert 'process_1-of-2.json' in data_files
  _check_saved_state(tmp_path, stop0)
