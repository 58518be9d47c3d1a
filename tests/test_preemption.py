"""Preemption and stop signals: real signals, real training-loop processes.

The loop script below is what the trainers do: SIGTERM -> should_stop ->
forced save -> exit 0. It runs as 1 process, and as 2 processes of a real
jax.distributed CPU cluster where only one host is signalled, to check that
all hosts stop at, and save, the same step (with JAX's preemption service
and with the signal-flag all-gather fallback).
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from dqvq import checkpoint as ckpt_lib
from dqvq.trainers import loop

import test_train  # pylint: disable=g-bad-import-order

REPO = pathlib.Path(__file__).resolve().parents[1]


def _mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(
      np.array(jax.devices()).reshape(8, 1), ('data', 'fsdp'),
      axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.parametrize('depth', [1, 2])
def test_host_runs_at_most_depth_steps_ahead_of_the_device(depth):
  # The loop's bound on asynchronous dispatch. Each "step" below takes tens
  # of milliseconds and depends on the one before (as the donated state
  # does), so dispatched back to back they would queue; once a step is
  # added, every step older than the newest `depth` has finished, and a stop
  # seen now waits for `depth` steps, not for all those since the last sync.
  step = jax.jit(lambda a: jax.lax.fori_loop(
      0, 16, lambda _, b: jnp.tanh(b @ b), a))
  state = jax.random.normal(jax.random.key(0), (384, 384)) / 20
  state = step(state).block_until_ready()  # compiled
  in_flight = loop.StepsInFlight(depth)
  outputs = []
  for _ in range(6):
    state = step(state)
    outputs.append(state)
    in_flight.add(state)
    assert all(o.is_ready() for o in outputs[:-depth])
  with pytest.raises(ValueError, match='depth'):
    loop.StepsInFlight(-1)


def test_sigint_handler_sets_flag_then_restores_the_default():
  old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    ckpt_lib.reset_preemption_request()
    with ckpt_lib.stop_signals(sigint=True) as installed:
      assert installed == [signal.SIGTERM, signal.SIGINT]
      assert not ckpt_lib.preemption_requested()
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)  # Python runs the handler at the next bytecode
      assert ckpt_lib.preemption_requested()
      assert ckpt_lib.stop_reason() == 'Ctrl-C'
      # The next Ctrl-C takes the default action: the process dies at once
      # (not sent here; test_second_ctrl_c_exits_at_once does it).
      assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    # The caller's handlers are back after the block.
    assert signal.getsignal(signal.SIGINT) is old[signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is old[signal.SIGTERM]
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
    ckpt_lib.reset_preemption_request()
  assert ckpt_lib.stop_reason() is None


_WAIT_FOR_SIGNALS = textwrap.dedent("""
    import sys, time
    from dqvq import run_guards
    run_guards.install_preemption_handler(sigint=True)
    print('READY', flush=True)
    while not run_guards.preemption_requested():
      time.sleep(0.01)
    print('STOP REQUESTED', flush=True)
    time.sleep(60)  # as if saving; a second Ctrl-C must not wait for this
""")


def test_second_ctrl_c_exits_at_once():
  proc = subprocess.Popen([sys.executable, '-c', _WAIT_FOR_SIGNALS],
                          env=dict(os.environ, PYTHONPATH=str(REPO)),
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'READY'
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == 'STOP REQUESTED'
    start = time.time()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == -signal.SIGINT
    assert time.time() - start < 5
  finally:
    if proc.poll() is None:
      proc.kill()


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
    SYNC_EVERY = 5  # the training loop passes its log_every

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
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=7, keep=2,
                                 stop_sync_every=SYNC_EVERY)
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
  if not service:
    # The hosts exchanged their flags only at multiples of stop_sync_every
    # (the loop's logging steps), never on the steps between.
    assert stop0 % 5 == 0, stop0
  # Host p reads elements p, p + 2, ...: each resumes its own position.
  assert (next0, next1) == (2 * stop0, 2 * stop0 + 1)
  data_files = sorted(os.listdir(tmp_path / 'checkpoints' / str(stop0) /
                                 'data'))
  assert 'process_0-of-2.json' in data_files
  assert 'process_1-of-2.json' in data_files
  _check_saved_state(tmp_path, stop0)


# The real trainer, `python -m dqvq.train`, signalled. Both runs go at once
# (two cores); compiled programs come from the persistent cache the suite
# uses, so a warm run takes well under a minute.
def _start_training(workdir, data_dir, *overrides) -> '_Training':
  return _Training(subprocess.Popen(
      test_train.cli_command(
          'ffhq_stage1.py:runlocal', workdir,
          f'--config.data.data_dir={data_dir}',
          '--config.num_train_steps=10000', '--config.checkpoint_every=10000',
          *overrides),
      cwd=REPO, env=test_train.cli_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True))


class _Training:
  """A trainer subprocess whose console is read as it comes."""

  def __init__(self, proc: subprocess.Popen):
    self.proc = proc
    self.lines: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.append(line.rstrip('\n'))

  def wait_for(self, pattern: str, deadline: float) -> None:
    while not any(re.search(pattern, l) for l in self.lines):
      assert self.proc.poll() is None, '\n'.join(self.lines[-40:])
      assert time.time() < deadline, (
          f'no {pattern!r} in time:\n' + '\n'.join(self.lines[-40:]))
      time.sleep(0.05)

  def finish(self, timeout: float) -> int:
    try:
      rc = self.proc.wait(timeout=timeout)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
    self._reader.join(timeout=5)
    return rc


@pytest.mark.long
def test_sigterm_and_ctrl_c_save_restorable_checkpoints_and_exit_0(
    demo_data_dir, tmp_path):
  # SIGTERM mid-training with the demo cadences (validation and pictures
  # every 2 steps), so its console is also the console test; Ctrl-C during
  # compilation, which used to crash the interpreter (rc 139).
  term = _start_training(tmp_path / 'term', demo_data_dir)
  intr = _start_training(tmp_path / 'intr', demo_data_dir,
                         '--config.eval_every=10000',
                         '--config.image_every=10000')
  try:
    deadline = time.time() + 240  # a cold compilation cache
    intr.wait_for(r'Initialised a new run', deadline)
    intr.proc.send_signal(signal.SIGINT)  # compiling the first step
    term.wait_for(r'step 3/10000', deadline)
    term.proc.send_signal(signal.SIGTERM)
    rcs = {'term': term.finish(120), 'intr': intr.finish(120)}
  finally:
    for run in (term, intr):
      if run.proc.poll() is None:
        run.proc.kill()
  console = {'term': term.lines, 'intr': intr.lines}
  for name, rc in rcs.items():
    assert rc == 0, '\n'.join(console[name][-40:])

  expected = {'term': r'Stopped at step (\d+)/10000 \(SIGTERM\)',
              'intr': r'Stopped at step (1)/10000 \(Ctrl-C\)'}
  # Saved on one device, they restore into this process's eight.
  restored = dict(zip(expected, test_train.restored_states(
      test_train.tiny(demo_data_dir, 'ffhq_stage1'),
      *(tmp_path / name for name in expected))))
  for name, pattern in expected.items():
    stops = [m for l in console[name] if (m := re.search(pattern, l))]
    assert stops, '\n'.join(console[name][-20:])
    stopped_at = int(stops[0].group(1))
    # Only the save the signal asked for (checkpoint_every is 10000).
    states = restored[name]
    assert list(states) == [stopped_at], (name, list(states))
    assert int(states[stopped_at].step) == stopped_at
    assert not ckpt_lib.nonfinite_leaves(states[stopped_at])
  assert stopped_at == 1  # Ctrl-C: the stop waited for the step boundary

  # The console: at most ~3 lines per logging step (was ~26: Orbax, clu),
  # no library INFO, a short progress line with the ETA, and a summary.
  lines = console['term']
  progress = [l for l in lines if re.match(r'[\d:]+ step \d+/10000 \(', l)]
  assert len(progress) >= 3
  first = lines.index(progress[0])
  assert len(lines) - first <= 3 * len(progress) + 4, '\n'.join(lines)
  assert len(lines) <= 3 * len(progress) + 10, '\n'.join(lines)
  assert all(len(l) < 120 for l in progress), progress
  assert re.search(r'\| loss [\d.]+ \| .* img/s \| ETA \w+$', progress[-1])
  assert not [l for l in lines if 'orbax' in l.lower() or '[Hyperparam' in l]
  assert any(l.split(' ', 1)[1].startswith('Checkpoints: ') for l in lines)
