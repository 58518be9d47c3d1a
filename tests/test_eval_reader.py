"""The one eval reader, `pipeline.make_eval_dataset`: a split once, in order.

Validation, `dqvq.evaluate`, the token writer and the entropy table all read
through it; these tests pin what they rely on: source order, one fixed batch
shape with a mask of real rows, each record read once, and host shards that
cover the split once and assemble into one host's batches.
"""

import collections
import threading

import numpy as np
import pytest

from dqvq.data import pipeline
from dqvq.data import transforms

RES = 8


def pixels(i: int) -> np.ndarray:
  """Record i's image: every pixel is i, sizes vary (the resize runs)."""
  return np.full((RES + 2 + i % 3, RES + 4, 3), i, np.uint8)


class CountingSource:
  """Records whose pixels and label are their index; counts each read."""

  def __init__(self, n: int, corrupt: tuple[int, ...] = ()):
    self._n, self._corrupt = n, corrupt
    self._lock = threading.Lock()  # grain reads with threads
    self.reads = collections.Counter()

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict:
    with self._lock:
      self.reads[int(i)] += 1
    image = b'not an image' if i in self._corrupt else pixels(i)
    return {'image': image, 'label': i}


def read(source, batch: int, **kwargs) -> list[dict]:
  return list(pipeline.make_eval_dataset(
      source, resolution=RES, host_batch_size=batch, read_threads=3,
      **kwargs))


def real_indices(batches: list[dict]) -> list[int]:
  return [int(i) for b in batches for i in b['index'][b['mask']]]


def test_source_order_fixed_shape_padding_and_mask():
  batches = read(CountingSource(10), 4)
  assert len(batches) == 3
  assert [b['index'].tolist() for b in batches] == [
      [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]
  assert [b['mask'].tolist() for b in batches][-1] == [True, True, False,
                                                      False]
  for b in batches:
    assert b['image'].shape == (4, RES, RES, 3)
    assert b['image'].dtype == np.float32 and b['mask'].dtype == bool
    assert b['index'].dtype == np.int64 and b['label'].dtype == np.int32
    for row, i in enumerate(b['index']):
      if i >= 0:  # a constant image stays constant through resize and crop
        want = transforms.to_model_range(np.full((RES, RES, 3), i, np.uint8))
        np.testing.assert_array_equal(b['image'][row], want)
        assert b['label'][row] == i
  assert np.all(batches[-1]['image'][2:] == 0)
  assert np.all(batches[-1]['label'][2:] == 0)


def test_reads_each_record_once_and_only_the_first_num_examples():
  source = CountingSource(13)
  assert real_indices(read(source, 4)) == list(range(13))
  assert source.reads == {i: 1 for i in range(13)}
  head = CountingSource(13)
  batches = read(head, 4, num_examples=5)
  assert len(batches) == 2 and real_indices(batches) == list(range(5))
  assert head.reads == {i: 1 for i in range(5)}
  with pytest.raises(ValueError, match='num_examples'):
    read(head, 4, num_examples=-1)


@pytest.mark.parametrize('n', [11, 12, 3])
def test_two_hosts_cover_the_split_once_in_lockstep(n):
  """Host batches of 2, in process order, are the batches of 4 one host
  reads; every record is read once by one of the hosts."""
  source = CountingSource(n)
  hosts = [read(source, 2, shard_index=p, shard_count=2) for p in range(2)]
  assert len(hosts[0]) == len(hosts[1])  # every step is a collective
  assert sorted(real_indices(hosts[0]) + real_indices(hosts[1])) == list(
      range(n))
  assert source.reads == {i: 1 for i in range(n)}
  one_host = read(CountingSource(n), 4)
  assert len(one_host) == len(hosts[0])
  for k, whole in enumerate(one_host):
    assembled = np.concatenate([hosts[0][k]['index'], hosts[1][k]['index']])
    mask = np.concatenate([hosts[0][k]['mask'], hosts[1][k]['mask']])
    assert assembled[mask].tolist() == whole['index'][whole['mask']].tolist()


def test_undecodable_records_are_skipped_and_positions_kept():
  batches = read(CountingSource(9, corrupt=(2, 5)), 4)
  assert real_indices(batches) == [0, 1, 3, 4, 6, 7, 8]
  assert [int(b['num_skipped']) for b in batches] == [1, 1, 0]
  for b in batches:
    rows = b['mask']
    np.testing.assert_array_equal(b['label'][rows], b['index'][rows])


def test_worker_processes_give_the_same_batches():
  source = [{'image': pixels(i), 'label': i} for i in range(6)]
  expected = read(source, 4)
  it = iter(pipeline.make_eval_dataset(
      source, resolution=RES, host_batch_size=4, num_workers=1))
  try:
    got = list(it)
  finally:
    it.close()
  assert len(got) == len(expected)
  for x, y in zip(expected, got):
    for key in ('image', 'index', 'mask'):
      np.testing.assert_array_equal(x[key], y[key])
