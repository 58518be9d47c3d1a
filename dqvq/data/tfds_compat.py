"""Workarounds shared by the project's TFDS builders.

tensorflow-datasets 4.9.10 resolves a builder's `code_path` through
`importlib_resources`, a backport it only declares as a dependency for
Python < 3.9, so on newer Pythons any builder defined inside a package fails
in `download_and_prepare` with `ModuleNotFoundError: importlib_resources`.
`ModuleCodePath` answers `code_path` from the class's own source file, which
is what TFDS falls back to anyway, so the builders work without the backport.
"""

from __future__ import annotations

import inspect
import os

from etils import epath
import tensorflow_datasets as tfds


class ModuleCodePath:
  """Mixin for `tfds.core.DatasetBuilder` subclasses; put it first in bases."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=no-self-argument
    return epath.Path(inspect.getfile(cls))


def prepare_if_needed(builder: tfds.core.DatasetBuilder) -> None:
  """Runs `download_and_prepare` unless the data already exists.

  Several processes preparing the same data_dir at once is safe: TFDS writes
  into a temporary directory and renames it when complete.
  """
  if builder.is_prepared():
    return
  os.makedirs(builder.data_dir_root, exist_ok=True)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
