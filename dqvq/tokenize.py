r"""Encodes a dataset once with a trained DQ-VAE, for stage-2 training.

Stage 2 reads these tokens instead of running the encoder in every step:

  python -m dqvq.tokenize --stage1_workdir /runs/dqvae --out /data/tokens \
      [--splits train,validation] [--batch_size 64] [--flip] [--data_dir D]

The images are those of the stage-1 run's `config.data` (its dataset, splits
and resolution; `--data_dir` points at another copy of the TFDS data), with
the eval preprocessing (shorter side to R, center crop). `--flip` also stores
the tokens of each mirrored image, which stage 2 picks at random as its
augmentation. After writing, the tokens of a few validation images are
re-encoded and compared exactly (`verify_token_dataset`), and a summary is
printed: images per split and the mean code length (codes per image: 1 per
coarse region, 4 per fine one for the dual-grain model).

The layout of the output directory is described in `dqvq.data.tokens`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import ml_collections

from dqvq.cpu import tuning as cpu_tuning
from dqvq.data import tokens as tokens_lib
from dqvq.inference import tokenizer as tokenizer_lib


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--stage1_workdir', required=True,
                 help='Directory of the trained stage-1 run (checkpoints/).')
  p.add_argument('--out', required=True, help='Output token directory.')
  p.add_argument('--splits', default='train,validation',
                 help='Comma-separated: train (config.data.train_split), '
                 'validation (config.data.eval_split) or other TFDS splits.')
  p.add_argument('--batch_size', type=int, default=64,
                 help='Images per encoder call; a multiple of the devices.')
  p.add_argument('--flip', action='store_true',
                 help='Also store the tokens of the mirrored images.')
  p.add_argument('--data_dir', default=None,
                 help='TFDS data directory; default: the stage-1 config\'s.')
  p.add_argument('--overwrite', action='store_true',
                 help='Replace a token dataset already in --out.')
  p.add_argument('--verify_images', type=int, default=8,
                 help='Validation images re-encoded to check the tokens.')
  p.add_argument('--nocpu_tuning', dest='cpu_tuning', action='store_false',
                 help='On CPU: no huge-page restart, XLA:CPU defaults '
                 '(dqvq.cpu.tuning).')
  args = p.parse_args(argv)
  args.splits = [s.strip() for s in args.splits.split(',') if s.strip()]
  if not args.splits:
    p.error('--splits names no split.')
  if args.batch_size < 1 or args.verify_images < 0:
    p.error('--batch_size must be >= 1 and --verify_images >= 0.')
  return args


def summary(meta: dict[str, Any]) -> str:
  """Human-readable lines: what was written, from what, per split."""
  lines = [f'Tokens of {meta["stage1_workdir"] or "?"} (step '
           f'{meta["stage1_step"]}, fingerprint {meta["fingerprint"]}): '
           f'{meta["dataset"]} at {meta["resolution"]}px, grain factors '
           f'{meta["grain_factors"]}, code grid {meta["code_grid"]}x'
           f'{meta["code_grid"]}, flip={meta["flip"]}.']
  for name, split in meta['splits'].items():
    lines.append(
        f'  {name} ({split["source_split"]}): {split["num_examples"]} images '
        f'({split["num_skipped"]} undecodable skipped), mean code length '
        f'{split["mean_code_length"]:.2f}')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the CLI; returns the metadata it wrote."""
  args = parse_args(argv)
  cpu_tuning.prepare_process(args.cpu_tuning)  # CPU runs only
  tokenizer = tokenizer_lib.load_stage1(args.stage1_workdir)
  data_config = ml_collections.ConfigDict(tokenizer.config.data.to_dict())
  if args.data_dir:
    data_config.data_dir = args.data_dir
  meta = tokens_lib.write_token_dataset(
      tokenizer, args.out, data_config=data_config, splits=args.splits,
      batch_size=args.batch_size, flip=args.flip,
      stage1_workdir=args.stage1_workdir, overwrite=args.overwrite)
  if args.verify_images:
    tokens_lib.verify_token_dataset(tokenizer, args.out,
                                    num_images=args.verify_images,
                                    stage1_workdir=args.stage1_workdir)
    print(f'Verified: {args.verify_images} re-encoded images match.')
  print(f'Wrote {args.out}\n{summary(meta)}', flush=True)
  return meta


if __name__ == '__main__':
  main(sys.argv[1:])
