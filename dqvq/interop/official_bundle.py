"""Official checkpoints <-> dqvq bundles (the `python -m dqvq.convert official` work).

`dqvq.interop.official` knows the names, shapes and configs; this module turns a
state dict into a loadable tokenizer or generator bundle and a bundle back
into a state dict, recording in the bundle's meta what the conversion
changed or dropped.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from dqvq.inference import bundle as bundle_lib
from dqvq.inference import generator as generator_lib
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq.interop import official
from dqvq.models import dqvae
from dqvq.models import transformer as transformer_lib
from dqvq import sharding


def _report(kind: str, config: Any, table: Sequence[official.Entry],
            shapes: official.Shapes) -> dict[str, Any]:
  """Bundle meta: what was mapped, ignored, and what behaves differently."""
  spec, ignored = official.official_spec(table), {}
  for k in shapes:
    if k not in spec:
      cat = ('*.attn.mask' if k.endswith('.attn.mask') else
             'first_stage_model.* (equal to --tokenizer)'
             if k.startswith('first_stage_model.') else k.split('.')[0] + '.*')
      ignored[cat] = ignored.get(cat, 0) + 1
  notes = list(official.NOTES[kind])
  if kind == 'dqvae' and config.model.router == 'entropy':
    notes.append(f'entropy bins {tuple(config.model.entropy_bin_range)} (the '
                 'official JSONs and released checkpoint: (0, 1); the official '
                 'HEAD code: (-1, 1))')
  return {'converted_from': 'official', 'official_kind': kind,
          'official_keys_mapped': len(table), 'official_keys_ignored': ignored,
          'differences': notes}


def _subtree(sd: Mapping[str, np.ndarray], prefix: str) -> dict[str, Any]:
  return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def convert_dqvae(sd: Mapping[str, np.ndarray], out: str, *, source: str = '',
                  step: int = 0, **options: Any) -> tuple[str, dict[str, Any]]:
  """Official DQ-VAE state dict -> tokenizer bundle; (path, report).

  A stage-2 checkpoint works too (its `first_stage_model.*` is the DQ-VAE).
  `options` are `official.dqvae_config`'s keyword arguments.
  """
  if ('encoder.conv_in.weight' not in sd
      and 'first_stage_model.encoder.conv_in.weight' in sd):
    sd = _subtree(sd, 'first_stage_model.')
  shapes = official.shapes_of(sd)
  config = official.dqvae_config(shapes, **options)
  table = official.entries(tokenizer_lib.abstract_variables(config), 'dqvae')
  official.check_state_dict(shapes, official.official_spec(table), 'official DQ-VAE',
                   ignore_prefixes=('loss.',))
  v = official.from_official(sd, table)
  tok = tokenizer_lib.Tokenizer(
      params=v['params'], codebook=v['codebook'],
      vae=dqvae.from_config(config.model), config=config, step=step,
      fingerprint=tokenizer_lib.fingerprint((v['params'], v['codebook'])),
      workdir=source)
  report = _report('dqvae', config, table, shapes)
  return tokenizer_lib.save_bundle(tok, out, report), report


def _check_first_stage(sd: Mapping[str, np.ndarray], tok: Any) -> None:
  """A stage-2 checkpoint's own DQ-VAE must be the --tokenizer's weights."""
  sub = _subtree(sd, 'first_stage_model.')
  if not sub:
    return
  table = official.entries(tok.variables, 'dqvae')
  official.check_state_dict(official.shapes_of(sub), official.official_spec(table),
                   'first_stage_model.* (the DQ-VAE inside the checkpoint)',
                   ignore_prefixes=('loss.',))
  for e in table:
    if not np.array_equal(official.to_ours(e.kind, sub[e.key]),
                          official.leaf_at(tok.variables, e.path)):
      raise ValueError(
          f'first_stage_model.{e.key} differs from the --tokenizer bundle '
          f'{tok.workdir}: this transformer was trained on another DQ-VAE. '
          'Convert its own (`python -m dqvq.convert official --kind dqvae '
          '--ckpt SAME_FILE --out TOKENIZER ...`) and pass that.')


def convert_transformer(sd: Mapping[str, np.ndarray], out: str,
                        tokenizer: str | None, *, source: str = '',
                        step: int = 0, num_heads: int | None = None,
                        official_config: Mapping[str, Any] | None = None
                        ) -> tuple[str, dict[str, Any]]:
  """Official StackGPT state dict -> generator bundle; (path, report).

  `tokenizer` is the tokenizer bundle (converted or exported) it models; it
  is copied into the generator bundle.
  """
  if not tokenizer:
    raise ValueError('--kind transformer needs --tokenizer BUNDLE, the DQ-VAE '
                     'whose codes it models (convert the official one with '
                     '--kind dqvae first).')
  tok = tokenizer_lib.load_bundle(tokenizer)
  shapes = official.shapes_of(sd)
  config = official.transformer_config(shapes, tok.config, num_heads=num_heads,
                              official_config=official_config)
  config.tokenizer.workdir = tok.workdir
  model, layout = generator_lib.build_model(config, tok)
  table = official.entries(
      {'params': transformer_lib.abstract_params(model)}, 'transformer')
  masks = official.mask_spec(config)
  official.check_state_dict(shapes, official.official_spec(table), 'official StackGPT',
                   optional=masks, ignore_prefixes=('first_stage_model.',))
  official.check_masks(sd, masks)
  _check_first_stage(sd, tok)
  gen = generator_lib.Generator(
      model, official.from_official(sd, table)['params'], layout, tok,
      config, sharding.create_mesh(), step=step)
  report = {**_report('transformer', config, table, shapes), 'source': source}
  return generator_lib.save_bundle(gen, out, report), report


def bundle_to_official(path: str) -> dict[str, np.ndarray]:
  """A dqvq bundle as an official state dict (a checkpoint's `state_dict`).

  Generator bundles give `transformer.*` with the causal masks plus their
  tokenizer as `first_stage_model.*`: what the official Dualformer loads.
  """
  if bundle_lib.read_manifest(path)['kind'] == 'tokenizer':
    tok = tokenizer_lib.load_bundle(path)
    return official.to_official(tok.variables, official.entries(tok.variables, 'dqvae'))
  gen = generator_lib.load_bundle(path)
  variables = {'params': gen.params}
  sd = official.to_official(variables, official.entries(variables, 'transformer'))
  for key, shape in official.mask_spec(gen.config).items():
    sd[key] = np.tri(shape[-1], dtype=np.float32)[None, None]
  tok = gen.tokenizer.variables
  sd.update({f'first_stage_model.{k}': v
             for k, v in official.to_official(tok, official.entries(tok, 'dqvae')).items()})
  return sd
