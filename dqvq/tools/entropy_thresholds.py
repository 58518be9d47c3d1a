r"""Computes a percentile table of region entropies over a TFDS split.

The entropy router needs, for a target fine ratio r, the (100 - 100 r)-th
percentile of region entropies over the training data. The official JSONs were
computed with bins [0, 1]; to route with another bin range (the official HEAD
uses [-1, 1]), another resolution or another dataset, recompute the table:

  python -m dqvq.tools.entropy_thresholds --data_dir DIR --dataset imagenet2012 \
      --split train --resolution 256 --region_size 16 --bin_range=-1,1 \
      --num_images 100000 --out thresholds.json

Stage-1 training with `model.entropy_thresholds='auto'` builds the table
through `write_once`: process 0 scans the split and writes the file into the
workdir, every other host waits for it and reads that file.

Images get the official evaluation preprocessing (PIL bilinear resize of the
shorter side to `resolution`, centre crop, scaled to [-1, 1]), shared with
the training pipeline through `dqvq.data.transforms`. `--bin_range` needs the `=` form because
its value starts with a minus sign.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import os
import sys
import time
from typing import Iterable, Iterator, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from dqvq.data import transforms
from dqvq.models import entropy as entropy_lib


def _parse_range(text: str) -> tuple[float, float]:
  parts = [float(p) for p in text.split(',')]
  if len(parts) != 2 or not parts[0] < parts[1]:
    raise argparse.ArgumentTypeError(
        f'--bin_range wants "LOW,HIGH" with LOW < HIGH, got {text!r}.')
  return parts[0], parts[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data_dir', default=None, help='TFDS data directory.')
  p.add_argument('--dataset', required=True, help='TFDS name, e.g. ffhq.')
  p.add_argument('--split', default='train')
  p.add_argument('--image_key', default='image')
  p.add_argument('--resolution', type=int, default=256)
  p.add_argument('--region_size', type=int, default=16)
  p.add_argument('--bin_range', type=_parse_range, default=(-1.0, 1.0),
                 help='First,last bin centre; use --bin_range=0,1 to match '
                 'the official JSONs.')
  p.add_argument('--num_bins', type=int, default=32)
  p.add_argument('--sigma', type=float, default=0.01)
  p.add_argument('--num_images', type=int, default=0,
                 help='Images to use from the start of the split; 0 = all.')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--download', action='store_true',
                 help='Let TFDS download/prepare the dataset if missing.')
  p.add_argument('--out', required=True, help='Output JSON path.')
  args = p.parse_args(argv)
  if args.resolution % args.region_size:
    p.error(f'--resolution {args.resolution} must be a multiple of '
            f'--region_size {args.region_size}.')
  if args.num_images < 0 or args.batch_size < 1:
    p.error('--num_images must be >= 0 and --batch_size >= 1.')
  return args


def preprocess_eval(image: np.ndarray, resolution: int) -> np.ndarray:
  """uint8 HWC image -> float32 [-1, 1] via the project's eval transform.

  The same PIL operations as training and evaluation (`dqvq.data.transforms`,
  torchvision's Resize + CenterCrop), so that thresholds describe the
  entropies the router will see.
  """
  img = transforms.decode_image(np.asarray(image, np.uint8))
  if img is None:
    raise ValueError(f'Cannot read an image of shape {np.shape(image)}.')
  img = np.asarray(transforms.resize_shorter_side(img, resolution))
  img = np.ascontiguousarray(transforms.center_crop(img, resolution))
  return transforms.to_model_range(img)


def iterate_batches(
    args: argparse.Namespace) -> Iterator[tuple[np.ndarray, int]]:
  """Yields ((batch_size, res, res, 3) float32 batch, real count) pairs.

  The last batch is padded with zeros to keep one compiled shape; the caller
  drops the padded rows. PIL releases the GIL while resizing, so a thread
  pool preprocesses a batch in parallel.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')  # keep the accelerator for JAX
  except RuntimeError:  # TF already initialised its devices; harmless.
    pass
  builder = tfds.builder(args.dataset, data_dir=args.data_dir)
  if args.download:
    builder.download_and_prepare()
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    # ArrayRecord (what our builders and grain use) has no tf.data reader.
    source = builder.as_data_source(split=args.split)
    count = min(len(source), args.num_images or len(source))
    images = (source[i][args.image_key] for i in range(count))
  else:
    ds = builder.as_dataset(split=args.split, shuffle_files=False)
    if args.num_images:
      ds = ds.take(args.num_images)
    images = tfds.as_numpy(ds.map(lambda ex: ex[args.image_key]).prefetch(64))
  prep = functools.partial(preprocess_eval, resolution=args.resolution)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for raw in _chunks(images, args.batch_size):
      batch = np.stack(list(pool.map(prep, raw)))
      n = batch.shape[0]
      if n < args.batch_size:
        pad = np.zeros((args.batch_size - n,) + batch.shape[1:], batch.dtype)
        batch = np.concatenate([batch, pad])
      yield batch, n


def _chunks(items: Iterable, size: int) -> Iterator[list]:
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def compute_dataset_entropies(
    args: argparse.Namespace) -> tuple[np.ndarray, int]:
  """All region entropies (flat, float32) and the number of images used."""
  chunks, seen, start = [], 0, time.time()
  for step, (batch, n) in enumerate(iterate_batches(args)):
    ent = entropy_lib.region_entropy(
        batch, region_size=args.region_size, num_bins=args.num_bins,
        bin_range=tuple(args.bin_range), sigma=args.sigma)
    chunks.append(np.asarray(ent)[:n].reshape(-1))
    seen += n
    if step % 100 == 0:
      print(f'{seen} images, {seen / (time.time() - start):.1f} images/s',
            flush=True)
  if not chunks:
    raise ValueError(f'No images in {args.dataset}:{args.split}.')
  return np.concatenate(chunks), seen


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the CLI; returns what it wrote (table plus metadata)."""
  args = parse_args(argv)
  entropies, num_images = compute_dataset_entropies(args)
  table = entropy_lib.compute_entropy_thresholds(entropies)
  metadata = {
      'bin_range': list(args.bin_range),
      'num_bins': args.num_bins,
      'sigma': args.sigma,
      'region_size': args.region_size,
      'resolution': args.resolution,
      'dataset': args.dataset,
      'split': args.split,
      'num_images': num_images,
      'num_regions': int(entropies.size),
      'preprocessing': 'PIL bilinear resize of the shorter side + centre '
                       'crop, [-1, 1]',
  }
  entropy_lib.save_thresholds(args.out, table, metadata)
  print(f'Wrote {args.out}: {entropies.size} regions from {num_images} '
        f'images; T_50 = {table["50"]:.6g}.')
  return {'table': table, 'metadata': metadata}


def write_once(path: str, argv: Sequence[str]) -> str:
  """The table of `main(argv)` at `path`, computed by process 0 only.

  Scanning the split costs a host's CPUs for minutes to hours, and every
  host would find the same table: process 0 computes it (unless `path`
  exists: a resumed run keeps its table) and writes it atomically, so that a
  crash leaves no half-written table for the next attempt to trust. The
  other hosts wait in a collective that also carries whether process 0
  succeeded (a failure there is raised on every host rather than leaving
  them in a barrier), then read the same file: `path` must be on storage
  every host sees, as the workdir's checkpoints already require. Returns
  `path`, checked by each host's read.
  """
  error: BaseException | None = None
  if jax.process_index() == 0 and not os.path.exists(path):
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
      main([*argv, f'--out={tmp}'])
      os.replace(tmp, path)
    except (Exception, SystemExit) as e:  # pylint: disable=broad-except
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


if __name__ == '__main__':
  main(sys.argv[1:])
