"""Input pipeline: TFDS ArrayRecord -> grain -> host batches -> global arrays.

Why grain: its iterators are random-access and checkpointable (the position
is a few integers), the order is a pure function of the seed, and each host
reads only its shard, which is what preemptible multi-host training needs.

Order of operations (train):
  source -> shuffle (new permutation every epoch, same on all hosts)
  -> repeat forever -> decode + augment (rng seeded by seed and global index)
  -> this host's blocks of host-batch-size elements -> threads / worker
  processes -> skip undecodable images while filling the per-host batch.
Shuffling before sharding makes the hosts split one global permutation per
epoch; augmenting before sharding keys the augmentation on the global index,
so hosts never draw correlated crops. Both are lazy, so each host still
decodes only its own elements.

Eval is one pass in file order, padded so that every host yields the same
number of batches (`mask` marks real examples): hosts must stay in lock-step
because every step is a collective. `make_eval_dataset` is the one reader of
a split read that way: validation, `dqvq.evaluate`, the token writer
(`data.tokens`) and the entropy table (`data.entropy_table`) share it, so all
of them see the same pixels in the same order.

Batches are dicts of numpy arrays: `image` float32 (B, R, R, 3) in [-1, 1]
NHWC, `label` int32 (B,), `mask` bool (B,), in eval batches also `index`
int64 (B,) (position in the source, -1 in padding), and two host-local scalars,
`num_skipped` (undecodable images skipped while filling this batch) and
`num_skipped_total` (since the start of training, restored with the
iterator). `make_global_batch` turns the arrays into global jax.Arrays and
leaves the scalars on the host.

Checkpointing: `iter(datasets.train)` is a grain `DatasetIterator`
(`get_state()` / `set_state()`, JSON-serialisable); Orbax stores it with
`grain.checkpoint.CheckpointHandler` and the args classes
`grain.checkpoint.CheckpointSave` / `CheckpointRestore`.

`config.data` fields (ml_collections.ConfigDict):
  name: 'dqvq_demo' | 'image_folder' | 'imagenet2012'.
  data_dir: TFDS data directory. dqvq_demo and image_folder are prepared into
    it on first use; imagenet2012 must be prepared there by hand (see
    `sources.IMAGENET_MANUAL_STEPS`).
  image_folder_root: folder of images (image_folder only), searched
    recursively.
  image_folder_train_list / image_folder_eval_list: optional text files of
    relative paths (e.g. taming's ffhqtrain.txt / ffhqvalidation.txt); they
    become the 'train' / 'validation' splits. Empty: hash split.
  image_folder_val_fraction: validation share of the hash split (0.05).
  image_folder_validate: decode every image while building (True).
  crop_scale: None (default): train crops as the official pipeline (shorter
    side to R, random R x R crop). (lo, hi): a random square of side
    log-uniform in [lo, hi] x the shorter side, resized to R (the demo, whose
    few large photographs yield crops at every scale and place).
  resolution: side R of the square crops fed to the model (256 in the paper).
  train_split / eval_split: TFDS split names ('train' / 'validation'); TFDS
    slicing such as 'train[:1%]' works.
  num_workers: grain worker processes for decoding; 0 decodes in-process
    (with `read_threads` threads), which the CPU tests use.
  read_threads: threads reading and decoding per process (default 8).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from absl import flags
import grain
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from dqvq.data import sources as sources_lib
from dqvq.data import transforms
from dqvq.sharding import BATCH_AXES

# Consecutive undecodable records after which the data, not one file, is
# broken: without a limit an infinite train stream would hang silently.
MAX_CONSECUTIVE_SKIPS = 1000


class _BlockShard(grain.MapDataset):
  """Host `index`'s blocks of `block` elements out of every `count` blocks."""

  def __init__(self, parent: grain.MapDataset, index: int, count: int,
               block: int):
    super().__init__(parent)
    self._index, self._count, self._block = index, count, block
    n = len(parent)
    rounds, rest = divmod(n, block * count)
    self._len = rounds * block + min(max(rest - index * block, 0), block)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, j):
    if isinstance(j, slice):
      return self.slice(j)
    rnd, offset = divmod(j, self._block)
    return self._parent[(rnd * self._count + self._index) * self._block
                        + offset]

  def __str__(self) -> str:
    return f'_BlockShard({self._index}/{self._count}, block={self._block})'


def shard_for_host(ds: grain.MapDataset, shard_index: int, shard_count: int,
                   block: int = 1) -> grain.MapDataset:
  """This host's disjoint share: blocks of `block` consecutive elements.

  With `block` = the host batch size, host p's k-th batch is elements
  [k*B + p*b, k*B + (p+1)*b) of the global order (B = b * shard_count), so
  the global batch the hosts assemble, in process order, is the same batch,
  in the same order, as one process would read: a run's result does not
  depend on how many hosts it ran on (order matters to the dead-code
  restart, which draws vectors by batch position).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in [0, {shard_count}).')
  if shard_count == 1:
    return ds
  if block == 1:
    return ds[shard_index::shard_count]
  return _BlockShard(ds, shard_index, shard_count, block)


def host_shard() -> tuple[int, int]:
  """(this process's index, process count), as grain's ShardByJaxProcess."""
  opts = grain.sharding.ShardByJaxProcess()
  return opts.shard_index, opts.shard_count


class _SkipAndBatchIterator(grain.DatasetIterator):
  """Fills fixed-size batches with valid elements, counting the invalid ones.

  The state is the parent's plus three counters, so restoring it resumes at
  exactly the next batch: a batch always ends right after its last element.
  """

  def __init__(self, parent: grain.DatasetIterator, batch_size: int,
               image_shape: tuple[int, ...], num_batches: int | None,
               with_index: bool = False):
    super().__init__(parent)
    self._batch_size = batch_size
    self._image_shape = tuple(image_shape)
    self._num_batches = num_batches
    self._with_index = with_index
    self._emitted = 0
    self._skipped_total = 0
    self._exhausted = False

  def __next__(self) -> dict[str, np.ndarray]:
    if self._num_batches is not None and self._emitted >= self._num_batches:
      raise StopIteration
    images, labels, indices, skipped, run = [], [], [], 0, 0
    while len(images) < self._batch_size and not self._exhausted:
      try:
        element = next(self._parent)
      except StopIteration:
        if self._num_batches is None:  # Unpadded: drop a partial batch.
          raise
        self._exhausted = True
        break
      if not element['valid']:
        skipped += 1
        run += 1
        if run >= MAX_CONSECUTIVE_SKIPS:
          raise RuntimeError(
              f'{run} consecutive records failed to decode as images: the '
              'dataset (not one file) is broken; check config.data.')
        continue
      run = 0
      images.append(element['image'])
      labels.append(element['label'])
      if self._with_index:
        indices.append(element['index'])
    self._emitted += 1
    self._skipped_total += skipped
    return self._assemble(images, labels, indices, skipped)

  def _assemble(self, images: list[np.ndarray], labels: list[Any],
                indices: list[Any], skipped: int) -> dict[str, np.ndarray]:
    n, b = len(images), self._batch_size
    image = np.zeros((b,) + self._image_shape, np.float32)
    label = np.zeros((b,), np.int32)
    if n:
      image[:n] = transforms.to_model_range(np.stack(images))
      label[:n] = np.asarray(labels, np.int32)
    batch = {'image': image, 'label': label, 'mask': np.arange(b) < n}
    if self._with_index:  # -1: a padding row is no source position
      batch['index'] = np.full((b,), -1, np.int64)
      batch['index'][:n] = np.asarray(indices, np.int64)
    return {**batch, 'num_skipped': np.int32(skipped),
            'num_skipped_total': np.int32(self._skipped_total)}

  def get_state(self) -> dict[str, Any]:
    return {'parent': self._parent.get_state(), 'emitted': self._emitted,
            'skipped_total': self._skipped_total,
            'exhausted': self._exhausted}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._emitted = int(state['emitted'])
    self._skipped_total = int(state['skipped_total'])
    self._exhausted = bool(state['exhausted'])


class SkipAndBatchDataset(grain.IterDataset):
  """`batch` that drops invalid elements; pads to `num_batches` if given."""

  def __init__(self, parent: grain.IterDataset, batch_size: int,
               image_shape: tuple[int, ...], num_batches: int | None = None,
               with_index: bool = False):
    super().__init__(parent)
    self._batch_size = batch_size
    self._image_shape = tuple(image_shape)
    self._num_batches = num_batches
    self._with_index = with_index

  def __iter__(self) -> _SkipAndBatchIterator:
    return _SkipAndBatchIterator(self._parent.__iter__(), self._batch_size,
                                 self._image_shape, self._num_batches,
                                 self._with_index)

  def __str__(self) -> str:
    return (f'SkipAndBatchDataset(batch_size={self._batch_size}, '
            f'num_batches={self._num_batches})')


def _parallel(ds: grain.MapDataset, num_workers: int,
              read_threads: int, host_batch_size: int) -> grain.IterDataset:
  """Threads (and optionally processes) that decode ahead of the batcher."""
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads,
      prefetch_buffer_size=max(read_threads, 2 * host_batch_size)))
  if num_workers > 0:
    # grain reads its absl flags while starting workers; outside absl.app
    # (tests, notebooks) they are unparsed and grain would raise.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # Per-element, before batching: the interleave is round-robin, so the
    # element order, and hence every batch, does not depend on num_workers.
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def make_train_dataset(source: Any, *, resolution: int, host_batch_size: int,
                       seed: int, shard_index: int = 0, shard_count: int = 1,
                       num_workers: int = 0, read_threads: int = 8,
                       crop_scale: tuple[float, float] | None = None
                       ) -> grain.IterDataset:
  """Infinite, shuffled, augmented batches of this host's shard.

  `crop_scale` selects multi-scale random crops (`transforms.TrainPreprocess`).
  """
  # grain wants a seed in [0, 2**32); map any int there deterministically.
  ds = grain.MapDataset.source(source).seed(int(seed) % 2**32)
  ds = ds.shuffle().repeat().random_map(
      transforms.TrainPreprocess(resolution, crop_scale))
  ds = shard_for_host(ds, shard_index, shard_count, host_batch_size)
  return SkipAndBatchDataset(
      _parallel(ds, num_workers, read_threads, host_batch_size),
      host_batch_size, (resolution, resolution, 3))


def num_eval_batches(num_examples: int, host_batch_size: int,
                     shard_count: int) -> int:
  """Batches per host so that the largest host shard fits: same on all."""
  return math.ceil(math.ceil(num_examples / shard_count) / host_batch_size)


class _EvalElement(grain.transforms.MapWithIndex):
  """`transforms.EvalPreprocess`, plus the record's position as 'index'.

  A class, not a lambda, so that worker processes can unpickle it.
  """

  def __init__(self, resolution: int):
    self._prep = transforms.EvalPreprocess(resolution)

  def map_with_index(self, index: int, element: Any) -> dict[str, Any]:
    return {**self._prep.map(element), 'index': np.int64(index)}


def make_eval_dataset(source: Any, *, resolution: int, host_batch_size: int,
                      shard_index: int = 0, shard_count: int = 1,
                      num_workers: int = 0, read_threads: int = 8,
                      num_examples: int = 0) -> grain.IterDataset:
  """A split read once, in source order: this host's shard, padded batches.

  The one eval reader (module docstring). `transforms.EvalPreprocess` (shorter
  side to R, center crop); undecodable images are skipped and counted in
  `num_skipped`. Every host yields `num_eval_batches` batches, the last ones
  padded (`mask` False, `image` 0, `index` -1) so that hosts stay in
  lock-step; `index` is a row's position in `source`, which survives the
  skipping. `shard_for_host` blocks make the hosts' k-th batches, in process
  order, one host's k-th batch. `num_examples` > 0 reads only the first ones.
  """
  ds = grain.MapDataset.source(source)
  if num_examples < 0:
    raise ValueError(f'num_examples={num_examples} must be >= 0 (0: all).')
  if num_examples:
    ds = ds[:num_examples]
  num_batches = num_eval_batches(len(ds), host_batch_size, shard_count)
  # Lazy: each host still decodes only the elements of its shard.
  ds = shard_for_host(ds.map_with_index(_EvalElement(resolution)),
                      shard_index, shard_count, host_batch_size)
  return SkipAndBatchDataset(
      _parallel(ds, num_workers, read_threads, host_batch_size),
      host_batch_size, (resolution, resolution, 3), num_batches=num_batches,
      with_index=True)


def make_global_batch(host_batch: Mapping[str, Any], mesh: jax.sharding.Mesh,
                      partition_spec: P = P(BATCH_AXES)) -> dict[str, Any]:
  """Host-local numpy batch -> global jax.Arrays sharded on the batch axis.

  Each process contributes its rows; the global batch is their concatenation
  in process order. 0-d entries (the skip counters) are per-host statistics,
  not data, and are returned unchanged.
  """
  spec = tuple(partition_spec)

  def to_global(x):
    x = np.asarray(x)
    if x.ndim == 0:
      return x
    sharding = NamedSharding(mesh, P(*spec[:x.ndim]))
    return jax.make_array_from_process_local_data(sharding, x)

  return {k: to_global(v) for k, v in host_batch.items()}


@dataclasses.dataclass
class Datasets:
  """What the trainer needs; `iter(train)` gives the checkpointable iterator."""
  train: grain.IterDataset
  eval: grain.IterDataset
  num_train_examples: int
  num_eval_examples: int
  num_classes: int
  host_batch_size: int
  eval_batches: int


def check_batch_sizes(global_batch_size: int, eval_batch_size: int,
                      shard_count: int, mesh: jax.sharding.Mesh | None) -> None:
  """Both batches split evenly over the processes and the mesh batch axes."""
  divisor = 1 if mesh is None else math.prod(
      mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
  for field, size in (('global_batch_size', global_batch_size),
                      ('eval_batch_size', eval_batch_size)):
    if size <= 0 or size % shard_count or size % divisor:
      raise ValueError(
          f'{field}={size} must be a positive multiple of the process count '
          f'({shard_count}) and of the mesh batch axes size ({divisor}).')


def create_datasets(config_data: ml_collections.ConfigDict, *,
                    global_batch_size: int, seed: int,
                    mesh: jax.sharding.Mesh | None = None,
                    eval_batch_size: int | None = None,
                    shard_index: int | None = None,
                    shard_count: int | None = None) -> Datasets:
  """Validates `config_data` and builds this host's train and eval datasets.

  Args:
    config_data: the `config.data` block (fields in the module docstring).
    global_batch_size: batch over all hosts; each host makes 1/process_count.
    seed: fixes the shuffle order and augmentations (same on all hosts).
    mesh: when given, batch sizes must divide its ('data', 'fsdp') size.
    eval_batch_size: global eval batch; defaults to global_batch_size.
    shard_index, shard_count: override the jax process index / count (tests).
  """
  default_index, default_count = host_shard()
  shard_index = default_index if shard_index is None else shard_index
  shard_count = default_count if shard_count is None else shard_count
  eval_batch_size = eval_batch_size or global_batch_size
  check_batch_sizes(global_batch_size, eval_batch_size, shard_count, mesh)
  srcs = sources_lib.load_sources(config_data)
  common = dict(resolution=config_data.resolution, shard_index=shard_index,
                shard_count=shard_count,
                num_workers=int(config_data.get('num_workers', 0) or 0),
                read_threads=int(config_data.get('read_threads', 8) or 8))
  host_batch = global_batch_size // shard_count
  host_eval_batch = eval_batch_size // shard_count
  return Datasets(
      train=make_train_dataset(srcs.train, host_batch_size=host_batch,
                               seed=seed, crop_scale=sources_lib.train_crop_scale(
                                   config_data), **common),
      eval=make_eval_dataset(srcs.eval, host_batch_size=host_eval_batch,
                             **common),
      num_train_examples=len(srcs.train),
      num_eval_examples=len(srcs.eval),
      num_classes=srcs.num_classes,
      host_batch_size=host_batch,
      eval_batches=num_eval_batches(len(srcs.eval), host_eval_batch,
                                    shard_count))
