"""What `python -m dqvq.evaluate` is pointed at: a run or a bundle.

Read from metadata only (configs, steps, where the tokenizer is), so that
every check of the evaluation's options runs before any weights load.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from dqvq import checkpoint as ckpt_lib
from dqvq.inference import bundle as bundle_lib
from dqvq.inference import generator as generator_lib
from dqvq.inference import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Source:
  """What --workdir / --bundle holds, read from metadata only (no weights)."""
  stage: int                                # 1: tokenizer, 2: generator
  config: ml_collections.ConfigDict         # its own config
  tokenizer_config: ml_collections.ConfigDict
  step: int
  where: str                                # eval outputs default under it
  workdir: str | None = None
  bundle: str | None = None
  tokenizer_workdir: str | None = None      # the stage-1 run, if any
  tokenizer_step: int = 0


def _run_meta(workdir: str) -> tuple[ml_collections.ConfigDict, int]:
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(
        f'{workdir} holds no checkpoints/: give a dqvq.train run directory '
        'with --workdir, or a bundle (python -m dqvq.export) with --bundle.')
  ckpt = ckpt_lib.Checkpointer(workdir, save_every=0)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f'{workdir}/checkpoints holds no finished '
                              'checkpoint yet.')
    config = ckpt.read_meta(step).get('config')
  finally:
    ckpt.close()
  if not config:
    raise ValueError(f'Checkpoint {step} of {workdir} stores no config; it was '
                     'not written by dqvq.train.')
  return ml_collections.ConfigDict(config), step


def describe(workdir: str | None, bundle: str | None) -> Source:
  """The stage, configs and step of a run or bundle, before any restore."""
  if bool(workdir) == bool(bundle):
    raise ValueError('Give exactly one of --workdir (a training run) or '
                     '--bundle (from python -m dqvq.export).')
  if workdir:
    config, step = _run_meta(workdir)
    stage = int(config.get('stage', 1))
    tok_dir = (workdir if stage == 1 else
               generator_lib.tokenizer_workdir_of(config, workdir))
    tok_cfg, tok_step = (config, step) if stage == 1 else _run_meta(tok_dir)
    return Source(stage, config, tok_cfg, step, os.path.abspath(workdir),
                  workdir=workdir, tokenizer_workdir=tok_dir,
                  tokenizer_step=tok_step)
  manifest = bundle_lib.read_manifest(bundle)
  stage = 1 if manifest['kind'] == 'tokenizer' else 2
  tok = manifest if stage == 1 else bundle_lib.read_manifest(
      os.path.join(manifest['path'], 'tokenizer'), kind='tokenizer')
  return Source(stage, manifest['config'], tok['config'],
                int(manifest['meta'].get('step', 0)), manifest['path'],
                bundle=bundle, tokenizer_step=int(tok['meta'].get('step', 0)))


def load_tokenizer(src: Source, mesh: jax.sharding.Mesh
                   ) -> tokenizer_lib.Tokenizer:
  if src.bundle:
    path = src.bundle if src.stage == 1 else os.path.join(src.where,
                                                          'tokenizer')
    return tokenizer_lib.load_bundle(path, mesh)
  return tokenizer_lib.load_stage1(src.tokenizer_workdir, mesh)
