"""Tokenizer evaluation over a split: the figures of paper Tables 1-6.

One pass over the data runs, per global batch and per code budget (the
trained routing, then every `--ratios` budget), one jitted step:

  encode (at the budget) -> decode -> PSNR / SSIM / L1 (/ LPIPS) per image,
  coding sums (usage per grain, exact code-length histogram), and for the
  trained budget the coarse-only reconstruction of the same model, whose
  per-region error is what the coding map should predict (paper Fig. 5).

Per-image outputs are sharded over the mesh; what the host needs (Inception
features, region errors for the AUROC, the first pictures) is gathered from
every process (`process_allgather`), so each host ends with the same figures
and process 0 writes them. Sums are reduced on device and added over batches.

rFID reuses the generator evaluation's FID plumbing (`generator_eval.
FIDSetup`): the real images' features are computed in the same pass only
when the cached statistics miss, so evaluating the split again costs the
reconstructions alone. `resolve_data` picks the evaluated images for both.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Sequence

import jax
import ml_collections
import numpy as np

from dqvq.data import sources as sources_lib
from dqvq.eval import coding as coding_lib
from dqvq.eval import fid as fid_lib
from dqvq.eval import generator_eval
from dqvq.eval import reconstruction as recon_lib
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq.models import granularity as grain_lib
from dqvq.models import inception as inception_lib
from dqvq.models import perceptual
from dqvq import sequence
from dqvq import sharding

Array = jax.Array
Batch = dict[str, Any]  # 'image' (B, R, R, 3) in [-1, 1], 'mask' (B,)


def budget_grain_ratios(fine_ratio: float,
                        trained: Sequence[float]) -> tuple[float, ...]:
  """Coarse-to-fine shares with the finest grain at `fine_ratio`.

  The rest is split over the coarser grains in the trained proportions (the
  triple model's (0.4, 0.3, 0.3) at fine 0.5 gives (0.286, 0.214, 0.5)), or
  evenly if the trained model put everything on the finest grain.
  """
  if not 0.0 < fine_ratio < 1.0:
    raise ValueError(f'--ratios values are shares of the finest grain and must '
                     f'lie in (0, 1); got {fine_ratio}.')
  coarser = [float(r) for r in trained[:-1]]
  total = sum(coarser)
  rest = 1.0 - fine_ratio
  if total <= 0:
    shares = [rest / len(coarser)] * len(coarser)
  else:
    shares = [rest * r / total for r in coarser]
  # Rounded so that 1 - 0.7 reads 0.3 in the JSON (sums stay within 1e-6).
  return tuple(round(r, 12) for r in shares) + (float(fine_ratio),)


def coarse_only_ratios(num_grains: int) -> tuple[float, ...]:
  return (1.0,) + (0.0,) * (num_grains - 1)


def coarse_only_tokenizer(tok: tokenizer_lib.Tokenizer
                          ) -> tokenizer_lib.Tokenizer:
  """The same weights, routed so that `coarse_only_ratios` is allowed.

  An entropy router with a percentile table cannot place a share of 0 (its
  table spans 1..99 %), so the coarse-only pass routes by per-image quota,
  which gives every region the coarsest grain at shares (1, 0, ...). The
  router holds no weights, so the variables are unchanged.
  """
  if tok.vae.router == 'entropy':
    return tok.replace(vae=tok.vae.clone(entropy_thresholds=None))
  return tok


def check_weights(path: str, kind: str) -> str:
  """'' (skip), 'random', or an existing directory; else names the fix."""
  if not path or path == 'random':
    return path
  if not os.path.isdir(path):
    hint = (inception_lib.CONVERT_HINT if kind == 'inception'
            else perceptual.CONVERT_HINT)
    raise FileNotFoundError(f'--{kind}_weights={path} is not a directory; '
                            f'create it with `{hint}`.')
  return path


def validate_ratios(ratios: Sequence[float], model: Any) -> None:
  """--ratios needs a router that takes a per-call budget, and shares < 1."""
  if not ratios:
    return
  if model.router == 'none' or len(model.grain_factors) < 2:
    raise ValueError(
        f"--ratios sets inference budgets of the finest grain, but this "
        f"tokenizer has router={model.router!r} with grain factors "
        f"{tuple(model.grain_factors)} (fixed length): drop --ratios.")
  for r in ratios:
    budget_grain_ratios(r, model.grain_ratios)


def lpips_setup(weights: str, mesh: jax.sharding.Mesh, notes: list[str]
                ) -> tuple[Any, Any] | None:
  """(LPIPS module, replicated params), or None (and a note) without weights."""
  if not weights:
    notes.append('LPIPS: skipped, no weights configured (the stage-1 config '
                 'has none; give --lpips_weights DIR from '
                 f'`{perceptual.CONVERT_HINT}`).')
    return None
  if weights == 'random':
    notes.append('LPIPS uses a RANDOM network (--lpips_weights=random): not '
                 'comparable with any published number.')
  params = perceptual.load_lpips_params(weights)
  return perceptual.LPIPS(), jax.device_put(params,
                                            sharding.replicated(mesh))


def resolve_data(data_cfg: ml_collections.ConfigDict, *, split: str | None,
                 num_images: int, data_dir: str | None, resolution: int
                 ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The data config that reads exactly the evaluated images, and its hash.

  Checks the split and the image count against the dataset (which the demo
  and image-folder sources prepare on first use) and slices the split to
  the first `num_images`.
  """
  data = ml_collections.ConfigDict(data_cfg.to_dict())
  if data_dir:
    data.data_dir = data_dir
  data.resolution = resolution
  info = sources_lib.load_sources(data).eval.dataset_info
  split = split or data.eval_split
  known = list(info.splits.keys())
  if split.split('[')[0] not in known:
    raise ValueError(f'--split={split!r} is not a split of {info.name} '
                     f'(splits: {", ".join(known)}); pick one of those.')
  size = info.splits[split].num_examples
  if num_images > size:
    raise ValueError(f'--num_images={num_images} but split {split!r} of '
                     f'{info.name} has {size} images; lower it, or give 0 '
                     'for the whole split.')
  read = split
  if num_images and num_images < size:
    if '[' in split:
      raise ValueError(f'--split={split!r} is already sliced; give '
                       '--num_images=0 or an unsliced split.')
    read = f'{split}[:{num_images}]'
  data.eval_split = read
  data_info = {'dataset': info.name, 'version': str(info.version),
               'split': split, 'read_split': read,
               'num_images': num_images or size, 'resolution': resolution,
               'crop': 'center'}
  data_info['hash'] = fid_lib.make_source_hash(**data_info)
  return data, data_info


def make_step(tok: tokenizer_lib.Tokenizer,
              grain_ratios: tuple[float, ...] | None, *,
              lpips_model: Any = None, coarse_only: bool = False
              ) -> Callable[..., dict[str, Any]]:
  """A jitted (tok, images, mask, lpips_params) -> sums and per-image maps.

  Returns 'sums' (reconstruction metric sums), 'coding' (coding sums),
  'recon' (clipped reconstructions), 'grain_map'; with `coarse_only` also
  'coarse_recon' and 'region_error' (per f_0 region, of the coarse-only
  reconstruction).
  """
  vae = tok.vae
  factors = tuple(vae.grain_factors)
  k = len(factors)
  coarse_vae = coarse_only_tokenizer(tok).vae

  def step(t, images, mask, lpips_params):
    enc = t.encode(images, grain_ratios)
    recon = t.decode(enc['codes'])
    per = recon_lib.reconstruction_metrics(images, recon)
    if lpips_model is not None:
      per['lpips'] = recon_lib.lpips_distance(lpips_model, lpips_params,
                                              images, recon)
    out = {'sums': recon_lib.masked_sums(per, mask),
           'coding': coding_lib.coding_sums(enc['codes'], enc['grain_map'],
                                            factors, vae.codebook_size, mask),
           'recon': recon, 'grain_map': enc['grain_map']}
    if coarse_only:
      coarse = t.replace(vae=coarse_vae)
      enc0 = coarse.encode(images, coarse_only_ratios(k))
      recon0 = coarse.decode(enc0['codes'])
      out['coarse_recon'] = recon0
      out['region_error'] = grain_lib.region_error(images, recon0, factors[0])
    return out

  return jax.jit(step)


@dataclasses.dataclass
class _Budget:
  """Running totals of one code budget (None: the trained routing)."""
  grain_ratios: tuple[float, ...] | None
  step: Callable[..., dict[str, Any]]
  sums: Any = None
  coding: Any = None
  features: fid_lib.FeatureStats | None = None
  regions: coding_lib.RegionScores | None = None


def _add(total: Any, new: Any) -> Any:
  """Running device sums (the first batch starts them)."""
  return new if total is None else coding_lib.merge_sums(total, new)


def evaluate_tokenizer(tok: tokenizer_lib.Tokenizer, batches: Iterable[Batch],
                       *, fine_ratios: Sequence[float] = (),
                       lpips: tuple[Any, Any] | None = None,
                       fid: generator_eval.FIDSetup | None = None,
                       num_pictures: int = 8,
                       on_batch: Callable[[int], None] | None = None
                       ) -> dict[str, Any]:
  """Every tokenizer figure over `batches` (global arrays, see `Batch`).

  Args:
    tok: the tokenizer, its variables replicated over the batches' mesh.
    batches: one pass over the split.
    fine_ratios: extra budgets of the finest grain (rate-distortion curve).
    lpips: (LPIPS module, params) or None to skip LPIPS.
    fid: Inception features and reference cache, or None to skip rFID.
    num_pictures: examples kept (from the first batches) for pictures.
    on_batch: called with the real images of each batch (progress).

  Returns:
    'figures' (trained budget), 'rate_distortion' (one dict per fine ratio,
    with its 'code_length_hist'), 'length_hist', 'histograms' (for the
    JSON) and 'pictures' (host arrays of the first examples).
  """
  vae = tok.vae
  factors = tuple(vae.grain_factors)
  k = len(factors)
  lpips_model, lpips_params = lpips if lpips is not None else (None, None)
  budgets = [_Budget(None, make_step(tok, None, lpips_model=lpips_model,
                                     coarse_only=k > 1))]
  for r in fine_ratios:
    ratios = budget_grain_ratios(r, vae.grain_ratios)
    budgets.append(_Budget(ratios, make_step(tok, ratios,
                                             lpips_model=lpips_model)))
  reference = fid.cached() if fid is not None else None
  real = fid_lib.FeatureStats() if fid is not None and reference is None \
      else None
  for b in budgets:
    if fid is not None:
      b.features = fid_lib.FeatureStats()
    if k > 1:
      b.regions = coding_lib.RegionScores()
  pictures: dict[str, list[np.ndarray]] = {}
  kept = 0
  gather = sharding.host_gather  # sharded -> host arrays, on every process
  for batch in batches:
    images, mask_global = batch['image'], batch['mask']
    mask = gather(mask_global).astype(bool)
    region_error = None
    for b in budgets:
      out = b.step(tok, images, mask_global, lpips_params)
      b.sums = _add(b.sums, out['sums'])
      b.coding = _add(b.coding, out['coding'])
      if b.features is not None:
        fid.update(b.features, out['recon'], mask)
      if 'region_error' in out:  # the trained budget, which runs first
        region_error = gather(out['region_error'])
      if b.regions is not None:
        b.regions.add(gather(out['grain_map']) == k - 1, region_error, mask)
      if b.grain_ratios is None and kept < num_pictures:
        names = ('recon', 'grain_map', 'coarse_recon')
        host = gather({'image': images,
                       **{n: out[n] for n in names if n in out}})
        for name, value in host.items():
          pictures.setdefault(name, []).append(
              value[mask][:num_pictures - kept])
        kept += int(min(mask.sum(), num_pictures - kept))
    if real is not None:
      fid.update(real, images, mask)
    if on_batch is not None:
      on_batch(int(mask.sum()))
  if budgets[0].sums is None:
    raise ValueError('The split gave no batches; check --split and '
                     '--num_images.')
  if real is not None:
    reference = fid.finish(real)
  results = [_figures(tok, b, reference) for b in budgets]
  hists = [np.asarray(jax.device_get(b.coding['length_hist']))
           for b in budgets]
  for point, hist in zip(results[1:], hists[1:]):
    point['code_length_hist'] = hist
  return {'figures': results[0], 'rate_distortion': results[1:],
          'length_hist': hists[0], 'histograms': {'code_length': hists[0]},
          'pictures': {n: np.concatenate(v) for n, v in pictures.items()}}


def _figures(tok: tokenizer_lib.Tokenizer, b: _Budget,
             reference: fid_lib.ReferenceStats | None) -> dict[str, Any]:
  """Host figures of one budget from its running totals."""
  vae = tok.vae
  factors = tuple(vae.grain_factors)
  ratios = b.grain_ratios or tuple(vae.grain_ratios)
  # lpips, rfid and the AUROC are always present: None when not computed.
  fig: dict[str, Any] = {'grain_ratios': list(ratios),
                         'fine_ratio_target': float(ratios[-1]),
                         'lpips': None, 'rfid': None,
                         'coding_map_auroc': None,
                         'coding_map_auroc_per_image': None}
  fig.update(recon_lib.means(b.sums))
  fig.update(coding_lib.summarize_coding(b.coding, factors, ratios))
  regions = int(np.asarray(jax.device_get(b.coding['grain_counts'])).sum()
                / max(fig['num_images'], 1.0))
  fig['regions_per_image'] = float(regions)
  fig.update(sequence.bits_per_image(fig['code_length_mean'], vae.codebook_size,
                            regions, len(factors)))
  if b.features is not None and reference is not None:
    fig['rfid'], note = generator_eval.frechet_or_note(reference, b.features)
    if note:
      fig['rfid_note'] = note
  if b.regions is None:
    fig['coding_map_auroc_note'] = 'one granularity: no coding map to score.'
  elif len(b.regions):
    try:
      fig['coding_map_auroc'] = b.regions.auroc()
      fig['coding_map_auroc_per_image'], _ = b.regions.per_image_auroc()
    except ValueError as e:  # e.g. every region has the same error
      fig['coding_map_auroc_note'] = str(e)
  return fig


__all__ = ['budget_grain_ratios', 'coarse_only_ratios', 'coarse_only_tokenizer',
           'check_weights', 'validate_ratios', 'lpips_setup',
           'resolve_data', 'make_step', 'evaluate_tokenizer']
