r"""Paper Table 7 in miniature: the DQ-Transformer's input layers, ablated.

  python -m dqvq.eval.study_stage2 --tokenizer_run /tmp/dqvq_demo/stage1 \
      --workdir /tmp/dqvq_table7 [--steps 240] [--config configs/demo.py] \
      [--set num_eval_batches=2 ...]

Trains the demo's stage 2 (`get_config()` of configs/demo.py: its model,
data and schedule) once per input-layer variant of paper Table 7 (the
paper's choice; non-shared content; shared position; no granularity
embedding; no absolute position embedding; `dqvq.models.transformer`),
every one on the same already-trained tokenizer run (stage 1 is not trained
again, so every variant models the same codes), at the same seed and the
same number of steps. Each variant's figure is its final stage-2 validation
loss (content cross-entropy + mean per-granularity position cross-entropy,
nats per token, on the validation photographs) and its two parts, beside
the FID the paper reports for the same row on FFHQ. The two measure
different things at very different scales (a sub-million-parameter model
for minutes against 300M parameters for days), so the orderings compare,
not the numbers.

Writes WORKDIR/<variant>/ (a `dqvq.train` stage-2 run each; a rerun
resumes, and a finished variant is only read back), WORKDIR/table7.json and
WORKDIR/table7.md. Last line: `table7=WORKDIR/table7.md`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from dqvq import checkpoint as ckpt_lib
from dqvq import config_lib
from dqvq.cpu import tuning as cpu_tuning  # defines --cpu_tuning
from dqvq.models import transformer as transformer_lib

FLAGS = flags.FLAGS

# Table 7's rows, top to bottom: each one's change to the paper's input
# layers (`config.model.*`).
VARIANTS: dict[str, dict[str, Any]] = {
    'paper': {},
    'non_shared_content': {'content_sharing': 'non_shared'},
    'shared_position': {'position_sharing': 'shared'},
    'no_granularity': {'granularity_embedding': False},
    'no_absolute_position': {'absolute_position_embedding': False},
}
# Paper Table 7: FID on FFHQ (lower is better), the same rows.
PAPER_FID = {'paper': 4.91, 'non_shared_content': 5.54,
             'shared_position': 18.28, 'no_granularity': 16.87,
             'no_absolute_position': 5.06}
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))), 'configs', 'demo.py')


def load_config(spec: str = '') -> ml_collections.ConfigDict:
  """`get_config(ARG)` of PATH[:ARG] (default: the repository's demo)."""
  path, _, arg = (spec or DEFAULT_CONFIG).partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config {path} does not exist; give a stage-2 '
                            'config file such as configs/demo.py.')
  module_spec = importlib.util.spec_from_file_location('table7_base', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  c = module.get_config(arg or None)
  if c.stage != 2:
    raise ValueError(f'{path} is a stage-{c.stage} config; Table 7 trains '
                     'DQ-Transformers (stage 2).')
  return c


def variant_config(base: ml_collections.ConfigDict, tokenizer_run: str,
                   name: str, steps: int) -> ml_collections.ConfigDict:
  """`base` on the trained tokenizer, with variant `name`'s input layers.

  Only the last state's validation is read, so no earlier evaluation,
  picture or save is due than the config's own or the last step; and no
  samples are drawn (the loss is the figure).
  """
  c = base.copy_and_resolve_references()
  c.tokenizer.stage1 = None  # trained already: stage 2 only
  c.tokenizer.workdir = os.path.abspath(tokenizer_run)
  c.model.update(VARIANTS[name])
  c.num_train_steps = steps
  for field in ('eval_every', 'image_every', 'checkpoint_every'):
    c[field] = min(c[field], steps)
  c.sample_images = 0
  return c


def _latest_meta(run_dir: str) -> tuple[int | None, dict[str, Any]]:
  """(newest step, its metadata) of a run; (None, {}) before its first save."""
  if not os.path.isdir(ckpt_lib.checkpoint_dir(run_dir)):
    return None, {}
  ckpt = ckpt_lib.Checkpointer(run_dir, save_every=0)
  try:
    step = ckpt.latest_step()
    return step, (ckpt.read_meta(step) if step is not None else {})
  finally:
    ckpt.close()


def final_validation(run_dir: str, steps: int) -> dict[str, float]:
  """The validation metrics stored with the run's last checkpoint.

  The loop evaluates the final state and saves them with it, so a finished
  run is read back without evaluating again.
  """
  step, meta = _latest_meta(run_dir)
  if step != steps:
    raise ValueError(f'{run_dir} ends at step {step}, not --steps {steps}: '
                     'give a fresh --workdir for another number of steps.')
  metrics = meta.get('metrics') or {}
  return {k.removeprefix('val/'): float(v) for k, v in metrics.items()
          if k.startswith('val/')}


def train_variant(config: ml_collections.ConfigDict, run_dir: str
                  ) -> dict[str, Any] | None:
  """Trains (or resumes) one variant; its figures, or None if it stopped
  early (SIGTERM, Ctrl-C): the remaining variants then wait for a rerun.

  A run begun for another number of steps is refused rather than resumed:
  its learning-rate schedule was another, so its loss would not compare.
  """
  from dqvq.trainers import loop  # pylint: disable=g-import-not-at-top
  _, meta = _latest_meta(run_dir)
  trained_for = (meta.get('config') or {}).get('num_train_steps')
  if trained_for not in (None, config.num_train_steps):
    raise ValueError(f'{run_dir} was started for {trained_for} steps, not '
                     f'--steps {config.num_train_steps}: give a fresh '
                     '--workdir for another number of steps.')
  state = loop.train_and_evaluate(config, run_dir)
  if int(state.step) < config.num_train_steps:
    return None
  row = final_validation(run_dir, config.num_train_steps)
  row['params'] = int(sum(np.prod(x.shape)
                          for x in jax.tree.leaves(state.params)))
  return row


def table7(tokenizer_run: str, workdir: str, steps: int, *,
           config: str = '', overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Every variant's final stage-2 validation loss (and parts) on one
  tokenizer, `steps` steps each.

  Args:
    tokenizer_run: a finished stage-1 run of the config's tokenizer (the
      demo's: `python -m dqvq.train --config configs/demo.py` writes one to
      WORKDIR/stage1).
    workdir: each variant trains in workdir/<variant>.
    steps: training steps of every variant.
    config: PATH[:ARG] of the stage-2 config (default: configs/demo.py).
    overrides: FIELD=VALUE changes to it before the variants' own.

  Returns:
    {'variants': {name: {'loss', 'position_loss', 'content_loss', ...,
    'params'}}, 'steps', 'tokenizer_run', 'config', 'set'}, and 'stopped'
    (the variant that stopped early) when not every variant finished.
  """
  base = load_config(config)
  config_lib.apply_overrides(base, overrides)
  results: dict[str, Any] = {
      'tokenizer_run': os.path.abspath(tokenizer_run), 'steps': steps,
      'config': config or DEFAULT_CONFIG, 'set': list(overrides),
      'variants': {}}
  for name in VARIANTS:
    run_dir = os.path.join(os.path.abspath(workdir), name)
    logging.info('table7: %s in %s', name, run_dir)
    row = train_variant(variant_config(base, tokenizer_run, name, steps),
                        run_dir)
    if row is None:
      results['stopped'] = name
      break
    results['variants'][name] = row
  return results


def _switch_cells(name: str) -> list[str]:
  """Table 7's first four columns for variant `name`."""
  layers = transformer_lib.input_layer_kwargs(VARIANTS[name])
  on = lambda v: '✓' if v else '✗'
  return [layers['content_sharing'].replace('_', '-'),
          layers['position_sharing'].replace('_', '-'),
          on(layers['granularity_embedding']),
          on(layers['absolute_position_embedding'])]


def markdown(results: dict[str, Any]) -> str:
  """The table beside the paper's Table 7 column."""
  rows = results['variants']
  paper_loss = rows.get('paper', {}).get('loss')
  fmt = lambda v: '-' if v is None else f'{v:.3f}'
  lines = [
      f'Stage-2 validation loss (nats per token: content CE + mean '
      f'per-granularity position CE) after {results["steps"]} steps on the '
      f'tokenizer {results["tokenizer_run"]} ({results["config"]}'
      f'{", " + " ".join(results["set"]) if results["set"] else ""}), one run '
      'per row at the same seed; FID from the paper\'s Table 7 (FFHQ, '
      'full-size models). Lower is better in both.',
      '',
      '| Content | Position | Granularity | Absolute position | paper FID ↓ '
      '| val loss ↓ | Δ vs paper row | position loss | content loss '
      '| params |',
      '|---|---|---|---|---:|---:|---:|---:|---:|---:|']
  for name in VARIANTS:
    row = rows.get(name)
    if row is None:
      cells = ['not run'] + [''] * 4
    else:
      delta = (None if paper_loss is None or name == 'paper'
               else row['loss'] - paper_loss)
      cells = [fmt(row['loss']),
               '-' if delta is None else f'{delta:+.3f}',
               fmt(row.get('position_loss')), fmt(row.get('content_loss')),
               f'{row["params"]:,}']
    lines.append('| ' + ' | '.join(
        _switch_cells(name) + [f'{PAPER_FID[name]:.2f}'] + cells) + ' |')
  if results.get('stopped'):
    lines += ['', f'Stopped early in {results["stopped"]}: rerun the same '
              'command to resume.']
  return '\n'.join(lines) + '\n'


def define_flags() -> None:
  """The CLI's flags; only when run as a script (dqvq.train and dqvq.study
  define --workdir too, and absl refuses a second definition)."""
  flags.DEFINE_string('tokenizer_run', None, 'A finished stage-1 run of the '
                      'config\'s tokenizer, e.g. /tmp/dqvq_demo/stage1.')
  flags.DEFINE_string('workdir', None, 'Runs and results go here.')
  flags.DEFINE_integer('steps', 240, 'Training steps of every variant (the '
                       'demo\'s stage 2 trains 240).')
  flags.DEFINE_string('config', '', 'PATH[:ARG] of the stage-2 config; '
                      'default: configs/demo.py.')
  flags.DEFINE_multi_string(
      'set', [], 'FIELD=VALUE on the config before each variant\'s own '
      'changes, e.g. --set num_eval_batches=2 (VALUE a Python literal, else '
      'a string).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.steps <= 0:
    raise app.UsageError('--steps must be positive.')
  # pylint: disable=g-import-not-at-top
  from dqvq import distributed
  from dqvq import metrics as metrics_lib
  # pylint: enable=g-import-not-at-top
  if not FLAGS['verbosity'].present:
    metrics_lib.quiet_console()  # dqvq's progress lines, as dqvq.train
  cpu_tuning.prepare_process()  # CPU runs only; may restart once
  distributed.initialize()
  workdir = os.path.abspath(FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  results = table7(FLAGS.tokenizer_run, workdir, FLAGS.steps,
                   config=FLAGS.config, overrides=FLAGS.set)
  from dqvq.eval import study_report  # pylint: disable=g-import-not-at-top
  study_report.write_tables(workdir, 'table7', results, markdown(results))


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['tokenizer_run', 'workdir'])
  app.run(main)
