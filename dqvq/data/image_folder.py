"""`dqvq_image_folder`: a TFDS builder for any folder of images (FFHQ, ...).

FFHQ and most custom datasets arrive as a directory tree of .png/.jpg files
with no TFDS builder. This builder turns such a tree into ArrayRecord files
that grain reads with random access, so every dataset goes through the same
TFDS + grain pipeline and gets checkpointable, shardable iterators.

Splits:

* With split lists (text files with one relative path per line, e.g.
  taming-transformers' `ffhqtrain.txt` / `ffhqvalidation.txt`), each list
  becomes one split. An entry that is not a relative path under the root is
  matched by file name when that name is unique, because taming's lists name
  files of a flat folder (`00000.png`) while the official FFHQ download nests
  them (`00000/00000.png`). Unmatched entries are counted and logged.
* Without lists, a file goes to `validation` when the SHA-1 of its relative
  path, read as a fraction, is below `validation_fraction`. This depends on
  nothing but the path, so adding files never moves existing ones between
  splits.

Images are stored as their original bytes (no re-encoding loss, and FFHQ's
PNGs stay lossless). With `validate_images` (default), each file is fully
decoded once while building and undecodable files are skipped, counted and
logged instead of crashing a long build; the pipeline additionally skips
records it cannot decode at read time. `label` is always 0 (one class): image
folders are unconditional.

Each root gets its own BuilderConfig, whose name carries a hash of the root
and split settings, so two folders never share a prepared directory.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import os
import re
from typing import Iterator, Mapping, Sequence

from absl import logging
from PIL import Image
import tensorflow_datasets as tfds

from dqvq.data import tfds_compat

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
_CHUNK = 256  # Files decoded in flight; bounds memory for 1024px PNGs.


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """Where the images are and how to split them.

  Attributes:
    root_dir: folder searched recursively for images.
    split_files: (split name, list file) pairs; empty for a hash split.
    validation_fraction: share of files put in `validation` by hash.
    validate_images: decode every file while building to drop broken ones.
    num_threads: threads reading and decoding files while building.
  """
  root_dir: str = ''
  split_files: tuple[tuple[str, str], ...] = ()
  validation_fraction: float = 0.05
  validate_images: bool = True
  num_threads: int = 16


def image_folder_config(root_dir: str,
                        *,
                        split_files: Mapping[str, str] | None = None,
                        validation_fraction: float = 0.05,
                        validate_images: bool = True,
                        num_threads: int = 16) -> ImageFolderConfig:
  """Builds the config for `root_dir`, named after the root and settings."""
  root_dir = os.path.abspath(root_dir)
  files = tuple(sorted((k, os.path.abspath(v))
                       for k, v in (split_files or {}).items()))
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(
        f'validation_fraction must be in [0, 1), got {validation_fraction}.')
  digest = hashlib.sha1(
      repr((root_dir, files, validation_fraction, validate_images)).encode()
  ).hexdigest()[:10]
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(root_dir).lower())
  return ImageFolderConfig(
      name=f'{slug.strip("_") or "root"}_{digest}',
      description=f'Images under {root_dir}.',
      root_dir=root_dir,
      split_files=files,
      validation_fraction=validation_fraction,
      validate_images=validate_images,
      num_threads=num_threads)


def list_images(root_dir: str) -> list[str]:
  """Relative paths ('/'-separated) of all images under root_dir, sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root_dir):
    dirnames.sort()
    for name in filenames:
      if name.lower().endswith(IMAGE_EXTENSIONS):
        rel = os.path.relpath(os.path.join(dirpath, name), root_dir)
        found.append(rel.replace(os.sep, '/'))
  return sorted(found)


def hash_fraction(rel_path: str) -> float:
  """A stable number in [0, 1) derived from the path alone."""
  return int(hashlib.sha1(rel_path.encode()).hexdigest()[:15], 16) / 16**15


def hash_split(rel_paths: Sequence[str],
               validation_fraction: float) -> dict[str, list[str]]:
  """Splits paths into train/validation by path hash (see module doc)."""
  if validation_fraction <= 0:
    return {'train': list(rel_paths)}
  val = [p for p in rel_paths if hash_fraction(p) < validation_fraction]
  if not val and len(rel_paths) > 1:
    # Tiny folders: keep a non-empty validation split, still hash-determined.
    val = [min(rel_paths, key=hash_fraction)]
  val_set = set(val)
  return {'train': [p for p in rel_paths if p not in val_set],
          'validation': val}


def resolve_split_list(entries: Sequence[str],
                       rel_paths: Sequence[str]) -> tuple[list[str], int]:
  """Maps list entries to files; returns (matched paths, unmatched count)."""
  present = set(rel_paths)
  by_name: dict[str, list[str]] = {}
  for p in rel_paths:
    by_name.setdefault(p.rsplit('/', 1)[-1], []).append(p)
  matched, missing = [], 0
  for entry in entries:
    entry = entry.strip().replace('\\', '/').removeprefix('./')
    if not entry:
      continue
    if entry in present:
      matched.append(entry)
    elif len(by_name.get(entry.rsplit('/', 1)[-1], ())) == 1:
      matched.append(by_name[entry.rsplit('/', 1)[-1]][0])
    else:
      missing += 1
  return matched, missing


def is_decodable(data: bytes) -> bool:
  """True when PIL fully decodes the bytes (truncation included)."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
    return True
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return False


class DqvqImageFolder(tfds_compat.ModuleCodePath,
                      tfds.core.GeneratorBasedBuilder):
  """Images from a folder tree; pass `config=image_folder_config(root)`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original bytes, label 0, hash or list splits.'}
  BUILDER_CONFIG_CLASS = ImageFolderConfig

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=['image']),
            'file_name': tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Local files only.
    config: ImageFolderConfig = self.builder_config
    if not os.path.isdir(config.root_dir):
      raise FileNotFoundError(
          f'Image folder root {config.root_dir} does not exist.')
    rel_paths = list_images(config.root_dir)
    if not rel_paths:
      raise FileNotFoundError(
          f'No {"/".join(IMAGE_EXTENSIONS)} files under {config.root_dir}.')
    if config.split_files:
      splits = {}
      for split, list_file in config.split_files:
        with open(list_file) as f:
          splits[split], missing = resolve_split_list(
              f.read().splitlines(), rel_paths)
        if missing:
          logging.warning('%d entries of %s are not under %s; ignored.',
                          missing, list_file, config.root_dir)
        if not splits[split]:
          raise ValueError(f'No entry of {list_file} matches a file under '
                           f'{config.root_dir}.')
    else:
      splits = hash_split(rel_paths, config.validation_fraction)
    return {name: self._generate_examples(name, paths)
            for name, paths in splits.items()}

  def _read(self, rel_path: str) -> tuple[str, bytes | None]:
    path = os.path.join(self.builder_config.root_dir, rel_path)
    with open(path, 'rb') as f:
      data = f.read()
    if self.builder_config.validate_images and not is_decodable(data):
      return rel_path, None
    return rel_path, data

  def _generate_examples(self, split: str,
                         rel_paths: Sequence[str]) -> Iterator[tuple]:
    skipped = []
    threads = max(1, self.builder_config.num_threads)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for start in range(0, len(rel_paths), _CHUNK):
        chunk = rel_paths[start:start + _CHUNK]
        for rel_path, data in pool.map(self._read, chunk):
          if data is None:
            skipped.append(rel_path)
            continue
          yield rel_path, {'image': data, 'label': 0, 'file_name': rel_path}
    if skipped:
      logging.warning('Split %s: skipped %d undecodable image(s): %s%s',
                      split, len(skipped), ', '.join(skipped[:10]),
                      ' ...' if len(skipped) > 10 else '')


def image_folder_builder(data_dir: str, root_dir: str,
                         **config_kwargs) -> DqvqImageFolder:
  """The builder for `root_dir` (see `image_folder_config` for kwargs)."""
  return DqvqImageFolder(
      data_dir=data_dir,
      config=image_folder_config(root_dir, **config_kwargs),
      file_format='array_record')


def load_image_folder(data_dir: str, root_dir: str,
                      **config_kwargs) -> DqvqImageFolder:
  """Returns the builder for `root_dir`, preparing it on first use."""
  builder = image_folder_builder(data_dir, root_dir, **config_kwargs)
  tfds_compat.prepare_if_needed(builder)
  return builder
