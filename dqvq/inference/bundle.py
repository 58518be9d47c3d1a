"""Inference bundles: the weights and config a user loads, nothing else.

A training workdir holds optimizer state, discriminator weights, data-iterator
positions and many steps; a user who wants to tokenize images or sample needs
one set of inference weights and the config that built them. A bundle is that
set, in a directory that outlives the run:

  BUNDLE/bundle.json              format, version, kind, config, meta, and
                                  the byte size of every file in variables/
  BUNDLE/variables/               Orbax checkpoint of the inference variables
  BUNDLE/entropy_thresholds.json  entropy-router tokenizers: the routing table
  BUNDLE/tokenizer/               generator bundles: their tokenizer's bundle
  BUNDLE/programs/                optional `jax.export` programs (dqvq.export)

kind 'tokenizer' holds the DQ-VAE's {'params', 'codebook'} (the codebook is
the EMA one training kept); kind 'generator' holds the DQ-Transformer's
{'params'} plus its tokenizer, so a generator bundle alone turns samples into
images. Bundles come from `python -m dqvq.export` (a run) or
`python -m dqvq.convert official` (the authors' checkpoints), and are read by
`dqvq.load_tokenizer` / `dqvq.load_generator`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from dqvq import sharding

FORMAT = 'dqvq-bundle'
VERSION = 1
KINDS = ('tokenizer', 'generator')
MANIFEST = 'bundle.json'
VARIABLES = 'variables'
THRESHOLDS = 'entropy_thresholds.json'


def _jsonable(value: Any) -> Any:
  """Config/meta values as JSON (tuples as lists, numpy scalars as numbers)."""
  return json.loads(json.dumps(value, default=lambda x: getattr(
      x, 'tolist', lambda: str(x))()))


def save(path: str, *, kind: str, config: ml_collections.ConfigDict,
         variables: Any, meta: dict[str, Any] | None = None) -> str:
  """Writes a bundle directory (which must not exist yet); returns its path.

  An entropy-router tokenizer's threshold table is copied in and the config
  made to name the copy, so the bundle does not depend on the run directory.
  """
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r}; choose one of {KINDS}.')
  path = os.path.abspath(path)
  if os.path.exists(path) and os.listdir(path):
    raise FileExistsError(f'{path} exists and is not empty; pick a new --out.')
  os.makedirs(path, exist_ok=True)
  config = ml_collections.ConfigDict(config.to_dict())
  thresholds = config.get('model', {}).get('entropy_thresholds')
  if (kind == 'tokenizer' and config.model.get('router') == 'entropy' and
      isinstance(thresholds, str) and thresholds):
    if not os.path.exists(thresholds):
      raise FileNotFoundError(
          f'The tokenizer routes with {thresholds}, which does not exist.')
    shutil.copyfile(thresholds, os.path.join(path, THRESHOLDS))
    config.model.entropy_thresholds = THRESHOLDS  # relative to the bundle
  host = jax.device_get(variables)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, VARIABLES), host)
  manifest = {'format': FORMAT, 'version': VERSION, 'kind': kind,
              'config': _jsonable(config.to_dict()),
              'meta': _jsonable(dict(meta or {})),
              'files': _file_sizes(path)}
  with open(os.path.join(path, MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  return path


def _file_sizes(path: str) -> dict[str, int]:
  """Byte size of every file under path/variables, by path in the bundle."""
  sizes = {}
  for root, _, files in os.walk(os.path.join(path, VARIABLES)):
    for name in files:
      file = os.path.join(root, name)
      sizes[os.path.relpath(file, path)] = os.path.getsize(file)
  return dict(sorted(sizes.items()))


def damaged_error(path: str, what: str) -> ValueError:
  """The error for a bundle whose files changed since export, with the fix."""
  return ValueError(f'{path}: the bundle is damaged ({what}); copy it again '
                    'from the original or re-export it with `python -m '
                    'dqvq.export`.')


def _check_files(path: str) -> None:
  """Every weight file export wrote is there at its size (cheap: stats).

  A truncated or partial copy would otherwise surface from deep inside
  Orbax as a TensorStore error (and stray asyncio logs); bundles written
  before the record existed skip this and rely on the read's own errors.
  """
  with open(os.path.join(path, MANIFEST)) as f:
    recorded = json.load(f).get('files') or {}
  for name, size in recorded.items():
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      raise damaged_error(path, f'{name} is missing')
    if os.path.getsize(file) != size:
      raise damaged_error(path, f'{name} has {os.path.getsize(file)} bytes, the '
                     f'export wrote {size}')


def read_manifest(path: str, kind: str | None = None) -> dict[str, Any]:
  """bundle.json of `path`, checked; the config comes back as a ConfigDict.

  Paths inside the config that the bundle carries (the entropy table) are
  made absolute, so the returned config builds the model as it is.
  """
  path = os.path.abspath(path)
  file = os.path.join(path, MANIFEST)
  if not os.path.exists(file):
    hint = ''
    if os.path.isdir(os.path.join(path, 'checkpoints')):
      hint = (f' It looks like a training workdir: make a bundle with '
              f'`python -m dqvq.export --workdir {path} --out BUNDLE`.')
    raise FileNotFoundError(f'{path} is not a dqvq bundle (no {MANIFEST}).'
                            + hint)
  with open(file) as f:
    manifest = json.load(f)
  if manifest.get('format') != FORMAT:
    raise ValueError(f'{file} is not a dqvq bundle manifest.')
  if manifest.get('version', 0) > VERSION:
    raise ValueError(f'{path} is a version-{manifest["version"]} bundle; this '
                     f'dqvq reads up to version {VERSION}: upgrade dqvq.')
  if kind and manifest.get('kind') != kind:
    loader = {'tokenizer': 'load_tokenizer', 'generator': 'load_generator'}
    raise ValueError(
        f'{path} is a {manifest.get("kind")} bundle, not a {kind}; load it '
        f'with dqvq.{loader.get(manifest.get("kind"), "?")}.')
  config = ml_collections.ConfigDict(manifest['config'])
  model = config.get('model')
  if model is not None and model.get('entropy_thresholds') == THRESHOLDS:
    model.entropy_thresholds = os.path.join(path, THRESHOLDS)
  manifest['config'] = config
  manifest['path'] = path
  return manifest


def restore_variables(path: str, abstract: Any,
                      mesh: jax.sharding.Mesh | None = None) -> Any:
  """The bundle's variables, replicated over `mesh`, checked against `abstract`.

  `abstract` (from `jax.eval_shape` of the model's init) names every array
  the model needs; a bundle whose tree or shapes differ (another config, a
  truncated copy) raises before any compile. So does one whose files are
  missing or not the size export recorded, and a read that fails anyway
  raises the same "damaged" ValueError, Orbax's error chained as its cause.
  """
  mesh = mesh or sharding.create_mesh()
  path = os.path.abspath(path)
  _check_files(path)
  var_dir = os.path.join(path, VARIABLES)
  with ocp.PyTreeCheckpointer() as ckptr:
    try:
      stored = ckptr.metadata(var_dir).item_metadata.tree
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise damaged_error(path, f'Orbax cannot read {VARIABLES}/_METADATA') from e
    want = jax.tree_util.tree_flatten_with_path(abstract)[0]
    have = {jax.tree_util.keystr(p): tuple(getattr(m, 'shape', ()))
            for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
    for p, leaf in want:
      name = jax.tree_util.keystr(p)
      if name not in have:
        raise ValueError(f'{path}: variable {name} is missing; the bundle was '
                         'made for another model config.')
      if have[name] != tuple(leaf.shape):
        raise ValueError(f'{path}: variable {name} has shape {have[name]}, '
                         f'the model needs {tuple(leaf.shape)}.')
    extra = sorted(set(have) - {jax.tree_util.keystr(p) for p, _ in want})
    if extra:
      raise ValueError(f'{path}: variables {extra[:5]} are not in the model.')
    replicated = sharding.replicated(mesh)
    target = sharding.with_shardings(
        abstract, jax.tree.map(lambda _: replicated, abstract))
    try:
      return ckptr.restore(var_dir, args=ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Orbax raises a bare Exception holding TensorStore's pybind repr; the
      # cause stays chained for whoever debugs the storage itself.
      raise damaged_error(path, f'Orbax cannot read {VARIABLES}/') from e


def load_program(path: str, name: str) -> jax.export.Exported:
  """A program `python -m dqvq.export --programs` wrote; call it with `.call`.

  E.g. `load_program(B, 'encode').call(variables, images)`, where the
  variables are the bundle's (`restore_variables` or the loaded object's).
  """
  file = os.path.join(os.path.abspath(path), 'programs', f'{name}.jax')
  if not os.path.exists(file):
    raise FileNotFoundError(
        f'{file} does not exist; export it with `python -m dqvq.export '
        f'--workdir RUN --out BUNDLE --programs {name}`.')
  with open(file, 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))
