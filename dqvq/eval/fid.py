"""FID and Inception Score statistics, computed the way the reference tools do.

* `frechet_distance` is pytorch-fid's / TF FID's formula in float64 with
  `scipy.linalg.sqrtm`: if sqrt(S1 S2) is not finite (a singular product,
  e.g. fewer samples than the 2048 feature dimensions) it retries with
  eps * I added to both covariances, drops an imaginary part that is
  numerical noise, and raises on a large one.
* `FeatureStats` accumulates the mean and the unbiased (N - 1) covariance of
  pool3 features batch by batch in float64 (sum and sum of outer products),
  which equals `np.cov(all_features, rowvar=False)` without keeping 50k x 2048
  features in memory.
* `inception_score` softmaxes over ALL 1008 columns of the *unbiased* logits
  (pool3 @ W, no bias): improved-gan's original `inception_score/model.py`
  (the `softmax/logits/MatMul` weight, no bias), ADM's evaluator, NVIDIA's
  StyleGAN `metrics/inception_score.py` (`no_output_bias=True`) and
  torch-fidelity (`logits_unbiased`) all do this. The 8 extra columns are the
  graph's dummy classes; `num_classes=1000` restricts to the first 1000 for
  tools that do so, but then numbers are not comparable with the tables.
  Splits are contiguous chunks i*N//splits, like improved-gan; torch-fidelity
  shuffles first (seed 2020), which only changes the split std.
  `InceptionScoreStats` gives the same figures batch by batch.
* `ReferenceStats` is the dataset side of FID, saved as .npz and reused
  through `cached_reference_stats`, keyed by a `source_hash` that must change
  whenever anything that changes the statistics changes (dataset, split,
  resolution, crop, image count, Inception weights).

Feature extraction: `make_feature_fn(FIDInception(), params)`; feed it images
in [-1, 1] rounded to uint8 levels first (`x = round((x+1)*127.5)/127.5 - 1`)
when comparing with numbers computed from saved PNGs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import scipy.linalg
import scipy.special


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any,
                     eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), in float64."""
  mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
  sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64))
                    for s in (sigma1, sigma2))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or (
      sigma2.shape != (d, d)):
    raise ValueError(
        'frechet_distance needs two means of shape (D,) and two covariances '
        f'of shape (D, D); got {mu1.shape}, {sigma1.shape}, {mu2.shape}, '
        f'{sigma2.shape}. Were both statistics made with the same features?')
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning('FID: sqrt(S1 S2) is singular; adding %g to the '
                    'covariance diagonals (more samples than feature '
                    'dimensions avoid this).', eps)
    offset = np.eye(d) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.abs(np.diagonal(covmean).imag).max()
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
          f'FID: sqrt(S1 S2) has an imaginary component of {imag:.3g}; the '
          'covariance estimates are unreliable. Use more images (at least as '
          'many as the feature dimension, 2048 for pool3).')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * np.trace(covmean))


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """Mean, covariance and count of a feature set, tagged with its source."""
  mean: np.ndarray
  cov: np.ndarray
  count: int
  source_hash: str

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes an .npz atomically (readers never see a half-written file)."""
    path = os.fspath(path)
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'wb') as f:  # A file object: savez adds no '.npz'.
      np.savez(f, mean=np.asarray(self.mean, np.float64),
               cov=np.asarray(self.cov, np.float64),
               count=np.int64(self.count),
               source_hash=np.str_(self.source_hash))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> ReferenceStats:
    with np.load(os.fspath(path), allow_pickle=False) as z:
      missing = {'mean', 'cov', 'count', 'source_hash'} - set(z.files)
      if missing:
        raise ValueError(f'{path} is not a ReferenceStats file (missing '
                         f'{sorted(missing)}); delete it to recompute.')
      return cls(z['mean'], z['cov'], int(z['count']), str(z['source_hash']))

  def frechet_distance(self, other: ReferenceStats) -> float:
    return frechet_distance(self.mean, self.cov, other.mean, other.cov)


class FeatureStats:
  """Streaming float64 mean / covariance of (N, D) feature batches.

  `update` takes host-readable arrays; in a multi-host run, gather the
  features of all processes first (`multihost_utils.process_allgather`).
  """

  def __init__(self, dim: int | None = None):
    self.dim = dim
    self.count = 0
    self._sum: np.ndarray | None = None
    self._outer: np.ndarray | None = None

  def update(self, features: Any) -> None:
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
      raise ValueError(f'features must be (N, D), got shape {f.shape}')
    if self.dim is None:
      self.dim = f.shape[1]
    if f.shape[1] != self.dim:
      raise ValueError(f'features have {f.shape[1]} dimensions, earlier '
                       f'batches had {self.dim}')
    if not np.isfinite(f).all():
      raise ValueError('features contain NaN or inf; check the images are '
                       'finite and in [-1, 1], and the Inception weights.')
    if self._sum is None:
      self._sum = np.zeros(self.dim)
      self._outer = np.zeros((self.dim, self.dim))
    self._sum += f.sum(axis=0)
    self._outer += f.T @ f
    self.count += f.shape[0]

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the unbiased covariance, as np.cov(rowvar=False)."""
    if self.count < 2:
      raise ValueError(f'need at least 2 feature vectors, have {self.count}')
    mean = self._sum / self.count
    cov = (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)
    return mean, cov

  def to_reference(self, source_hash: str) -> ReferenceStats:
    mean, cov = self.mean_cov()
    return ReferenceStats(mean, cov, self.count, source_hash)


def inception_score(logits: Any, splits: int = 10,
                    num_classes: int | None = None) -> tuple[float, float]:
  """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` chunks.

  Args:
    logits: (N, C) class logits; for the standard IS the `logits_unbiased`
      output of FIDInception (C = 1008; see the module docstring).
    splits: number of contiguous chunks (10 in the literature).
    num_classes: softmax over only the first num_classes columns; None (the
      reference tools' choice) uses all of them.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f'logits must be (N, C), got shape {logits.shape}')
  if num_classes is not None:
    if not 1 < num_classes <= logits.shape[1]:
      raise ValueError(f'num_classes={num_classes} must be in 2..'
                       f'{logits.shape[1]}')
    logits = logits[:, :num_classes]
  n = logits.shape[0]
  if not 1 <= splits <= n:
    raise ValueError(f'inception_score: {n} samples cannot make {splits} '
                     'splits; lower splits or add samples.')
  log_p = scipy.special.log_softmax(logits, axis=1)
  scores = []
  for i in range(splits):
    lp = log_p[i * n // splits:(i + 1) * n // splits]
    # log of the marginal, computed in log space so empty classes stay finite.
    log_py = scipy.special.logsumexp(lp, axis=0) - np.log(lp.shape[0])
    p = np.exp(lp)
    kl = np.sum(np.where(p > 0, p * (lp - log_py), 0.0), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


class InceptionScoreStats:
  """`inception_score` batch by batch, without keeping the (N, C) logits.

  Within a split, E_x KL(p(y|x) || p(y)) = E_x sum_c p log p - sum_c p(y) log
  p(y) with p(y) the split's mean of p(y|x), so a split needs only the sum of
  the rows' negative entropies and the log-sum of their p(y|x); both add up
  batch by batch in float64. The splits are `inception_score`'s contiguous
  chunks i*N//splits, which is why the total N is given up front. 50k x 1008
  logits would be 0.4 GB of float64 per host, times the copies
  `inception_score` makes.
  """

  def __init__(self, total: int, splits: int = 10,
               num_classes: int | None = None):
    if not 1 <= splits <= total:
      raise ValueError(f'inception_score: {total} samples cannot make '
                       f'{splits} splits; lower splits or add samples.')
    self.total, self.splits, self.num_classes = total, splits, num_classes
    self.count = 0
    # Split s holds samples bounds[s] <= i < bounds[s + 1].
    self._bounds = np.arange(splits + 1) * total // splits
    self._neg_entropy = np.zeros(splits)
    self._log_sum: np.ndarray | None = None  # (splits, C): log sum_x p(y|x)

  def update(self, logits: Any) -> None:
    """Adds the next rows, in sample order, of the (N, C) logits."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
      raise ValueError(f'logits must be (N, C), got shape {logits.shape}')
    if self.num_classes is not None:
      if not 1 < self.num_classes <= logits.shape[1]:
        raise ValueError(f'num_classes={self.num_classes} must be in 2..'
                         f'{logits.shape[1]}')
      logits = logits[:, :self.num_classes]
    if self.count + len(logits) > self.total:
      raise ValueError(f'{self.count + len(logits)} logits rows for an '
                       f'Inception Score of {self.total} samples.')
    if self._log_sum is None:
      self._log_sum = np.full((self.splits, logits.shape[1]), -np.inf)
    log_p = scipy.special.log_softmax(logits, axis=1)
    p = np.exp(log_p)
    neg_entropy = np.sum(np.where(p > 0, p * log_p, 0.0), axis=1)
    split = np.searchsorted(self._bounds, self.count + np.arange(len(logits)),
                            side='right') - 1
    for s in np.unique(split):
      rows = split == s
      self._neg_entropy[s] += neg_entropy[rows].sum()
      self._log_sum[s] = np.logaddexp(
          self._log_sum[s], scipy.special.logsumexp(log_p[rows], axis=0))
    self.count += len(logits)

  def result(self) -> tuple[float, float]:
    """IS mean and std over the splits, as `inception_score`."""
    if self.count != self.total:
      raise ValueError(f'Inception Score of {self.total} samples, but '
                       f'{self.count} were added.')
    n = np.diff(self._bounds).astype(np.float64)
    log_py = self._log_sum - np.log(n)[:, None]
    py = np.exp(log_py)
    cross = np.sum(np.where(py > 0, py * log_py, 0.0), axis=1)
    scores = np.exp(self._neg_entropy / n - cross)
    return float(np.mean(scores)), float(np.std(scores))


def make_source_hash(**parts: Any) -> str:
  """A stable hash of everything that determines reference statistics."""
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def cached_reference_stats(
    cache_dir: str | os.PathLike[str], source_hash: str,
    compute_fn: Callable[[], FeatureStats | ReferenceStats],
    filename: str = 'fid_reference_stats.npz') -> ReferenceStats:
  """Loads cache_dir/filename if its source_hash matches, else recomputes.

  compute_fn returns a filled FeatureStats (or ReferenceStats); the result
  is tagged with source_hash and written (by process 0 only; every process
  must compute the same statistics from all images).
  """
  path = os.path.join(os.fspath(cache_dir), filename)
  if os.path.exists(path):
    try:
      cached = ReferenceStats.load(path)
    except (ValueError, OSError) as e:
      logging.warning('FID reference stats at %s unreadable (%s); '
                      'recomputing.', path, e)
    else:
      if cached.source_hash == source_hash:
        logging.info('FID reference stats: reusing %s (%d images).', path,
                     cached.count)
        return cached
      logging.info('FID reference stats at %s are for source %s, not %s; '
                   'recomputing.', path, cached.source_hash, source_hash)
  result = compute_fn()
  if isinstance(result, FeatureStats):
    stats = result.to_reference(source_hash)
  elif isinstance(result, ReferenceStats):
    stats = dataclasses.replace(result, source_hash=source_hash)
  else:
    raise TypeError('compute_fn must return FeatureStats or ReferenceStats, '
                    f'not {type(result).__name__}')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    stats.save(path)
  return stats


def make_feature_fn(model: nn.Module, params: Any, *,
                    mesh: jax.sharding.Mesh | None = None,
                    logits_key: str = 'logits_unbiased'
                    ) -> Callable[[Any], tuple[jax.Array, jax.Array]]:
  """A jitted images -> (pool (B, 2048), logits (B, 1008)) for FID and IS.

  Args:
    model: a `FIDInception`.
    params: its params; passed as an argument, not closed over, so that 95 MB
      of weights do not become compile-time constants.
    mesh: a `dqvq.sharding` ('data', 'fsdp') mesh: params are replicated on
      it and the batch (a multiple of mesh.size) is split over all devices,
      so one call runs data-parallel. None: plain jit, following the input.
    logits_key: 'logits_unbiased' (for `inception_score`) or 'logits'.
  """
  if logits_key not in ('logits', 'logits_unbiased'):
    raise ValueError("logits_key must be 'logits_unbiased' or 'logits', not "
                     f'{logits_key!r}')

  def features(p, images):
    out = model.apply({'params': p}, images)
    return out['pool'], out[logits_key]

  if mesh is None:
    jitted = jax.jit(features)
  else:
    from dqvq import sharding  # pylint: disable=g-import-not-at-top
    rep, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    params = jax.device_put(params, rep)
    jitted = jax.jit(features, in_shardings=(rep, batch),
                     out_shardings=(batch, batch))

  def fn(images):
    if mesh is not None and images.shape[0] % mesh.size:
      raise ValueError(
          f'batch of {images.shape[0]} images does not split over the '
          f'{mesh.size} devices of the mesh; pad it to a multiple of '
          f'{mesh.size} and drop the padded features.')
    return jitted(params, images)

  return fn
