"""Who gets the fine codes: the router's choice against random and an oracle.

The paper's claim is that DQ-VAE's router puts the extra codes where they buy
the most (Table 5's random row, Figure 5). On one trained model and one code
budget, three allocations of the same number of fine regions per image can be
compared directly, with `DQVAE.encode(..., grain_map=...)`:

* router: the model's own ranking (`grain_ratios` at inference: the feature
  router's expected grain, the entropy router's region entropy);
* random: uniform scores, the same quota (`random_grain_map`);
* oracle: the regions where fine codes lower the reconstruction error most,
  measured on this image (`oracle_grain_map`): every region is coded coarse
  and fine once, and its gain is its error drop. It is greedy (the decoder
  mixes neighbouring regions, so gains do not add exactly), but it is the
  allocation an ideal router would approach, and it needs the image's
  ground truth, which a router never has.

`gap_closed` states the result as the share of the random-to-oracle gap that
the router closes (1 = oracle, 0 = no better than chance).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from dqvq.models import entropy as entropy_lib
from dqvq.models import granularity as grain_lib

Array = jax.Array


def uniform_grain_map(batch: int, grid: Sequence[int], grain: int) -> Array:
  """Every region at one grain id (0 = coarsest)."""
  return jnp.full((batch, *grid), grain, jnp.int32)


def random_grain_map(key: Array, batch: int, grid: Sequence[int],
                     ratios: Sequence[float]) -> Array:
  """Random regions, exactly the quota of each grain in every image."""
  scores = jax.random.uniform(key, (batch, *grid))
  return entropy_lib.assign_grains_by_quota(scores, tuple(ratios))


# The per-region error drop from coarse to fine codes; it lives with the grain
# maps because the DQ-VAE's 'gain' router target trains on it too.
region_gain = grain_lib.region_gain


def oracle_grain_map(gain: Array, ratios: Sequence[float]) -> Array:
  """The highest-gain regions get the finer grains, in the given quota."""
  return entropy_lib.assign_grains_by_quota(gain, tuple(ratios))


def gap_closed(router: float, random: float, oracle: float) -> float:
  """(router - random) / (oracle - random); NaN when the gap is zero."""
  gap = oracle - random
  return float('nan') if abs(gap) < 1e-9 else (router - random) / gap
