"""End-to-end test of the entropy threshold CLI on a tiny TFDS dataset.

Also the table of a 'auto' stage-1 run in two real processes on localhost:
process 0 scans, process 1 reads its file.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from dqvq.tools import entropy_thresholds as cli
from dqvq.models import entropy as E


@pytest.fixture(scope='module')
def tiny_dataset(tmp_path_factory):
  """5 RGB images of mixed sizes and content, stored as a TFDS dataset.

  Written as TFRecords plus `write_metadata` rather than through a builder's
  `download_and_prepare`, which needs the optional `importlib_resources`
  package (etils[epath]) only to look for download checksums.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('tfds')
  version_dir = root / 'dqvq_tiny_entropy' / '1.0.0'
  version_dir.mkdir(parents=True)
  features = tfds.features.FeaturesDict(
      {'image': tfds.features.Image(shape=(None, None, 3))})
  rng = np.random.RandomState(0)
  images = []
  shard = version_dir / 'dqvq_tiny_entropy-train.tfrecord-00000-of-00001'
  with tf.io.TFRecordWriter(str(shard)) as writer:
    for i, (h, w) in enumerate([(40, 48), (48, 32), (32, 32), (36, 60),
                                (32, 40)]):
      img = np.full((h, w, 3), 20 * i, np.uint8)  # flat, some dark
      img[: h // 2, : w // 2] = rng.randint(0, 256, (h // 2, w // 2, 3))
      images.append({'image': img})
      writer.write(features.serialize_example(images[-1]))
  tfds.folder_dataset.write_metadata(
      data_dir=str(version_dir), features=features, split_infos=None)
  return str(root), images


def test_cli_writes_table_with_metadata(tiny_dataset, tmp_path):
  data_dir, images = tiny_dataset
  out = tmp_path / 'thr.json'
  result = cli.main([
      '--data_dir', data_dir, '--dataset', 'dqvq_tiny_entropy', '--split',
      'train', '--resolution', '32', '--region_size', '8', '--bin_range=0,1',
      '--num_images', '4', '--batch_size', '3', '--out', str(out)])
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
  table, loaded_meta = E.load_thresholds(str(out))
  assert table == result['table'] and loaded_meta == meta

  # Same numbers as region_entropy on the preprocessed images directly, so
  # the padded last batch (1 real image of 3) was dropped correctly.
  batch = np.stack([cli.preprocess_eval(ex['image'], 32) for ex in images[:4]])
  ent = E.region_entropy(batch, 8, bin_range=(0.0, 1.0))
  assert table == E.compute_entropy_thresholds(np.asarray(ent))


def test_preprocess_matches_torchvision_geometry():
  img = np.zeros((40, 80, 3), np.uint8)
  img[:, 30:50] = 255  # bright centre band survives the centre crop
  out = cli.preprocess_eval(img, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  assert out.min() >= -1.0 and out.max() <= 1.0
  # Resize 40x80 -> 16x32, crop columns 8..24: band 12..20 is in the middle.
  np.testing.assert_allclose(out[:, 7:9].mean(), 1.0, atol=1e-6)
  np.testing.assert_allclose(out[:, 0], -1.0, atol=1e-6)


def test_cli_rejects_bad_flags(tmp_path):
  with pytest.raises(SystemExit):
    cli.main(['--dataset', 'x', '--resolution', '30', '--region_size', '8',
              '--out', str(tmp_path / 'a.json')])
  with pytest.raises(SystemExit):
    cli.main(['--dataset', 'x', '--bin_range=1,0', '--out',
              str(tmp_path / 'a.json')])


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One host of a 2-process run: stage 1's 'auto' table for a dataset that does
# not exist, then twice (start, resume) for the tiny one. Prints, per call,
# the error or the table path and how many scans this process ran.
_HOST = r'''
import json, sys
from dqvq import distributed
address, index, data_dir, workdir = sys.argv[1:]
distributed.initialize(address, 2, int(index))
import ml_collections
from dqvq.tools import entropy_thresholds
from dqvq.trainers import stage1
scans = []
scan = entropy_thresholds.main
entropy_thresholds.main = lambda argv: scans.append(1) or scan(argv)
calls = []
for dataset, where in (('nosuch', '/bad'), ('dqvq_tiny_entropy', ''),
                       ('dqvq_tiny_entropy', '')):
  c = ml_collections.ConfigDict({
      'model': {'router': 'entropy', 'entropy_thresholds': 'auto',
                'grain_factors': (8, 4)},
      'data': {'data_dir': data_dir, 'name': dataset, 'train_split': 'train',
               'resolution': 32},
      'entropy_num_images': 4})
  try:
    stage1.resolve_entropy_thresholds(c, workdir + where)
    calls.append({'path': c.model.entropy_thresholds, 'scans': len(scans)})
  except Exception as e:
    calls.append({'error': type(e).__name__, 'scans': len(scans)})
print('CALLS', json.dumps(calls))
'''


def test_two_hosts_scan_once(tiny_dataset, tmp_path):
  """Process 0 computes and writes the table; process 1 waits and reads it.

  A failure on process 0 reaches process 1 as an error (no host is left in
  the barrier), and a resumed run scans nothing.
  """
  data_dir, _ = tiny_dataset
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3')
  workdir = str(tmp_path / 'run')
  hosts = [subprocess.Popen(
      [sys.executable, '-c', _HOST, address, str(i), data_dir, workdir],
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
  assert bad0 == {'error': 'DatasetNotFoundError', 'scans': 1}
  assert bad1 == {'error': 'RuntimeError', 'scans': 0}
  assert first0 == resumed0 == {'path': path, 'scans': 2}
  assert first1 == resumed1 == {'path': path, 'scans': 0}
  assert sorted(os.listdir(workdir)) == ['entropy_thresholds.json']
  table, meta = E.load_thresholds(path)
  assert meta['num_images'] == 4 and meta['resolution'] == 32
  assert len(table) == 99
