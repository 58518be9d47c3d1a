"""What the two stage-2 step benchmarks share: their inputs, flags and timing.

`stage2_step.py` and `official_stage2_step.py` both import it; it needs only
numpy and the standard library, so the official's torch interpreter can.

The inputs are random but legal. A frozen dual-grain DQ-VAE hands stage 2 a
code map on the fine grid (B, 32, 32) and a grain map on the coarse grid
(B, 16, 16), 1 = fine. Here each region is fine with probability
`fine_ratio` (about half by default, the paper's budget), a coarse region's
code repeats over its 2x2 cells as the tokenizer's code map has it, and
labels are random classes. The same flags (`add_flags`) give both steps the
same images, so the same code counts.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Callable

import numpy as np


def add_flags(p: argparse.ArgumentParser) -> None:
  """What both stage-2 steps are fed: the same flags give the same batch."""
  p.add_argument('--fine_ratio', type=float, default=0.5,
                 help='chance that a region is fine in the random maps')
  p.add_argument('--seed', type=int, default=0,
                 help='seed of the random maps')
  p.add_argument('--tiny', action='store_true',
                 help='toy widths (dqvq.models.transformer.tiny_kwargs) on '
                 'the paper token layout: a smoke run')


def random_maps(batch: int, seed: int = 0, fine_ratio: float = 0.5,
                coarse_grid: int = 16, fine_grid: int = 32,
                codebook_size: int = 1024, num_classes: int = 1000
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(codes (B, G, G), grain_map (B, g, g), labels (B,)), all int32."""
  rng = np.random.default_rng(seed)
  rep = fine_grid // coarse_grid
  grain = (rng.random((batch, coarse_grid, coarse_grid)) < fine_ratio)
  coarse = rng.integers(0, codebook_size, (batch, coarse_grid, coarse_grid))
  coarse = coarse.repeat(rep, axis=1).repeat(rep, axis=2)
  fine = rng.integers(0, codebook_size, (batch, fine_grid, fine_grid))
  fine_cells = grain.repeat(rep, axis=1).repeat(rep, axis=2)
  codes = np.where(fine_cells, fine, coarse)
  labels = rng.integers(0, max(num_classes, 1), (batch,))
  return (codes.astype(np.int32), grain.astype(np.int32),
          labels.astype(np.int32))


def batch_capacities(grain_map: np.ndarray, fine_cells: int = 4
                     ) -> tuple[int, int]:
  """(coarse, fine) stream capacities of the batch's longest streams.

  The official pads each stream to the batch's longest; dqvq's streams have
  the capacities of `config.model.capacities`, which a user sets to the
  longest streams of their data. These are those of this batch: the two
  steps then run over sequences of the same length.
  """
  fine = grain_map.reshape(grain_map.shape[0], -1).sum(1)
  coarse = grain_map[0].size - fine
  return int(coarse.max()), int(fine.max()) * fine_cells


def describe(grain_map: np.ndarray, rep: int = 2) -> str:
  """One line on what the maps make: codes and official stream lengths.

  The official pads each stream to the batch's longest, so its sequence is
  (1 + max coarse count + 1) + (1 + max fine codes + 1) tokens.
  """
  fine = grain_map.reshape(grain_map.shape[0], -1).sum(1)
  coarse = grain_map[0].size - fine
  fine_codes = fine * rep * rep
  official = int(coarse.max() + 2 + fine_codes.max() + 2)
  return (f'streams: {float(np.mean(fine / grain_map[0].size)):.3f} fine '
          f'ratio, {float(np.mean(coarse + fine_codes)):.1f} codes per image '
          f'(coarse {coarse.tolist()}, fine {fine_codes.tolist()}), official '
          f'sequence {official} tokens ({official - 1} inputs)')


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def time_steps(step: Callable[[], float], steps: int) -> float:
  """One warm-up call, then `steps` timed ones; returns the median seconds.

  `step` runs one training step and returns its loss as a float, which also
  waits for the step to finish (JAX dispatches asynchronously). Each step's
  line also gives the CPU seconds the process spent in it (all threads): on
  a shared machine, wall time well above CPU time / cores means the step
  waited for the cores, not that it got slower.
  """
  step()  # warm-up
  times = []
  for i in range(steps):
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    loss = step()
    times.append(time.perf_counter() - t0)
    print(f'step {i}: {times[-1]:.2f} s (loss {loss:.4f}, cpu '
          f'{_cpu_seconds() - cpu0:.1f} s)', flush=True)
  return statistics.median(times)
