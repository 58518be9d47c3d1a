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

Keeping memory mapped instead (mmap_max=0, a high trim threshold, one
arena) helped less, and nothing on top of it; the measurements
(`benchmarks/stage1_step.py`) are in benchmarks/README.md.

glibc reads its tunables once, when the process starts, so the only way for
a program to get them is to start again: `restart_with` replaces the
current process (same PID, same arguments, same interpreter) by one with
`glibc.malloc.hugetlb=1` appended to GLIBC_TUNABLES. Only CPU runs do this,
through `dqvq.cpu.tuning.prepare_process` (which logs it and which
`--nocpu_tuning` turns off); libraries that import dqvq are never
restarted. `restart_tunables` says when it would not help (not glibc,
transparent huge pages off or always on) or when GLIBC_TUNABLES already
names the tunable (the user's value wins).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


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


def restart_tunables(environ: Mapping[str, str] | None = None,
                     mode: str | None = None, has_tunable: bool | None = None,
                     force: bool = False) -> str | None:
  """The GLIBC_TUNABLES to restart with, or None to carry on as started.

  Args:
    environ: the environment (default: this process's).
    mode: the kernel's THP mode (default: read, see `thp_mode`).
    has_tunable: whether this libc reads glibc.malloc.hugetlb (default:
      from the running libc).
    force: restart even where the kernel mode says it would not help (for
      tests, and kernels that report their mode elsewhere).
  """
  environ = os.environ if environ is None else environ
  if not force:
    mode = thp_mode() if mode is None else mode
    has_tunable = (_glibc_has_tunable() if has_tunable is None
                   else has_tunable)
    if not has_tunable or mode != 'madvise':
      return None
  return with_huge_pages(environ.get('GLIBC_TUNABLES', ''))


def restart_with(tunables: str) -> None:
  """Replaces this process by itself with GLIBC_TUNABLES=`tunables`.

  Everything the process did before is done again by the new one, so call
  it first (`dqvq.cpu.tuning.prepare_process`). The restarted process's
  GLIBC_TUNABLES names the tunable, so it does not restart again.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  # orig_argv holds the interpreter's own options too (-m module, -X, -u).
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
            {**os.environ, 'GLIBC_TUNABLES': tunables})
