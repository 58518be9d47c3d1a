"""Entry point: `python -m dqvq.train --config configs/NAME.py --workdir DIR`.

Trains the stage named by `config.stage`, resuming from DIR's checkpoints
(the demo config trains both stages, in DIR/stage1 and DIR/stage2).
Any config field can be overridden: `--config.batch_size=64`,
`--config.model.grain_ratios='(0.7,0.3)'`.

What the user sees, and why:
- The console shows dqvq's own lines: one short progress line per logging
  step, the validations, and an end-of-run summary with the next command to
  run. Orbax's, TFDS's and clu's INFO lines (26 per progress line before)
  are hidden; absl's `--verbosity=0` (or `-v 0`, or higher) shows them all.
- SIGTERM and Ctrl-C save a checkpoint at the next step boundary and exit 0;
  a second Ctrl-C exits at once.
- A mistake of the user's (a bad config or flag, a missing or unwritable
  directory, a checkpoint that does not restore) prints its message alone,
  with exit code 2; a diverged run (nothing diverged is saved) exit code 3.
  The traceback is logged at debug level (`-v 1` shows it). Errors raised
  outside dqvq (a bug) keep their traceback.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dqvq.cpu import tuning as cpu_tuning
from dqvq import distributed

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/demo.py or configs/x.py:runlocal.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, summaries, '
                               'pictures go here; an existing run resumes.')
flags.mark_flags_as_required(['config', 'workdir'])

USAGE_ERROR = 2       # a bad config, flag, directory or checkpoint
DIVERGED_ERROR = 3    # the run diverged; its last good checkpoint is kept
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _exit_with_message(message: str, code: int) -> NoReturn:
  """Prints `message` as the last line and exits at once with `code`.

  `os._exit` rather than `sys.exit`: an Orbax manager that dqvq did not get
  to close (a tokenizer's, when loading it failed) would otherwise still be
  cleaning up in a background thread during interpreter shutdown and print
  "cannot schedule new futures after interpreter shutdown" after the
  message. Everything that must reach disk is closed before this (the loop
  waits for its checkpoint writes and closes its writer on every way out).
  """
  logging.flush()
  sys.stdout.flush()
  print(message, file=sys.stderr, flush=True)
  os._exit(code)  # pylint: disable=protected-access


def _raised_by_dqvq(error: BaseException) -> bool:
  """Whether the innermost frame of `error` is dqvq code (our own checks
  raise messages meant for the user; a ValueError from inside jax is a bug
  whose traceback matters)."""
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and os.path.abspath(
      frames[-1].filename).startswith(_PACKAGE_DIR)


def _user_errors() -> tuple[type[BaseException], ...]:
  # pylint: disable-next=g-import-not-at-top
  from dqvq import checkpoint as ckpt_lib
  return (ValueError, OSError, ckpt_lib.CheckpointRestoreError)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config error as one clean message.

  A config file's own ValueError (`configs/x.py:bogus`) reaches absl as a
  message holding its whole traceback, and overriding a field that does not
  exist (`--config.model.typo=1`) as a KeyError traceback; both become the
  message alone.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    flag, traced, trace = text.partition(': Error whilst parsing config file')
    if traced:
      # The last line of the embedded traceback is 'SomeError: message'.
      last = [l for l in trace.splitlines() if l.strip()][-1].strip()
      text = f'{flag}: {last.split(": ", 1)[-1]}'
    _exit_with_message(f'Flags parsing error: {text}\nPass --helpshort or '
                       '--helpfull to see help on flags.', USAGE_ERROR)
  except OSError as e:  # the config file does not load
    _exit_with_message(f'{type(e).__name__}: {e}', USAGE_ERROR)
  except (AttributeError, KeyError) as e:
    name = re.sub(r'^\W+|\W+$', '', str(e))
    given = [a for a in argv[1:] if a.startswith('--config.') and name in a]
    _exit_with_message(
        f'Unknown config field {name!r} in '
        f'{" ".join(given) or "a --config override"}: check the spelling '
        'against the config file (every field exists there, with a comment).',
        USAGE_ERROR)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # pylint: disable-next=g-import-not-at-top
    from dqvq import metrics as metrics_lib
    metrics_lib.quiet_console()
  try:
    config = _CONFIG.value
    config.get('stage')  # ml_collections defers a file's load error to a read
  except OSError as e:
    _exit_with_message(f'{type(e).__name__}: {e}', USAGE_ERROR)
  try:
    cpu_tuning.prepare_process()  # CPU runs only; may restart once
    distributed.initialize()  # before anything touches a device
    workdir = os.path.abspath(_WORKDIR.value)
    logging.info('JAX: %d processes, %d devices (%s).', jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform)
    run(config, workdir)
  except KeyboardInterrupt:
    # A Ctrl-C before the training loop trapped it (or after it): nothing of
    # the run's is lost that a checkpoint held.
    _exit_with_message('Interrupted.', 128 + 2)
  except Exception as e:  # pylint: disable=broad-exception-caught
    # pylint: disable-next=g-import-not-at-top
    from dqvq import checkpoint as ckpt_lib
    if isinstance(e, ckpt_lib.DivergenceError):
      code = DIVERGED_ERROR
    elif isinstance(e, _user_errors()) and _raised_by_dqvq(e):
      code = USAGE_ERROR
    else:
      raise
    logging.debug('The error was raised here:', exc_info=True)
    _exit_with_message(f'{type(e).__name__}: {e}', code)


def next_command(config, workdir: str) -> str | None:
  """What to run after a finished run of `config` in `workdir`."""
  if config.stage == 1:
    config_file = config_flags.get_config_filename(flags.FLAGS['config']) if (
        flags.FLAGS.is_parsed()) else ''
    stage2_file = config_file.replace('_stage1.py', '_stage2.py')
    if stage2_file == config_file or not os.path.exists(
        stage2_file.split(':', 1)[0]):
      stage2_file = 'configs/<dataset>_stage2.py'
    return (f'python -m dqvq.train --config {stage2_file} --workdir '
            f'{workdir}_stage2 --config.tokenizer.workdir={workdir}   # the '
            f'generator on this tokenizer (python -m dqvq.evaluate --workdir '
            f'{workdir} measures it)')
  return (f'python -m dqvq.sample --workdir {workdir} --num_images 16 --out '
          f'{os.path.join(workdir, "samples")}')


def _finished(config, state: Any) -> bool:
  return int(state.step) >= config.num_train_steps


def run(config, workdir: str) -> None:
  """Trains what `config` names; a stage-2 config that carries its own
  tokenizer config (`config.tokenizer.stage1`, as the demo does) trains that
  first in `workdir/stage1` and itself in `workdir/stage2`. Both resume.
  With `config.sample_images` > 0, stage 2 then writes that many samples
  (`python -m dqvq.sample` with `config.sampling` and
  `config.sample_class_labels`) to `workdir/samples`. A run stopped early
  (SIGTERM, Ctrl-C, `stop_at_step`) does nothing after its stop."""
  from dqvq import config_lib  # pylint: disable=g-import-not-at-top
  from dqvq import run_guards  # pylint: disable=g-import-not-at-top
  from dqvq.trainers import checks  # pylint: disable=g-import-not-at-top
  from dqvq.trainers import loop  # pylint: disable=g-import-not-at-top
  stage1_config = (config.tokenizer.get('stage1') if config.stage == 2
                   else None)
  if stage1_config is not None:
    # Every check of both stages before the first one trains.
    checks.validate_config(config, tokenizer_ready=False)
    stage1_dir = config.tokenizer.workdir or os.path.join(workdir, 'stage1')
    run_guards.check_writable(
        *(os.path.join(d, sub) for d in (stage1_dir,
                                          os.path.join(workdir, 'stage2'))
          for sub in ('', 'checkpoints')))
    logging.info('Stage 1 (tokenizer) in %s.', stage1_dir)
    if not _finished(stage1_config,
                     loop.train_and_evaluate(stage1_config, stage1_dir)):
      return  # stage 2 must not start on a half-trained tokenizer
    with config.unlocked():
      config.tokenizer.workdir = stage1_dir
    workdir = os.path.join(workdir, 'stage2')
    logging.info('Stage 2 (transformer) in %s.', workdir)
  if not _finished(config, loop.train_and_evaluate(config, workdir)):
    return
  if config.stage == 2 and config.get('sample_images', 0):
    # pylint: disable=g-import-not-at-top
    from dqvq.inference import generator as generator_lib
    # pylint: enable=g-import-not-at-top
    out = os.path.join(os.path.dirname(workdir) if stage1_config is not None
                       else workdir, 'samples')
    logging.info('Sampling %d images into %s.', config.sample_images, out)
    generator_lib.sample_to_dir(
        generator_lib.load_run(workdir), out, config.sample_images,
        config=config_lib.sampling_config(config),
        class_labels=tuple(config.get('sample_class_labels', ())))
    logging.info('Samples: %s (grid.png, images/, previews/).', out)
  logging.info('Next: %s', next_command(config, workdir))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
