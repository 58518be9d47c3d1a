"""Config checks and TFDS random-access sources for the three datasets.

Everything that can be wrong with a data config is checked here, before any
worker process starts or anything compiles, and each error says what to
change. The config fields are documented in `dqvq.data.pipeline`.

Every source returns images as encoded bytes (`tfds.decode.SkipDecoding`):
decoding is done by the pipeline's transforms, which can skip a corrupt
record, whereas a TFDS decoder would raise inside the data source.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import ml_collections
import tensorflow_datasets as tfds

from dqvq.data import demo
from dqvq.data import image_folder

KNOWN_DATASETS = ('dqvq_demo', 'image_folder', 'imagenet2012')

IMAGENET_MANUAL_STEPS = """\
imagenet2012 cannot be downloaded automatically. Prepare it once:
  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from
     https://image-net.org (requires an account).
  2. Put both files in {manual_dir}
  3. Run: tfds build imagenet2012 --data_dir {data_dir} --file_format array_record
The pipeline reads ArrayRecord files (random access for grain); data already
prepared as TFRecord must be rebuilt or converted with
`tfds convert_format --dataset_dir {data_dir}/imagenet2012/<version> --out_file_format array_record`."""


class DataNotPreparedError(FileNotFoundError):
  """The dataset needs a manual preparation step before training."""


@dataclasses.dataclass
class Sources:
  """Random-access sources of one dataset plus the facts the trainer needs."""
  train: Sequence[Any]
  eval: Sequence[Any]
  num_classes: int


def _get(config: ml_collections.ConfigDict, field: str, default: Any) -> Any:
  value = config.get(field, default)
  return default if value is None else value


def train_crop_scale(config_data: ml_collections.ConfigDict
                     ) -> tuple[float, float] | None:
  """`config.data.crop_scale` checked: None, or 0 < lo <= hi <= 1."""
  scale = _get(config_data, 'crop_scale', None)
  if scale is None:
    return None
  scale = tuple(float(s) for s in scale)
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    raise ValueError(
        f'config.data.crop_scale={scale} must be (lo, hi) with 0 < lo <= hi '
        '<= 1 (shares of the shorter side), e.g. (0.1, 1.0), or None for '
        "the paper's resize-and-crop.")
  return scale


def validate_data_config(config_data: ml_collections.ConfigDict) -> None:
  """Raises ValueError / FileNotFoundError naming the field to fix."""
  name = _get(config_data, 'name', '')
  if name not in KNOWN_DATASETS:
    raise ValueError(
        f'config.data.name={name!r} is not a known dataset; use one of '
        f'{", ".join(KNOWN_DATASETS)}.')
  train_crop_scale(config_data)
  data_dir = _get(config_data, 'data_dir', '')
  if not data_dir:
    raise ValueError(
        'config.data.data_dir is empty: set it to the TFDS data directory '
        '(for dqvq_demo and image_folder any writable directory; it is '
        'created and the dataset is prepared there on first use).')
  if name == 'imagenet2012' and not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f'config.data.data_dir={data_dir} does not exist. ' +
        IMAGENET_MANUAL_STEPS.format(
            manual_dir=os.path.join(data_dir, 'downloads', 'manual'),
            data_dir=data_dir))
  if name == 'image_folder':
    root = _get(config_data, 'image_folder_root', '')
    if not root or not os.path.isdir(root):
      raise FileNotFoundError(
          f'config.data.image_folder_root={root!r} is not a directory: point '
          'it at a folder containing the .png/.jpg images (nested subfolders '
          'are fine, e.g. FFHQ images1024x1024/).')
    for field in ('image_folder_train_list', 'image_folder_eval_list'):
      path = _get(config_data, field, '')
      if path and not os.path.isfile(path):
        raise FileNotFoundError(
            f'config.data.{field}={path} does not exist: give a text file '
            'with one image path (relative to image_folder_root) per line, '
            'or leave it empty for a hash-based split.')
    fraction = _get(config_data, 'image_folder_val_fraction', 0.05)
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f'config.data.image_folder_val_fraction={fraction} '
                       'must be in [0, 1).')
    if (bool(_get(config_data, 'image_folder_train_list', '')) !=
        bool(_get(config_data, 'image_folder_eval_list', ''))):
      raise ValueError('Set both image_folder_train_list and '
                       'image_folder_eval_list, or neither.')
  resolution = _get(config_data, 'resolution', 0)
  if not isinstance(resolution, int) or resolution <= 0:
    raise ValueError(
        f'config.data.resolution={resolution!r} must be a positive integer '
        '(the side of the square training crops, e.g. 256).')
  if int(_get(config_data, 'num_workers', 0)) < 0:
    raise ValueError('config.data.num_workers must be >= 0 (0 = in-process).')
  for field in ('train_split', 'eval_split'):
    if field in config_data and not config_data[field]:
      raise ValueError(f'config.data.{field} is empty: name a TFDS split, '
                       'e.g. "train" or "validation".')


def _builder(config_data: ml_collections.ConfigDict
             ) -> tfds.core.DatasetBuilder:
  """The builder for config_data.name, prepared if that needs no download."""
  name, data_dir = config_data.name, config_data.data_dir
  if name == 'dqvq_demo':
    return demo.load_demo(data_dir)
  if name == 'image_folder':
    split_files = {}
    if _get(config_data, 'image_folder_train_list', ''):
      split_files = {'train': config_data.image_folder_train_list,
                     'validation': config_data.image_folder_eval_list}
    return image_folder.load_image_folder(
        data_dir, config_data.image_folder_root,
        split_files=split_files,
        validation_fraction=float(
            _get(config_data, 'image_folder_val_fraction', 0.05)),
        validate_images=bool(_get(config_data, 'image_folder_validate', True)))
  return tfds.builder(name, data_dir=data_dir)


def _data_source(builder: tfds.core.DatasetBuilder, split: str,
                 data_dir: str) -> Sequence[Any]:
  """`builder.as_data_source(split)` with errors that name the fix."""
  known = list(builder.info.splits.keys())
  if known and split.split('[')[0] not in known:
    raise ValueError(f'Split {split!r} is not in {builder.name} (splits: '
                     f'{", ".join(known)}); fix config.data.train_split / '
                     'eval_split.')
  try:
    source = builder.as_data_source(
        split, decoders={'image': tfds.decode.SkipDecoding()})
  except (NotImplementedError, AssertionError, FileNotFoundError,
          ValueError) as e:
    if builder.name == 'imagenet2012':
      state = ('is not prepared' if not builder.is_prepared() else
               'is prepared but not as ArrayRecord')
      raise DataNotPreparedError(
          f'imagenet2012 {state} in {data_dir}. ' +
          IMAGENET_MANUAL_STEPS.format(
              manual_dir=os.path.join(data_dir, 'downloads', 'manual'),
              data_dir=data_dir)) from e
    raise
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f'Split {split!r} of {builder.name} is empty.')
  return source


def load_sources(config_data: ml_collections.ConfigDict) -> Sources:
  """Validates the config and opens the train and eval sources."""
  validate_data_config(config_data)
  builder = _builder(config_data)
  train = _data_source(builder, _get(config_data, 'train_split', 'train'),
                       config_data.data_dir)
  evaluation = _data_source(
      builder, _get(config_data, 'eval_split', 'validation'),
      config_data.data_dir)
  label = builder.info.features['label']
  return Sources(train=train, eval=evaluation,
                 num_classes=int(getattr(label, 'num_classes', 1) or 1))

