"""Generator evaluation: FID / IS of samples and their code-length spread.

The paper's generation tables report FID and IS of class-balanced samples
against the dataset; a dynamic tokenizer adds one more question, whether the
DQ-Transformer spends codes like the data does. Both come from one data pass
and one sampling run:

* The data pass encodes the split with the generator's own (frozen)
  tokenizer, the trained routing, and collects the exact code-length
  histogram and usage (`dqvq.eval.coding`); it also collects the real
  images' Inception features when the reference statistics are not cached.
* `Generator.sample_batches` draws the images batch by batch, sharded over
  the mesh, and each batch is reduced where it lies: Inception features
  and logits, and the code maps' sums (the same as the data's). Only the
  features, the sums and a few pictures reach the hosts, so host memory
  stays flat in the number of samples (FID-50k at 256 px would otherwise
  put 39 GB of float32 images on every host). The Inception Score streams
  too (`fid.InceptionScoreStats`).

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

from dqvq.eval import coding as coding_lib
from dqvq.eval import fid as fid_lib
from dqvq.inference import generator as generator_lib
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq.models import inception as inception_lib
from dqvq import sampling
from dqvq import sharding

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
             mask: np.ndarray,
             inception_score: fid_lib.InceptionScoreStats | None = None
             ) -> None:
    """Adds the real rows of a global batch (quantised to uint8 levels).

    Inception runs on the devices; only the pool3 features (and, for the
    Inception Score, the logits) of the batch come back to every host.
    """
    pool, logit = sharding.host_gather(self.feature_fn(_fid_range_jit(images)))
    stats.update(pool[mask])
    if inception_score is not None:
      inception_score.update(logit[mask])


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
    mask = sharding.host_gather(batch['mask']).astype(bool)
    if real is not None:
      fid.update(real, batch['image'], mask)
    if on_batch is not None:
      on_batch(int(mask.sum()))
  if total is None:
    raise ValueError('The split gave no batches; check --split and '
                     '--num_images.')
  return total, real


def _sample_sums_fn(tok: tokenizer_lib.Tokenizer) -> Callable[..., Any]:
  """Jitted (codes, grain_map, writes, mask) -> one sampled batch's sums.

  The data side's coding sums plus 'complete', the samples whose every
  finest cell was written once (a full code map).
  """
  factors = tuple(tok.vae.grain_factors)

  def fn(codes, grain_map, writes, mask):
    full = jnp.all(writes.reshape(writes.shape[0], -1) == 1, axis=1)
    return {'coding': coding_lib.coding_sums(
        codes, grain_map, factors, tok.vae.codebook_size, mask),
            'complete': jnp.sum(full & (mask > 0), dtype=jnp.int32)}
  return jax.jit(fn)


def _keep_pictures(pictures: dict[str, list[np.ndarray]],
                   sampled: generator_lib.SampledBatch, wanted: int) -> None:
  """Appends the batch's first samples to `pictures`, up to `wanted` in all.

  Only batches that contribute are gathered, so the host holds at most
  one batch of images beyond the pictures.
  """
  have = sum(len(v) for v in pictures['label'])
  if have >= wanted:
    return
  take = min(wanted - have, sampled.count)
  host = sharding.host_gather(
      {k: sampled.arrays[k] for k in ('image', 'grain_map')})
  for name, value in host.items():
    pictures[name].append(value[:take])
  pictures['label'].append(sampled.labels[:take])


def sample_statistics(gen: generator_lib.Generator, num_samples: int, *,
                      sampling_config: sampling.SamplingConfig,
                      class_labels: Sequence[int] = (), batch_size: int = 0,
                      fid: FIDSetup | None = None, num_pictures: int = 8,
                      on_batch: Callable[[int], None] | None = None
                      ) -> dict[str, Any]:
  """Draws `num_samples` samples and reduces each batch on the devices.

  Per batch, on the mesh: the coding sums of the code maps and, with `fid`,
  Inception pool3 features and logits of the images (rounded to uint8
  levels). Only the features (B x 3056 floats), the sums and the first
  `num_pictures` samples reach the host, so host memory does not grow with
  `num_samples` (gathering 50k 256 px images as float32 to every host, as
  `Generator.sample` does, is about 39 GB each).

  Returns 'sums' (coding sums over all samples, on device), 'complete'
  (samples with a full code map), 'features' (`FeatureStats`) and
  'inception_score' (`InceptionScoreStats`), both None without `fid`, and
  'pictures' (host 'image', 'grain_map', 'label' of the first samples).
  """
  sums_fn = _sample_sums_fn(gen.tokenizer)
  spec = sharding.batch_sharding(gen.mesh)
  feats = is_stats = None
  if fid is not None:
    feats = fid_lib.FeatureStats()
    is_stats = fid_lib.InceptionScoreStats(
        num_samples, splits=min(IS_SPLITS, num_samples))
  pictures: dict[str, list[np.ndarray]] = {
      'image': [], 'grain_map': [], 'label': []}
  total = None
  for sampled in gen.sample_batches(
      num_samples, class_labels=class_labels, config=sampling_config,
      batch_size=batch_size, previews=False):
    mask = sampled.mask()
    mask_dev = jax.make_array_from_callback(
        mask.shape, spec, lambda idx, m=mask.astype(np.int32): m[idx])
    out = sampled.arrays
    sums = sums_fn(out['codes'], out['grain_map'], out['writes'], mask_dev)
    total = sums if total is None else coding_lib.merge_sums(total, sums)
    if fid is not None:
      fid.update(feats, out['image'], mask, is_stats)
    _keep_pictures(pictures, sampled, num_pictures)
    if on_batch is not None:
      on_batch(sampled.count)
  pictures = {k: (np.concatenate(v) if v else np.zeros((0,)))
              for k, v in pictures.items()}
  return {'sums': total['coding'], 'complete': int(total['complete']),
          'features': feats, 'inception_score': is_stats,
          'pictures': pictures}


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
                       fid: FIDSetup | None = None, num_pictures: int = 8,
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
    num_pictures: samples kept on the host for pictures.
    on_batch: progress callback, called with images done.

  Returns:
    'figures' (flat; 'fid' and IS None without `fid`), 'data_length_hist',
    'sample_length_hist', 'histograms' (for the JSON) and 'samples' (host
    images, grain maps and labels of the first `num_pictures` samples).
  """
  tok = gen.tokenizer
  factors = tuple(tok.vae.grain_factors)
  reference = fid.cached() if fid is not None else None
  data_sums, real = encode_split(
      tok, batches, fid=fid, collect_real=fid is not None and reference is None,
      on_batch=on_batch)
  if real is not None:
    reference = fid.finish(real)
  res = sample_statistics(
      gen, num_samples, sampling_config=sampling_config,
      class_labels=class_labels, batch_size=batch_size, fid=fid,
      num_pictures=num_pictures, on_batch=on_batch)
  sample_sums = res['sums']
  ratios = tuple(tok.vae.grain_ratios)
  data_fig = coding_lib.summarize_coding(data_sums, factors, ratios)
  sample_fig = coding_lib.summarize_coding(sample_sums, factors, ratios)
  data_hist = np.asarray(jax.device_get(data_sums['length_hist']))
  sample_hist = np.asarray(jax.device_get(sample_sums['length_hist']))
  figures: dict[str, Any] = {
      'fid': None, 'inception_score': None, 'inception_score_std': None,
      'num_samples': float(num_samples),
      'sample_complete_share': res['complete'] / num_samples,
      **_prefixed('sample_', sample_fig), **_prefixed('data_', data_fig),
      **length_distances(data_hist, sample_hist)}
  if fid is not None:
    figures['fid'], note = frechet_or_note(reference, res['features'])
    if note:
      figures['fid_note'] = note
    is_stats = res['inception_score']
    figures['inception_score'], figures['inception_score_std'] = (
        is_stats.result())
    figures['inception_score_splits'] = float(is_stats.splits)
    figures['reference_count'] = float(reference.count)
  return {'figures': figures, 'data_length_hist': data_hist,
          'sample_length_hist': sample_hist,
          'histograms': {'data_code_length': data_hist,
                         'sample_code_length': sample_hist},
          'samples': res['pictures']}


__all__ = ['FIDSetup', 'fid_setup', 'frechet_or_note', 'fid_range',
           'load', 'encode_split', 'sample_statistics', 'length_distances',
           'evaluate_generator']
