r"""The paper's DQ-VAE claims, reproduced in miniature on held-out photographs.

  python -m dqvq.study --workdir /tmp/dqvq_study [--steps 240] \
      [--config configs/demo.py] [--only table5,table6,budget,figure5] \
      [--set model.router_target=gain ...]
  python -m dqvq.study --run /tmp/dqvq_demo/stage1 --workdir OUT  # one model

Trains, with the demo tokenizer's config (its model, data, schedule; `--steps`
changes the length of every run), the tokenizers each claim needs, then
measures them on the validation split (photographs no model trained on):

* Table 5, equal expected code length: a fixed-length VQGAN (K = 1, f = 4:
  256 codes at 64 px) against triple-grain DQ-VAEs, F = {8, 4, 2}, with the
  paper's constraint r_f2 = r_f8 / 4 (0.3 / 0.625 / 0.075: also 256 codes
  expected), routed by the learned feature router, the entropy router and
  random regions.
* Same model, same budget: one trained dual-grain DQ-VAE (each router) gives
  its fine codes, in every image the same number of regions, to its router's
  ranking, to random regions (5 seeds) and to a greedy oracle
  (`dqvq.eval.allocation`), at fine budgets 0.25 / 0.5 / 0.75.
* Table 6: dual-grain feature-router models trained at r_fine = 0.1 ... 0.9:
  mean code length against its expectation, its variance, PSNR, usage.
* Figure 5: AUROC of "the router chose fine" against the per-region error of
  the fixed-length f = 8 model (`coding.coding_map_auroc`); with Table 6, also
  of its r = 0.3 model, the fine share of the paper's figure.

Writes WORKDIR/study.json, WORKDIR/study.md (the tables), rate_distortion.png
and coding_vs_error.png. Runs resume: a trained model is only evaluated again.
Last line: `study=WORKDIR/study.md`.

With `--run DIR`, nothing is trained: the stage-1 run in DIR (the demo's
tokenizer, or any dual-grain one) is measured with its own routing, all
regions coarse, all fine, and router / random / oracle at each budget.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging

from dqvq import config_lib
from dqvq.cpu import tuning as cpu_tuning  # defines --cpu_tuning


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags, defined only when run as a script: importing the
  module as a library (a test, beside `dqvq.train`'s flags) must not define
  --workdir twice."""
  flags.DEFINE_string('workdir', None, 'Runs and results go here.')
  flags.DEFINE_integer('steps', 240, 'Training steps of every model.')
  flags.DEFINE_string(
      'config', 'configs/demo.py', 'A config file whose stage1_config() (or '
      'get_config(), stage 1) is the base of every model.')
  flags.DEFINE_list('only', ['table5', 'budget', 'table6', 'figure5'],
                    'Parts to run.')
  flags.DEFINE_integer('random_seeds', 5, 'Random allocations.')
  flags.DEFINE_string('run', None, 'Measure this trained stage-1 run '
                      'instead of training the study\'s models.')
  flags.DEFINE_multi_string(
      'set', [], 'FIELD=VALUE on the base config before the study\'s own '
      'changes, e.g. --set model.router_target=gain --set optim.'
      'router_lr_multiplier=10 (VALUE is a Python literal, else a string).')


TRIPLE = dict(grain_factors=(8, 4, 2), grain_ratios=(0.3, 0.625, 0.075),
              dec_ch_mult=(1, 2))
MODELS: dict[str, dict[str, Any]] = {
    'fixed_f8': dict(grain_factors=(8,), grain_ratios=(1.0,), router='none',
                     dec_ch_mult=(1, 1, 2, 4)),
    'fixed_f4': dict(grain_factors=(4,), grain_ratios=(1.0,), router='none',
                     ch_mult=(1, 1, 2), attn_factors=(4,)),
    'triple_feature': dict(TRIPLE, router='feature'),
    'triple_entropy': dict(TRIPLE, router='entropy'),
    'triple_random': dict(TRIPLE, router='random'),
    'dual_entropy': dict(grain_ratios=(0.5, 0.5), router='entropy'),
    **{f'dual_feature_r{r:g}': dict(grain_ratios=(round(1 - r, 6), r),
                                    router='feature')
       for r in (0.1, 0.3, 0.5, 0.7, 0.9)},
}
PARTS = {'table5': ('fixed_f4', 'triple_feature', 'triple_entropy',
                    'triple_random'),
         'budget': ('dual_feature_r0.5', 'dual_entropy'),
         'table6': tuple(f'dual_feature_r{r:g}' for r in (0.1, 0.3, 0.5, 0.7,
                                                          0.9)),
         'figure5': ('fixed_f8', 'dual_feature_r0.5', 'dual_entropy')}
BUDGETS = (0.25, 0.5, 0.75)


def base_config(spec_arg: str):
  """The stage-1 config of PATH[:ARG] (configs/demo.py: its tokenizer)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec_arg.partition(':')
  spec = importlib.util.spec_from_file_location('study_base', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if hasattr(module, 'stage1_config'):
    return module.stage1_config(arg or None)
  c = module.get_config(arg or None)
  if c.stage != 1:
    raise ValueError(f'{path} is a stage-{c.stage} config without '
                     'stage1_config(); give a tokenizer config.')
  return c


def model_config(base, name: str, steps: int):
  c = base.copy_and_resolve_references()
  c.model.update(MODELS[name])
  if c.model.router == 'entropy':
    c.model.entropy_thresholds = 'auto'
  c.num_train_steps = steps
  c.eval_every = c.image_every = c.checkpoint_every = steps
  return c


class Stopped(Exception):
  """A model's run stopped early (SIGTERM, Ctrl-C) after saving."""


def train(base, name: str, workdir: str, steps: int):
  """Trains (or resumes) one model; raises Stopped if its run was stopped.

  The run saves and returns early on SIGTERM or Ctrl-C; the study must stop
  there too rather than go on to train the next models (and leave each of
  them half trained under a stop that was meant for the whole study).
  """
  from dqvq.trainers import loop  # pylint: disable=g-import-not-at-top
  c = model_config(base, name, steps)
  run_dir = os.path.join(workdir, name)
  logging.info('study: training %s in %s', name, run_dir)
  state = loop.train_and_evaluate(c, run_dir)
  if int(state.step) < steps:
    raise Stopped(f'study: {name} stopped at step {int(state.step)} of '
                  f'{steps} (saved); rerun the same command to resume.')
  return c, state


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  unknown = set(FLAGS.only) - set(PARTS)
  if unknown:
    raise app.UsageError(f'--only: unknown parts {sorted(unknown)}; choose '
                         f'from {sorted(PARTS)}.')
  if FLAGS.steps <= 0 or FLAGS.random_seeds <= 0:
    raise app.UsageError('--steps and --random_seeds must be positive.')
  if not os.path.isfile(FLAGS.config.partition(':')[0]):
    raise app.UsageError(f'--config {FLAGS.config} does not exist.')
  from dqvq import distributed  # pylint: disable=g-import-not-at-top
  cpu_tuning.prepare_process()  # CPU runs only; may restart once
  distributed.initialize()
  from dqvq.eval import study_eval  # pylint: disable=g-import-not-at-top
  from dqvq.eval import study_report  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  if FLAGS.run:
    from dqvq.inference import tokenizer  # pylint: disable=g-import-not-at-top
    tok = tokenizer.load_stage1(FLAGS.run)
    results = study_eval.run_one(tok.config, tok, budgets=BUDGETS,
                                 seeds=FLAGS.random_seeds)
    results.update(run=os.path.abspath(FLAGS.run), steps=tok.step)
  else:
    base = base_config(FLAGS.config)
    try:
      config_lib.apply_overrides(base, FLAGS.set)
    except ValueError as e:
      raise app.UsageError(f'--set: {e}') from e
    names = [n for n in MODELS if any(n in PARTS[p] for p in FLAGS.only)]
    try:
      runs = {n: train(base, n, workdir, FLAGS.steps) for n in names}
    except Stopped as e:
      print(e)
      return
    results = study_eval.run_study(runs, FLAGS.only, workdir,
                                   budgets=BUDGETS, seeds=FLAGS.random_seeds)
    results['steps'] = FLAGS.steps
  results['config'] = FLAGS.config
  results['set'] = list(FLAGS.set)
  study_report.write_tables(workdir, 'study', results,
                            study_report.markdown(results))


def cli() -> None:
  """Runs the command line once `define_flags()` has run: `python -m
  dqvq.study` and `benchmarks/study.py`."""
  flags.mark_flags_as_required(['workdir'])
  app.run(main)


if __name__ == '__main__':
  define_flags()
  cli()
