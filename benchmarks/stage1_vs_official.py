r"""Stage-1 step throughput: our JAX step against the official PyTorch one.

This machine is shared and noisy, so a ratio is only worth what its two
figures' conditions share: this script measures both in one run, in
alternating processes (ours, official, ours, official, ...), each its own
process so that neither inherits the other's threads or memory, and reports
each round's ratio and the ratio of the medians.

  python benchmarks/stage1_vs_official.py \
      --official_repo /path/to/DynamicVectorQuantization \
      --torch_python /path/to/torch-venv/bin/python [--rounds 2] [--batch 2]

Ours is `benchmarks/stage1_step.py` under this interpreter; the official step
is `benchmarks/official_stage1_step.py` under `--torch_python` (see its
docstring for what that interpreter needs). Ours restarts itself with glibc's
huge-page malloc setting, as every dqvq entry point does
(dqvq/host_allocator.py); the official runs as its users start it, unless
`--official_huge_pages` gives it the same setting. The last line:
  ours_images_per_s=... official_images_per_s=... ratio=...
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from dqvq import host_allocator  # pylint: disable=g-import-not-at-top,wrong-import-position
_FIGURE = re.compile(r'images_per_s=([0-9.]+)')


def run_one(command: list[str], env: dict[str, str] | None = None) -> float:
  """Runs one benchmark process; returns the images/s of its last line."""
  result = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=env)
  lines = result.stdout.strip().splitlines()
  match = _FIGURE.search(lines[-1]) if lines else None
  if result.returncode or not match:
    raise SystemExit(
        f'{" ".join(command)} failed (exit {result.returncode}):\n'
        f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
  for line in lines:
    if line.startswith(('step ', 'median', 'images_per_s')):
      print(f'    {line}', flush=True)
  return float(match.group(1))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--official_repo', required=True,
                 help='checkout of CrossmodalGroup/DynamicVectorQuantization')
  p.add_argument('--torch_python', required=True,
                 help='a Python with torch (see official_stage1_step.py)')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--resolution', type=int, default=256)
  p.add_argument('--steps', type=int, default=3,
                 help='timed steps per process (after one warm-up step)')
  p.add_argument('--official_huge_pages', action='store_true',
                 help='also give the official process glibc.malloc.hugetlb=1 '
                 '(ours restarts itself with it, see dqvq.host_allocator): '
                 'what PyTorch gains from the same allocator setting')
  args = p.parse_args()
  if not os.access(args.torch_python, os.X_OK):
    raise SystemExit(f'--torch_python {args.torch_python} is not an '
                     f'executable; give the python of a venv with torch.')
  shape = ['--batch', str(args.batch), '--resolution', str(args.resolution),
           '--steps', str(args.steps)]
  ours_cmd = [sys.executable, os.path.join(HERE, 'stage1_step.py'),
              '--no_flops', *shape]
  official_cmd = [args.torch_python,
                  os.path.join(HERE, 'official_stage1_step.py'),
                  '--official_repo', args.official_repo, *shape]
  official_env = None
  if args.official_huge_pages:
    current = os.environ.get('GLIBC_TUNABLES', '')
    official_env = {**os.environ, 'GLIBC_TUNABLES':
                    host_allocator.with_huge_pages(current) or current}
  ours, official = [], []
  for r in range(args.rounds):
    print(f'round {r}: ours (JAX)', flush=True)
    ours.append(run_one(ours_cmd))
    print(f'round {r}: official (PyTorch)', flush=True)
    official.append(run_one(official_cmd, official_env))
    print(f'round {r}: ours {ours[-1]:.4f} images/s, official '
          f'{official[-1]:.4f} images/s, ratio {ours[-1] / official[-1]:.2f}',
          flush=True)
  ours_m, official_m = statistics.median(ours), statistics.median(official)
  print(f'ours_images_per_s={ours_m:.4f} official_images_per_s='
        f'{official_m:.4f} ratio={ours_m / official_m:.2f}')


if __name__ == '__main__':
  main()
