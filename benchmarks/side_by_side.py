"""Our step against the official one, alternated in separate processes.

Shared by `stage1_vs_official.py` and `stage2_vs_official.py`. This machine
is shared and noisy, so a ratio is only worth what its two figures'
conditions share: both are measured in one run, in alternating processes
(ours, official, ours, official, ...), each its own process so that neither
inherits the other's threads or memory, and the report gives each round's
ratio and the ratio of the medians.

Ours restarts itself with glibc's huge-page malloc setting, as every dqvq
entry point does (dqvq/cpu/host_allocator.py); the official runs as its users
start it, unless `--official_huge_pages` gives it the same setting.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from dqvq.cpu import host_allocator  # pylint: disable=g-import-not-at-top,wrong-import-position


def add_flags(p: argparse.ArgumentParser, official_script: str) -> None:
  """The flags every side-by-side script takes."""
  p.add_argument('--official_repo', required=True,
                 help='checkout of CrossmodalGroup/DynamicVectorQuantization')
  p.add_argument('--torch_python', required=True,
                 help=f'a Python with torch (see {official_script})')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--steps', type=int, default=3,
                 help='timed steps per process (after one warm-up step)')
  p.add_argument('--official_huge_pages', action='store_true',
                 help='also give the official process glibc.malloc.hugetlb=1 '
                 '(ours restarts itself with it, see dqvq.cpu.host_allocator): '
                 'what PyTorch gains from the same allocator setting')


def run_one(command: list[str], figure: str,
            env: dict[str, str] | None = None) -> float:
  """Runs one benchmark process; returns `figure` from its last line.

  Echoes the per-step and summary lines (and any 'streams' line: what the
  two steps were fed), so the round's log shows what the figure came from.
  """
  result = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=env)
  lines = result.stdout.strip().splitlines()
  match = re.search(rf'{figure}=([0-9.]+)', lines[-1]) if lines else None
  if result.returncode or not match:
    raise SystemExit(
        f'{" ".join(command)} failed (exit {result.returncode}):\n'
        f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
  for line in lines:
    if line.startswith(('step ', 'median', 'streams', figure)):
      print(f'    {line}', flush=True)
  return float(match.group(1))


def forward(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
  """The parsed flags `names` as command-line arguments again."""
  out = []
  for name in names:
    value = getattr(args, name)
    if isinstance(value, bool):
      out += [f'--{name}'] if value else []
    else:
      out += [f'--{name}', str(value)]
  return out


def compare(args: argparse.Namespace, ours: str, official: str,
            shared: Sequence[str], figure: str, unit: str,
            ours_extra: Sequence[str] = ()) -> None:
  """Alternates the two scripts for `args.rounds` rounds; prints ratios.

  `ours` runs under this interpreter, `official` under `--torch_python`
  with `--official_repo`, both with the flags `shared` as parsed here. The
  last line is `ours_<figure>=... official_<figure>=... ratio=...`, from the
  medians over the rounds.
  """
  if not os.access(args.torch_python, os.X_OK):
    raise SystemExit(f'--torch_python {args.torch_python} is not an '
                     f'executable; give the python of a venv with torch.')
  shared_args = forward(args, shared)
  ours_cmd = [sys.executable, os.path.join(HERE, ours), *ours_extra,
              *shared_args]
  official_cmd = [args.torch_python, os.path.join(HERE, official),
                  '--official_repo', args.official_repo, *shared_args]
  official_env = None
  if args.official_huge_pages:
    current = os.environ.get('GLIBC_TUNABLES', '')
    official_env = {**os.environ, 'GLIBC_TUNABLES':
                    host_allocator.with_huge_pages(current) or current}
  ours_figures, official_figures = [], []
  for r in range(args.rounds):
    print(f'round {r}: ours (JAX)', flush=True)
    ours_figures.append(run_one(ours_cmd, figure))
    print(f'round {r}: official (PyTorch)', flush=True)
    official_figures.append(run_one(official_cmd, figure, official_env))
    print(f'round {r}: ours {ours_figures[-1]:.4f} {unit}, official '
          f'{official_figures[-1]:.4f} {unit}, ratio '
          f'{ours_figures[-1] / official_figures[-1]:.2f}', flush=True)
  ours_m = statistics.median(ours_figures)
  official_m = statistics.median(official_figures)
  print(f'ours_{figure}={ours_m:.4f} official_{figure}={official_m:.4f} '
        f'ratio={ours_m / official_m:.2f}')
