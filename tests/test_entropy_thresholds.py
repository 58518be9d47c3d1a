"""The entropy table (`dqvq.data.entropy_table`) and its CLI, on tiny data.

The table is read through grain without TensorFlow; stage 1's 'auto' table
is the CLI's table for the same settings; and in two real processes on
localhost, process 0 scans while process 1 reads its file.
"""

import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from dqvq import config_lib
from dqvq.data import entropy_table
from dqvq.data import tfds_compat
from dqvq.data import transforms
from dqvq.models import entropy as E
from dqvq.tools import entropy_thresholds as cli
from dqvq.trainers import stage1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(40, 48), (48, 32), (32, 32), (36, 60), (32, 40)]


def tiny_images() -> list[np.ndarray]:
  """5 RGB images of mixed sizes: flat, some dark, one noisy quadrant."""
  rng = np.random.RandomState(0)
  images = []
  for i, (h, w) in enumerate(SIZES):
    img = np.full((h, w, 3), 20 * i, np.uint8)
    img[: h // 2, : w // 2] = rng.randint(0, 256, (h // 2, w // 2, 3))
    images.append(img)
  return images


def png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


class DqvqTinyEntropy(tfds_compat.ModuleCodePath,
                      tfds.core.GeneratorBasedBuilder):
  """`tiny_images` as an ArrayRecord TFDS dataset, in order."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo itself: dataset_info_from_configs looks for metadata files
    # in the builder's package, and a test module is none.
    image = tfds.features.Image(shape=(None, None, 3), encoding_format='png')
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,
        features=tfds.features.FeaturesDict({'image': image, 'flat': image}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, image in enumerate(tiny_images()):
      # 'flat': the image without its noisy quadrant (for --image_key).
      yield i, {'image': png(image),
                'flat': png(np.full_like(image, image[-1, -1, 0]))}


@pytest.fixture(scope='module')
def tiny_dataset(tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp('tfds'))
  tfds_compat.prepare_if_needed(
      DqvqTinyEntropy(data_dir=root, file_format='array_record'))
  return root


def run_cli(data_dir: str, out: str, *flags: str) -> dict:
  return cli.main([
      '--data_dir', data_dir, '--dataset', 'dqvq_tiny_entropy', '--split',
      'train', '--resolution', '32', '--region_size', '8', '--bin_range=0,1',
      '--num_images', '4', '--batch_size', '3', '--out', out, *flags])


def test_cli_writes_table_with_metadata(tiny_dataset, tmp_path):
  out = tmp_path / 'thr.json'
  result = run_cli(tiny_dataset, str(out))
  data = json.loads(out.read_text())
  keys = [k for k in data if k != 'metadata']
  assert keys == [str(k) for k in range(1, 100)]
  values = [data[k] for k in keys]
  assert all(b >= a for a, b in zip(values, values[1:]))
  assert values[-1] > values[0]  # the noisy quadrants are above the flat rest
  meta = data['metadata']
  assert meta['bin_range'] == [0.0, 1.0] and meta['num_bins'] == 32
  assert meta['num_images'] == 4 and meta['num_regions'] == 4 * 16
  assert meta['resolution'] == 32 and meta['region_size'] == 8
  assert meta['dataset'] == 'dqvq_tiny_entropy' and meta['split'] == 'train'
  assert meta['preprocessing'] == entropy_table.PREPROCESSING
  table, loaded_meta = E.load_thresholds(str(out))
  assert table == result['table'] and loaded_meta == meta
  assert os.listdir(tmp_path) == ['thr.json']  # no temporary file left

  # Same numbers as region_entropy on the first 4 images preprocessed
  # directly, in order: the padded last batch (1 real image of 3) and the
  # fifth image were left out.
  prep = transforms.EvalPreprocess(32)
  batch = transforms.to_model_range(np.stack(
      [prep.map({'image': img})['image'] for img in tiny_images()[:4]]))
  ent = E.region_entropy(batch, 8, bin_range=(0.0, 1.0))
  assert table == E.compute_entropy_thresholds(np.asarray(ent))


def test_image_key_picks_the_feature(tiny_dataset, tmp_path):
  image = run_cli(tiny_dataset, str(tmp_path / 'a.json'))
  flat = run_cli(tiny_dataset, str(tmp_path / 'b.json'), '--image_key=flat')
  assert flat['metadata'] == image['metadata']
  assert flat['table']['99'] < image['table']['99']  # no noisy quadrant
  with pytest.raises(ValueError, match='no feature .nosuch.*image, flat'):
    run_cli(tiny_dataset, str(tmp_path / 'c.json'), '--image_key=nosuch')


def test_table_is_read_without_tensorflow(tiny_dataset, tmp_path):
  """A fresh process computes the same table and never imports TensorFlow
  (it also finds the dataset from its files: the builder is not defined)."""
  out = str(tmp_path / 'sub.json')
  code = ('import sys\n'
          'from dqvq.tools import entropy_thresholds as cli\n'
          'cli.main(sys.argv[1:])\n'
          "print('TF', 'tensorflow' in sys.modules)\n")
  # This process's XLA flags (tests/conftest.py): other flags may fuse the
  # entropies differently and round their last bits otherwise.
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, '-c', code, '--data_dir', tiny_dataset, '--dataset',
       'dqvq_tiny_entropy', '--resolution', '32', '--region_size', '8',
       '--bin_range=0,1', '--num_images', '4', '--batch_size', '3', '--out',
       out], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'TF False' in proc.stdout
  expected = run_cli(tiny_dataset, str(tmp_path / 'here.json'))
  assert E.load_thresholds(out) == (expected['table'], expected['metadata'])


def test_preprocess_matches_torchvision_geometry():
  img = np.zeros((40, 80, 3), np.uint8)
  img[:, 30:50] = 255  # bright centre band survives the centre crop
  out = transforms.to_model_range(
      transforms.EvalPreprocess(16).map({'image': img})['image'])
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  assert out.min() >= -1.0 and out.max() <= 1.0
  # Resize 40x80 -> 16x32, crop columns 8..24: band 12..20 is in the middle.
  np.testing.assert_allclose(out[:, 7:9].mean(), 1.0, atol=1e-6)
  np.testing.assert_allclose(out[:, 0], -1.0, atol=1e-6)


def test_cli_rejects_bad_flags(tmp_path):
  out = str(tmp_path / 'a.json')
  for bad in (['--resolution', '30', '--region_size', '8'],
              ['--bin_range=1,0'], ['--num_images', '-1'],
              ['--batch_size', '0']):
    with pytest.raises(SystemExit):
      cli.main(['--dataset', 'x', *bad, '--out', out])
  assert not os.path.exists(out)


def test_missing_dataset_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='--download'):
    entropy_table.open_split('dqvq_tiny_entropy', 'train',
                             data_dir=str(tmp_path))


def test_stage1_auto_table_is_the_cli_table(demo_data_dir, tmp_path):
  """`resolve_entropy_thresholds` passes the config's settings through: its
  table is the CLI's for the same train images."""
  c = config_lib.stage1_config('runlocal,entropy')
  assert c.entropy_num_images == 0  # declared, so the command line sets it
  c.entropy_num_images = 3
  c.model.entropy_thresholds = 'auto'
  c.model.grain_factors = (8, 4)
  c.model.entropy_bin_range = (0.0, 1.0)
  c.data.update(name='dqvq_demo', data_dir=demo_data_dir, resolution=32)
  stage1.resolve_entropy_thresholds(c, str(tmp_path))
  assert c.model.entropy_thresholds == str(tmp_path /
                                           'entropy_thresholds.json')
  want = cli.main([
      '--data_dir', demo_data_dir, '--dataset', 'dqvq_demo', '--split',
      'train', '--resolution', '32', '--region_size', '8', '--bin_range=0,1',
      f'--num_bins={c.model.entropy_num_bins}',
      f'--sigma={c.model.entropy_sigma}', '--num_images', '3', '--out',
      str(tmp_path / 'cli.json')])
  assert E.load_thresholds(c.model.entropy_thresholds) == (
      want['table'], want['metadata'])


# One host of a 2-process run: stage 1's 'auto' table for a dataset that does
# not exist, then twice (start, resume) for the demo. Prints, per call, the
# error or the table path and how many scans this process ran.
_HOST = r'''
import json, sys
from dqvq import distributed
address, index, data_dir, workdir = sys.argv[1:]
distributed.initialize(address, 2, int(index))
import ml_collections
from dqvq.data import entropy_table
from dqvq.trainers import stage1
scans = []
scan = entropy_table.compute_table
entropy_table.compute_table = lambda *a, **k: scans.append(1) or scan(*a, **k)
calls = []
for dataset, where in (('nosuch', '/bad'), ('dqvq_demo', ''),
                       ('dqvq_demo', '')):
  c = ml_collections.ConfigDict({
      'model': {'router': 'entropy', 'entropy_thresholds': 'auto',
                'grain_factors': (8, 4)},
      'data': {'data_dir': data_dir, 'name': dataset, 'train_split': 'train',
               'resolution': 32},
      'entropy_num_images': 2})
  try:
    stage1.resolve_entropy_thresholds(c, workdir + where)
    calls.append({'path': c.model.entropy_thresholds, 'scans': len(scans)})
  except Exception as e:
    calls.append({'error': type(e).__name__, 'scans': len(scans)})
print('CALLS', json.dumps(calls))
'''


def test_two_hosts_scan_once(demo_data_dir, tmp_path):
  """Process 0 computes and writes the table; process 1 waits and reads it.

  A failure on process 0 reaches process 1 as an error (no host is left in
  the barrier), and a resumed run scans nothing.
  """
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3')
  workdir = str(tmp_path / 'run')
  hosts = [subprocess.Popen(
      [sys.executable, '-c', _HOST, address, str(i), demo_data_dir, workdir],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outputs = [host.communicate(timeout=300) for host in hosts]
  finally:
    for host in hosts:  # one that failed leaves the other in a collective
      if host.poll() is None:
        host.kill()
  calls = []
  for host, (out, err) in zip(hosts, outputs):
    assert host.returncode == 0, out[-2000:] + err[-3000:]
    calls.append(json.loads(out.split('CALLS', 1)[1]))
  path = os.path.join(workdir, 'entropy_thresholds.json')
  (bad0, first0, resumed0), (bad1, first1, resumed1) = calls
  assert bad0 == {'error': 'ValueError', 'scans': 0}  # unknown dataset
  assert bad1 == {'error': 'RuntimeError', 'scans': 0}
  assert first0 == resumed0 == {'path': path, 'scans': 1}
  assert first1 == resumed1 == {'path': path, 'scans': 0}
  assert sorted(os.listdir(workdir)) == ['entropy_thresholds.json']
  table, meta = E.load_thresholds(path)
  assert meta['num_images'] == 2 and meta['resolution'] == 32
  assert len(table) == 99
