"""The entropy router's threshold table: percentiles of a split's entropies.

The entropy router needs, for a target fine ratio r, the (100 - 100 r)-th
percentile of region entropies over the training data (`dqvq.models.entropy`).
A table holds only for the bin range, sigma, region size and resolution it
was computed with, so it is recomputed for each of them: by hand with
`python -m dqvq.tools.entropy_thresholds`, or by stage 1 for
`model.entropy_thresholds='auto'` (`write_once`).

The split is read through `pipeline.make_eval_dataset`, the reader of
validation and of the token writer, so the entropies come from the pixels the
router will see (PIL decoding, shorter side to R, centre crop, [-1, 1]) and no
TensorFlow is imported. Images are read from the start of the split, in order,
and undecodable ones are skipped, as training skips them.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow_datasets as tfds

from dqvq.data import pipeline
from dqvq.models import entropy as entropy_lib

PREPROCESSING = ('PIL bilinear resize of the shorter side + centre crop, '
                 '[-1, 1]')
_CONVERT = ('tfds convert_format --dataset_dir {dir} --out_file_format '
            'array_record')


class _ImageKey:
  """A source whose `key` feature is presented as 'image', the reader's name.

  A module-level class so that grain's worker processes can unpickle it.
  """

  def __init__(self, source: Sequence[Any], key: str):
    self._source, self._key = source, key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {'image': self._source[index][self._key]}


def open_split(dataset: str, split: str, *, data_dir: str | None = None,
               image_key: str = 'image',
               download: bool = False) -> Sequence[Any]:
  """Random-access source of a TFDS split, as `make_eval_dataset` reads it.

  The dataset must be stored as ArrayRecord (grain needs random access);
  `download` prepares it so when it is missing. Image features stay encoded
  (`SkipDecoding`) so that PIL decodes them exactly as the pipeline does.
  """
  builder = tfds.builder(dataset, data_dir=data_dir)
  if download and not builder.is_prepared():
    builder = tfds.builder(dataset, data_dir=data_dir,
                           file_format='array_record')
    builder.download_and_prepare()
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'{dataset} is not prepared in {builder.data_dir}; pass --download '
        '(download=True) or prepare it with `tfds build`.')
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f'{dataset} is stored as {builder.info.file_format.value}; the table '
        'is read through grain, which needs ArrayRecord: `' +
        _CONVERT.format(dir=builder.data_dir) + '`.')
  if image_key not in builder.info.features:
    raise ValueError(f'{dataset} has no feature {image_key!r} (features: '
                     f'{", ".join(builder.info.features)}); set --image_key.')
  feature = builder.info.features[image_key]
  decoders = ({image_key: tfds.decode.SkipDecoding()}
              if isinstance(feature, tfds.features.Image) else None)
  source = builder.as_data_source(split, decoders=decoders)
  return source if image_key == 'image' else _ImageKey(source, image_key)


def check_settings(resolution: int, region_size: int,
                   bin_range: tuple[float, float], num_images: int,
                   batch_size: int) -> None:
  """Raises ValueError naming the setting that cannot make a table."""
  if region_size < 1 or resolution < 1 or resolution % region_size:
    raise ValueError(f'resolution {resolution} must be a positive multiple '
                     f'of region_size {region_size}.')
  if not bin_range[0] < bin_range[1]:
    raise ValueError(f'bin_range {tuple(bin_range)} must be (LOW, HIGH) with '
                     'LOW < HIGH.')
  if num_images < 0 or batch_size < 1:
    raise ValueError(f'num_images ({num_images}) must be >= 0 and batch_size '
                     f'({batch_size}) >= 1.')


def region_entropies(source: Sequence[Any], *, resolution: int,
                     region_size: int, bin_range: tuple[float, float],
                     num_bins: int, sigma: float, num_images: int = 0,
                     batch_size: int = 32, read_threads: int = 8
                     ) -> tuple[np.ndarray, int]:
  """All region entropies (flat, float32) and the number of images used.

  One compiled shape: every batch has `batch_size` rows, and the padded and
  skipped rows are dropped by the batch's `mask`.
  """
  batches = pipeline.make_eval_dataset(
      source, resolution=resolution, host_batch_size=batch_size,
      read_threads=read_threads, num_examples=num_images)
  chunks, seen, skipped, start = [], 0, 0, time.time()
  for step, batch in enumerate(batches):
    skipped += int(batch['num_skipped'])
    if not batch['mask'].any():
      continue
    ent = entropy_lib.region_entropy(
        batch['image'], region_size=region_size, num_bins=num_bins,
        bin_range=tuple(bin_range), sigma=sigma)
    chunks.append(np.asarray(ent)[batch['mask']].reshape(-1))
    seen += int(batch['mask'].sum())
    if step % 100 == 0:
      print(f'{seen} images, {seen / (time.time() - start):.1f} images/s',
            flush=True)
  if skipped:
    print(f'Skipped {skipped} undecodable images.', flush=True)
  if not chunks:
    raise ValueError('The split holds no decodable image.')
  return np.concatenate(chunks), seen


def compute_table(source: Sequence[Any], *, dataset: str, split: str,
                  resolution: int = 256, region_size: int = 16,
                  bin_range: tuple[float, float] = (-1.0, 1.0),
                  num_bins: int = 32, sigma: float = 0.01,
                  num_images: int = 0, batch_size: int = 32,
                  read_threads: int = 8) -> dict[str, Any]:
  """{'table': percentile -> threshold, 'metadata': how it was computed}.

  Args:
    source: random-access records with an encoded 'image' (`open_split`, or
      `sources.load_sources(config.data).train`).
    dataset, split: recorded in the metadata only.
    resolution: side of the centre crops (the training resolution).
    region_size: side of a region in pixels (the coarsest grain factor).
    bin_range, num_bins, sigma: the entropy's soft histogram
      (`entropy_lib.region_entropy`); must match the model's.
    num_images: images from the start of the split; 0: all.
    batch_size, read_threads: throughput only; the table does not depend on
      them.
  """
  check_settings(resolution, region_size, bin_range, num_images, batch_size)
  entropies, count = region_entropies(
      source, resolution=resolution, region_size=region_size,
      bin_range=bin_range, num_bins=num_bins, sigma=sigma,
      num_images=num_images, batch_size=batch_size, read_threads=read_threads)
  metadata = {  # plain JSON types, whatever a config held
      'bin_range': [float(b) for b in bin_range], 'num_bins': int(num_bins),
      'sigma': float(sigma), 'region_size': int(region_size),
      'resolution': int(resolution), 'dataset': str(dataset),
      'split': str(split), 'num_images': count,
      'num_regions': int(entropies.size), 'preprocessing': PREPROCESSING}
  return {'table': entropy_lib.compute_entropy_thresholds(entropies),
          'metadata': metadata}


def write_table(path: str, source: Sequence[Any],
                **settings: Any) -> dict[str, Any]:
  """`compute_table(source, **settings)`, written to `path` as JSON.

  Written to a temporary file and renamed, so that a crash leaves no
  half-written table for the next attempt to trust. Returns what it wrote.
  """
  result = compute_table(source, **settings)
  tmp = f'{path}.tmp-{os.getpid()}'
  entropy_lib.save_thresholds(tmp, result['table'], result['metadata'])
  os.replace(tmp, path)
  meta = result['metadata']
  print(f'Wrote {path}: {meta["num_regions"]} regions from '
        f'{meta["num_images"]} images; T_50 = {result["table"]["50"]:.6g}.')
  return result


def write_once(path: str, open_source: Callable[[], Sequence[Any]],
               **settings: Any) -> str:
  """The table of `write_table` at `path`, computed by process 0 only.

  Scanning the split costs a host's CPUs for minutes to hours, and every
  host would find the same table: process 0 opens the split
  (`open_source()`) and writes the table, unless `path` exists (a resumed
  run keeps its table). The other hosts wait in a collective that also
  carries whether process 0 succeeded (a failure there is raised on every
  host rather than leaving them in a barrier), then read the same file:
  `path` must be on storage every host sees, as the workdir's checkpoints
  already require. Returns `path`, checked by each host's read.
  """
  error: BaseException | None = None
  if jax.process_index() == 0 and not os.path.exists(path):
    try:
      write_table(path, open_source(), **settings)
    except Exception as e:  # pylint: disable=broad-except
      error = e  # raised below, once the other hosts know
  ok = error is None
  if jax.process_count() > 1:
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
  if error is not None:
    raise error
  if not ok:
    raise RuntimeError(
        f'Process 0 failed to compute the entropy threshold table {path}; '
        'its log has the error.')
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'Process 0 wrote the entropy threshold table {path}, but process '
        f'{jax.process_index()} cannot see it: put the workdir on storage '
        'that every host shares (the checkpoints need it too).')
  entropy_lib.load_thresholds(path)
  return path
