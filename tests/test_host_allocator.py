"""The huge-page restart of CPU runs (dqvq.cpu.host_allocator, through
dqvq.cpu.tuning)."""

import os
import subprocess
import sys

import pytest

from dqvq.cpu import host_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON = f'{host_allocator.TUNABLE}=1'


def test_with_huge_pages_keeps_the_users_tunables():
  assert host_allocator.with_huge_pages('') == ON
  assert (host_allocator.with_huge_pages('glibc.malloc.arena_max=2') ==
          f'glibc.malloc.arena_max=2:{ON}')
  # A value the user chose is theirs, 0 included.
  assert host_allocator.with_huge_pages(
      f'glibc.malloc.arena_max=2:{host_allocator.TUNABLE}=0') is None
  assert host_allocator.with_huge_pages(ON) is None


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_allocator.thp_mode(str(path)) == 'madvise'
  path.write_text('[always] madvise never\n')
  assert host_allocator.thp_mode(str(path)) == 'always'
  assert host_allocator.thp_mode(str(tmp_path / 'missing')) is None


@pytest.mark.parametrize('env, mode, glibc, force, restarts', [
    ({}, 'madvise', True, False, True),
    ({}, 'always', True, False, False),   # the kernel already uses huge pages
    ({}, 'never', True, False, False),    # the advice would be ignored
    ({}, '', True, False, False),         # mode unknown
    ({}, 'madvise', False, False, False),  # not glibc, or older than 2.35
    ({}, 'never', False, True, True),     # forced
    ({'GLIBC_TUNABLES': f'{host_allocator.TUNABLE}=0'}, 'madvise', True,
     False, False),                       # the user's value wins
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'madvise', True, False,
     True),
])
def test_restart_tunables(env, mode, glibc, force, restarts):
  new = host_allocator.restart_tunables(env, mode, glibc, force=force)
  if not restarts:
    assert new is None
    return
  assert new.split(':')[-1] == ON
  assert new.split(':')[:-1] == [
      e for e in env.get('GLIBC_TUNABLES', '').split(':') if e]


def test_reexec_restarts_once_with_the_same_pid_and_arguments():
  script = ('import os, sys\n'
            'print("start", os.getpid(), flush=True)\n'
            'from dqvq.cpu import host_allocator\n'
            'tunables = host_allocator.restart_tunables(force=True)\n'
            'if tunables: host_allocator.restart_with(tunables)\n'
            'print("after", os.getpid(), os.environ["GLIBC_TUNABLES"], '
            '"|".join(sys.argv[1:]))\n')
  env = {**os.environ, 'PYTHONPATH': ROOT,
         'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}
  out = subprocess.run([sys.executable, '-c', script, 'a b', '--flag=1'],
                       env=env, capture_output=True, text=True, check=True,
                       cwd=ROOT).stdout.split('\n')
  starts = [line for line in out if line.startswith('start')]
  after = [line for line in out if line.startswith('after')]
  assert len(starts) == 2 and starts[0] == starts[1], out  # One restart.
  assert after == [f'after {starts[0].split()[1]} '
                   f'glibc.malloc.arena_max=4:{ON} a b|--flag=1'], out
