r"""What a preemption costs: the stop (SIGTERM to saved) and the restart.

Schedulers (Slurm, Kubernetes, Cloud TPU) send SIGTERM some seconds before
they kill a job; the save must land inside that window. A stop is seen at
the next step the host dispatches, but the save waits for every step the
host has already queued on the device (asynchronous dispatch). With no bound
(`steps_in_flight=0`) the queue is up to `log_every` steps long; the default
bound of 1 keeps it at one or two.

This trains the demo's stage 1 (`python -m dqvq.train --config
configs/demo.py`, the README's first command) in a subprocess per setting and
sends SIGTERM `--delay_s` seconds after the progress line of `--signal_at`
(mid-interval: right at the line the host has just synced and queued
nothing). Per run it prints the seconds from the signal to the process's
exit, the step it saved, and the steps/s the progress line reported before
the signal (the bound must not slow training). Settings alternate over
`--rounds` so that load on the machine hits both alike.

  python benchmarks/stop_latency.py --workdir W [--settings 0,1] \
      [--rounds 2] [--signal_at 40] [--delay_s 5] [--resume_from 20]

With `--resume_from S`, each run first trains to step S and stops there
(untimed), and the timed run resumes from that checkpoint, as a job
restarted after a preemption does. Its stop must not compile anything (the
save's probe of the state needs the validation program, which a resumed run
compiles at its start), and it also reports the seconds from its launch to
the `--signal_at` progress line. A setting `N+cache` runs with
`JAX_COMPILATION_CACHE_DIR` set (W/jax_cache, kept over the rounds, so warm
after the first run): the restart loads its compiled programs instead of
compiling them (`--settings 1,1+cache`).

Last line: `median_exit_s=` per setting (and `median_launch_s=` on resume).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Sequence

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Runs go here (each deleted before it '
                    'starts; the compilation cache jax_cache/ is kept).')
flags.DEFINE_list('settings', ['0', '1'], 'steps_in_flight values, each '
                  'optionally with "+cache" (a persistent compilation cache).')
flags.DEFINE_integer('rounds', 2, 'Runs per setting, alternating.')
flags.DEFINE_integer('signal_at', 40, 'SIGTERM once this step is logged '
                     '(a multiple of the demo\'s log_every, 20).')
flags.DEFINE_float('delay_s', 5.0, 'Seconds from that line to the signal.')
flags.DEFINE_integer('resume_from', 0, '>0: train to this step first, and '
                     'time the run that resumes from it.')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(workdir: str, in_flight: int, signal_at: int, delay_s: float,
            resume_from: int = 0,
            cache_dir: str | None = None) -> dict[str, float]:
  """Trains until `signal_at` (from `resume_from`), signals, times the stop."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, '-m', 'dqvq.train', '--config', 'configs/demo.py',
         '--workdir', workdir,
         f'--config.tokenizer.stage1.steps_in_flight={in_flight}']
  env = dict(os.environ)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  if cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  if resume_from:
    first = subprocess.run(
        cmd + [f'--config.tokenizer.stage1.stop_at_step={resume_from}'],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, check=False)
    if first.returncode != 0 or 'Stopped at step' not in first.stdout:
      raise RuntimeError(f'rc={first.returncode}, no stop at {resume_from}:'
                         f'\n{first.stdout[-3000:]}')
  launched = time.monotonic()
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  rate, lines = None, []
  for line in proc.stdout:
    lines.append(line)
    m = re.search(rf'step {signal_at}/\d+ .*\| ([\d.]+) steps/s', line)
    if m:
      rate = float(m.group(1))
      break
  if rate is None:
    proc.wait()
    raise RuntimeError('training ended before step '
                       f'{signal_at}:\n' + ''.join(lines[-30:]))
  launch_s = time.monotonic() - launched
  time.sleep(delay_s)  # the console pipe holds a few lines meanwhile
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  rest = proc.stdout.read()
  rc = proc.wait()
  exit_s = time.monotonic() - sent
  m = re.search(r'Stopped at step (\d+)/', rest)
  if rc != 0 or not m:
    raise RuntimeError(f'rc={rc}, no stop line:\n{rest[-3000:]}')
  return {'exit_s': exit_s, 'saved_step': int(m.group(1)),
          'steps_per_s': rate, 'launch_s': launch_s}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.resume_from and FLAGS.resume_from >= FLAGS.signal_at:
    raise app.UsageError(f'--resume_from ({FLAGS.resume_from}) must be below '
                         f'--signal_at ({FLAGS.signal_at}).')
  settings = {}
  for s in FLAGS.settings:
    depth, _, cache = s.partition('+')
    if not depth.isdigit() or cache not in ('', 'cache'):
      raise app.UsageError(f'--settings takes N or N+cache, got {s!r}.')
    settings[s] = (int(depth), cache == 'cache')
  cache_dir = os.path.join(FLAGS.workdir, 'jax_cache')
  results: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
  for r in range(FLAGS.rounds):
    for s, (depth, cache) in settings.items():
      res = one_run(os.path.join(FLAGS.workdir, f'in_flight_{s}'), depth,
                    FLAGS.signal_at, FLAGS.delay_s, FLAGS.resume_from,
                    cache_dir if cache else None)
      results[s].append(res)
      resumed = (f' (resumed at {FLAGS.resume_from}, that line '
                 f'{res["launch_s"]:.1f} s after the launch)'
                 if FLAGS.resume_from else '')
      print(f'round {r} steps_in_flight={s}: SIGTERM {FLAGS.delay_s:g} s '
            f'after step {FLAGS.signal_at}{resumed} -> exit in '
            f'{res["exit_s"]:.1f} s, saved step {res["saved_step"]}, '
            f'{res["steps_per_s"]:.2f} steps/s before', flush=True)
  medians = ['exit_s'] + (['launch_s'] if FLAGS.resume_from else [])
  print(' '.join(f'median_{k}=' + ','.join(
      f'{s}:{statistics.median(r[k] for r in runs):.1f}'
      for s, runs in results.items()) for k in medians))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
