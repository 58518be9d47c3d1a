r"""The paper's Tables 5 and 6 at demo scale: routers and code lengths.

Trains, on the embedded demo data with one fixed budget of steps, fixed-length
tokenizers (K = 1, a grid at f = 8 and at f = 4, which bracket the dual-grain
models' mean length) and dual-grain DQ-VAEs (F = {4, 8}, r_fine = 0.5) with
the learned feature router, the entropy router and random assignment, then
evaluates each on the validation split with `dqvq.evaluate` and prints one
row per model: fine ratio, mean and variance of the code length, PSNR, SSIM,
LPIPS and rFID (when their weights are given), codebook usage.

  python benchmarks/paper_tables.py --workdir /tmp/dqvq_tables --steps 240 \
      [--variants fixed_f8,fixed_f4,feature,entropy,random] \
      [--lpips_weights DIR] [--inception_weights DIR]

Runs resume (a finished variant is only evaluated again); the table is also
written to WORKDIR/table.json. Last line: `table=WORKDIR/table.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq import evaluate
from dqvq.trainers import loop
# pylint: enable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    # name: config.model overrides of the demo tokenizer (F = {8, 4}).
    'fixed_f8': dict(grain_factors=(8,), grain_ratios=(1.0,), router='none',
                     dec_ch_mult=(1, 1, 2, 4)),
    'fixed_f4': dict(grain_factors=(4,), grain_ratios=(1.0,), router='none',
                     ch_mult=(1, 1, 2), attn_factors=(4,)),
    'feature': dict(router='feature'),
    'entropy': dict(router='entropy'),
    'random': dict(router='random'),
}
COLUMNS = (('fine ratio', 'ratio_fine', '.3f'),
           ('mean length', 'code_length_mean', '.1f'),
           ('var length', 'code_length_var', '.1f'),
           ('PSNR', 'psnr', '.2f'), ('SSIM', 'ssim', '.3f'),
           ('LPIPS', 'lpips', '.3f'), ('rFID', 'rfid', '.1f'),
           ('usage', 'codebook_usage', '.3f'))


def demo_stage1_config(variant: str, steps: int):
  spec = importlib.util.spec_from_file_location(
      'demo_config', os.path.join(ROOT, 'configs', 'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.stage1_config()
  c.model.update(VARIANTS[variant])
  c.num_train_steps = steps
  c.eval_every = c.image_every = c.checkpoint_every = steps
  return c


def fine_ratio(figures: dict[str, float]) -> float:
  """The share of regions at the finest grain (1.0 for a one-grain model)."""
  shares = {k: v for k, v in figures.items() if k.startswith('ratio_f')}
  if not shares:
    return 1.0
  return shares[min(shares, key=lambda k: int(k[len('ratio_f'):]))]


def _cell(figures: dict[str, float], key: str, fmt: str) -> str:
  v = figures.get(key)
  return 'n/a' if v is None else f'{v:{fmt}}'


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--steps', type=int, default=240)
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--lpips_weights', default='')
  p.add_argument('--inception_weights', default='')
  args = p.parse_args()
  variants = args.variants.split(',')
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    sys.exit(f'unknown variants {unknown}; choose from {sorted(VARIANTS)}')
  rows = {}
  for name in variants:
    workdir = os.path.join(args.workdir, name)
    config = demo_stage1_config(name, args.steps)
    loop.train_and_evaluate(config, workdir)  # resumes; no-op when finished
    res = evaluate.run(evaluate.EvalOptions(
        workdir=workdir, what='tokenizer', lpips_weights=args.lpips_weights,
        inception_weights=args.inception_weights, tensorboard=False,
        out=os.path.join(workdir, 'eval')))
    figures = dict(res['metrics'])
    figures['ratio_fine'] = fine_ratio(figures)
    rows[name] = figures
    print(f'{name}: ' + ', '.join(f'{k}={_cell(figures, key, f)}'
                                  for k, key, f in COLUMNS), flush=True)
  header = '| model | ' + ' | '.join(c[0] for c in COLUMNS) + ' |'
  print(f'\nDemo data, 64 px, {args.steps} steps per model, validation split')
  print(header)
  print('|' + '---|' * (len(COLUMNS) + 1))
  for name, figures in rows.items():
    cells = [_cell(figures, key, f) for _, key, f in COLUMNS]
    print(f'| {name} | ' + ' | '.join(cells) + ' |')
  out = os.path.join(args.workdir, 'table.json')
  with open(out, 'w') as f:
    json.dump({'steps': args.steps, 'rows': rows}, f, indent=1)
  print(f'table={out}')


if __name__ == '__main__':
  main()
