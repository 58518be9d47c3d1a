"""Tests of the demo dataset and the grain pipeline (batches, order, resume)."""

import io

import grain
import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from dqvq.data import demo
from dqvq.data import pipeline
from dqvq.data import transforms

RES = 16


@pytest.fixture(scope='session')
def demo_dir(demo_data_dir) -> str:
  return demo_data_dir


def demo_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      name='dqvq_demo', data_dir=data_dir, resolution=RES,
      train_split='train', eval_split='validation', num_workers=0,
      read_threads=2))
  config.update(overrides)
  return config


def take(it, n):
  return [next(it) for _ in range(n)]


def png(value: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(buf, 'PNG')
  return buf.getvalue()


def labelled_source(n: int, corrupt: tuple[int, ...] = ()) -> list[dict]:
  """In-memory records whose label is their index, so batches reveal order."""
  return [{'image': b'not an image' if i in corrupt else png(i * 7),
           'label': i} for i in range(n)]


def test_demo_split_is_fixed_by_source_photo(demo_dir):
  builder = demo.demo_builder(demo_dir)
  assert builder.info.splits['train'].num_examples == len(demo.PHOTOS) - 3
  assert builder.info.splits['validation'].num_examples == 192
  names = builder.info.features['label'].names
  labels = {}
  for split in ('train', 'validation'):
    source = builder.as_data_source(
        split, decoders={'image': tfds.decode.SkipDecoding()})
    labels[split] = {int(source[i]['label']) for i in range(len(source))}
  assert not labels['train'] & labels['validation']
  assert {names[i] for i in labels['validation']} == demo.VALIDATION_PHOTOS
  assert len(labels['train']) == len(demo.PHOTOS) - 3


def test_demo_crop_grid_covers_photo_within_bounds():
  boxes = demo.crop_boxes(300, 451)  # chelsea
  assert len(boxes) == 69
  for _, top, left, side in boxes:
    assert side >= demo.MIN_CROP
    assert 0 <= top and top + side <= 300 and 0 <= left and left + side <= 451
  # Both borders are reached at every scale.
  assert max(l + s for _, _, l, s in boxes) == 451
  assert min(l for _, _, l, _ in boxes) == 0


def test_demo_train_split_holds_full_resolution_photos(demo_dir):
  source = demo.demo_builder(demo_dir).as_data_source(
      'train', decoders={'image': tfds.decode.SkipDecoding()})
  names = [n for n, _ in demo.PHOTOS]
  for i in range(len(source)):
    record = source[i]
    name = names[int(record['label'])]
    want = demo.load_photo(dict(demo.PHOTOS)[name])
    got = np.asarray(transforms.decode_image(record['image']))
    np.testing.assert_array_equal(got, want)  # lossless, native size


def _stripes(h: int, w: int) -> Image.Image:
  """Columns numbered 0..w-1 in red, rows 0..h-1 in green (h, w < 256)."""
  arr = np.zeros((h, w, 3), np.uint8)
  arr[..., 0] = np.arange(w, dtype=np.uint8)[None, :]
  arr[..., 1] = np.arange(h, dtype=np.uint8)[:, None]
  return Image.fromarray(arr)


def test_random_scale_crops_vary_in_scale_place_and_flip():
  img = _stripes(200, 240)
  rng = np.random.default_rng(0)
  spans, lefts, flips = [], [], 0
  for _ in range(300):
    out = transforms.random_scale_crop_flip(img, 16, (0.05, 1.0), rng)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    col = out[8, :, 0].astype(int)
    flips += int(col[0] > col[-1])
    spans.append(abs(col[-1] - col[0]))
    lefts.append(min(col[0], col[-1]))
  assert 110 < flips < 190  # p = 0.5
  spans = np.asarray(spans)
  # Never enlarged (a crop spans at least 16 source columns) and up to the
  # whole shorter side; log-uniform: both small and large crops are common.
  assert spans.min() >= 14 and spans.max() >= 180
  assert np.mean(spans < 40) > 0.2 and np.mean(spans > 100) > 0.2
  assert len(set(lefts)) > 100


def test_decoded_cache_returns_the_decoded_image_once_per_content():
  buf = io.BytesIO()
  _stripes(30, 40).save(buf, 'PNG')
  cache = transforms.DecodedCache(max_items=2)
  a = cache.decode(buf.getvalue())
  assert cache.decode(bytes(buf.getvalue())) is a  # same content, one decode
  np.testing.assert_array_equal(np.asarray(a), np.asarray(_stripes(30, 40)))
  for v in range(3):
    cache.decode(png(v))
  assert cache.decode(buf.getvalue()) is not a  # evicted, decoded again
  assert cache.decode(b'not an image') is None


def test_multiscale_train_batches_are_random_crops(demo_dir):
  ds = pipeline.create_datasets(
      demo_config(demo_dir, crop_scale=(0.1, 1.0)), global_batch_size=8,
      seed=0)
  it = iter(ds.train)
  a, b = next(it), next(it)
  assert a['image'].shape == (8, RES, RES, 3)
  assert not np.array_equal(a['image'], b['image'])
  with pytest.raises(ValueError, match='crop_scale'):
    pipeline.create_datasets(demo_config(demo_dir, crop_scale=(0.5, 0.1)),
                             global_batch_size=8, seed=0)


def test_train_batches_shape_dtype_range(demo_dir):
  ds = pipeline.create_datasets(demo_config(demo_dir), global_batch_size=8,
                                seed=0)
  assert (ds.num_train_examples, ds.num_eval_examples) == (
      len(demo.PHOTOS) - 3, 192)
  assert ds.num_classes == len(demo.PHOTOS)
  batch = next(iter(ds.train))
  assert batch['image'].shape == (8, RES, RES, 3)
  assert batch['image'].dtype == np.float32
  assert -1.0 <= batch['image'].min() < 0.0 < batch['image'].max() <= 1.0
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (8,)
  val_labels = {i for i, (n, _) in enumerate(demo.PHOTOS)
                if n in demo.VALIDATION_PHOTOS}
  assert not set(batch['label'].tolist()) & val_labels
  assert batch['mask'].all() and int(batch['num_skipped']) == 0


def test_eval_is_one_padded_pass(demo_dir):
  ds = pipeline.create_datasets(demo_config(demo_dir), global_batch_size=40,
                                seed=0)
  batches = list(ds.eval)
  assert len(batches) == ds.eval_batches == 5  # ceil(192 / 40)
  assert sum(int(b['mask'].sum()) for b in batches) == 192
  last = batches[-1]
  assert not last['mask'][-1] and np.all(last['image'][~last['mask']] == 0)
  # Eval is deterministic: center crops, file order.
  again = next(iter(ds.eval))
  np.testing.assert_array_equal(again['image'], batches[0]['image'])


def test_seed_fixes_order_and_augmentation(demo_dir):
  make = lambda seed: iter(pipeline.create_datasets(
      demo_config(demo_dir), global_batch_size=8, seed=seed).train)
  a, b, c = take(make(3), 2), take(make(3), 2), take(make(4), 2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_checkpointed_state_resumes_at_next_batch(demo_dir, tmp_path):
  ds = pipeline.create_datasets(demo_config(demo_dir), global_batch_size=8,
                                seed=1)
  it = iter(ds.train)
  take(it, 2)
  state = it.get_state()
  grain.checkpoint.CheckpointHandler().save(tmp_path, item=it)
  expected = next(it)
  restored = iter(ds.train)
  restored.set_state(state)
  np.testing.assert_array_equal(next(restored)['image'], expected['image'])
  from_file = grain.checkpoint.CheckpointHandler().restore(
      tmp_path, item=iter(ds.train))
  np.testing.assert_array_equal(next(from_file)['image'], expected['image'])


def test_transforms_follow_torchvision_semantics():
  img = Image.fromarray(np.zeros((20, 30, 3), np.uint8))  # w=30, h=20
  assert transforms.resize_shorter_side(img, 16).size == (24, 16)
  assert transforms.resize_shorter_side(img, 20) is img
  ramp = np.broadcast_to(np.arange(24, dtype=np.uint8)[None, :, None],
                         (16, 24, 3))
  crop = transforms.center_crop(ramp, 16)
  assert crop.shape == (16, 16, 3) and crop[0, 0, 0] == 4
  rng = np.random.default_rng(0)
  flips = 0
  for _ in range(200):
    out = transforms.random_crop_flip(ramp, 16, rng)
    assert out.shape == (16, 16, 3)
    flips += int(out[0, 0, 0] > out[0, -1, 0])
  assert 70 < flips < 130  # p = 0.5
  x = transforms.to_model_range(np.array([0, 255], np.uint8))
  np.testing.assert_allclose(x, [-1.0, 1.0])


def test_hosts_split_one_permutation_per_epoch():
  source = labelled_source(16)
  hosts = [iter(pipeline.make_train_dataset(
      source, resolution=RES, host_batch_size=4, seed=5, shard_index=i,
      shard_count=2, read_threads=1)) for i in range(2)]
  epochs = [[], []]
  for epoch in epochs:
    for it in hosts:
      for b in take(it, 2):
        epoch.extend(b['label'].tolist())
  assert sorted(epochs[0]) == list(range(16))
  assert sorted(epochs[1]) == list(range(16))
  assert epochs[0] != epochs[1]  # Reshuffled each epoch.


def test_shard_for_host_is_disjoint_and_complete():
  ds = grain.MapDataset.range(11)
  shards = [list(pipeline.shard_for_host(ds, i, 2)) for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == list(range(11))
  with pytest.raises(ValueError):
    pipeline.shard_for_host(ds, 2, 2)


@pytest.mark.parametrize('n', [24, 23, 13, 5])
def test_block_shards_assemble_the_single_host_batches(n):
  """Host batches of 3 from 2 hosts, concatenated in process order, are the
  batches of 6 one host reads: same elements, same order."""
  ds = grain.MapDataset.range(n)
  shards = [list(pipeline.shard_for_host(ds, i, 2, block=3)) for i in range(2)]
  assert sorted(shards[0] + shards[1]) == list(range(n))
  assert len(shards[0]) == len(pipeline.shard_for_host(ds, 0, 2, block=3))
  for k in range(n // 6):
    assert (shards[0][3 * k:3 * k + 3] + shards[1][3 * k:3 * k + 3]
            == list(range(6 * k, 6 * k + 6)))


def test_eval_shards_stay_in_lockstep():
  source = labelled_source(11)
  per_host = [list(pipeline.make_eval_dataset(
      source, resolution=RES, host_batch_size=2, shard_index=i,
      shard_count=2, read_threads=1)) for i in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == 3  # ceil(ceil(11/2)/2)
  seen = [set(b['label'][b['mask']].tolist()) for b in sum(per_host, [])]
  assert sorted(x for s in seen for x in s) == list(range(11))


def test_corrupt_record_is_skipped_and_counted():
  source = labelled_source(12, corrupt=(3, 7))
  batches = list(pipeline.make_eval_dataset(
      source, resolution=RES, host_batch_size=4, read_threads=1))
  labels = [x for b in batches for x in b['label'][b['mask']].tolist()]
  assert labels == [i for i in range(12) if i not in (3, 7)]
  assert [int(b['num_skipped']) for b in batches] == [1, 1, 0]
  assert int(batches[-1]['num_skipped_total']) == 2
  train = iter(pipeline.make_train_dataset(
      source, resolution=RES, host_batch_size=4, seed=0, read_threads=1))
  got = take(train, 3)  # 12 valid images need more than one epoch.
  assert sum(int(b['num_skipped']) for b in got) >= 2
  assert int(got[-1]['num_skipped_total']) == sum(
      int(b['num_skipped']) for b in got)
  assert not {3, 7} & {x for b in got for x in b['label'].tolist()}


def test_all_records_corrupt_is_an_error_not_a_hang(monkeypatch):
  # A lower limit keeps the test fast (grain shuffles tiny datasets slowly).
  monkeypatch.setattr(pipeline, 'MAX_CONSECUTIVE_SKIPS', 20)
  train = iter(pipeline.make_train_dataset(
      labelled_source(4, corrupt=(0, 1, 2, 3)), resolution=RES,
      host_batch_size=2, seed=0, read_threads=1))
  with pytest.raises(RuntimeError, match='consecutive records'):
    next(train)


def test_make_global_batch_shards_rows_over_mesh():
  mesh = jax.sharding.Mesh(
      np.array(jax.devices()).reshape(8, 1), ('data', 'fsdp'),
      axis_types=(jax.sharding.AxisType.Auto,) * 2)
  host = {'image': np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(
      8, 2, 2, 3), 'label': np.arange(8, dtype=np.int32),
          'num_skipped': np.int32(1)}
  out = pipeline.make_global_batch(host, mesh, P(('data', 'fsdp')))
  assert isinstance(out['image'], jax.Array)
  assert out['image'].shape == (8, 2, 2, 3)
  assert out['image'].sharding.spec == P(('data', 'fsdp'))
  assert len(out['image'].addressable_shards) == 8
  assert all(s.data.shape == (1, 2, 2, 3)
             for s in out['image'].addressable_shards)
  np.testing.assert_array_equal(np.asarray(out['label']), host['label'])
  assert out['label'].sharding.spec == P(('data', 'fsdp'))
  assert int(out['num_skipped']) == 1 and not isinstance(
      out['num_skipped'], jax.Array)


def test_worker_processes_do_not_change_batches(demo_dir):
  config = demo_config(demo_dir)
  expected = take(iter(pipeline.create_datasets(
      config, global_batch_size=8, seed=2).train), 2)
  config.num_workers = 1
  it = iter(pipeline.create_datasets(config, global_batch_size=8,
                                     seed=2).train)
  try:
    got = take(it, 2)
    state = it.get_state()
  finally:
    it.close()
  for x, y in zip(expected, got):
    np.testing.assert_array_equal(x['image'], y['image'])
  assert state['emitted'] == 2
