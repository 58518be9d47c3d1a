"""Routers: which granularity codes each region (paper Sec. 3.1, DGC module).

Three ways to decide, all returning a `Routing`:

* `FeatureRouter`, the paper's Dynamic Grained Coding gate: group-normed,
  pooled features of every granularity -> gate -> Gumbel-softmax with a
  straight-through estimator in training, argmax at inference.
* `EntropyRouter`, the official "better version": regions whose gray-level
  entropy exceeds a percentile threshold of the training data go fine. No
  parameters, no gradient, no budget loss.
* `RandomRouter`: the same shares, random regions (paper Table 5 ablation).

Grain id 0 is the coarsest granularity throughout.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dqvq.models import entropy as entropy_lib
from dqvq.models import granularity as grain_lib
from dqvq.models import layers

Array = jax.Array

ROUTERS = ('feature', 'entropy', 'random', 'none')
GATE_TYPES = ('mlp', 'linear')
# How the feature router decides at inference. 'argmax': each region's most
# probable grain (paper, official). 'expected': each image gets as many
# regions at grain >= k as its gate expects, round(sum_regions P(grain >= k)),
# given to its highest-ranked regions (`expected_grain`).
INFERENCE_MODES = ('argmax', 'expected')
# What the feature router reads of each finer grain within a region: 'mean'
# (paper, official: its average-pooled features) or 'mean_std' (also their
# per-channel standard deviation within the region: how much the region
# varies, which a mean cannot show; more gate inputs, so not the official
# parameter shapes).
# 'mean_logstd': the same spread, but of the features before the per-image
# GroupNorm, log-compressed: the norm divides each image by its own feature
# scale, so a flat image's relative spread looks like a detailed one's, and
# a gate that should give detailed images more codes than flat ones cannot
# see the difference.
ROUTER_INPUTS = ('mean', 'mean_std', 'mean_logstd')
# How the feature router routes in training. 'gumbel' (paper, official): a
# Gumbel-softmax draw, grain k with probability p_k. A gate that is unsure
# (p near the budget everywhere, as it is for most of a short run) then
# routes regions nearly at random, so neither branch of the encoder is
# trained on the regions it will code at inference. 'inference': the rule
# `inference` names, the same decision the trained model makes, with the
# softmax's straight-through gradient for the budget loss; meant for
# a router_target ('gain', 'error'), which trains the gate without exploration.
TRAIN_ROUTINGS = ('gumbel', 'inference')


@flax.struct.dataclass
class Routing:
  """A router's decision for a batch.

  Attributes:
    grain_map: (B, h, w) int32 grain id per region.
    gate: (B, h, w, K) one-hot in the forward pass; in training with the
      feature router its gradient is that of the Gumbel softmax, which is what
      the budget loss differentiates.
    gate_scale: (B, h, w) equal to 1 in the forward pass but carrying the
      chosen soft score's gradient (paper Eq. 6), multiplied into the merged
      features so that the reconstruction loss reaches the gate; None when the
      router has no parameters or at inference.
    logits: (B, h, w, K) gate logits (feature router), else None.
    entropy: (B, h, w) region entropy (entropy router), else None.
  """
  grain_map: Array
  gate: Array
  gate_scale: Array | None = None
  logits: Array | None = None
  entropy: Array | None = None


def gumbel_straight_through(logits: Array, key: Array,
                            tau: float = 1.0) -> tuple[Array, Array, Array]:
  """Hard Gumbel-softmax sample with a straight-through gradient.

  Returns (index, st_one_hot, chosen_score): the forward value of st_one_hot
  is exactly one-hot, its gradient is that of softmax((logits + g) / tau);
  chosen_score is 1 in the forward pass with the gradient of the chosen soft
  probability p (paper Eq. 6).
  """
  noise = jax.random.gumbel(key, logits.shape, jnp.float32)
  y_soft = jax.nn.softmax((logits.astype(jnp.float32) + noise) / tau, axis=-1)
  index = jnp.argmax(y_soft, axis=-1)
  hard = jax.nn.one_hot(index, logits.shape[-1], dtype=jnp.float32)
  st = hard - jax.lax.stop_gradient(y_soft) + y_soft
  return index.astype(jnp.int32), st, jnp.sum(st * hard, axis=-1)


def expected_grain(logits: Array) -> Array:
  """Softmax-weighted grain id per region: the feature router's ranking.

  Higher means the gate is surer the region is detailed; a per-call budget
  gives the finest grains to the highest-ranked regions.
  """
  k = logits.shape[-1]
  return jax.nn.softmax(logits, axis=-1) @ jnp.arange(k, dtype=jnp.float32)


class FeatureRouter(nn.Module):
  """The DGC gate over per-grain features (official `*GrainFeatureRouter`).

  Attributes:
    grain_factors: coarse to fine.
    gate_type: 'mlp' (official: Linear, SiLU, Linear) or 'linear' (paper's
      single W_g).
    tau: Gumbel-softmax temperature (paper: 1).
    inference: one of INFERENCE_MODES. Training draws grain k with
      probability p_k (the Gumbel-max trick), and the budget loss holds the
      mean of p at the target shares, which a gate can meet with the same
      logits everywhere. The mode of p (argmax) then sends every region the
      same way, 'expected' keeps the training draw's expected count per image
      (its length varies with the image, and its mean meets the budget).
    inputs: one of ROUTER_INPUTS.
    train_routing: one of TRAIN_ROUTINGS.
  """
  grain_factors: tuple[int, ...]
  gate_type: str = 'mlp'
  tau: float = 1.0
  norm_groups: int = 32
  inference: str = 'argmax'
  inputs: str = 'mean'
  train_routing: str = 'gumbel'

  @nn.compact
  def __call__(self, features: Sequence[Array], train: bool,
               grain_ratios: Sequence[float] | None = None) -> Routing:
    """Gate decision; `grain_ratios` imposes a code budget at inference.

    With a budget, each image's regions are ranked by the gate's expected
    grain (softmax-weighted grain id, so a region the gate is surer is
    detailed ranks higher) and the finest grains go to the top regions in the
    requested shares: the learned ranking, with a user-chosen length.
    """
    if train and grain_ratios is not None:
      raise ValueError('grain_ratios is an inference-time budget; training '
                       'sets the shares through the budget loss.')
    roles = grain_lib.grain_role_names(len(features))
    coarse = self.grain_factors[0]
    if self.inputs not in ROUTER_INPUTS:
      raise ValueError(f'Unknown router inputs {self.inputs!r}; choose one of '
                       f'{ROUTER_INPUTS}.')
    pooled = []
    for role, f, feat in zip(roles, self.grain_factors, features):
      normed = layers.GroupNorm(self.norm_groups,
                                name=f'feature_norm_{role}')(feat)
      mean = layers.avg_pool(normed, coarse // f)
      pooled.append(mean)
      if self.inputs == 'mean_std' and f < coarse:
        var = layers.avg_pool(normed * normed, coarse // f) - mean * mean
        pooled.append(jnp.sqrt(jnp.maximum(var, 0.0) + 1e-6))
      if self.inputs == 'mean_logstd' and f < coarse:
        raw = feat.astype(jnp.float32)
        raw_mean = layers.avg_pool(raw, coarse // f)
        var = layers.avg_pool(raw * raw, coarse // f) - raw_mean * raw_mean
        pooled.append(0.5 * jnp.log(jnp.maximum(var, 0.0) + 1e-6).astype(
            mean.dtype))
    h = jnp.concatenate(pooled, axis=-1)  # [coarse, ..., fine], as official.
    self.sow('intermediates', 'gate_inputs', h)
    k = len(features)
    if self.gate_type == 'mlp':
      h = nn.silu(layers.Dense(h.shape[-1], name='gate_0')(h))
      logits = layers.Dense(k, name='gate_2')(h)
    elif self.gate_type == 'linear':
      logits = layers.Dense(k, name='gate_0')(h)
    else:
      raise ValueError(f'Unknown gate_type {self.gate_type!r}; choose one of '
                       f'{GATE_TYPES}.')
    logits = logits.astype(jnp.float32)
    if train and self.train_routing == 'gumbel':
      index, gate, scale = gumbel_straight_through(
          logits, self.make_rng('gumbel'), self.tau)
      return Routing(index, gate, scale, logits)
    if train and self.train_routing == 'inference':
      index = self.decide(logits)
      hard = jax.nn.one_hot(index, k, dtype=jnp.float32)
      soft = jax.nn.softmax(logits / self.tau, axis=-1)
      gate = hard - jax.lax.stop_gradient(soft) + soft
      return Routing(index, gate, jnp.sum(gate * hard, axis=-1), logits)
    if train:
      raise ValueError(f'Unknown router train_routing {self.train_routing!r}; '
                       f'choose one of {TRAIN_ROUTINGS}.')
    if grain_ratios is not None:
      grain_lib.validate_grain_ratios(tuple(grain_ratios), k)
      scores = expected_grain(logits)
      index = entropy_lib.assign_grains_by_quota(
          scores, tuple(grain_ratios)).astype(jnp.int32)
      return Routing(index, jax.nn.one_hot(index, k), None, logits)
    index = self.decide(logits)
    return Routing(index, jax.nn.one_hot(index, k), None, logits)

  def decide(self, logits: Array) -> Array:
    """(B, h, w) grain ids by the `inference` rule."""
    if self.inference == 'expected':
      probs = jax.nn.softmax(logits, axis=-1)
      # P(grain >= j) summed over each image's regions, j = 1..K-1.
      at_least = jnp.cumsum(probs[..., ::-1], axis=-1)[..., ::-1][..., 1:]
      counts = jnp.round(at_least.sum(axis=(1, 2))).astype(jnp.int32)
      return entropy_lib.assign_grains_by_counts(expected_grain(logits),
                                                 counts).astype(jnp.int32)
    if self.inference == 'argmax':
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    raise ValueError(f'Unknown router inference {self.inference!r}; choose '
                     f'one of {INFERENCE_MODES}.')


@functools.lru_cache(maxsize=16)
def _load_table(path: str) -> dict[str, float]:
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'entropy_thresholds file {path!r} does not exist. Make one from your '
        'training data with `python -m dqvq.tools.entropy_thresholds --dataset NAME '
        '--data_dir DIR --out thresholds.json`, or set entropy_thresholds=None '
        'to route each image by quota.')
  table, _ = entropy_lib.load_thresholds(path)
  return table


class EntropyRouter(nn.Module):
  """Routes by per-region image entropy against percentile thresholds.

  Attributes:
    grain_factors: coarse to fine; a region is grain_factors[0] pixels wide.
    grain_ratios: target share per grain, coarse to fine.
    thresholds: a JSON table from `python -m dqvq.tools.entropy_thresholds` (or an
      official one), or a tuple of the 99 percentile values, or None to route
      by per-image quota (exactly round(r * regions) regions per grain).
    bin_range: entropy histogram range; (0, 1) reproduces the released
      checkpoint and its JSONs, (-1, 1) is the official HEAD.
  """
  grain_factors: tuple[int, ...]
  grain_ratios: tuple[float, ...]
  thresholds: str | tuple[float, ...] | None = None
  bin_range: tuple[float, float] = (-1.0, 1.0)
  num_bins: int = 32
  sigma: float = 0.01

  def table(self) -> dict[str, float] | None:
    if self.thresholds is None:
      return None
    if isinstance(self.thresholds, str):
      return _load_table(self.thresholds)
    if len(self.thresholds) != 99:
      raise ValueError('thresholds as a tuple must hold the 99 percentiles '
                       f'1..99, got {len(self.thresholds)} values.')
    return {str(i + 1): float(t) for i, t in enumerate(self.thresholds)}

  @nn.compact
  def __call__(self, images: Array,
               grain_ratios: Sequence[float] | None = None) -> Routing:
    """Routes `images`; `grain_ratios` overrides the configured shares."""
    ratios = tuple(grain_ratios or self.grain_ratios)
    grain_lib.validate_grain_ratios(ratios, len(self.grain_factors))
    ent = entropy_lib.region_entropy(
        images.astype(jnp.float32), self.grain_factors[0], self.num_bins,
        tuple(self.bin_range), self.sigma)
    table = self.table()
    if table is None:
      grain_map = entropy_lib.assign_grains_by_quota(ent, ratios)
    else:
      grain_map = entropy_lib.assign_grains_by_entropy(
          ent, entropy_lib.thresholds_for_ratios(table, ratios))
    grain_map = grain_map.astype(jnp.int32)
    gate = jax.nn.one_hot(grain_map, len(self.grain_factors))
    return Routing(grain_map, gate, entropy=ent)


class RandomRouter(nn.Module):
  """Random regions with exactly the target share per grain and image.

  Uses the 'router' rng stream; for a fixed key the assignment is fixed, so a
  run is reproducible. Built on the same quota assignment as the entropy
  router, with uniform noise in place of entropy.
  """
  grain_factors: tuple[int, ...]
  grain_ratios: tuple[float, ...]

  @nn.compact
  def __call__(self, batch: int, grid: tuple[int, int],
               grain_ratios: Sequence[float] | None = None) -> Routing:
    ratios = tuple(grain_ratios or self.grain_ratios)
    grain_lib.validate_grain_ratios(ratios, len(self.grain_factors))
    scores = jax.random.uniform(self.make_rng('router'), (batch, *grid))
    grain_map = entropy_lib.assign_grains_by_quota(scores, ratios)
    grain_map = grain_map.astype(jnp.int32)
    return Routing(grain_map, jax.nn.one_hot(grain_map, len(ratios)))


def fixed_routing(batch: int, grid: tuple[int, int], num_grains: int,
                  grain: int = 0) -> Routing:
  """Every region at one granularity: plain VQGAN when there is one grain."""
  grain_map = jnp.full((batch, *grid), grain, jnp.int32)
  return Routing(grain_map, jax.nn.one_hot(grain_map, num_grains))
