"""`python -m dqvq.evaluate --codec_images N`: measured bits of real files.

The generator evaluation codes its first held-out images as .dqvq files
(issue 17) and reports their size beside the fixed-rate count and the
transformer's cross-entropy. Two cheap evaluations of conftest's 2-step
class-conditional stage-2 run (8 images, 8 samples, no Inception): one
coding 4 images, one with the codec off.
"""

from __future__ import annotations

import json
import os

import pytest

from dqvq import evaluate

CODEC_IMAGES = 4
RESOLUTION = 32  # the demo's :runlocal images


def _evaluate(stage2_workdir: str, demo_data_dir: str, out: str,
              codec_images: int) -> dict:
  return evaluate.run(evaluate.EvalOptions(
      workdir=stage2_workdir, data_dir=demo_data_dir, num_images=8,
      num_samples=8, batch_size=8, num_pictures=0, out=out,
      tensorboard=False, codec_images=codec_images))


@pytest.fixture(scope='module')
def with_codec(stage2_workdir, demo_data_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('codec_eval'))
  return _evaluate(stage2_workdir, demo_data_dir, out, CODEC_IMAGES), out


def test_codec_figures_in_the_json(with_codec):
  payload, out = with_codec
  with open(os.path.join(out, 'metrics.json')) as f:
    m = json.load(f)['metrics']
  assert m == payload['metrics']
  assert m['codec_images'] == CODEC_IMAGES
  assert m['codec_round_trip_exact'] is True
  pixels = RESOLUTION ** 2
  for key in ('codec_bpp', 'codec_payload_bpp', 'codec_cross_entropy_bpp',
              'codec_fixed_rate_bpp'):
    assert m[key] > 0, key
  # The whole file is the payload plus the fixed-size header.
  assert m['codec_bpp'] == pytest.approx(
      m['codec_payload_bpp'] + m['codec_header_bits'] / pixels)
  # The range coder costs at most 1% over the model's cross-entropy, plus
  # up to one byte per file (the files' granularity).
  payload_bpp, ce_bpp = m['codec_payload_bpp'], m['codec_cross_entropy_bpp']
  assert abs(payload_bpp - ce_bpp) <= 0.01 * ce_bpp + 8 / pixels, m
  assert m['codec_payload_over_cross_entropy'] == pytest.approx(
      payload_bpp / ce_bpp)
  assert m['codec_max_payload_over_cross_entropy'] >= (
      m['codec_payload_over_cross_entropy'] - 1e-9)


def test_codec_images_zero_leaves_them_out(stage2_workdir, demo_data_dir,
                                           tmp_path):
  payload = _evaluate(stage2_workdir, demo_data_dir, str(tmp_path), 0)
  assert 'data_code_length_mean' in payload['metrics']
  assert not [k for k in payload['metrics'] if k.startswith('codec_')]


def test_negative_codec_images_refused(stage2_workdir, demo_data_dir,
                                       tmp_path):
  with pytest.raises(ValueError, match='codec_images'):
    _evaluate(stage2_workdir, demo_data_dir, str(tmp_path), -1)
