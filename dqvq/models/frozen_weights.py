"""Frozen pretrained weights on disk: one Orbax directory per network.

LPIPS's VGG16 and FID's InceptionV3 are never trained here; their weights
come once from `python -m dqvq.convert lpips|inception` and are read back by
every run that needs them. Both networks store, check and load their params
the same way, so that is written once: a directory that is not an Orbax
checkpoint, or one whose tree differs from the module's, is refused by name
(with the command that makes a good one) before its arrays are read.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check(params: Any, abstract: Any, *, what: str, where: str,
          hint: str, limit: int = 20) -> None:
  """Raises ValueError naming every missing, extra or mis-shaped leaf."""
  flat = lambda t: {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in
                    jax.tree_util.tree_flatten_with_path(t)[0]}
  want, got = flat(abstract), flat(params)
  problems = [f'missing {k}' for k in sorted(want.keys() - got.keys())]
  problems += [f'unexpected {k}' for k in sorted(got.keys() - want.keys())]
  problems += [f'{k}: shape {got[k]}, expected {want[k]}'
               for k in sorted(want.keys() & got.keys()) if got[k] != want[k]]
  if problems:
    more = len(problems) - limit
    raise ValueError(
        f'{where}: params do not match {what}: ' + '; '.join(problems[:limit])
        + (f' (and {more} more)' if more > 0 else '')
        + f'. Re-create them with: {hint}')


def save(params: Any, path: str | os.PathLike[str], abstract: Any, *,
         what: str, hint: str) -> None:
  """Writes params as an Orbax checkpoint directory (must not exist yet)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  check(params, abstract, what=what, where=f'saving {what} params', hint=hint)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.fspath(path)),
               jax.tree.map(np.asarray, params))


def load(path: str | os.PathLike[str], abstract: Any, *, what: str,
         hint: str) -> dict[str, Any]:
  """float32 params from a directory `save` (or the converter) wrote.

  Raises:
    FileNotFoundError: nothing at `path`; the message gives `hint`.
    ValueError: a file, an unreadable checkpoint, or another tree.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{what} weights not found at {path}. Create them with: {hint}')
  if not os.path.isdir(path):
    raise ValueError(
        f'{path} is a file; {what} weights are an Orbax checkpoint '
        f'directory. Convert PyTorch weights with: {hint}')
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  where = f'loading {what} weights from {path}'
  with ocp.PyTreeCheckpointer() as ckptr:
    try:
      tree = ckptr.metadata(path).item_metadata.tree
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise ValueError(f'{path} is not a readable Orbax checkpoint ({e}). '
                       f'Re-create it with: {hint}') from e
    check(tree, abstract, what=what, where=where, hint=hint)  # names first
    params = ckptr.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  check(params, abstract, what=what, where=where, hint=hint)
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
