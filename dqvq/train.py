"""Entry point: `python -m dqvq.train --config configs/NAME.py --workdir DIR`.

Trains the stage named by `config.stage`, resuming from DIR's checkpoints.
Any config field can be overridden: `--config.batch_size=64`,
`--config.model.grain_ratios='(0.7,0.3)'`.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/demo.py or configs/x.py:runlocal.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, summaries, '
                               'pictures go here; an existing run resumes.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Lazy imports so `--help` is fast and flags parse before jax initialises.
  from dqvq.trainers import loop  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  logging.info('JAX: %d processes, %d devices (%s).', jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  if config.stage != 1:
    raise app.UsageError(f'config.stage={config.stage}: only stage 1 is built '
                         'so far.')
  loop.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  app.run(main)
