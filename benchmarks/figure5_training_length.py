r"""Figure 5 against training length: out of reach, or only of 300 steps?

The study (`python -m dqvq.study`) trains every model 300 steps, to fit its
90 CPU minutes; at that length the learned router's Figure 5 AUROC stays
below the 0.7 target. This trains the two models Figure 5 needs, with the
study's own config and function (`dqvq.study.train`: the fixed-length f = 8
model and the demo's dual-grain learned-router model, r_fine = 0.5), at
several lengths, and scores every router length against every fixed-model
length with the study's `figure5` (pooled over the split and within each
image), beside the router model's own PSNR and code length.

  python benchmarks/figure5_training_length.py --workdir W \
      [--steps 300,1000,3000] [--config configs/demo.py]

A pair at the same length is what `python -m dqvq.study --steps N --only
figure5` measures (which also trains the entropy-routed model). Runs go to
W/STEPS/NAME and resume: a trained run is only evaluated again. On the
2-core CPU the f = 8 model trains at ~2 steps/s, the dual model at ~1.4.
Writes W/figure5_training_length.json and .md; last line `md=PATH`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from dqvq.cpu import tuning as cpu_tuning  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Runs and results go here.')
flags.DEFINE_list('steps', ['300', '1000', '3000'], 'Training lengths.')
flags.DEFINE_string('config', 'configs/demo.py', 'The study\'s base config.')

FIXED, ROUTED = 'fixed_f8', 'dual_feature_r0.5'
COLUMNS = ('auroc', 'ranking', 'ceiling', 'gain_oracle', 'auroc_per_image',
           'ranking_per_image')


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  out = ['| router steps | fixed f = 8 steps | ' + ' | '.join(COLUMNS) +
         ' | router model: PSNR, length mean / var |',
         '|---' * (len(COLUMNS) + 3) + '|']
  for r in rows:
    out.append(f"| {r['router_steps']} | {r['fixed_steps']} | " +
               ' | '.join(f'{r[k]:.3f}' for k in COLUMNS) +
               f" | {r['psnr']:.2f} dB, {r['code_length_mean']:.1f} / "
               f"{r['code_length_var']:.0f} |")
  return '\n'.join(out) + '\n'


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  lengths = sorted({int(s) for s in FLAGS.steps})
  if not lengths or lengths[0] <= 0:
    raise app.UsageError('--steps: positive training lengths, e.g. 300,1000.')
  cpu_tuning.prepare_process()
  from dqvq import distributed  # pylint: disable=g-import-not-at-top
  from dqvq import study  # pylint: disable=g-import-not-at-top
  from dqvq.eval import study_eval  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  base = study.base_config(FLAGS.config)
  models = {}
  for n in lengths:
    for name in (FIXED, ROUTED):
      run_dir = os.path.join(FLAGS.workdir, str(n))
      models[name, n] = study_eval.Model(*study.train(base, name, run_dir, n))
  batches = study_eval.validation_batches(models[FIXED, lengths[0]].config)
  errors = {m: study_eval.fixed_region_errors(models[FIXED, m], batches)
            for m in lengths}
  rows = []
  for n in lengths:
    own = study_eval.coding_figures(models[ROUTED, n], batches)
    for m in lengths:
      fig = study_eval.figure5(errors[m], models[ROUTED, n], batches)
      rows.append(dict(fig, router_steps=n, fixed_steps=m, psnr=own['psnr'],
                       code_length_mean=own['code_length_mean'],
                       code_length_var=own['code_length_var']))
      print(json.dumps(rows[-1]), flush=True)
  path = os.path.join(FLAGS.workdir, 'figure5_training_length')
  with open(path + '.json', 'w') as f:
    json.dump(rows, f, indent=1)
  with open(path + '.md', 'w') as f:
    f.write(markdown(rows))
  print(markdown(rows))
  print(f'md={path}.md')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
