"""Entry point: `python -m dqvq.train --config configs/NAME.py --workdir DIR`.

Trains the stage named by `config.stage`, resuming from DIR's checkpoints
(the demo config trains both stages, in DIR/stage1 and DIR/stage2).
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

from dqvq import distributed
from dqvq import host_allocator

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/demo.py or configs/x.py:runlocal.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, summaries, '
                               'pictures go here; an existing run resumes.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  distributed.initialize()  # before anything touches a device
  config = _CONFIG.value
  workdir = os.path.abspath(_WORKDIR.value)
  logging.info('JAX: %d processes, %d devices (%s).', jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  run(config, workdir)


def run(config, workdir: str) -> None:
  """Trains what `config` names; a stage-2 config that carries its own
  tokenizer config (`config.tokenizer.stage1`, as the demo does) trains that
  first in `workdir/stage1` and itself in `workdir/stage2`. Both resume.
  With `config.sample_images` > 0, stage 2 then writes that many samples
  (`python -m dqvq.sample` with `config.sampling` and
  `config.sample_class_labels`) to `workdir/samples`."""
  from dqvq import config_lib  # pylint: disable=g-import-not-at-top
  from dqvq import run_guards  # pylint: disable=g-import-not-at-top
  from dqvq.trainers import loop  # pylint: disable=g-import-not-at-top
  stage1_config = (config.tokenizer.get('stage1') if config.stage == 2
                   else None)
  if stage1_config is not None:
    # Every check of both stages before the first one trains.
    config_lib.validate_config(config, tokenizer_ready=False)
    stage1_dir = config.tokenizer.workdir or os.path.join(workdir, 'stage1')
    run_guards.check_writable(
        *(os.path.join(d, sub) for d in (stage1_dir,
                                          os.path.join(workdir, 'stage2'))
          for sub in ('', 'checkpoints')))
    logging.info('Stage 1 (tokenizer) in %s.', stage1_dir)
    loop.train_and_evaluate(stage1_config, stage1_dir)
    with config.unlocked():
      config.tokenizer.workdir = stage1_dir
    workdir = os.path.join(workdir, 'stage2')
    logging.info('Stage 2 (transformer) in %s.', workdir)
  loop.train_and_evaluate(config, workdir)
  if config.stage == 2 and config.get('sample_images', 0):
    # pylint: disable=g-import-not-at-top
    from dqvq import sample
    # pylint: enable=g-import-not-at-top
    out = os.path.join(os.path.dirname(workdir) if stage1_config is not None
                       else workdir, 'samples')
    logging.info('Sampling %d images into %s.', config.sample_images, out)
    sample.run(out=out, num_images=config.sample_images,
               config=config_lib.sampling_config(config),
               class_labels=tuple(config.get('sample_class_labels', ())),
               workdir=workdir)


if __name__ == '__main__':
  host_allocator.reexec_with_huge_pages()
  app.run(main)
