"""2 processes x 4 CPU devices train like 1 process x 8 devices.

Both stages of the `:runlocal` demo run through `launch/local.sh` (real
processes on localhost, JAX's gloo CPU collectives, each host reading its
own data shard, Orbax checkpoints written by both) and, for reference,
`dqvq.train.run` in this process (8 fake devices). The logged losses
of every step must agree: the global batch, the sharding and the updates are
the same, only the process boundary differs.

Marked slow (not in the default run): `python -m pytest -m slow
tests/test_multihost.py`.
"""

import collections
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Short: no validation pass, pictures or samples, one checkpoint per stage.
OVERRIDES = []
for prefix in ('--config.', '--config.tokenizer.stage1.'):
  OVERRIDES += [f'{prefix}eval_every=100', f'{prefix}image_every=100',
                f'{prefix}checkpoint_every=2']
OVERRIDES += ['--config.sample_images=0']


def _env(data_dir: str, devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(DQVQ_DATA_DIR=data_dir, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             TF_CPP_MIN_LOG_LEVEL='3')
  return env


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from the TensorBoard event files of `workdir`."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  # pylint: enable=g-import-not-at-top
  out: dict[str, dict[int, float]] = collections.defaultdict(dict)
  for file in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    acc = event_accumulator.EventAccumulator(
        file, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    for tag in acc.Tags()['tensors']:
      for ev in acc.Tensors(tag):
        value = tensor_util.make_ndarray(ev.tensor_proto)
        if value.ndim == 0 and value.dtype.kind == 'f':  # scalars only
          out[tag][ev.step] = float(value)
  return dict(out)


@pytest.mark.slow  # three training runs of both stages: minutes on 2 cores
def test_two_processes_match_one(demo_data_dir, tmp_path):
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  args = ['--config', 'configs/demo.py:runlocal', *OVERRIDES]
  proc = subprocess.run(
      [os.path.join(ROOT, 'launch', 'local.sh'), '--num_processes', '2',
       '--devices_per_process', '4', '--python', sys.executable,
       '--port', '12391', '--logdir', str(tmp_path / 'logs'), '--',
       *args, '--workdir', multi],
      cwd=ROOT, env=_env(demo_data_dir, 4), capture_output=True, text=True,
      timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  # The reference: this pytest process has 8 CPU devices.
  from dqvq import train  # pylint: disable=g-import-not-at-top
  c = load_config('demo').get_config('runlocal')
  for stage_config in (c, c.tokenizer.stage1):
    stage_config.data.data_dir = demo_data_dir
    stage_config.eval_every = stage_config.image_every = 100
    stage_config.checkpoint_every = 2
  c.sample_images = 0
  train.run(c, single)
  log1 = open(tmp_path / 'logs' / 'process_1.log').read()
  assert 'Process 1 of 2; 4 local of 8 devices' in log1
  for stage, losses in (('stage1', ('train/l1_loss', 'train/loss')),
                        ('stage2', ('train/loss', 'train/content_loss'))):
    got = read_scalars(os.path.join(multi, stage))
    want = read_scalars(os.path.join(single, stage))
    for tag in losses:
      assert tag in want, sorted(want)
      assert sorted(got[tag]) == sorted(want[tag]) == [1, 2], tag
      np.testing.assert_allclose(
          [got[tag][s] for s in (1, 2)], [want[tag][s] for s in (1, 2)],
          rtol=2e-5, err_msg=f'{stage} {tag}')
    # Both hosts wrote the final checkpoint together.
    assert os.path.isdir(os.path.join(multi, stage, 'checkpoints', '2'))
