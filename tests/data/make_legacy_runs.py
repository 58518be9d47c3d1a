"""Writes tests/data/legacy_runs: tiny runs of the code before issue 16.

Made once, by commit 0629810, with
`PYTHONPATH=. python tests/data/make_legacy_runs.py /tmp/legacy/run` and the
stage1/ and stage2/ directories copied without their events and pictures.
tests/test_legacy_checkpoints.py checks that later code restores them to
the same weights and outputs; rerunning this with later code would only
test the later code against itself.
"""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from conftest import load_config  # pylint: disable=g-import-not-at-top
from dqvq.data import demo  # pylint: disable=g-import-not-at-top
from dqvq.inference import generator  # pylint: disable=g-import-not-at-top
from dqvq.inference import tokenizer  # pylint: disable=g-import-not-at-top
from dqvq import token_choice  # pylint: disable=g-import-not-at-top
from dqvq.trainers import loop  # pylint: disable=g-import-not-at-top


def main(out: str) -> None:
  data_dir = os.path.join(out, 'tfds')
  demo.load_demo(data_dir)
  c = load_config('demo').stage1_config('runlocal')
  c.data.data_dir = data_dir
  c.entropy_num_images = 32
  c.eval_every = c.image_every = 1000
  c.checkpoint_every = 2
  # A few channels and 16 codes: kilobytes of weights, every module kept.
  c.model.update(dict(ch=8, ch_mult=(1, 1, 1, 1), attn_factors=(),
                      z_channels=8, dec_ch=8, dec_ch_mult=(1, 1, 1),
                      codebook_size=16, codebook_dim=8, norm_groups=4))
  c.disc.ndf = 8
  loop.train_and_evaluate(c, os.path.join(out, 'stage1'))
  c2 = load_config('imagenet_stage2').get_config('runlocal,cfg=0.1')
  c2.tokenizer.workdir = os.path.join(out, 'stage1')
  c2.data.data_dir = data_dir
  c2.eval_every = c2.image_every = 1000
  c2.checkpoint_every = 2
  loop.train_and_evaluate(c2, os.path.join(out, 'stage2'))

  tok = tokenizer.load_stage1(os.path.join(out, 'stage1'))
  x = np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3))
  x = x.astype(np.float32)
  enc = tok.encode(x)
  gen = generator.load_run(os.path.join(out, 'stage2'))
  s = gen.sample(2, class_labels=[0, 1],
                 config=token_choice.SamplingConfig(greedy=True))
  np.savez(os.path.join(out, 'expected.npz'), image=x,
           codes=np.asarray(enc['codes']),
           grain_map=np.asarray(enc['grain_map']),
           recon=np.asarray(tok.decode(enc['codes'])),
           tokenizer_fingerprint=tok.fingerprint,
           generator_fingerprint=tokenizer.fingerprint(gen.params),
           content=s['content'], position=s['position'])


if __name__ == '__main__':
  main(sys.argv[1])
