"""The huge-page restart of dqvq's entry points (dqvq.host_allocator)."""

import os
import subprocess
import sys

import pytest

from dqvq import host_allocator

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


@pytest.mark.parametrize('env, mode, glibc, restarts', [
    ({}, 'madvise', True, True),
    ({}, 'always', True, False),      # the kernel already uses huge pages
    ({}, 'never', True, False),       # the advice would be ignored
    ({}, None, True, False),
    ({}, 'madvise', False, False),    # not glibc, or older than 2.35
    ({'DQVQ_HUGE_PAGES': '0'}, 'madvise', True, False),
    ({'DQVQ_HUGE_PAGES': '1'}, 'never', False, True),
    ({'GLIBC_TUNABLES': f'{host_allocator.TUNABLE}=0'}, 'madvise', True,
     False),
])
def test_restart_environment(env, mode, glibc, restarts):
  env = {'PATH': '/bin', **env}
  new = host_allocator.restart_environment(env, mode, glibc)
  if not restarts:
    assert new is None
    return
  assert new['GLIBC_TUNABLES'].split(':')[-1] == ON
  assert new['PATH'] == '/bin'  # The rest of the environment is kept.


def test_restart_environment_rejects_a_bad_switch():
  with pytest.raises(ValueError, match='DQVQ_HUGE_PAGES'):
    host_allocator.restart_environment({'DQVQ_HUGE_PAGES': 'maybe'},
                                       'madvise', True)


def test_reexec_restarts_once_with_the_same_pid_and_arguments():
  script = ('import os, sys\n'
            'print("start", os.getpid(), flush=True)\n'
            'from dqvq import host_allocator\n'
            'host_allocator.reexec_with_huge_pages()\n'
            'print("after", os.getpid(), os.environ["GLIBC_TUNABLES"], '
            '"|".join(sys.argv[1:]))\n')
  env = {**os.environ, 'DQVQ_HUGE_PAGES': '1', 'PYTHONPATH': ROOT,
         'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}
  out = subprocess.run([sys.executable, '-c', script, 'a b', '--flag=1'],
                       env=env, capture_output=True, text=True, check=True,
                       cwd=ROOT).stdout.split('\n')
  starts = [line for line in out if line.startswith('start')]
  after = [line for line in out if line.startswith('after')]
  assert len(starts) == 2 and starts[0] == starts[1], out  # One restart.
  assert after == [f'after {starts[0].split()[1]} '
                   f'glibc.malloc.arena_max=4:{ON} a b|--flag=1'], out
