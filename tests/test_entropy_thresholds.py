"""End-to-end test of the entropy threshold CLI on a tiny TFDS dataset."""

import json

import numpy as np
import pytest

from dqvq import entropy_thresholds as cli
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
