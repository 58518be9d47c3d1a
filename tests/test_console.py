"""What `python -m dqvq.train` prints: quiet by default, errors alone.

The console of a real training run (at most ~3 lines per logging step, the
summary) is checked in test_preemption.py, on the run it signals.
"""

import logging
import os
import subprocess

from dqvq import metrics
from dqvq import train

import test_train  # pylint: disable=g-bad-import-order


def _record(pathname: str, level: int, msg: str = 'hello') -> logging.LogRecord:
  return logging.LogRecord('absl', level, pathname, 1, msg, None, None)


def test_quiet_console_shows_own_info_and_every_warning():
  keep = metrics._OwnInfoFilter().filter  # pylint: disable=protected-access
  own = os.path.join(os.path.dirname(metrics.__file__), 'trainers', 'loop.py')
  orbax = '/venv/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert keep(_record(own, logging.INFO))
  assert not keep(_record(own, logging.DEBUG))
  assert not keep(_record(orbax, logging.INFO))  # 26 of these per step
  assert keep(_record(orbax, logging.WARNING))
  fmt = metrics._ConsoleFormatter()  # pylint: disable=protected-access
  line = fmt.format(_record(own, logging.INFO, 'step 3/8 | loss 0.5'))
  assert line.endswith(' step 3/8 | loss 0.5') and len(line) == 28
  assert ' WARNING: disk' in fmt.format(_record(orbax, logging.WARNING, 'disk'))


def test_next_command_after_each_stage(demo_data_dir):
  stage1 = test_train.tiny(demo_data_dir, 'ffhq_stage1')
  assert train.next_command(stage1, '/runs/tok').startswith(
      'python -m dqvq.train --config configs/<dataset>_stage2.py --workdir '
      '/runs/tok_stage2 --config.tokenizer.workdir=/runs/tok')
  stage1.stage = 2
  assert train.next_command(stage1, '/runs/gen') == (
      'python -m dqvq.sample --workdir /runs/gen --num_images 16 --out '
      '/runs/gen/samples')


def test_user_errors_print_their_message_alone_with_exit_code_2(tmp_path):
  empty_tokenizer = tmp_path / 'tokenizer'
  os.makedirs(empty_tokenizer / 'checkpoints')
  cases = {  # the command's overrides -> the message's start
      ('imagenet_stage1.py:runlocal,bogus',):
          f'Flags parsing error: flag --config={test_train.ROOT}/configs/'
          "imagenet_stage1.py:runlocal,bogus: Unknown config argument 'bogus'",
      ('imagenet_stage1.py:runlocal', '--config.num_train_steps=0'):
          'ValueError: config.num_train_steps must be positive, got 0.',
      ('imagenet_stage2.py:runlocal',
       f'--config.tokenizer.workdir={empty_tokenizer}'):
          f'FileNotFoundError: {empty_tokenizer}/checkpoints holds no '
          'finished checkpoint.',
  }
  procs = {args: subprocess.Popen(  # at once: each is mostly imports
      test_train.cli_command(args[0], tmp_path / 'run', *args[1:]),
      cwd=test_train.ROOT, env=test_train.cli_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for args in cases}
  for args, expected in cases.items():
    out, _ = procs[args].communicate(timeout=300)
    lines = out.strip().splitlines()
    assert procs[args].returncode == 2, out[-3000:]
    assert not [l for l in lines if 'Traceback' in l], out[-3000:]
    # The message is the last thing printed (absl's help hint after a flag
    # error aside), with nothing from Orbax's threads behind it.
    last = lines[-2] if lines[-1].startswith('Pass --helpshort') else lines[-1]
    assert last.startswith(expected), out[-3000:]
