"""Stage 2's input pipeline over a token dataset (`dqvq.data.tokens`).

The same contract as the image pipeline (`pipeline.create_datasets`): an
infinite shuffled train stream (a new permutation per epoch from the seed,
each host reading only its slice, checkpointable grain iterator) and a padded
one-pass eval stream that keeps all hosts in lock-step. With flipped tokens
stored, each train example is the plain or the flipped image's tokens, by a
coin seeded with the seed and the example's global index.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np

from dqvq.data import pipeline
from dqvq.data import tokens


def _to_batch_element(element: dict[str, Any], suffix: str = ''
                      ) -> dict[str, np.ndarray]:
  return {'codes': np.asarray(element['codes' + suffix], np.int32),
          'grain_map': np.asarray(element['grain_map' + suffix], np.int32),
          'label': np.int32(element['label']), 'mask': np.bool_(True)}


class _TrainTokens(grain.transforms.RandomMap):
  """Plain or flipped tokens (coin seeded by seed and global index)."""

  def __init__(self, flip: bool):
    self.flip = flip

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    flipped = self.flip and rng.random() < 0.5
    return _to_batch_element(element, '_flipped' if flipped else '')


class _PadToLength(grain.MapDataset):
  """The parent's elements, then `pad` up to `length`: eval lock-step."""

  def __init__(self, parent: grain.MapDataset, length: int, pad: Any):
    super().__init__(parent)
    self._length, self._pad = length, pad

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[index] if index < len(self._parent) else self._pad


def create_token_datasets(tokens_dir: str, *, global_batch_size: int,
                          seed: int, mesh: jax.sharding.Mesh | None = None,
                          eval_batch_size: int | None = None,
                          train_split: str = 'train',
                          eval_split: str = 'validation',
                          shard_index: int | None = None,
                          shard_count: int | None = None
                          ) -> pipeline.Datasets:
  """This host's train and eval token batches; see `pipeline.create_datasets`.

  Train: infinite, a new permutation per epoch from `seed`, this host's slice
  of it, batches of global_batch_size / shard_count; `iter(train)` is a
  checkpointable grain iterator. Eval: one pass in file order, padded with
  `mask=False` rows so every host yields `eval_batches` batches. Batches hold
  'codes' int32 (B, G, G), 'grain_map' int32 (B, R, R), 'label' int32 (B,)
  and 'mask' bool (B,).
  """
  default_index, default_count = pipeline.host_shard()
  shard_index = default_index if shard_index is None else shard_index
  shard_count = default_count if shard_count is None else shard_count
  eval_batch_size = eval_batch_size or global_batch_size
  pipeline.check_batch_sizes(global_batch_size, eval_batch_size, shard_count,
                             mesh)
  meta = tokens.read_metadata(tokens_dir)
  train_src = tokens.open_token_split(tokens_dir, train_split)
  eval_src = tokens.open_token_split(tokens_dir, eval_split)
  host_batch = global_batch_size // shard_count
  host_eval_batch = eval_batch_size // shard_count
  options = grain.ReadOptions(num_threads=tokens.READ_THREADS,
                              prefetch_buffer_size=2 * tokens.READ_THREADS)
  train = grain.MapDataset.source(train_src).seed(int(seed) % 2**32)
  train = train.shuffle().repeat().random_map(_TrainTokens(meta['flip']))
  train = pipeline.shard_for_host(train, shard_index, shard_count)
  train = train.batch(host_batch, drop_remainder=True).to_iter_dataset(options)
  eval_batches = pipeline.num_eval_batches(len(eval_src), host_eval_batch,
                                           shard_count)
  grid, regions = meta['code_grid'], meta['region_grid']
  pad = {'codes': np.zeros((grid, grid), np.int32),
         'grain_map': np.zeros((regions, regions), np.int32),
         'label': np.int32(0), 'mask': np.bool_(False)}
  evaluation = pipeline.shard_for_host(
      grain.MapDataset.source(eval_src), shard_index, shard_count)
  evaluation = _PadToLength(evaluation.map(_to_batch_element),
                            eval_batches * host_eval_batch, pad)
  evaluation = evaluation.batch(host_eval_batch).to_iter_dataset(options)
  return pipeline.Datasets(
      train=train, eval=evaluation, num_train_examples=len(train_src),
      num_eval_examples=len(eval_src), num_classes=int(meta['num_classes']),
      host_batch_size=host_batch, eval_batches=eval_batches)
