"""Tests of the image-folder builder, imagenet2012 loading and config checks."""

import os

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from dqvq.data import image_folder
from dqvq.data import pipeline
from dqvq.data import sources

RES = 16


def write_folder(root, n: int, corrupt: str | None = None) -> list[str]:
  """FFHQ-like nested layout: root/<thousands>/<id>.png (+ a .jpg)."""
  rng = np.random.default_rng(0)
  rel_paths = []
  for i in range(n):
    rel = f'{i // 4:02d}/{i:05d}.' + ('jpg' if i % 5 == 0 else 'png')
    os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (18 + i, 22, 3), np.uint8)).save(
        os.path.join(root, rel))
    rel_paths.append(rel)
  if corrupt:
    os.makedirs(os.path.join(root, os.path.dirname(corrupt)), exist_ok=True)
    with open(os.path.join(root, corrupt), 'wb') as f:
      f.write(b'\xff\xd8\xff\xe0 truncated jpeg')
  return rel_paths


def folder_config(data_dir, root, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      name='image_folder', data_dir=str(data_dir), image_folder_root=str(root),
      image_folder_train_list='', image_folder_eval_list='',
      image_folder_val_fraction=0.25, image_folder_validate=True,
      resolution=RES, train_split='train', eval_split='validation',
      num_workers=0, read_threads=1))
  config.update(overrides)
  return config


def file_names(builder, split) -> set[str]:
  source = builder.as_data_source(
      split, decoders={'image': tfds.decode.SkipDecoding()})
  return {source[i]['file_name'].decode() for i in range(len(source))}


def test_corrupt_file_skipped_when_building(tmp_path):
  root = tmp_path / 'images'
  good = write_folder(root, 10, corrupt='01/bad.jpg')
  builder = image_folder.load_image_folder(str(tmp_path / 'tfds'), str(root),
                                           validation_fraction=0.25)
  splits = builder.info.splits
  assert splits['train'].num_examples + splits['validation'].num_examples == 10
  names = file_names(builder, 'train') | file_names(builder, 'validation')
  assert names == set(good)
  ds = pipeline.create_datasets(folder_config(tmp_path / 'tfds', root),
                                global_batch_size=2, seed=0)
  batch = next(iter(ds.train))
  assert batch['image'].shape == (2, RES, RES, 3) and (batch['label'] == 0).all()


def test_corrupt_record_skipped_when_reading(tmp_path):
  root = tmp_path / 'images'
  write_folder(root, 6, corrupt='00/bad.jpg')
  config = folder_config(tmp_path / 'tfds', root, image_folder_validate=False,
                         image_folder_val_fraction=0.0, eval_split='train')
  ds = pipeline.create_datasets(config, global_batch_size=4, seed=0)
  assert ds.num_eval_examples == 7  # The corrupt bytes were stored.
  batches = list(ds.eval)
  assert sum(int(b['mask'].sum()) for b in batches) == 6
  assert int(batches[-1]['num_skipped_total']) == 1


def test_split_lists_match_nested_layout(tmp_path):
  root = tmp_path / 'images'
  rel = write_folder(root, 8)
  train_list, eval_list = tmp_path / 'train.txt', tmp_path / 'val.txt'
  # taming's lists name files of a flat folder; one entry matches nothing.
  train_list.write_text('\n'.join(os.path.basename(p) for p in rel[:5]) +
                        '\n99999.png\n')
  eval_list.write_text('\n'.join(rel[5:]) + '\n')
  config = folder_config(tmp_path / 'tfds', root,
                         image_folder_train_list=str(train_list),
                         image_folder_eval_list=str(eval_list))
  ds = pipeline.create_datasets(config, global_batch_size=2, seed=0)
  assert (ds.num_train_examples, ds.num_eval_examples) == (5, 3)
  builder = image_folder.image_folder_builder(
      str(tmp_path / 'tfds'), str(root),
      split_files={'train': str(train_list), 'validation': str(eval_list)},
      validation_fraction=0.25)
  assert file_names(builder, 'train') == set(rel[:5])
  assert file_names(builder, 'validation') == set(rel[5:])


def test_hash_split_depends_only_on_path():
  paths = [f'{i:05d}.png' for i in range(400)]
  split = image_folder.hash_split(paths, 0.1)
  assert 20 < len(split['validation']) < 60
  more = image_folder.hash_split(paths + [f'x{i}.png' for i in range(50)], 0.1)
  assert set(split['validation']) <= set(more['validation'])
  assert not set(split['train']) & set(more['validation'])
  assert image_folder.hash_split(paths[:3], 0.01)['validation']  # never empty


def test_imagenet_through_mock_data(tmp_path):
  config = ml_collections.ConfigDict(dict(
      name='imagenet2012', data_dir=str(tmp_path), resolution=RES,
      train_split='train', eval_split='validation', num_workers=0,
      read_threads=1))
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    ds = pipeline.create_datasets(config, global_batch_size=4, seed=0)
    batch = next(iter(ds.train))
  assert ds.num_classes == 1000
  assert batch['image'].shape == (4, RES, RES, 3)
  assert batch['image'].dtype == np.float32
  assert ((batch['label'] >= 0) & (batch['label'] < 1000)).all()
  assert batch['mask'].all() and int(batch['num_skipped']) == 0


def test_imagenet_not_prepared_names_manual_steps(tmp_path):
  config = ml_collections.ConfigDict(dict(
      name='imagenet2012', data_dir=str(tmp_path), resolution=RES))
  with pytest.raises(sources.DataNotPreparedError) as e:
    pipeline.create_datasets(config, global_batch_size=4, seed=0)
  message = str(e.value)
  for needle in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar',
                 os.path.join('downloads', 'manual'), 'tfds build imagenet2012',
                 '--file_format array_record'):
    assert needle in message


@pytest.mark.parametrize('overrides, error, needle', [
    (dict(name='cifar'), ValueError, 'dqvq_demo, image_folder, imagenet2012'),
    (dict(data_dir=''), ValueError, 'data_dir'),
    (dict(name='image_folder', image_folder_root='/nonexistent/ffhq'),
     FileNotFoundError, 'image_folder_root'),
    (dict(name='imagenet2012', data_dir='/nonexistent/tfds'),
     FileNotFoundError, 'ILSVRC2012_img_train.tar'),
    (dict(name='image_folder', image_folder_val_fraction=1.5), ValueError,
     'image_folder_val_fraction'),
    (dict(resolution=0), ValueError, 'resolution'),
    (dict(num_workers=-1), ValueError, 'num_workers'),
])
def test_validate_data_config_errors(tmp_path, overrides, error, needle):
  config = ml_collections.ConfigDict(dict(
      name='dqvq_demo', data_dir=str(tmp_path),
      image_folder_root=str(tmp_path), image_folder_val_fraction=0.05,
      resolution=RES, train_split='train', eval_split='validation',
      num_workers=0))
  sources.validate_data_config(config)  # The base config is valid.
  config.update(overrides)
  with pytest.raises(error, match=needle):
    sources.validate_data_config(config)


def test_batch_size_must_divide_hosts(tmp_path):
  config = ml_collections.ConfigDict(dict(
      name='dqvq_demo', data_dir=str(tmp_path), resolution=RES))
  with pytest.raises(ValueError, match='process count'):
    pipeline.create_datasets(config, global_batch_size=5, seed=0,
                             shard_index=0, shard_count=2)
