"""Runs written by an older dqvq still load, to the same numbers.

`tests/data/legacy_runs` holds a tiny stage-1 and stage-2 run written by
commit 0629810 (before the package layout of issue 16) with
`tests/data/make_legacy_runs.py`, and the outputs that code computed from
them. Moving modules must keep the checkpoints' tree paths: a renamed
module or parameter would fail the restore, a changed computation the
comparison.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from dqvq.inference import generator
from dqvq.inference import tokenizer
from dqvq import token_choice

LEGACY = os.path.join(os.path.dirname(__file__), 'data', 'legacy_runs')


@pytest.fixture(scope='module')
def expected():
  return dict(np.load(os.path.join(LEGACY, 'expected.npz')))


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> str:
  """A copy: the stage-2 run names its tokenizer by a path that is gone."""
  dst = str(tmp_path_factory.mktemp('legacy') / 'run')
  shutil.copytree(LEGACY, dst)
  return dst


def test_old_tokenizer_checkpoint_loads_to_the_same_codes(runs, expected):
  tok = tokenizer.load_stage1(os.path.join(runs, 'stage1'))
  assert tok.fingerprint == str(expected['tokenizer_fingerprint'])
  out = tok.encode(expected['image'])
  np.testing.assert_array_equal(np.asarray(out['codes']), expected['codes'])
  np.testing.assert_array_equal(np.asarray(out['grain_map']),
                                expected['grain_map'])
  np.testing.assert_allclose(np.asarray(tok.decode(out['codes'])),
                             expected['recon'], atol=1e-5)


def test_old_generator_checkpoint_loads_beside_its_moved_tokenizer(
    runs, expected):
  gen = generator.load_run(os.path.join(runs, 'stage2'))
  assert tokenizer.fingerprint(gen.params) == str(
      expected['generator_fingerprint'])
  s = gen.sample(2, class_labels=[0, 1],
                 config=token_choice.SamplingConfig(greedy=True))
  np.testing.assert_array_equal(s['content'], expected['content'])
  np.testing.assert_array_equal(s['position'], expected['position'])


def test_generator_names_a_missing_tokenizer(runs, tmp_path):
  lone = tmp_path / 'elsewhere' / 'stage2'
  shutil.copytree(os.path.join(runs, 'stage2'), lone)
  with pytest.raises(FileNotFoundError, match='put the stage-1 run back'):
    generator.load_run(str(lone))
