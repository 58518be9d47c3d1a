"""The study's text report: its tables as Markdown, written beside the JSON.

`dqvq.eval.study_eval` measures; this module only formats what it returns
(and what `dqvq.eval.study_stage2` returns for Table 7) and writes it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def _f(v: Any, fmt: str = '.2f') -> str:
  return '—' if v is None or (isinstance(v, float) and math.isnan(v)) else (
      format(v, fmt))


def markdown(res: dict[str, Any]) -> str:
  """The study's tables as Markdown (what the README shows)."""
  out = [f"Validation: {res['num_images']} held-out crops, "
         f"{res.get('steps', '?')} training steps per model.", '']
  if 'own' in res:
    own = res['own']
    out += ['| routing | PSNR | mean length |', '|---|---|---|',
            f"| trained | {_f(own['psnr'])} | "
            f"{_f(own['code_length_mean'], '.1f')} |",
            f"| all coarse | {_f(res['all_coarse'])} | — |",
            f"| all fine | {_f(res['all_fine'])} | — |", '',
            'Share of regions per grain: ' + ', '.join(
                f'f={k[7:]} {v:.3f}' for k, v in own.items()
                if k.startswith('ratio_f')) + '.', '']
  if 'table5' in res:
    out += ['**Table 5** (equal expected length, 256 codes at 64 px)', '',
            '| model | mean length | PSNR | usage |', '|---|---|---|---|']
    for n, r in res['table5'].items():
      out.append(f"| {n} | {_f(r['code_length_mean'], '.1f')} | "
                 f"{_f(r['psnr'])} | {_f(r['codebook_usage'], '.3f')} |")
    out.append('')
  for name, rows in res.get('budget', {}).items():
    out += [f'**Same model, same budget** ({name})', '',
            '| fine budget | router | random (5 seeds) | oracle | gap closed |',
            '|---|---|---|---|---|']
    for r in rows:
      out.append(f"| {r['budget']:g} | {_f(r['router'])} | {_f(r['random'])}"
                 f" ± {_f(r['random_std'])} | {_f(r['oracle'])} | "
                 f"{_f(100 * r['gap_closed'], '.0f')}% |")
    out.append('')
  if 'table6' in res:
    out += ['**Table 6** (feature router trained at each r_fine; inference '
            'by argmax, the paper\'s, and by expected count; the last column '
            'on as many fresh crops of the training photographs)', '',
            '| r_fine | inference | mean length | expected | error | var | '
            'PSNR | usage | training crops: length (error) |',
            '|---|---|---|---|---|---|---|---|---|']
    for r in res['table6']:
      train_error = r.get('training_crops_length_error')
      out.append(
          f"| {r['fine_ratio_target']:g} | {r.get('inference', 'argmax')} | "
          f"{_f(r['code_length_mean'], '.1f')}"
          f" | {_f(r['expected_length'], '.0f')} | "
          f"{_f(100 * r['length_error'], '+.1f')}% | "
          f"{_f(r['code_length_var'], '.0f')} | {_f(r['psnr'])} | "
          f"{_f(r['codebook_usage'], '.3f')} | "
          f"{_f(r.get('training_crops_length'), '.1f')} ("
          f"{_f(None if train_error is None else 100 * train_error, '+.1f')}"
          "%) |")
    out.append('')
  if 'figure5' in res:
    out += ['**Figure 5** (AUROC of fine choice vs fixed f=8 region error; '
            "the router's ranking instead of its choice; the same per-image "
            "counts at the fixed model's worst regions (ceiling) and at the "
            "greedy oracle's); per image: each image against its own "
            'median error, averaged over images', '',
            '| router | AUROC | ranking | ceiling | gain oracle | '
            'per image: AUROC | ranking | gain oracle |',
            '|---|---|---|---|---|---|---|---|']
    for n, r in res['figure5'].items():
      out.append(f"| {n} | {_f(r['auroc'], '.3f')} | "
                 f"{_f(r.get('ranking'), '.3f')} | "
                 f"{_f(r.get('ceiling'), '.3f')} | "
                 f"{_f(r.get('gain_oracle'), '.3f')} | "
                 f"{_f(r.get('auroc_per_image'), '.3f')} | "
                 f"{_f(r.get('ranking_per_image'), '.3f')} | "
                 f"{_f(r.get('gain_oracle_per_image'), '.3f')} |")
    out.append('')
  return '\n'.join(out)


def write_tables(workdir: str, stem: str, results: dict[str, Any],
                 md: str) -> str:
  """WORKDIR/STEM.json and STEM.md; prints the table and `STEM=PATH` last,
  the line the study CLIs promise. Returns the Markdown file's path."""
  with open(os.path.join(workdir, f'{stem}.json'), 'w') as f:
    json.dump(results, f, indent=1)
  path = os.path.join(workdir, f'{stem}.md')
  with open(path, 'w') as f:
    f.write(md)
  print(md)
  print(f'{stem}={path}')
  return path


__all__ = ['markdown', 'write_tables']
