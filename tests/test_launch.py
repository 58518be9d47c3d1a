"""Tests for the launch/ scripts: lint, dry runs, argument errors, real runs.

gcloud, sbatch and srun are never run for real: the real-run paths of
tpu_pod.sh and slurm.sh go through small fakes placed first on PATH, which
record their arguments and emulate just enough (scp copies into a fake home,
ssh runs the remote command there, srun runs its command locally). That checks
what the dry runs cannot: that the arguments after `--` survive every layer of
quoting and reach python intact. local.sh runs real processes.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]
_LAUNCH = _REPO / 'launch'
_SCRIPTS = ('local.sh', 'slurm.sh', 'tpu_pod.sh')
# Spaces, both quote kinds and shell metacharacters: what users really pass.
_ARGS = ['--config', 'configs/demo.py:runlocal', '--workdir', '/tmp/a b/run',
         "--config.model.grain_ratios='(0.7,0.3)'", '--config.name=it\'s "x"',
         '--note=$HOME;*']

_FAKE_MODULE = r'''
"""Prints its argv and environment as one JSON line; flags steer the exit."""
import json, os, sys, time
argv = sys.argv[1:]
def flag(name):
  for a in argv:
    if a.startswith(f'--{name}='):
      return a.split('=', 1)[1]
  return None
pid = flag('process_id')
env = {k: os.environ.get(k) for k in (
    'JAX_PLATFORMS', 'XLA_FLAGS', 'CUDA_VISIBLE_DEVICES', 'PYTHONUNBUFFERED',
    'EXTRA', 'JAX_LOCAL_DEVICE_IDS')}
print('FAKEMOD ' + json.dumps({'argv': argv, 'env': env}), flush=True)
if flag('pid_dir'):
  with open(os.path.join(flag('pid_dir'), f'pid_{pid}'), 'w') as f:
    f.write(str(os.getpid()))
if '--fail' in argv or (pid is not None and pid == flag('fail_process')):
  time.sleep(float(flag('fail_delay') or 0))
  print(f'FAKEMOD process {pid} fails on purpose', file=sys.stderr, flush=True)
  sys.exit(int(flag('fail_code') or 1))
if flag('sleep'):
  time.sleep(float(flag('sleep')))
'''

# A recording fake of the gcloud commands tpu_pod.sh uses.
_FAKE_GCLOUD = r'''
import json, os, shutil, subprocess, sys
argv = sys.argv[1:]
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(json.dumps(argv) + '\n')
verb = argv[3]
if verb == 'describe':
  state = os.environ.get('FAKE_STATE', '')
  if not state:
    sys.exit('ERROR: NOT_FOUND')
  print(state)
elif verb == 'scp':
  src, dest = argv[4], argv[5].split(':', 1)[1]
  shutil.copy(src, os.path.join(os.environ['FAKE_HOME'], dest))
elif verb == 'ssh':
  command = argv[argv.index('--command') + 1]
  sys.exit(subprocess.run(['bash', '-c', command],
                          cwd=os.environ['FAKE_HOME']).returncode)
'''

_FAKE_SBATCH = r'''
import json, os, sys
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\n')
print('4242;cluster')
'''

# srun without Slurm: drop srun's own options, run the command once.
_FAKE_SRUN = r'''
import os, sys
argv = sys.argv[1:]
while argv and argv[0].startswith('--'):
  argv.pop(0)
os.execvp(argv[0], argv)
'''


def _write_exe(path: pathlib.Path, body: str) -> None:
  path.write_text(f'#!{sys.executable}\n{body}')
  path.chmod(0o755)


@pytest.fixture
def fakes(tmp_path) -> dict:
  """A PATH with fake gcloud/sbatch/srun and PYTHONPATH with the fake module."""
  bin_dir, mod_dir = tmp_path / 'bin', tmp_path / 'mod'
  bin_dir.mkdir()
  mod_dir.mkdir()
  (mod_dir / 'dqvq_launch_fake.py').write_text(_FAKE_MODULE)
  _write_exe(bin_dir / 'gcloud', _FAKE_GCLOUD)
  _write_exe(bin_dir / 'sbatch', _FAKE_SBATCH)
  _write_exe(bin_dir / 'srun', _FAKE_SRUN)
  env = dict(os.environ)
  env['PATH'] = f'{bin_dir}{os.pathsep}{env["PATH"]}'
  env['FAKE_CALLS'] = str(tmp_path / 'calls.jsonl')
  env['TMPDIR'] = str(tmp_path)
  return {'env': env, 'mod_dir': str(mod_dir),
          'calls': tmp_path / 'calls.jsonl'}


def _run(script: str, *args: str, env: dict | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
  return subprocess.run([str(_LAUNCH / script), *args], capture_output=True,
                        text=True, env=env, timeout=timeout, check=False)


def _calls(fakes: dict) -> list[list[str]]:
  if not fakes['calls'].exists():
    return []
  return [json.loads(l) for l in fakes['calls'].read_text().splitlines()]


def _fakemod_lines(text: str) -> list[dict]:
  return [json.loads(l.split(' ', 1)[1]) for l in text.splitlines()
          if l.startswith('FAKEMOD {')]


def _shellcheck() -> str:
  found = (shutil.which('shellcheck') or
           shutil.which('shellcheck', path=os.path.dirname(sys.executable)))
  assert found, 'shellcheck missing: pip install -r requirements-test.txt'
  return found


def test_scripts_exist_and_are_executable():
  for name in _SCRIPTS:
    path = _LAUNCH / name
    assert path.is_file(), path
    assert os.access(path, os.X_OK), f'chmod +x {path}'
  assert (_LAUNCH / 'README.md').is_file()


@pytest.mark.parametrize('path', sorted(_LAUNCH.glob('*.sh')),
                         ids=lambda p: p.name)
def test_shellcheck_finds_nothing(path):
  result = subprocess.run(
      [_shellcheck(), '--severity=style', '--external-sources', str(path)],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize('script', _SCRIPTS)
def test_help(script):
  result = _run(script, '--help')
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('Usage: ')
  assert '--dry-run' in result.stdout


@pytest.mark.parametrize('script,args,message', [
    ('local.sh', [], '--num_processes is required'),
    ('local.sh', ['--num_processes', '0'], 'positive integer'),
    ('local.sh', ['--num_processes', '2', '--port', '70000'], '--port'),
    ('local.sh', ['--num_processes'], '--num_processes needs a value'),
    ('local.sh', ['--num_processes', '2', '--', '--process_id=1'],
     'do not pass'),
    ('local.sh', ['--num_processes', '2', '--config', 'x'],
     "unknown argument '--config'"),
    ('slurm.sh', ['--nodes', '2'], '--gpus-per-node is required'),
    ('slurm.sh', ['--gpus-per-node', '8'], '--nodes is required'),
    ('slurm.sh', ['--nodes', 'two', '--gpus-per-node', '8'],
     'positive integer'),
    ('tpu_pod.sh', ['--zone', 'z', '--accelerator', 'v4-8'],
     '--name is required'),
    ('tpu_pod.sh', ['--name', 'x', '--accelerator', 'v4-8'],
     '--zone is required'),
    ('tpu_pod.sh', ['--name', 'x', '--zone', 'z'], '--accelerator is required'),
    ('tpu_pod.sh', ['--name', 'x', '--zone', 'z', '--accelerator', 'v4-8',
                    '--spot', '--preemptible'], 'exclude each other'),
    ('tpu_pod.sh', ['--name', 'Bad_Name', '--zone', 'z', '--no-create'],
     '--name must be'),
    # A flag given a value is refused, not taken as on (`--dry_run=0`).
    ('local.sh', ['--dry_run=0', '--num_processes=2'],
     '--dry-run takes no value'),
    ('slurm.sh', ['--per_node=no', '--nodes=2', '--gpus-per-node=8'],
     '--per-node takes no value'),
    ('tpu_pod.sh', ['--name=x', '--zone=z', '--accelerator=v4-8',
                    '--spot=false'], '--spot takes no value'),
])
def test_bad_arguments_exit_2_with_usage(script, args, message):
  result = _run(script, '--dry-run', *args)
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert message in result.stderr
  assert 'Usage: ' in result.stderr
  assert not result.stdout


def _lines_with(text: str, *needles: str) -> list[list[str]]:
  return [shlex.split(l) for l in text.splitlines()
          if not l.startswith('#') and all(n in l for n in needles)]


def test_tpu_dry_run_prints_every_step():
  result = _run('tpu_pod.sh', '--name', 'dq-pod', '--zone', 'us-central2-b',
                '--accelerator', 'v4-32', '--project', 'proj', '--spot',
                '--env', 'EXTRA=a b', '--delete', '--dry-run', '--', *_ARGS)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  [create] = _lines_with(out, 'tpu-vm create')
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create',
                        'dq-pod']
  for flag in ('--zone=us-central2-b', '--project=proj', '--spot',
               '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base'):
    assert flag in create
  [scp] = _lines_with(out, 'tpu-vm scp')
  assert '--worker=all' in scp and scp[6] == 'dq-pod:dqvq-code.tgz'
  ssh = _lines_with(out, 'tpu-vm ssh')
  assert len(ssh) == 3  # extract, install, run
  assert all('--worker=all' in s and '--zone=us-central2-b' in s for s in ssh)
  assert 'jax[tpu]==' in ssh[1][ssh[1].index('--command') + 1]
  remote = shlex.split(ssh[2][ssh[2].index('--command') + 1])
  assert remote[:4] == ['cd', 'dqvq', '&&', 'exec']
  assert 'EXTRA=a b' in remote
  m = remote.index('-m')
  assert remote[m - 1].endswith('python') and remote[m + 1] == 'dqvq.train'
  assert remote[m + 2:] == _ARGS
  [delete] = _lines_with(out, 'tpu-vm delete')
  assert 'dq-pod' in delete and '--quiet' in delete


def test_tpu_dry_run_skips_what_it_is_told_to():
  result = _run('tpu_pod.sh', '--name', 'dq', '--zone', 'z', '--no-create',
                '--no-copy', '--no-install', '--dry-run', '--', '--workdir=x')
  assert result.returncode == 0, result.stderr
  assert not _lines_with(result.stdout, 'tpu-vm create')
  assert not _lines_with(result.stdout, 'tpu-vm scp')
  assert not _lines_with(result.stdout, 'tpu-vm delete')
  [ssh] = _lines_with(result.stdout, 'tpu-vm ssh')
  assert shlex.split(ssh[-1])[-1] == '--workdir=x'


def _tpu_real(fakes, tmp_path, *extra: str, state: str = '',
              fail: bool = False) -> tuple[subprocess.CompletedProcess, dict]:
  home = tmp_path / 'home'
  venv_bin = home / 'dqvq' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True, exist_ok=True)
  (venv_bin / 'python').write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
  (venv_bin / 'python').chmod(0o755)
  (home / 'dqvq' / 'stale.py').write_text('left from an older copy')
  env = dict(fakes['env'], FAKE_HOME=str(home), FAKE_STATE=state)
  args = _ARGS + (['--fail'] if fail else [])
  result = _run('tpu_pod.sh', '--name', 'dq', '--zone', 'z',
                '--accelerator', 'v4-8', '--no-install', '--module',
                'dqvq_launch_fake', '--env', f'PYTHONPATH={fakes["mod_dir"]}',
                '--log', str(tmp_path / 'tpu.log'), *extra, '--', *args,
                env=env)
  return result, {'home': home, 'args': args}


def test_tpu_real_run_through_fake_gcloud(fakes, tmp_path):
  result, info = _tpu_real(fakes, tmp_path, '--delete')
  assert result.returncode == 0, result.stderr
  verbs = [c[3] for c in _calls(fakes)]
  assert verbs == ['describe', 'create', 'scp', 'ssh', 'ssh', 'delete']
  home = info['home']
  # The checkout arrived, the stale file went, the venv stayed.
  assert (home / 'dqvq' / 'dqvq' / 'train.py').is_file()
  assert (home / 'dqvq' / 'launch' / 'tpu_pod.sh').is_file()
  assert not (home / 'dqvq' / 'stale.py').exists()
  assert (home / 'dqvq' / '.venv' / 'bin' / 'python').exists()
  [printed] = _fakemod_lines(result.stdout)
  assert printed['argv'] == info['args']
  assert printed['env']['PYTHONUNBUFFERED'] == '1'
  assert _fakemod_lines((tmp_path / 'tpu.log').read_text()) == [printed]


def test_tpu_failure_keeps_or_deletes_the_vm(fakes, tmp_path):
  result, _ = _tpu_real(fakes, tmp_path, '--no-copy', '--delete',
                        state='READY', fail=True)
  assert result.returncode == 1
  assert 'is kept' in result.stderr
  assert [c[3] for c in _calls(fakes)] == ['describe', 'ssh']
  fakes['calls'].unlink()
  result, _ = _tpu_real(fakes, tmp_path, '--no-copy', '--delete-on-failure',
                        state='READY', fail=True)
  assert result.returncode == 1
  assert [c[3] for c in _calls(fakes)] == ['describe', 'ssh', 'delete']


def test_tpu_refuses_a_preempted_vm(fakes, tmp_path):
  result, _ = _tpu_real(fakes, tmp_path, state='PREEMPTED')
  assert result.returncode == 1
  assert 'is PREEMPTED' in result.stderr and 'delete' in result.stderr
  assert [c[3] for c in _calls(fakes)] == ['describe']


def test_slurm_dry_run(tmp_path):
  script = tmp_path / 'job.sbatch'
  result = _run('slurm.sh', '--nodes', '2', '--gpus-per-node', '8',
                '--partition', 'gpu', '--account', 'acct', '--time', '2:00:00',
                '--job-name', 'dq', '--cpus-per-task', '6', '--script',
                str(script), '--dry-run', '--', *_ARGS)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  for directive in ('--nodes=2', '--ntasks-per-node=8', '--gpus-per-node=8',
                    '--partition=gpu', '--account=acct', '--time=2:00:00',
                    '--job-name=dq', '--cpus-per-task=6', '--output=%x-%j.out'):
    assert f'#SBATCH {directive}' in lines
  [srun] = _lines_with(result.stdout, 'srun ')
  assert srun[:2] == ['srun', '--kill-on-bad-exit=1']
  assert srun[3:5] == ['-m', 'dqvq.train'] and srun[5:] == _ARGS
  assert 'JAX_LOCAL_DEVICE_IDS' not in result.stdout
  assert _lines_with(result.stdout, 'sbatch ') == [
      ['sbatch', '--parsable', str(script)]]
  assert not script.exists()  # a dry run writes nothing


def test_slurm_dry_run_one_process_per_node():
  result = _run('slurm.sh', '--nodes', '3', '--gpus-per-node', '4',
                '--per-node', '--dry-run')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert '#SBATCH --ntasks-per-node=1' in lines
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3' in lines


def test_slurm_submit_and_run_the_script(fakes, tmp_path):
  script = tmp_path / 'job.sbatch'
  result = _run('slurm.sh', '--nodes', '1', '--gpus-per-node', '2',
                '--output-dir', str(tmp_path / 'logs'), '--script',
                str(script), '--python', sys.executable, '--module',
                'dqvq_launch_fake', '--env', f'PYTHONPATH={fakes["mod_dir"]}',
                '--env', 'EXTRA=x y', '--', *_ARGS, env=fakes['env'])
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == '4242'
  assert _calls(fakes) == [['--parsable', str(script)]]
  assert f'{tmp_path}/logs/dqvq-4242.out' in result.stderr
  # The written script, run with the fake srun, hands python the exact args.
  job = subprocess.run(['bash', str(script)], capture_output=True, text=True,
                       env=fakes['env'], timeout=60, check=False)
  assert job.returncode == 0, job.stderr
  [printed] = _fakemod_lines(job.stdout)
  assert printed['argv'] == _ARGS
  assert printed['env']['EXTRA'] == 'x y'


def test_local_dry_run():
  env = dict(os.environ, XLA_FLAGS=(
      '--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8'))
  result = _run('local.sh', '--num_processes', '2', '--devices_per_process',
                '4', '--port', '23456', '--dry-run', '--', *_ARGS, env=env)
  assert result.returncode == 0, result.stderr
  commands = _lines_with(result.stdout, ' -m dqvq.train')
  assert len(commands) == 2
  for i, cmd in enumerate(commands):
    assert cmd[0] == 'env'
    assert 'JAX_PLATFORMS=cpu' in cmd
    assert ('XLA_FLAGS=--xla_dump_to=/tmp/d '
            '--xla_force_host_platform_device_count=4') in cmd
    m = cmd.index('-m')
    assert cmd[m + 2:m + 5] == ['--coordinator_address=127.0.0.1:23456',
                                '--num_processes=2', f'--process_id={i}']
    assert cmd[m + 5:] == _ARGS


def test_local_dry_run_gpu_slices():
  result = _run('local.sh', '--num_processes', '2', '--devices_per_process',
                '2', '--platform', 'gpu', '--dry-run')
  assert result.returncode == 0, result.stderr
  commands = _lines_with(result.stdout, ' -m dqvq.train')
  assert 'CUDA_VISIBLE_DEVICES=0,1' in commands[0]
  assert 'CUDA_VISIBLE_DEVICES=2,3' in commands[1]
  assert not any(a.startswith('JAX_PLATFORMS') for a in commands[0])


def _local(fakes, tmp_path, *args: str) -> subprocess.CompletedProcess:
  env = dict(fakes['env'], PYTHONPATH=fakes['mod_dir'], EXTRA='')
  return _run('local.sh', '--num_processes', '2', '--devices_per_process',
              '3', '--module', 'dqvq_launch_fake', '--python', sys.executable,
              '--env', 'EXTRA=from env', '--logdir', str(tmp_path / 'logs'),
              '--', *args, env=env, timeout=30)


def test_local_runs_two_processes(fakes, tmp_path):
  result = _local(fakes, tmp_path, *_ARGS)
  assert result.returncode == 0, result.stderr
  # Only process 0 reaches the terminal.
  [shown] = _fakemod_lines(result.stdout)
  assert '--process_id=0' in shown['argv']
  for i in range(2):
    [printed] = _fakemod_lines(
        (tmp_path / 'logs' / f'process_{i}.log').read_text())
    assert printed['argv'] == ['--coordinator_address=127.0.0.1:12355',
                               '--num_processes=2', f'--process_id={i}',
                               *_ARGS]
    assert printed['env']['JAX_PLATFORMS'] == 'cpu'
    assert printed['env']['XLA_FLAGS'].endswith(
        '--xla_force_host_platform_device_count=3')
    assert printed['env']['EXTRA'] == 'from env'


def _alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie waiting to be reaped does not count)."""
  if not os.path.isdir('/proc'):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    return True
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def test_local_failure_stops_the_others(fakes, tmp_path):
  pid_dir = tmp_path / 'pids'
  pid_dir.mkdir()
  start = time.monotonic()
  # The delay lets process 0 write its pid before it is stopped.
  result = _local(fakes, tmp_path, '--fail_process=1', '--fail_code=7',
                  '--fail_delay=1', '--sleep=120', f'--pid_dir={pid_dir}')
  assert time.monotonic() - start < 30  # process 0 did not sleep it out
  assert result.returncode == 7, (result.stdout, result.stderr)
  assert 'process 1 failed with exit status 7' in result.stderr
  assert 'FAKEMOD process 1 fails on purpose' in result.stderr  # log tail
  survivor = int((pid_dir / 'pid_0').read_text())
  deadline = time.monotonic() + 10
  while _alive(survivor) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _alive(survivor), 'process 0 was left running'
