"""Measurements of `python -m dqvq.study`: the paper's DQ-VAE tables, small.

Every figure is on the validation split (photographs no model trained on),
with eval preprocessing, PSNR per image in [0, 1] units (then averaged), and
each code counted once (`dqvq.eval.coding`). The parts and the models they
need are listed in `dqvq.study`; this module only evaluates trained runs.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

from absl import logging
from matplotlib.figure import Figure
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dqvq.data import pipeline
from dqvq.eval import allocation
from dqvq.eval import coding
from dqvq.models import dqvae
from dqvq.models import entropy as entropy_lib
from dqvq.models import granularity as grain_lib
from dqvq.models import router as router_lib
from dqvq import visualize

Array = jax.Array


# The programs take the weights as arguments and the model (a hashable Flax
# module) as a static one, as `dqvq.inference.tokenizer`'s do: two `Model`s of
# one configuration then share one compiled program, where closing over the
# weights compiled one per `Model`, weights baked in as constants.
@functools.partial(jax.jit, static_argnames=('vae', 'grain_ratios'))
def _encode_program(vae: dqvae.DQVAE, variables: Any, x: Array,
                    grain_ratios: tuple[float, ...] | None) -> dict[str, Any]:
  return vae.apply(variables, x, grain_ratios=grain_ratios,
                   rngs={'router': jax.random.key(0)}, method=vae.encode)


@functools.partial(jax.jit, static_argnames=('vae',))
def _with_map_program(vae: dqvae.DQVAE, variables: Any, x: Array,
                      grain_map: Array) -> dict[str, Any]:
  return vae.apply(variables, x, grain_map=grain_map, method=vae.encode)


@functools.partial(jax.jit, static_argnames=('vae',))
def _decode_program(vae: dqvae.DQVAE, variables: Any, quantized: Array
                    ) -> Array:
  return jnp.clip(vae.apply(variables, quantized, method=vae.decode),
                  -1.0, 1.0)


class Model:
  """A trained run's tokenizer with jitted encode / decode on given maps."""

  def __init__(self, config: ml_collections.ConfigDict, state: Any,
               router_inference: str | None = None,
               grain_ratios: tuple[float, ...] | None = None):
    """`grain_ratios` imposes that budget on every image (its own routing
    ranks the regions), instead of the trained routing's length."""
    if router_inference is not None:
      config = config.copy_and_resolve_references()
      config.model.router_inference = router_inference
    self.config = config
    self.vae = dqvae.from_config(config.model)
    self.variables = {'params': state.params, 'codebook': state.codebook}
    self.factors = tuple(self.vae.grain_factors)
    self.grain_ratios = None if grain_ratios is None else tuple(grain_ratios)

  def _encode(self, x: np.ndarray) -> dict[str, Any]:
    return _encode_program(self.vae, self.variables, x, self.grain_ratios)

  def _with_map(self, x: np.ndarray, grain_map: Array) -> dict[str, Any]:
    return _with_map_program(self.vae, self.variables, x, grain_map)

  def _decode(self, quantized: Array) -> Array:
    return _decode_program(self.vae, self.variables, quantized)

  def grid(self, x: np.ndarray) -> tuple[int, int]:
    return x.shape[1] // self.factors[0], x.shape[2] // self.factors[0]

  def routed(self, x: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """The model's own routing: encode outputs and the reconstruction."""
    out = self._encode(x)
    return out, np.asarray(self._decode(out['quantized']))

  def with_map(self, x: np.ndarray, grain_map: Array
               ) -> tuple[dict[str, Any], np.ndarray]:
    out = self._with_map(x, jnp.asarray(grain_map, jnp.int32))
    return out, np.asarray(self._decode(out['quantized']))

  def region_gain(self, x: np.ndarray) -> Array:
    """Per-region error drop from all regions coarsest to all finest."""
    n, grid, finest = x.shape[0], self.grid(x), len(self.factors) - 1
    coarse, fine = (
        self.with_map(x, allocation.uniform_grain_map(n, grid, g))[1]
        for g in (0, finest))
    return allocation.region_gain(x, coarse, fine, self.factors[0])

  def router_scores(self, out: dict[str, Any]) -> Array:
    """Per-region ranking the router would budget by (higher = finer)."""
    if out.get('logits') is not None:
      return router_lib.expected_grain(out['logits'])
    if out.get('entropy') is not None:
      return out['entropy']
    raise ValueError('This model has no router ranking (fixed or random).')


def validation_batches(config: ml_collections.ConfigDict
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
  """The validation split once, as (images, mask) host batches."""
  ds = pipeline.create_datasets(config.data,
                                global_batch_size=config.eval_batch_size,
                                seed=0)
  return [(b['image'], b['mask']) for b in iter(ds.eval)]


# Seed of the fresh training-photograph crops; not the training runs' seed.
TRAINING_CROPS_SEED = 12345


def training_crops(config: ml_collections.ConfigDict, count: int
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
  """`count` fresh crops of the *training* photographs, drawn as in training.

  The paper's Table 6 measures ImageNet's validation split, which is drawn
  like its training split; the held-out photographs here are not (they are
  more detailed). These crops are the in-distribution reference: new crops
  (a seed no run trains with) of the same photographs and crop law.
  """
  ds = pipeline.create_datasets(config.data,
                                global_batch_size=config.eval_batch_size,
                                seed=TRAINING_CROPS_SEED)
  batches, it, drawn = [], iter(ds.train), 0
  while drawn < count:
    images = np.asarray(next(it)['image'])
    batches.append((images, np.ones(len(images), bool)))
    drawn += len(images)
  return batches


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Per-image PSNR in dB of images in [-1, 1] (data range 1 after / 2)."""
  mse = np.mean(((np.clip(x, -1, 1) - np.clip(y, -1, 1)) / 2.0) ** 2,
                axis=(1, 2, 3))
  return -10.0 * np.log10(np.maximum(mse, 1e-10))


def coding_figures(model: Model, batches) -> dict[str, Any]:
  """The model's own routing: PSNR, length mean/var, grain shares, usage."""
  sums, scores = None, []
  for x, mask in batches:
    out, y = model.routed(x)
    s = coding.coding_sums(out['codes'], out['grain_map'], model.factors,
                           model.vae.codebook_size, jnp.asarray(mask))
    sums = s if sums is None else coding.merge_sums(sums, s)
    scores.append(psnr(x, y)[mask])
  res = coding.summarize_coding(jax.device_get(sums), model.factors)
  res['psnr'] = float(np.mean(np.concatenate(scores)))
  return res


def budget_figures(model: Model, batches, budgets: Sequence[float],
                   seeds: int) -> list[dict[str, float]]:
  """Router vs random vs oracle allocations of the same fine quota.

  Each batch is encoded, and coded all-coarse and all-fine, once; the
  rankings (router scores, oracle gains) then serve every budget.
  """
  got = {b: {k: [] for k in ('router', 'oracle', *(
      f'random{s}' for s in range(seeds)))} for b in budgets}
  for i, (x, mask) in enumerate(batches):
    n, grid = x.shape[0], model.grid(x)
    out, _ = model.routed(x)
    gain = model.region_gain(x)
    scores = model.router_scores(out)
    for b in budgets:
      ratios = (1.0 - b, b)
      maps = {'router': allocation.oracle_grain_map(scores, ratios),
              'oracle': allocation.oracle_grain_map(gain, ratios)}
      for s in range(seeds):
        key = jax.random.fold_in(jax.random.key(s), i)
        maps[f'random{s}'] = allocation.random_grain_map(key, n, grid, ratios)
      for k, g in maps.items():
        got[b][k].append(psnr(x, model.with_map(x, g)[1])[mask])
  rows = []
  grid = model.grid(batches[0][0])
  for b in budgets:
    mean = {k: float(np.mean(np.concatenate(v))) for k, v in got[b].items()}
    random = [mean[f'random{s}'] for s in range(seeds)]
    row = {'budget': b, 'router': mean['router'], 'oracle': mean['oracle'],
           'random': float(np.mean(random)), 'random_std': float(np.std(random)),
           'code_length': coding.expected_code_length(
               (1.0 - b, b), model.factors, int(np.prod(grid)))}
    row['gap_closed'] = allocation.gap_closed(row['router'], row['random'],
                                              row['oracle'])
    rows.append(row)
  return rows


def fixed_region_errors(fixed: Model, batches) -> list[Array]:
  """Figure 5's error map, once per fixed model for every router it scores:
  its L1 error per region of its code (the paper's VQGAN f = 16 regions),
  one (B, h, w) array per batch."""
  return [grain_lib.region_error(x, fixed.routed(x)[1], fixed.factors[0])
          for x, _ in batches]


def figure5(errors: Sequence[Array], dual: Model, batches) -> dict[str, Any]:
  """AUROC of the dual model's fine choice vs the fixed model's region error
  (`errors`, from `fixed_region_errors`).

  With two reference points for the figure: 'ceiling', the AUROC of giving
  each image the router's own number of fine regions but at the fixed
  model's highest-error regions (the best a router with these lengths can
  score), and 'gain_oracle', the same counts at the regions where fine codes
  lower the dual model's error most (what the 'gain' router target trains
  towards). 'ranking' scores the router's continuous ranking instead of its
  0/1 choice. The '_per_image' keys score each image against its own
  median error and average over images (`RegionScores.per_image_auroc`):
  the paper's figure, image by image, without the images' counts.
  """
  got = {k: coding.RegionScores()
         for k in ('auroc', 'ranking', 'ceiling', 'gain_oracle')}
  finest = len(dual.factors) - 1
  for (x, mask), error in zip(batches, errors, strict=True):
    if error.shape[1:] != dual.grid(x):
      raise ValueError(f'{error.shape[1:]} error regions, {dual.grid(x)} coded:'
                       " the fixed model must use the dual's coarsest grain.")
    out, _ = dual.routed(x)
    fine = out['grain_map'] == finest
    counts = jnp.sum(out['grain_map'] >= jnp.arange(1, finest + 1)[
        :, None, None, None], axis=(2, 3)).T  # (B, K-1) regions >= grain k
    got['auroc'].add(fine, error, mask)
    got['ranking'].add(dual.router_scores(out), error, mask)
    for key, score in (('ceiling', error),
                       ('gain_oracle', dual.region_gain(x))):
      picked = entropy_lib.assign_grains_by_counts(score, counts) == finest
      got[key].add(picked, error, mask)
  res = {k: v.auroc() for k, v in got.items()}
  for k, v in got.items():
    res[f'{k}_per_image'], res['images_per_image'] = v.per_image_auroc()
  res['regions'] = len(got['auroc'])
  return res


def coding_vs_error_picture(path: str, fixed: Model, duals: dict[str, Model],
                            x: np.ndarray, count: int = 6) -> None:
  """Rows: input | fixed-length error map | each router's coding map."""
  x = x[:count]
  z = max(1, 128 // x.shape[1])
  up = lambda a: np.repeat(np.repeat(np.asarray(a), z, 1), z, 2)
  _, y = fixed.routed(x)
  region = next(iter(duals.values())).factors[0]
  columns = [visualize.to_uint8(up(x)),
             visualize.error_map(up(x), up(y), region_size=region * z)]
  for model in duals.values():
    out, _ = model.routed(x)
    columns.append(visualize.coding_map_overlay(
        up(x), np.asarray(out['grain_map']), len(model.factors),
        grain_factors=tuple(f * z for f in model.factors)))
  tiles = np.stack(columns, axis=1)
  grid = visualize.image_grid(tiles.reshape((-1,) + tiles.shape[2:]),
                              ncols=len(columns))
  visualize.save_png(path, grid)


def rate_distortion_plot(path: str, res: dict[str, Any]) -> None:
  """PSNR against mean code length: budgets, trained ratios, fixed grids."""
  fig = Figure(figsize=(8, 5.5), dpi=100)
  ax = fig.subplots()
  for name, rows in res.get('budget', {}).items():
    xs = [r['code_length'] for r in rows]
    for key, style in (('router', 'o-'), ('random', 's--'), ('oracle', '^:')):
      ax.plot(xs, [r[key] for r in rows], style, label=f'{name}: {key}')
  for mode, style in (('argmax', 'D-'), ('expected', 'v-')):
    t6 = [r for r in res.get('table6', [])
          if r.get('inference', 'argmax') == mode]
    if t6:
      ax.plot([r['code_length_mean'] for r in t6], [r['psnr'] for r in t6],
              style, label=f'feature router trained at each r ({mode})')
  for name, r in res.get('table5', {}).items():
    ax.plot([r['code_length_mean']], [r['psnr']], '*', markersize=12,
            label=name)
  for name in ('fixed_f8',):
    if name in res.get('fixed', {}):
      r = res['fixed'][name]
      ax.plot([r['code_length_mean']], [r['psnr']], 'P', markersize=10,
              label=name)
  ax.set_xlabel('codes per image')
  ax.set_ylabel('validation PSNR (dB)')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path)


def run_one(config: ml_collections.ConfigDict, state: Any,
            budgets: Sequence[float], seeds: int) -> dict[str, Any]:
  """One trained dual-grain run: own routing, all coarse / fine, budgets."""
  model = Model(config, state)
  if len(model.factors) != 2:
    raise ValueError('--run measures a dual-grain tokenizer (two grain '
                     f'factors); this one has {model.factors}.')
  batches = validation_batches(config)
  res: dict[str, Any] = {'num_images': int(sum(m.sum() for _, m in batches))}
  res['own'] = coding_figures(model, batches)
  for name, grain in (('all_coarse', 0), ('all_fine', 1)):
    scores = [psnr(x, model.with_map(x, allocation.uniform_grain_map(
        x.shape[0], model.grid(x), grain))[1])[m] for x, m in batches]
    res[name] = float(np.mean(np.concatenate(scores)))
  res['budget'] = {'run': budget_figures(model, batches, budgets, seeds)}
  return res


def inference_variants(name: str, config: ml_collections.ConfigDict,
                       state: Any, model: Model) -> dict[str, Model]:
  """A feature-router model under each inference mode ({label: Model}), the
  trained one's own first; other models as they are."""
  if config.model.router != 'feature':
    return {name: model}
  own = config.model.router_inference
  out = {f'{name} ({own})': model}
  for mode in router_lib.INFERENCE_MODES:
    if mode != own:
      out[f'{name} ({mode})'] = Model(config, state, mode)
  return out


def run_study(runs: dict[str, tuple[Any, Any]], parts: Sequence[str],
              workdir: str, budgets: Sequence[float], seeds: int
              ) -> dict[str, Any]:
  """Evaluates the trained `runs` ({name: (config, state)}) for `parts`."""
  models = {n: Model(c, s) for n, (c, s) in runs.items()}
  batches = validation_batches(next(iter(runs.values()))[0])
  res: dict[str, Any] = {'num_images': int(sum(m.sum() for _, m in batches))}
  own = {}
  for name, model in models.items():
    logging.info('study: evaluating %s', name)
    own[name] = coding_figures(model, batches)
  if 'table5' in parts:
    res['table5'] = {n: own[n] for n in ('fixed_f4', 'triple_feature',
                                         'triple_entropy', 'triple_random')}
    # The learned router held to the budget on every image: its length can
    # drift on other data (held-out photographs are more detailed).
    config, state = runs['triple_feature']
    res['table5']['triple_feature (at budget)'] = coding_figures(
        Model(config, state, grain_ratios=tuple(config.model.grain_ratios)),
        batches)
  if 'table6' in parts:
    rows = []
    crops = training_crops(next(iter(runs.values()))[0], res['num_images'])
    for r in (0.1, 0.3, 0.5, 0.7, 0.9):
      name = f'dual_feature_r{r:g}'
      m = models[name]
      n0 = int(np.prod(m.grid(batches[0][0])))
      expected = coding.expected_code_length((1 - r, r), m.factors, n0)
      for mode in router_lib.INFERENCE_MODES:
        trained = mode == m.config.model.router_inference
        variant = m if trained else Model(*runs[name], mode)
        figures = own[name] if trained else coding_figures(variant, batches)
        on_training = coding_figures(variant, crops)
        rows.append(dict(
            figures, fine_ratio_target=r, inference=mode,
            expected_length=expected,
            length_error=figures['code_length_mean'] / expected - 1.0,
            training_crops_length=on_training['code_length_mean'],
            training_crops_length_error=(
                on_training['code_length_mean'] / expected - 1.0)))
    res['table6'] = rows
  if 'budget' in parts:
    res['budget'] = {n: budget_figures(models[n], batches, budgets, seeds)
                     for n in ('dual_feature_r0.5', 'dual_entropy')}
  if 'figure5' in parts:
    fixed = models['fixed_f8']
    duals = {n: models[n] for n in ('dual_feature_r0.5', 'dual_entropy')}
    res['fixed'] = {'fixed_f8': own['fixed_f8']}
    errors = fixed_region_errors(fixed, batches)
    res['figure5'] = {
        label: figure5(errors, variant, batches)
        for n, m in duals.items()
        for label, variant in inference_variants(n, *runs[n], m).items()}
    # The paper's Figure 5 codes 30% of the regions fine (r_f8 = 0.3), the
    # ratio of Table 6's r = 0.3 model: scored too when Table 6 trained it.
    if 'dual_feature_r0.3' in models:
      res['figure5']['dual_feature_r0.3 (the paper\'s ratio)'] = figure5(
          errors, models['dual_feature_r0.3'], batches)
    coding_vs_error_picture(os.path.join(workdir, 'coding_vs_error.png'),
                            fixed, duals, batches[0][0])
  rate_distortion_plot(os.path.join(workdir, 'rate_distortion.png'), res)
  return res


__all__ = ['Model', 'run_study', 'budget_figures', 'coding_figures',
           'fixed_region_errors', 'figure5']
