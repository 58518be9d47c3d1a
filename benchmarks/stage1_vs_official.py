r"""Stage-1 step throughput: our JAX step against the official PyTorch one.

This machine is shared and noisy, so a ratio is only worth what its two
figures' conditions share: this script measures both in one run, in
alternating processes (ours, official, ours, official, ...), each its own
process so that neither inherits the other's threads or memory, and reports
each round's ratio and the ratio of the medians (`benchmarks/side_by_side.py`,
shared with `stage2_vs_official.py`).

  python benchmarks/stage1_vs_official.py \
      --official_repo /path/to/DynamicVectorQuantization \
      --torch_python /path/to/torch-venv/bin/python [--rounds 2] [--batch 2]

Ours is `benchmarks/stage1_step.py` under this interpreter; the official step
is `benchmarks/official_stage1_step.py` under `--torch_python` (see its
docstring for what that interpreter needs). Ours restarts itself with glibc's
huge-page malloc setting, as every dqvq entry point does
(dqvq/cpu/host_allocator.py); the official runs as its users start it, unless
`--official_huge_pages` gives it the same setting. The last line:
  ours_images_per_s=... official_images_per_s=... ratio=...
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import side_by_side  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  side_by_side.add_flags(p, 'official_stage1_step.py')
  p.add_argument('--resolution', type=int, default=256)
  side_by_side.compare(p.parse_args(), 'stage1_step.py',
                       'official_stage1_step.py',
                       ('batch', 'resolution', 'steps'), 'images_per_s',
                       'images/s', ours_extra=('--no_flops',))


if __name__ == '__main__':
  main()
