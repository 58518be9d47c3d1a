"""Generator evaluation: FID / IS of samples and their code-length spread.

The paper's generation tables report FID and IS of class-balanced samples
against the dataset; a dynamic tokenizer adds one more question, whether the
DQ-Transformer spends codes like the data does. Both come from one data pass
and one sampling run:

* The data pass encodes the split with the generator's own (frozen)
  tokenizer, the trained routing, and collects the exact code-length
  histogram and usage (`dqvq.eval.coding`); it also collects the real
  images' Inception features when the reference statistics are not cached.
* `Generator.sample` draws the images (sharded over the mesh, gathered on
  every host); their Inception features are computed in mesh-sized batches,
  and their code maps summarised the same way as the data's.

Code-length distributions are compared by their means and variances, the
total-variation distance of the histograms and the 1-D Wasserstein (earth
mover's) distance in codes.

The FID plumbing lives here and the tokenizer's rFID reuses it: `FIDSetup`
holds the Inception feature function (data-parallel over the mesh) and the
cache of the real images' statistics, keyed by a hash of the data and of the
Inception weights; features are computed on images rounded to uint8 levels,
as the reference tools see saved PNGs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

from dqvq import generator as generator_lib
from dqvq import sampling
from dqvq import sharding
from dqvq import tokenizer as tokenizer_lib
from dqvq.eval import coding as coding_lib
from dqvq.eval import fid as fid_lib
from dqvq.models import inception as inception_lib

Array = jax.Array

IS_SPLITS = 10  # the literature's split count (fewer when samples are few)


def fid_range(images: Array) -> Array:
  """[-1, 1] images rounded to uint8 levels, as saved PNGs would be."""
  return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


_fid_range_jit = jax.jit(fid_range)


def frechet_or_note(reference: fid_lib.ReferenceStats,
                    features: fid_lib.FeatureStats
                    ) -> tuple[float | None, str | None]:
  """FID against `reference`, or (None, why) when it cannot be computed.

  Few images (fewer than the 2048 feature dimensions) make the covariance
  square root unreliable; `frechet_distance` refuses then, and the JSON says
  so instead of the evaluation failing after its expensive part.
  """
  try:
    return reference.frechet_distance(
        features.to_reference(reference.source_hash)), None
  except ValueError as e:
    return None, f'FID not computed: {e}'


def gather(tree: Any) -> Any:
  """Global (sharded) arrays -> full host numpy arrays on every process."""
  return jax.tree.map(np.asarray,
                      multihost_utils.process_allgather(tree, tiled=True))


@dataclasses.dataclass
class FIDSetup:
  """Inception features plus the cache of the real images' statistics."""
  feature_fn: Callable[[Array], tuple[Array, Array]]
  cache_dir: str
  source_hash: str

  def cached(self) -> fid_lib.ReferenceStats | None:
    """The cached reference statistics if they match the source hash."""
    try:
      stats = fid_lib.ReferenceStats.load(
          os.path.join(self.cache_dir, 'fid_reference_stats.npz'))
    except (ValueError, OSError):  # missing or unreadable: recompute
      stats = None
    if stats is not None and stats.source_hash != self.source_hash:
      stats = None
    if jax.process_count() > 1:
      # Every host must make the same choice: collecting the real features
      # runs collectives, so a host that cannot see the cache (no shared
      # disk) makes all of them collect.
      hits = multihost_utils.process_allgather(np.int32(stats is not None))
      stats = stats if int(np.min(hits)) else None
    return stats

  def finish(self, collected: fid_lib.FeatureStats
             ) -> fid_lib.ReferenceStats:
    """Reference statistics from features `collected` after a cache miss.

    Tagged with the source hash and written to the cache (by process 0).
    """
    return fid_lib.cached_reference_stats(self.cache_dir, self.source_hash,
                                          lambda: collected)

  def update(self, stats: fid_lib.FeatureStats, images: Array,
             mask: np.ndarray, logits: list[np.ndarray] | None = None
             ) -> None:
    """Adds the real rows of a global batch (quantised to uint8 levels)."""
    pool, logit = gather(self.feature_fn(_fid_range_jit(images)))
    stats.update(pool[mask])
    if logits is not None:
      logits.append(logit[mask])


def fid_setup(weights: str, mesh: jax.sharding.Mesh, data_hash: str,
              cache_dir: str, notes: list[str],
              num_images: int = 0) -> FIDSetup | None:
  """Inception features for FID / IS, or None (and a note) without weights.

  `num_images` (the smaller of the two sets) only adds a note when it is
  below the 2048 feature dimensions, where the covariances are singular.
  """
  if not weights:
    notes.append('FID / IS / rFID: skipped, no --inception_weights (make them '
                 f'with `{inception_lib.CONVERT_HINT}`).')
    return None
  params = inception_lib.load_inception_params(weights)
  if weights == 'random':
    notes.append('FID / IS / rFID use a RANDOM Inception (--inception_weights'
                 '=random): not comparable with any published number.')
  if 0 < num_images < inception_lib.POOL_DIM:
    notes.append(f'FID / rFID from {num_images} < {inception_lib.POOL_DIM} '
                 'images: singular covariances, biased upwards; compare '
                 'only with figures from as many images (papers use 50k).')
  source_hash = fid_lib.make_source_hash(
      data=data_hash, inception=tokenizer_lib.fingerprint(params))
  return FIDSetup(fid_lib.make_feature_fn(inception_lib.FIDInception(),
                                          params, mesh=mesh),
                  cache_dir, source_hash)


def load(workdir: str | None, bundle: str | None,
         mesh: jax.sharding.Mesh) -> generator_lib.Generator:
  """The generator of a stage-2 run (newest checkpoint) or bundle."""
  if bundle:
    return generator_lib.load_bundle(bundle, mesh)
  return generator_lib.load_run(workdir, mesh=mesh)


def _coding_fn(tok: tokenizer_lib.Tokenizer) -> Callable[..., Any]:
  factors = tuple(tok.vae.grain_factors)

  def fn(t, images, mask):
    enc = t.encode(images)
    return coding_lib.coding_sums(enc['codes'], enc['grain_map'], factors,
                                  t.vae.codebook_size, mask)
  return jax.jit(fn)


def encode_split(tok: tokenizer_lib.Tokenizer, batches: Iterable[Any], *,
                 fid: FIDSetup | None = None,
                 collect_real: bool = False,
                 on_batch: Callable[[int], None] | None = None
                 ) -> tuple[Any, fid_lib.FeatureStats | None]:
  """The split's coding sums (trained routing) and, if asked, real features."""
  step = _coding_fn(tok)
  total = None
  real = fid_lib.FeatureStats() if collect_real else None
  for batch in batches:
    sums = step(tok, batch['image'], batch['mask'])
    total = sums if total is None else coding_lib.merge_sums(total, sums)
    mask = gather(batch['mask']).astype(bool)
    if real is not None:
      fid.update(real, batch['image'], mask)
    if on_batch is not None:
      on_batch(int(mask.sum()))
  if total is None:
    raise ValueError('The split gave no batches; check --split and '
                     '--num_images.')
  return total, real


def host_features(fid: FIDSetup, images: np.ndarray,
                  mesh: jax.sharding.Mesh, batch_size: int
                  ) -> tuple[fid_lib.FeatureStats, np.ndarray]:
  """Pool3 statistics and unbiased logits of host images (N, H, W, 3).

  Every process holds all N images (`Generator.sample` gathers them); each
  batch is zero-padded to `batch_size` (a multiple of the mesh) and every
  process places its devices' rows, so the Inception runs data-parallel.
  """
  if batch_size % mesh.size:
    raise ValueError(f'batch size {batch_size} is not a multiple of the '
                     f'{mesh.size} devices.')
  feats, logits = fid_lib.FeatureStats(), []
  spec = sharding.batch_sharding(mesh)
  for lo in range(0, len(images), batch_size):
    chunk = np.asarray(images[lo:lo + batch_size], np.float32)
    padded = np.zeros((batch_size,) + chunk.shape[1:], np.float32)
    padded[:len(chunk)] = chunk
    x = jax.make_array_from_callback(padded.shape, spec,
                                     lambda idx, a=padded: a[idx])
    fid.update(feats, x, np.arange(batch_size) < len(chunk), logits)
  return feats, np.concatenate(logits)


def length_distances(hist_a: np.ndarray, hist_b: np.ndarray
                     ) -> dict[str, float]:
  """Total variation and Wasserstein-1 distance of two length histograms."""
  a = np.asarray(hist_a, np.float64)
  b = np.asarray(hist_b, np.float64)
  n = max(a.size, b.size)
  a, b = np.pad(a, (0, n - a.size)), np.pad(b, (0, n - b.size))
  if a.sum() <= 0 or b.sum() <= 0:
    raise ValueError('Both code-length histograms need at least one image.')
  lengths = np.arange(n, dtype=np.float64)
  return {
      'code_length_tv_distance': float(
          0.5 * np.abs(a / a.sum() - b / b.sum()).sum()),
      'code_length_wasserstein': float(scipy_stats.wasserstein_distance(
          lengths, lengths, a, b)),
  }


def _prefixed(prefix: str, figures: dict[str, float]) -> dict[str, float]:
  return {f'{prefix}{k}': v for k, v in figures.items()}


def evaluate_generator(gen: generator_lib.Generator, batches: Iterable[Any],
                       *, num_samples: int,
                       sampling_config: sampling.SamplingConfig,
                       class_labels: Sequence[int] = (), batch_size: int = 0,
                       fid: FIDSetup | None = None,
                       on_batch: Callable[[int], None] | None = None
                       ) -> dict[str, Any]:
  """FID, IS and code-length statistics of `num_samples` samples.

  Args:
    gen: the generator (its tokenizer encodes the data side).
    batches: one pass over the reference split (global arrays).
    num_samples: images to sample.
    sampling_config: how tokens are chosen (as `python -m dqvq.sample`).
    class_labels: labels to cycle through; empty: every class in turn.
    batch_size: images per sampler / Inception call (multiple of devices).
    fid: Inception setup, or None to skip FID and IS.
    on_batch: progress callback, called with images done.

  Returns:
    'figures' (flat; 'fid' and IS None without `fid`), 'data_length_hist',
    'sample_length_hist', 'histograms' (for the JSON) and 'samples' (host
    images, grain maps and labels, for pictures).
  """
  tok = gen.tokenizer
  factors = tuple(tok.vae.grain_factors)
  reference = fid.cached() if fid is not None else None
  data_sums, real = encode_split(
      tok, batches, fid=fid, collect_real=fid is not None and reference is None,
      on_batch=on_batch)
  if real is not None:
    reference = fid.finish(real)
  res = gen.sample(num_samples, class_labels=class_labels,
                   config=sampling_config, batch_size=batch_size,
                   on_batch=on_batch)
  sample_sums = coding_lib.coding_sums(
      jnp.asarray(res['codes']), jnp.asarray(res['grain_map']), factors,
      tok.vae.codebook_size)
  ratios = tuple(tok.vae.grain_ratios)
  data_fig = coding_lib.summarize_coding(data_sums, factors, ratios)
  sample_fig = coding_lib.summarize_coding(sample_sums, factors, ratios)
  data_hist = np.asarray(jax.device_get(data_sums['length_hist']))
  sample_hist = np.asarray(jax.device_get(sample_sums['length_hist']))
  figures: dict[str, Any] = {
      'fid': None, 'inception_score': None, 'inception_score_std': None,
      'num_samples': float(num_samples),
      'sample_complete_share': float(np.mean(np.all(
          res['writes'].reshape(num_samples, -1) == 1, axis=1))),
      **_prefixed('sample_', sample_fig), **_prefixed('data_', data_fig),
      **length_distances(data_hist, sample_hist)}
  if fid is not None:
    n_dev = gen.mesh.size
    batch = -(-(batch_size or 4 * n_dev) // n_dev) * n_dev
    feats, logits = host_features(fid, res['image'], gen.mesh, batch)
    figures['fid'], note = frechet_or_note(reference, feats)
    if note:
      figures['fid_note'] = note
    figures['inception_score'], figures['inception_score_std'] = (
        fid_lib.inception_score(logits, splits=min(IS_SPLITS, len(logits))))
    figures['inception_score_splits'] = float(min(IS_SPLITS, len(logits)))
    figures['reference_count'] = float(reference.count)
  return {'figures': figures, 'data_length_hist': data_hist,
          'sample_length_hist': sample_hist,
          'histograms': {'data_code_length': data_hist,
                         'sample_code_length': sample_hist},
          'samples': {'image': res['image'], 'grain_map': res['grain_map'],
                      'label': res['label']}}


__all__ = ['FIDSetup', 'fid_setup', 'frechet_or_note', 'fid_range', 'gather',
           'load', 'encode_split', 'host_features', 'length_distances',
           'evaluate_generator']
