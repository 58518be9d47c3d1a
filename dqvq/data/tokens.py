"""Token datasets: a frozen tokenizer's codes, stored once, read by stage 2.

Stage 2 trains for hundreds of thousands of steps on the tokens of the same
images. Running the DQ-VAE encoder in every step costs more than the
transformer itself, so `python -m dqvq.tokenize` encodes each image once
(eval preprocessing: shorter side to R, center crop) and stores the result as
a TFDS dataset in ArrayRecord files, which grain reads with random access,
exactly like the image pipeline.

Layout of a token directory `out_dir`:
  dqvq_tokens.json           metadata (METADATA_FILE): which checkpoint made
                             the tokens (fingerprint, step, workdir), the
                             shapes, the source dataset and per-split counts.
  dqvq_tokens/1.0.0/...      the TFDS dataset; splits 'train', 'validation'.
Features: 'codes' (G, G) int16 (int32 for codebooks >= 32768), 'grain_map'
(R, R) uint8, 'label' int64, 'index' int64 (position in the source split) and,
when written with flip=True, 'codes_flipped' / 'grain_map_flipped': the
tokens of the horizontally flipped image, the only augmentation of the
official stage 2 that survives center-cropped tokens.

Examples are stored in source order (undecodable images are skipped and
counted); the fingerprint lets stage 2 refuse tokens of another checkpoint.
`token_pipeline.create_token_datasets` reads them for stage 2, with the
same contract as `pipeline.create_datasets`.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import time
from typing import Any, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from dqvq.data import pipeline
from dqvq.data import sources as sources_lib
from dqvq.data import tfds_compat
from dqvq.models import granularity as grain_lib
from dqvq import sharding

METADATA_FILE = 'dqvq_tokens.json'
TFDS_NAME = 'dqvq_tokens'
TFDS_VERSION = '1.0.0'
FORMAT_VERSION = 1
READ_THREADS = 4  # token batches are small: a few readers keep up


def tokenize_command(out_dir: str, stage1_workdir: str | None = None,
                     meta: dict[str, Any] | None = None) -> str:
  """The CLI line that (re)writes `out_dir` as `meta` describes it."""
  args = ['python', '-m', 'dqvq.tokenize', '--stage1_workdir',
          stage1_workdir or '<stage-1 workdir>', '--out', out_dir]
  if meta:
    splits = [i['source_split'] if i['source_split'].split('[')[0] == name
              else name for name, i in meta['splits'].items()]
    args += ['--splits', ','.join(splits), '--batch_size',
             str(meta['batch_size']), '--data_dir',
             meta['data_config']['data_dir']] + ['--flip'] * meta['flip']
    args.append('--overwrite')
  return shlex.join(args)


def read_metadata(tokens_dir: str) -> dict[str, Any]:
  """The metadata of a token dataset; a clear error when there is none."""
  path = os.path.join(tokens_dir, METADATA_FILE)
  if not os.path.isfile(path):
    what = 'does not exist' if not os.path.exists(tokens_dir) else (
        f'is not a token dataset (no {METADATA_FILE})')
    raise FileNotFoundError(
        f'Token dataset {tokens_dir!r} {what}; write it with `'
        f'{tokenize_command(tokens_dir)}`.')
  with open(path) as f:
    return json.load(f)


# Module level so every writer / verifier of a tokenizer reuses one trace.
_encode = jax.jit(lambda tokenizer, images: tokenizer.encode(images))


def _local_copy(tree: Any) -> Any:
  """Replicated (possibly multi-host) weights -> this process's first copy."""
  return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(
      a, jax.Array) and a.sharding.is_fully_replicated else a, tree)


class _Encoder:
  """Jitted `tokenizer.encode` on fixed-size batches.

  Sharded over the tokenizer's mesh when this is one process and the batch
  divides the mesh (the writer's layout); otherwise on one local device, so
  that stage 2 on a pod can still verify. Writer and verifier share it: the
  same layout runs the same program, so codes can be compared exactly.
  """

  def __init__(self, tokenizer: Any, batch_size: int):
    leaf = jax.tree.leaves(tokenizer.params)[0]
    mesh = getattr(getattr(leaf, 'sharding', None), 'mesh', None)
    self.num_devices = math.prod(
        mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.shape
    ) if isinstance(mesh, jax.sharding.Mesh) else 1
    self._sharding = None
    if (self.num_devices > 1 and jax.process_count() == 1 and
        batch_size % self.num_devices == 0):
      self._sharding = sharding.batch_sharding(mesh)
      self._tokenizer = tokenizer
    else:
      self.num_devices = 1
      self._tokenizer = tokenizer.replace(
          params=_local_copy(tokenizer.params),
          codebook=_local_copy(tokenizer.codebook))

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    x = jax.device_put(images, self._sharding) if self._sharding else images
    return jax.device_get(_encode(self._tokenizer, x))


def _image_batches(source: Any, resolution: int, batch_size: int,
                   threads: int = 8) -> Iterable[dict[str, np.ndarray]]:
  """The split once, in order: `pipeline.make_eval_dataset` on one host.

  The pixels stage-1 evaluation sees; undecodable images are skipped (counted
  in 'num_skipped') and 'index' keeps each row's source position. Writer and
  verifier read through here, so they encode identical batches.
  """
  return pipeline.make_eval_dataset(source, resolution=resolution,
                                    host_batch_size=batch_size,
                                    read_threads=threads)


class DqvqTokens(tfds_compat.ModuleCodePath, tfds.core.GeneratorBasedBuilder):
  """Writes the examples it is given, in order (`write_token_dataset`).

  A generator-based builder rather than `store_as_tfds_dataset`, whose
  builder lacks the `code_path` workaround (`tfds_compat`) and so fails here.
  """

  VERSION = tfds.core.Version(TFDS_VERSION)

  def __init__(self, *, features: tfds.features.FeaturesDict,
               split_examples: dict[str, Iterator[tuple[int, dict]]],
               description: str, **kwargs):
    self._features = features
    self._split_examples = split_examples
    self._description = description
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=self._description, features=self._features,
        disable_shuffling=True)  # Keep source order: index i is row i.

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    return dict(self._split_examples)

  def _generate_examples(self):  # pytype: disable=signature-mismatch
    raise NotImplementedError('Examples come from `split_examples`.')


def _split_sources(data_config: ml_collections.ConfigDict,
                   splits: Sequence[str]) -> tuple[dict[str, Any], int]:
  """{output split: (source split, data source)} and num_classes.

  'train' / 'validation' read config.train_split / eval_split (which may be
  sliced, e.g. 'train[:1%]'); any other name, sliced or not, is read as given
  and stored under its unsliced name ('validation[:32]' -> 'validation').
  """
  out, num_classes = {}, 1
  for split in splits:
    name = split.split('[')[0]
    if name in out:
      raise ValueError(f'Split {name!r} is requested twice in {splits}.')
    config = ml_collections.ConfigDict(data_config.to_dict())
    if split != 'train':
      config.eval_split = (config.get('eval_split', 'validation')
                           if split == 'validation' else split)
    srcs = sources_lib.load_sources(config)
    source_split = (config.get('train_split', 'train') if split == 'train'
                    else config.eval_split)
    out[name] = (source_split, srcs.train if split == 'train' else srcs.eval)
    num_classes = srcs.num_classes
  return out, num_classes


def write_token_dataset(tokenizer: Any, out_dir: str, *,
                        data_config: ml_collections.ConfigDict | None = None,
                        splits: Sequence[str] = ('train', 'validation'),
                        batch_size: int = 64, flip: bool = False,
                        stage1_workdir: str | None = None,
                        overwrite: bool = False) -> dict[str, Any]:
  """Encodes every image of `splits` and stores the tokens; returns metadata.

  Single process: run it on one host (it uses all of that host's devices).
  `stage1_workdir` is recorded (default: `tokenizer.workdir` if it has one).
  """
  if jax.process_count() > 1:
    raise ValueError('write_token_dataset runs on one host; start '
                     '`python -m dqvq.tokenize` as a single process.')
  if data_config is None:
    data_config = tokenizer.config.data
  stage1_workdir = stage1_workdir or getattr(tokenizer, 'workdir', None) or ''
  tfds_root = os.path.join(out_dir, TFDS_NAME)
  meta_path = os.path.join(out_dir, METADATA_FILE)
  if os.path.exists(meta_path) or os.path.exists(tfds_root):
    if not overwrite:
      raise FileExistsError(f'{out_dir} already holds a token dataset; delete '
                            'it or pass overwrite=True (--overwrite).')
    shutil.rmtree(tfds_root, ignore_errors=True)
    if os.path.exists(meta_path):
      os.remove(meta_path)
  resolution = int(data_config.resolution)
  factors = tuple(int(f) for f in tokenizer.vae.grain_factors)
  codebook_size = int(tokenizer.vae.codebook_size)
  code_dtype = np.int16 if codebook_size < 2**15 else np.int32
  grid, regions = resolution // factors[-1], resolution // factors[0]
  encoder = _Encoder(tokenizer, batch_size)
  # Host-side `grain_lib.code_length` (no dispatch per batch): codes/image.
  per_region = np.asarray(grain_lib.codes_per_region(factors), np.int64)
  split_sources, num_classes = _split_sources(data_config, splits)
  threads = int(data_config.get('read_threads', 8) or 8)
  stats = {}

  def examples(split: str, source: Any) -> Iterator[tuple[int, dict]]:
    start, seen, skipped, lengths = time.time(), 0, 0, []
    for step, batch in enumerate(
        _image_batches(source, resolution, batch_size, threads)):
      keep = np.flatnonzero(batch['mask'])
      skipped += int(batch['num_skipped'])
      seen += len(keep) + int(batch['num_skipped'])
      toks = {'': encoder(batch['image'])}
      if flip:
        toks['_flipped'] = encoder(np.ascontiguousarray(
            batch['image'][:, :, ::-1]))
      lengths.append(per_region[toks['']['grain_map'][keep]].sum(axis=(1, 2)))
      for i in keep:
        ex = {'label': np.int64(batch['label'][i]),
              'index': np.int64(batch['index'][i])}
        for suffix, t in toks.items():
          ex['codes' + suffix] = t['codes'][i].astype(code_dtype)
          ex['grain_map' + suffix] = t['grain_map'][i].astype(np.uint8)
        yield int(ex['index']), ex
      if step % 50 == 0 or seen == len(source):
        print(f'{split}: {seen}/{len(source)} images, '
              f'{seen / max(time.time() - start, 1e-9):.1f} images/s',
              flush=True)
    stats[split] = {'num_examples': seen - skipped, 'num_skipped': skipped,
                    'num_source_examples': len(source),
                    'mean_code_length': float(np.concatenate(lengths).mean())
                                        if seen > skipped else 0.0}

  tokens = {'codes': tfds.features.Tensor(shape=(grid, grid), dtype=code_dtype),
            'grain_map': tfds.features.Tensor(shape=(regions, regions),
                                              dtype=np.uint8)}
  features = {**tokens, 'label': tfds.features.Scalar(dtype=np.int64),
              'index': tfds.features.Scalar(dtype=np.int64)}
  if flip:
    features.update({k + '_flipped': v for k, v in tokens.items()})
  builder = DqvqTokens(
      features=tfds.features.FeaturesDict(features),
      split_examples={s: examples(s, src)
                      for s, (_, src) in split_sources.items()},
      description=f'DQ-VAE tokens of {data_config.name} (see {METADATA_FILE}).',
      data_dir=out_dir, file_format='array_record')
  builder.download_and_prepare()
  meta = {
      'format_version': FORMAT_VERSION,
      'fingerprint': tokenizer.fingerprint, 'stage1_step': int(tokenizer.step),
      'stage1_workdir': os.path.abspath(stage1_workdir) if stage1_workdir
                        else '',
      'resolution': resolution, 'grain_factors': list(factors),
      'codebook_size': codebook_size, 'code_grid': grid,
      'region_grid': regions, 'codes_dtype': np.dtype(code_dtype).name,
      'num_classes': num_classes, 'flip': bool(flip), 'batch_size': batch_size,
      'encode_devices': encoder.num_devices, 'platform': jax.default_backend(),
      'dataset': data_config.name, 'data_config': data_config.to_dict(),
      'tfds_dir': os.path.join(TFDS_NAME, TFDS_VERSION),
      'splits': {s: {'source_split': name, **stats[s]}
                 for s, (name, _) in split_sources.items()},
  }
  tmp = meta_path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, meta_path)  # Last: its presence means the data is complete.
  return meta


def open_token_split(tokens_dir: str, split: str) -> Any:
  """Random-access TFDS data source of one split of a token dataset."""
  meta = read_metadata(tokens_dir)
  builder = tfds.builder_from_directory(
      os.path.join(tokens_dir, meta['tfds_dir']))
  if split not in builder.info.splits:
    raise ValueError(f'{tokens_dir} has no split {split!r} (splits: '
                     f'{", ".join(builder.info.splits)}); write it with '
                     f'`{tokenize_command(tokens_dir, meta["stage1_workdir"])}'
                     ' --splits ...`.')
  return builder.as_data_source(split)


def verify_token_dataset(tokenizer: Any, tokens_dir: str,
                         num_images: int = 8,
                         stage1_workdir: str | None = None) -> None:
  """Raises ValueError unless `tokenizer` made the tokens in `tokens_dir`.

  Checks the recorded fingerprint, then re-encodes the first `num_images`
  stored validation examples in batches identical to the writer's and
  compares every token: exactly on the writer's device layout, else allowing
  1% (other hardware rounds differently, which can flip near-tie codes).
  `stage1_workdir` (or `tokenizer.workdir`) goes into the fix's command.
  """
  meta = read_metadata(tokens_dir)
  workdir = stage1_workdir or getattr(tokenizer, 'workdir', None)
  regenerate = tokenize_command(tokens_dir, workdir, meta)
  if meta['fingerprint'] != tokenizer.fingerprint:
    raise ValueError(
        f'{tokens_dir} holds tokens of another stage-1 checkpoint: '
        f'fingerprint {meta["fingerprint"]} (step {meta["stage1_step"]} of '
        f'{meta["stage1_workdir"] or "an unrecorded workdir"}), but this '
        f'tokenizer is {tokenizer.fingerprint} (step {tokenizer.step}). '
        f'Regenerate them: `{regenerate}`.')
  split = 'validation' if 'validation' in meta['splits'] else next(
      iter(meta['splits']))
  stored = open_token_split(tokens_dir, split)
  wanted = {int(r['index']): r for r in (
      stored[i] for i in range(min(num_images, len(stored))))}
  source = _split_sources(ml_collections.ConfigDict(meta['data_config']),
                          [split])[0][split][1]
  encoder = _Encoder(tokenizer, meta['batch_size'])
  # Another device layout may round differently and flip near-tie codes.
  exact = (encoder.num_devices == meta['encode_devices'] and
           jax.default_backend() == meta['platform'])
  differ = total = 0
  for batch in _image_batches(source, meta['resolution'], meta['batch_size']):
    if not wanted:
      break
    toks = {'': encoder(batch['image'])}
    if meta['flip']:
      toks['_flipped'] = encoder(np.ascontiguousarray(
          batch['image'][:, :, ::-1]))
    for row, index in enumerate(batch['index']):
      ex = wanted.pop(int(index), None)  # None for padding (-1) and unstored
      if ex is None:
        continue
      for key in ('codes', 'grain_map'):
        for suffix, t in toks.items():
          want = np.asarray(ex[key + suffix], np.int64)
          differ += int((want != t[key][row]).sum())
          total += want.size
  if wanted:
    raise ValueError(f'{tokens_dir}: {split} indices {sorted(wanted)} are not '
                     f'in the source split; regenerate: `{regenerate}`.')
  if differ > (0 if exact else 0.01 * total):
    raise ValueError(
        f'{tokens_dir}: {differ} of {total} stored tokens differ from what '
        'this tokenizer encodes, although the fingerprints match (compared '
        f'{"exactly" if exact else "with 1% tolerance: other devices"}). '
        f'Regenerate them: `{regenerate}`.')
