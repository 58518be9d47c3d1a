"""The authors' PyTorch checkpoints <-> dqvq bundles (DQ-VAE and StackGPT).

Why a name map rather than hand-written tables: dqvq's modules carry the
official attribute names (`mid_coarse`, `down_3_attn_1`, `content_fine_pos_emb`),
so each leaf of our variable tree names its official key after a few renames
(`_dqvae_key`, `_transformer_key`). Walking our tree for the config inferred
from the checkpoint's shapes thus yields every expected key and shape: a
missing, extra or mis-shaped key is an error naming it, and the same entries
map both ways (official -> dqvq -> official is the identity).

Layouts: PyTorch conv (O, I, kh, kw) is Flax (kh, kw, I, O), Linear (O, I) is
Dense (I, O), and the 1x1 convs of attention and of the Fourier embedding are
Dense layers here. Not imported: the codebook's never-used padding row,
`loss.*` (training only) and the causal `attn.mask` buffers (checked, then
recomputed). Not in checkpoints: the entropy router's thresholds
(`--entropy_thresholds`) and the number of heads (`--num_heads`, official 8).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np

from dqvq import config_lib
from dqvq.models import entropy as entropy_lib
from dqvq import sequence

Shapes = Mapping[str, tuple[int, ...]]
THRESHOLDS_HINT = (
    "The entropy router's thresholds are not in the checkpoint: pass "
    "--entropy_thresholds FILE, the official repo's scripts/tools/thresholds/"
    'entropy_thresholds_imagenet_train_patch-16.json (the released DQ-VAE), or '
    'a table from `python -m dqvq.tools.entropy_thresholds`.')
NOTES = {'dqvae': [
    'the codebook padding row (quantize.codebook.weight[K], never used) is '
    'dropped', 'loss.* (LPIPS, discriminator) is training-only: not imported'],
          'transformer': [
    'pads are hidden as attention keys (the official model attends to them)',
    "compact absolute positions (config.model.position_index='compact'): each "
    "token reads the pos_emb row the official gives it on that image alone, "
    "and the coarse eos is told the fine sos (the official's batch pads the "
    'coarse stream to its longest, which moves the fine rows with the batch: '
    'not copied)',
    'sampling is dqvq.sampling, without the official sampler quirks']}


class Entry(NamedTuple):
  """One leaf: our tree path, its official key, the layout change, shapes."""
  path: tuple[str, ...]
  key: str
  kind: str  # a key of _LAYOUTS
  shape: tuple[int, ...]
  official_shape: tuple[int, ...]


# kind -> (official -> ours, ours -> official, our shape -> official shape).
_LAYOUTS = {
    'copy': (lambda w: w, lambda w: w, lambda s: s),
    'conv': (lambda w: w.transpose(2, 3, 1, 0),
             lambda w: w.transpose(3, 2, 0, 1),
             lambda s: (s[3], s[2], s[0], s[1])),
    'conv1x1': (lambda w: w[:, :, 0, 0].T, lambda w: w.T[:, :, None, None],
                lambda s: (s[1], s[0], 1, 1)),
    'linear': (lambda w: w.T, lambda w: w.T, lambda s: s[::-1]),
    # The official codebook has an unused padding row K; it comes back zero.
    'codebook': (lambda w: w[:-1],
                 lambda w: np.concatenate([w, np.zeros_like(w[:1])]),
                 lambda s: (s[0] + 1,) + s[1:]),
}


def to_ours(kind: str, w: np.ndarray) -> np.ndarray:
  """Official array -> dqvq layout (float32, contiguous)."""
  return np.ascontiguousarray(_LAYOUTS[kind][0](np.asarray(w, np.float32)))


def to_theirs(kind: str, w: np.ndarray) -> np.ndarray:
  """dqvq array -> official layout (float32, contiguous)."""
  return np.ascontiguousarray(_LAYOUTS[kind][1](np.asarray(w, np.float32)))


_RENAMES = ((re.compile(r'(down|up)_(\d+)_(block|attn)_(\d+)'), r'\1.\2.\3.\4'),
            (re.compile(r'(down|up)_(\d+)_(downsample|upsample)'), r'\1.\2.\3'),
            (re.compile(r'(gate|mlp)_(\d+)'), r'\1.\2'),
            (re.compile(r'grain_router'), 'encoder.router'))
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
         'embedding': 'weight'}


def _rename(module: str) -> str:
  for pattern, repl in _RENAMES:
    if pattern.fullmatch(module):
      return pattern.sub(repl, module)
  return module


def _dqvae_key(path: tuple[str, ...]) -> tuple[str, str]:
  """(official key, kind) of a DQVAE variable path ('params'|'codebook', ...)."""
  collection, *mods, leaf = path
  if collection == 'codebook':
    return {'embedding': ('quantize.codebook.weight', 'codebook'),
            'cluster_size': ('quantize.codebook.cluster_size_ema', 'copy'),
            'embed_sum': ('quantize.codebook.embed_ema', 'copy')}[leaf]
  if mods == ['decoder', 'position_bias_fourier', 'conv']:  # a Dense itself
    return ('decoder.position_bias_fourier.lff.ffm.conv.' + _LEAF[leaf],
            'conv1x1' if leaf == 'kernel' else 'copy')
  if mods == ['decoder', 'position_bias_learned']:
    return f'decoder.position_bias_learned.{leaf}.weight', 'copy'
  wrapper = mods.pop() if mods[-1] in ('conv', 'linear', 'GroupNorm_0') else ''
  kind = 'copy'
  if leaf == 'kernel':
    kind = {'conv': 'conv', 'linear': 'linear'}[wrapper]
    if wrapper == 'linear' and mods[-1] in ('q', 'k', 'v', 'proj_out'):
      kind = 'conv1x1'  # AttnBlock's 1x1 convs are Dense layers here
  return '.'.join([_rename(m) for m in mods] + [_LEAF[leaf]]), kind


def _transformer_key(path: tuple[str, ...]) -> tuple[str, str]:
  """(official key, kind) of a DQTransformer param path ('params', ...)."""
  _, head, *rest = path
  if head == 'pos_emb':
    return 'transformer.pos_emb', 'copy'
  kind = 'linear' if rest[-1] == 'kernel' else 'copy'
  if m := re.fullmatch(r'(position|content)_head(_ln)?', head):
    return f'transformer.{m[1]}_head.{0 if m[2] else 1}.{_LEAF[rest[-1]]}', kind
  if m := re.fullmatch(r'(position|content)_transformer_(\d+)', head):
    head = f'{m[1]}_transformer.{m[2]}'
  mods = [head] + [_rename(r) for r in rest[:-1]]
  return 'transformer.' + '.'.join(mods + [_LEAF[rest[-1]]]), kind


def entries(abstract: Any, kind: str) -> list[Entry]:
  """The official counterpart of every leaf of `abstract` (our variables)."""
  name = {'dqvae': _dqvae_key, 'transformer': _transformer_key}[kind]
  out = []
  for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    path = tuple(str(getattr(k, 'key', k)) for k in p)
    key, k = name(path)
    out.append(Entry(path, key, k, tuple(leaf.shape),
                     _LAYOUTS[k][2](tuple(leaf.shape))))
  return out


def official_spec(table: Sequence[Entry]) -> dict[str, tuple[int, ...]]:
  return {e.key: e.official_shape for e in table}


def mask_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """StackGPT's causal-mask buffers (persistent, so in its checkpoints)."""
  m, b = config.model, config.model.block_size
  return {f'transformer.{s}_transformer.{i}.attn.mask': (1, 1, b, b)
          for s, n in (('position', m.position_layers),
                       ('content', m.content_layers)) for i in range(n)}


def shapes_of(sd: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
  return {k: tuple(np.shape(v)) for k, v in sd.items()}


def check_state_dict(shapes: Shapes, spec: Shapes, what: str,
                     optional: Shapes | None = None,
                     ignore_prefixes: Sequence[str] = ()) -> None:
  """Raises ValueError naming missing, unexpected and mis-shaped keys."""
  known = {**(optional or {}), **spec}
  groups = {
      'missing': [k for k in spec if k not in shapes],
      'unexpected': [k for k in shapes if k not in known and not any(
          k.startswith(p) for p in ignore_prefixes)],
      'mis-shaped': [f'{k} has shape {tuple(shapes[k])}, expected {s}'
                     for k, s in known.items()
                     if k in shapes and tuple(shapes[k]) != tuple(s)]}
  problems = [f'{n} {len(v)}: ' + ', '.join(v[:12]) + ' ...' * (len(v) > 12)
              for n, v in groups.items() if v]
  if problems:
    raise ValueError(f'{what}: the state dict does not match the model '
                     'inferred from it; ' + '; '.join(problems))


def from_official(sd: Mapping[str, np.ndarray],
                  table: Sequence[Entry]) -> dict[str, Any]:
  """Official arrays -> our nested variables (float32 numpy)."""
  tree: dict[str, Any] = {}
  for e in table:
    node = tree
    for k in e.path[:-1]:
      node = node.setdefault(k, {})
    node[e.path[-1]] = to_ours(e.kind, sd[e.key])
  return tree


def to_official(variables: Any, table: Sequence[Entry]) -> dict[str, np.ndarray]:
  """Our variables -> {official key: array}, the inverse of `from_official`."""
  return {e.key: to_theirs(e.kind, leaf_at(variables, e.path)) for e in table}


def leaf_at(tree: Any, path: Sequence[str]) -> np.ndarray:
  for k in path:
    tree = tree[k]
  return np.asarray(jax.device_get(tree))


# --- Config inference: the dqvq config that reproduces a checkpoint. -------


def _shape(shapes: Shapes, key: str) -> tuple[int, ...]:
  if key not in shapes:
    raise ValueError(f'the state dict lacks {key}, which the converter reads '
                     'to infer the model; is this the right --kind?')
  return tuple(shapes[key])


def _indices(shapes: Shapes, pattern: str) -> list[int]:
  found = sorted({int(m[1]) for k in shapes if (m := re.match(pattern, k))})
  if found != list(range(len(found))):
    raise ValueError(f'keys matching {pattern} have indices {found}; expected '
                     '0, 1, 2, ... without gaps.')
  return found


def _widths(shapes: Shapes, prefix: str, levels: Sequence[int],
            ch: int) -> tuple[int, ...]:
  """ch_mult from each level's first conv (dqvq widths are ch * ch_mult)."""
  out = []
  for level in levels:
    key = f'{prefix}.{level}.block.0.conv1.weight'
    if _shape(shapes, key)[0] % ch:
      raise ValueError(f'{key} has {shapes[key][0]} channels, not a multiple '
                       f'of the base width {ch}: dqvq cannot represent it.')
    out.append(shapes[key][0] // ch)
  return tuple(out)


def load_official_config(path: str | None) -> dict[str, Any]:
  """An official YAML config (or a JSON dict of StackGPT params), or {}."""
  if not path:
    return {}
  import yaml  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    cfg = yaml.safe_load(f)
  if not isinstance(cfg, dict):
    raise ValueError(f'--official_config {path} is not a YAML/JSON mapping.')
  return cfg


def _find(cfg: Any, key: str) -> dict[str, Any]:
  """The params of the first `key:` block anywhere in an official config."""
  if isinstance(cfg, dict):
    if key in cfg:
      return dict(cfg[key].get('params', cfg[key]) or {})
    for v in cfg.values():
      if found := _find(v, key):
        return found
  return {}


def _compare(what: str, pairs: Mapping[str, tuple[Any, Any]]) -> None:
  bad = [f'{n}: config {c!r}, checkpoint {s!r}' for n, (c, s) in pairs.items()
         if c is not None and c != s]
  if bad:
    raise ValueError(f'--official_config disagrees with the {what} '
                     'checkpoint: ' + '; '.join(bad))


def dqvae_config(shapes: Shapes, *, entropy_thresholds: str | None = None,
                 entropy_bin_range: Sequence[float] | None = None,
                 fine_ratio: float | None = None, resolution: int | None = None,
                 official_config: Mapping[str, Any] | None = None
                 ) -> ml_collections.ConfigDict:
  """The stage-1 config whose DQVAE has exactly the checkpoint's layers."""
  levels = _indices(shapes, r'encoder\.down\.(\d+)\.')
  if not levels:
    raise ValueError('no encoder.down.* keys: not an official DQ-VAE state '
                     'dict (a StackGPT checkpoint needs --kind transformer).')
  roles = [r for r in ('coarse', 'median', 'fine')
           if f'encoder.conv_out_{r}.weight' in shapes]
  if not roles and 'encoder.conv_out.weight' in shapes:
    roles = ['']
  if roles not in ([''], ['coarse', 'fine'], ['coarse', 'median', 'fine']):
    raise ValueError(f'encoder heads {roles} (encoder.conv_out_*) form no '
                     'one-, dual- or triple-grain model dqvq can represent.')
  factors = tuple(2 ** (len(levels) - 1 - k) for k in range(len(roles)))
  dec = _indices(shapes, r'decoder\.up\.(\d+)\.')
  ch = _shape(shapes, 'encoder.conv_in.weight')[0]
  dec_ch = _shape(shapes, 'decoder.conv_out.weight')[1]
  has = lambda k: k in shapes
  attn = lambda p, ls: tuple(2 ** l for l in ls
                             if has(f'{p}.{l}.attn.0.norm.weight'))
  pe = '+'.join(p for p in ('fourier', 'learned') if any(
      k.startswith(f'decoder.position_bias_{p}.') for k in shapes)) or 'none'
  head = f'_{roles[-1]}' if roles[-1] else ''
  fields: dict[str, Any] = dict(
      grain_factors=factors, ch=ch,
      ch_mult=_widths(shapes, 'encoder.down', levels, ch),
      num_res_blocks=len(_indices(shapes, r'encoder\.down\.0\.block\.(\d+)\.')),
      attn_factors=attn('encoder.down', levels),
      z_channels=_shape(shapes, f'encoder.conv_out{head}.weight')[0],
      dec_ch=dec_ch, dec_ch_mult=_widths(shapes, 'decoder.up', dec, dec_ch),
      dec_num_res_blocks=len(_indices(
          shapes, r'decoder\.up\.0\.block\.(\d+)\.')) - 1,
      dec_attn_factors=attn('decoder.up', dec), position_embedding=pe,
      codebook_size=_shape(shapes, 'quantize.codebook.embed_ema')[0],
      codebook_dim=_shape(shapes, 'quantize.codebook.weight')[1],
      router='none' if len(roles) == 1 else 'feature' if has(
          'encoder.router.gate.0.weight') else 'entropy',
      gate_type='linear' if has('encoder.router.gate.0.weight') and not has(
          'encoder.router.gate.2.weight') else 'mlp')
  if pe.endswith('learned'):  # the tables fix the latent grid
    rows = _shape(shapes, 'decoder.position_bias_learned.row_embed.weight')[0]
    if resolution and resolution != rows * factors[-1]:
      raise ValueError(f'--resolution {resolution}: the learned position '
                       f'tables fix the latent grid at {rows} rows, i.e. '
                       f'{rows * factors[-1]} pixels.')
    resolution = rows * factors[-1]
  enc, vq = _find(official_config, 'encoderconfig'), _find(official_config,
                                                           'vqconfig')
  res = resolution or enc.get('resolution') or 256
  _compare('DQ-VAE', {
      'encoder ch_mult': (enc.get('ch_mult') and tuple(enc['ch_mult']),
                          fields['ch_mult']),
      'encoder attn factors': (enc.get('attn_resolutions') and tuple(sorted(
          res // r for r in enc['attn_resolutions'])), tuple(sorted(
              fields['attn_factors']))),
      'resolution': (enc.get('resolution'), res),
      'position_type': (_find(official_config, 'decoderconfig').get(
          'position_type'), pe),
      'codebook_size': (vq.get('codebook_size'), fields['codebook_size'])})
  fields.update(beta=vq.get('commitment_beta', 0.25),
                ema_decay=vq.get('decay', 0.99),
                restart_unused=bool(vq.get('restart_unused_codes', True)))
  if len(factors) == 2:
    r = fine_ratio if fine_ratio is not None else _find(
        enc, 'router_config').get('fine_grain_ratito', 0.5)
    fields['grain_ratios'] = (1.0 - r, r)
  if fields['router'] == 'entropy':
    fields.update(_entropy_fields(entropy_thresholds, entropy_bin_range,
                                  factors))
  c = config_lib.stage1_config({1: 'vqgan', 3: 'triple'}.get(
      len(factors), 'entropy' if fields['router'] == 'entropy' else None))
  c.model.update(fields)  # the triple keeps the official r-03-03 shares
  c.data.resolution = int(res)
  if c.model.router != 'feature':
    c.loss.budget_kind = 'none'  # as configs/imagenet_stage1.py
  return c


def _entropy_fields(path: str | None, bin_range: Sequence[float] | None,
                    factors: tuple[int, ...]) -> dict[str, Any]:
  if not path:
    raise ValueError(THRESHOLDS_HINT)
  if not os.path.exists(path):
    raise FileNotFoundError(f'--entropy_thresholds {path} does not exist. '
                            + THRESHOLDS_HINT)
  try:
    meta = entropy_lib.load_thresholds(path)[1] or {}
  except ValueError as e:  # json.JSONDecodeError is a ValueError too
    raise ValueError(f'--entropy_thresholds {path}: {e}') from e
  if meta.get('region_size', factors[0]) != factors[0]:
    raise ValueError(f'--entropy_thresholds {path} was computed on '
                     f'{meta["region_size"]}-pixel regions; this model routes '
                     f'{factors[0]}-pixel regions.')
  # Official JSONs carry no metadata and were made with bins [0, 1], as the
  # released checkpoint was (official-implementation.md, section 1.5).
  bins = bin_range or meta.get('bin_range') or entropy_lib.OFFICIAL_JSON_BIN_RANGE
  return dict(entropy_thresholds=os.path.abspath(path),
              entropy_bin_range=tuple(float(b) for b in bins),
              entropy_num_bins=int(meta.get('num_bins', 32)),
              entropy_sigma=float(meta.get('sigma', 0.01)))


def transformer_config(shapes: Shapes, tokenizer_config: Any, *,
                       num_heads: int | None = None,
                       official_config: Mapping[str, Any] | None = None
                       ) -> ml_collections.ConfigDict:
  """The stage-2 config of a StackGPT checkpoint on top of a tokenizer."""
  tm, res = tokenizer_config.model, tokenizer_config.data.resolution
  factors, k = tuple(tm.grain_factors), tm.codebook_size
  if len(factors) != 2:
    raise ValueError(f'the tokenizer has {len(factors)} grains; the official '
                     'StackGPT (coarse and fine position tables) needs a '
                     'dual-grain one.')
  vocab, width = _shape(shapes, 'transformer.content_emb.weight')
  num_sos = vocab - k - 2  # content ids: codes, pad, eos, one sos per class
  if num_sos < 1:
    raise ValueError(f'content vocabulary {vocab} < codebook {k} + pad, eos, '
                     'sos: the --tokenizer has another codebook size.')
  num_classes = num_sos if num_sos > 1 else 0
  layout = sequence.layout_for(factors, res, k, num_classes)
  for g, role in enumerate(('coarse', 'fine')):
    key = f'transformer.content_{role}_pos_emb.weight'
    if _shape(shapes, key)[0] != layout.position_vocab_size(g):
      raise ValueError(
          f'{key} has {shapes[key][0]} rows; a {layout.grid_sizes[g]}x'
          f'{layout.grid_sizes[g]} {role} grid with {num_sos} sos ids needs '
          f'{layout.position_vocab_size(g)}: the --tokenizer does not match '
          'this transformer (grid or resolution).')
  layers = {s: len(_indices(shapes, rf'transformer\.{s}_transformer\.(\d+)\.'))
            for s in ('position', 'content')}
  mlp = [f'transformer.{s}_transformer.0.mlp.0.weight' for s in layers
         if layers[s]]
  hidden = _shape(shapes, mlp[0])[0] if mlp else 4 * width
  p = _find(official_config, 'transformer_config') or dict(
      official_config or {})
  heads = num_heads or int(p.get('n_head', 8))
  if width % heads or hidden % width:
    raise ValueError(f'width {width} is not divisible by --num_heads {heads}, '
                     f'or the MLP width {hidden} by the width.')
  block = _shape(shapes, 'transformer.pos_emb')[1]
  _compare('StackGPT', {
      'vocab_size': (p.get('vocab_size'), vocab), 'n_embd': (p.get('n_embd'),
                                                            width),
      'block_size': (p.get('block_size'), block),
      'segment_size': (p.get('segment_size'), 2),
      'position_layer': (p.get('position_layer'), layers['position']),
      'content_layer': (p.get('content_layer'), layers['content']),
      # dqvq's pads are the codebook / grid sizes and the mask is causal.
      'content_pad_code': (p.get('content_pad_code'), k),
      'coarse_position_pad_code': (p.get('coarse_position_pad_code'),
                                   layout.num_cells[0]),
      'fine_position_pad_code': (p.get('fine_position_pad_code'),
                                 layout.num_cells[1]),
      'n_unmasked': (p.get('n_unmasked'), 0)})
  c = config_lib.stage2_config('uncond' if not num_classes else None)
  c.model.update(dict(
      width=width, num_heads=heads, position_layers=layers['position'],
      content_layers=layers['content'], block_size=block,
      mlp_ratio=hidden // width, num_classes=num_classes, label_dropout=0.0,
      embed_dropout=float(p.get('embd_pdrop', 0.1)),
      attn_dropout=float(p.get('attn_pdrop', 0.1)),
      resid_dropout=float(p.get('resid_pdrop', 0.1)),
      # The absolute positions the official trained with (dqvq.sequence).
      position_index='compact'))
  c.data.resolution = int(res)
  c.data.name = tokenizer_config.data.name
  return c


def check_masks(sd: Mapping[str, np.ndarray], spec: Shapes) -> None:
  """The masks must be causal: dqvq's attention has no unmasked prefix."""
  for key, shape in spec.items():
    if key in sd and not np.array_equal(np.asarray(sd[key])[0, 0] != 0,
                                        np.tri(shape[-1], dtype=bool)):
      raise ValueError(f'{key} is not the causal (lower-triangular) mask; '
                       'dqvq cannot represent n_unmasked > 0.')
