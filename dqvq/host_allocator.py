"""Huge pages for host buffers: a process-start setting of glibc's malloc.

XLA:CPU allocates every large buffer of a step with malloc, and glibc serves
allocations above 32 MiB with a fresh mmap that is unmapped again on free.
A 256-pixel stage-1 step at batch 2 works through ~8 GB of such buffers, so
each step faults in (and the kernel zeroes) about two million 4 KiB pages:
tens of seconds of system time per minute of training. With
`glibc.malloc.hugetlb=1` (glibc 2.35+), malloc asks for transparent huge
pages on those mappings (`madvise(MADV_HUGEPAGE)`), which the kernel serves
as 2 MiB pages when transparent huge pages are in `madvise` mode, the common
default: 512 times fewer faults.

Measured on this project's 2-core AVX2 EPYC (`benchmarks/stage1_step.py`,
batch 2, 256 px, s/step, each setting its own process, two rounds): plain
26.85 / 26.67, hugetlb=1 22.78 / 21.29. Keeping memory mapped instead
(mmap_max=0, a high trim threshold, one arena) helped less on its own
(27.49 / 24.71) and nothing reliable on top of hugetlb=1 (21.75 / 25.66).

glibc reads its tunables once, when the process starts, so the only way for
a program to get them is to start again: `reexec_with_huge_pages` replaces
the current process (same PID, same arguments, same interpreter) by one with
`glibc.malloc.hugetlb=1` appended to GLIBC_TUNABLES. dqvq's command-line
entry points call it first thing, before flags are parsed or a file is
touched; libraries that import dqvq are never restarted. It does nothing
where it cannot help (not glibc, transparent huge pages off or always on),
when GLIBC_TUNABLES already names the tunable (the user's value wins), or
with DQVQ_HUGE_PAGES=0. DQVQ_HUGE_PAGES=1 restarts even where the kernel
mode says it would not help (for tests and for kernels that report their
mode elsewhere).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
ENV_VAR = 'DQVQ_HUGE_PAGES'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
_FALSE_VALUES = ('0', 'false', 'no', 'off')
_TRUE_VALUES = ('1', 'true', 'yes', 'on')


def with_huge_pages(tunables: str) -> str | None:
  """GLIBC_TUNABLES with hugetlb=1 appended; None if it already names it.

  GLIBC_TUNABLES is a colon-separated list of name=value pairs; the user's
  other tunables are kept, and a hugetlb value they chose is never replaced.
  """
  entries = [e for e in tunables.split(':') if e]
  if any(e.split('=', 1)[0] == TUNABLE for e in entries):
    return None
  return ':'.join(entries + [f'{TUNABLE}=1'])


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never')."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def _glibc_has_tunable() -> bool:
  name, version = platform.libc_ver()
  if name != 'glibc':
    return False
  try:
    major, minor = (int(v) for v in version.split('.')[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)


def restart_environment(environ: Mapping[str, str], mode: str | None,
                        has_tunable: bool) -> dict[str, str] | None:
  """The environment to restart with, or None to carry on as started.

  Args:
    environ: the current environment.
    mode: the kernel's THP mode (see `thp_mode`).
    has_tunable: whether this libc reads glibc.malloc.hugetlb.
  """
  choice = environ.get(ENV_VAR, '').strip().lower()
  if choice in _FALSE_VALUES:
    return None
  if choice and choice not in _TRUE_VALUES:
    raise ValueError(f'{ENV_VAR}={environ[ENV_VAR]!r}: use 1 (always restart '
                     f'with huge pages), 0 (never) or leave it unset (auto).')
  if choice not in _TRUE_VALUES and (not has_tunable or mode != 'madvise'):
    return None
  tunables = with_huge_pages(environ.get('GLIBC_TUNABLES', ''))
  if tunables is None:
    return None
  return {**environ, 'GLIBC_TUNABLES': tunables}


def reexec_with_huge_pages() -> None:
  """Restarts this process with glibc.malloc.hugetlb=1, if that would help.

  Call it first in a `__main__` block: everything the process did before is
  done again by the new one. Returns only when no restart is needed (which
  includes the restarted process itself, whose GLIBC_TUNABLES names the
  tunable).
  """
  env = restart_environment(os.environ, thp_mode(), _glibc_has_tunable())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv holds the interpreter's own options too (-m module, -X, -u).
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
