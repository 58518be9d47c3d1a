r"""Computes a percentile table of region entropies over a TFDS split.

The entropy router needs, for a target fine ratio r, the (100 - 100 r)-th
percentile of region entropies over the training data. The official JSONs were
computed with bins [0, 1]; to route with another bin range (the official HEAD
uses [-1, 1]), another resolution or another dataset, recompute the table:

  python -m dqvq.tools.entropy_thresholds --data_dir DIR --dataset imagenet2012 \
      --split train --resolution 256 --region_size 16 --bin_range=-1,1 \
      --num_images 100000 --out thresholds.json

Flags -> one call of `dqvq.data.entropy_table.write_table`, which reads the
split through grain (the dataset must be stored as ArrayRecord) with the
evaluation preprocessing of training and evaluation: PIL bilinear resize of
the shorter side to `resolution`, centre crop, [-1, 1]. Stage-1 training with
`model.entropy_thresholds='auto'` computes the same table itself
(`entropy_table.write_once`). `--bin_range` needs the `=` form because its
value starts with a minus sign.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from dqvq.data import entropy_table


def _parse_range(text: str) -> tuple[float, float]:
  parts = [float(p) for p in text.split(',')]
  if len(parts) != 2 or not parts[0] < parts[1]:
    raise argparse.ArgumentTypeError(
        f'--bin_range wants "LOW,HIGH" with LOW < HIGH, got {text!r}.')
  return parts[0], parts[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data_dir', default=None, help='TFDS data directory.')
  p.add_argument('--dataset', required=True, help='TFDS name, e.g. ffhq.')
  p.add_argument('--split', default='train')
  p.add_argument('--image_key', default='image')
  p.add_argument('--resolution', type=int, default=256)
  p.add_argument('--region_size', type=int, default=16)
  p.add_argument('--bin_range', type=_parse_range, default=(-1.0, 1.0),
                 help='First,last bin centre; use --bin_range=0,1 to match '
                 'the official JSONs.')
  p.add_argument('--num_bins', type=int, default=32)
  p.add_argument('--sigma', type=float, default=0.01)
  p.add_argument('--num_images', type=int, default=0,
                 help='Images to use from the start of the split; 0 = all.')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--download', action='store_true',
                 help='Let TFDS download/prepare the dataset if missing.')
  p.add_argument('--out', required=True, help='Output JSON path.')
  args = p.parse_args(argv)
  try:
    entropy_table.check_settings(args.resolution, args.region_size,
                                 args.bin_range, args.num_images,
                                 args.batch_size)
  except ValueError as e:
    p.error(str(e))
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the CLI; returns what it wrote (table plus metadata)."""
  args = parse_args(argv)
  source = entropy_table.open_split(
      args.dataset, args.split, data_dir=args.data_dir,
      image_key=args.image_key, download=args.download)
  return entropy_table.write_table(
      args.out, source, dataset=args.dataset, split=args.split,
      resolution=args.resolution, region_size=args.region_size,
      bin_range=args.bin_range, num_bins=args.num_bins, sigma=args.sigma,
      num_images=args.num_images, batch_size=args.batch_size)


if __name__ == '__main__':
  main(sys.argv[1:])
