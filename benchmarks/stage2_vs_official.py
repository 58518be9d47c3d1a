r"""Stage-2 step throughput: our JAX step against the official PyTorch one.

Both steps train the paper's class-conditional base DQ-Transformer in fp32 on
the same random token maps (`benchmarks/stage2_common.py`, same seed), measured
in one run in alternating processes as `stage1_vs_official.py` does
(`benchmarks/side_by_side.py`): each round's ratio and the ratio of the
medians.

  python benchmarks/stage2_vs_official.py \
      --official_repo /path/to/DynamicVectorQuantization \
      --torch_python /path/to/torch-venv/bin/python [--rounds 2] [--batch 2] \
      [--capacities batch]

Ours is `benchmarks/stage2_step.py` under this interpreter; the official step
is `benchmarks/official_stage2_step.py` under `--torch_python` (see its
docstring for what that interpreter needs; this project's venv, which has
torch, will do). `--tiny` runs both at toy widths, a smoke test of the
harness. `--capacities batch` gives our layout each stream as long as the
batch's longest (what a config's `model.capacities` set to the data's
longest streams does), the length the official pads to; without it ours runs
the full 1,283-input layout. The last line:
  ours_sequences_per_s=... official_sequences_per_s=... ratio=...
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import side_by_side
from benchmarks import stage2_common
# pylint: enable=g-import-not-at-top,wrong-import-position


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  side_by_side.add_flags(p, 'official_stage2_step.py')
  stage2_common.add_flags(p)
  p.add_argument('--capacities', default='',
                 help='ours: stage2_step.py --capacities (e.g. "batch": the '
                 'streams as long as the official pads them)')
  args = p.parse_args()
  side_by_side.compare(args, 'stage2_step.py', 'official_stage2_step.py',
                       ('batch', 'steps', 'fine_ratio', 'seed', 'tiny'),
                       'sequences_per_s', 'sequences/s',
                       ours_extra=(('--capacities', args.capacities)
                                   if args.capacities else ()))


if __name__ == '__main__':
  main()
