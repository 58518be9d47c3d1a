"""Evaluation pictures: coding and error maps, grids, histograms, RD curves.

Image panels go through `dqvq.visualize` (the same colours, grid lines and
uint8 mapping as training's TensorBoard pictures); charts are matplotlib on
the Agg canvas, built from `matplotlib.figure.Figure` without pyplot, so no
global backend or figure registry is touched (safe in tests and threads).

Small images (the 32-64 px demo and test runs) are enlarged by an integer
nearest-neighbour factor to at least `MIN_SIZE` pixels so code cells stay
visible; grain factors are scaled with them.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from matplotlib.figure import Figure
import numpy as np

from dqvq import visualize

MIN_SIZE = 128
RD_METRICS = (('psnr', 'PSNR (dB)'), ('lpips', 'LPIPS'), ('rfid', 'rFID'))
RD_AXES = (('code_length_mean', 'mean code length (codes / image)'),
           ('bits_per_image', 'bits / image (codes + grain map)'))


def _zoom(images: np.ndarray, factors: Sequence[int] | None
          ) -> tuple[np.ndarray, tuple[int, ...] | None, int]:
  z = max(1, MIN_SIZE // images.shape[1])
  if z > 1:
    images = np.repeat(np.repeat(np.asarray(images), z, 1), z, 2)
  if factors is not None:
    factors = tuple(int(f) * z for f in factors)
  return images, factors, z


def _shared_error_maps(images: np.ndarray, recon: np.ndarray,
                       coarse: np.ndarray, region_size: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Per-region error maps of two reconstructions on one scale per row.

  Each row's white-hot value is the larger error of the two, so the maps
  compare the model with its own coarse-only reconstruction directly.
  """
  def region_max(x, y):
    err = np.abs(np.asarray(x, np.float32) - y).mean(-1)
    h, w = err.shape
    s = region_size
    return err.reshape(h // s, s, w // s, s).mean(axis=(1, 3)).max()

  a, b = [], []
  for i in range(images.shape[0]):
    vmax = float(max(region_max(images[i], recon[i]),
                     region_max(images[i], coarse[i]), 1e-6))
    a.append(visualize.error_map(images[i:i + 1], recon[i:i + 1], vmax=vmax,
                                 region_size=region_size)[0])
    b.append(visualize.error_map(images[i:i + 1], coarse[i:i + 1], vmax=vmax,
                                 region_size=region_size)[0])
  return np.stack(a), np.stack(b)


def tokenizer_pictures(out_dir: str, pictures: dict[str, np.ndarray],
                       num_grains: int, grain_factors: Sequence[int]
                       ) -> list[str]:
  """Coding maps, error maps and reconstruction grid; returns file names.

  `pictures` holds 'image', 'recon', 'grain_map' and optionally
  'coarse_recon' (host arrays, [-1, 1]); see `tokenizer_eval`.
  """
  if not pictures or not len(pictures.get('image', ())):
    return []
  images, factors, _ = _zoom(pictures['image'], grain_factors)
  recon = _zoom(pictures['recon'], None)[0]
  grain_map = pictures['grain_map']
  overlay = visualize.coding_map_overlay(images, grain_map, num_grains,
                                         grain_factors=factors)
  written = {'coding_maps.png': visualize.image_grid(overlay),
             'reconstructions.png': visualize.image_grid(
                 np.stack([visualize.to_uint8(images),
                           visualize.to_uint8(recon)], 1).reshape(
                               (-1,) + images.shape[1:]), ncols=4)}
  columns = [visualize.to_uint8(images), visualize.to_uint8(recon), overlay]
  if 'coarse_recon' in pictures:
    coarse = _zoom(pictures['coarse_recon'], None)[0]
    err, err0 = _shared_error_maps(images, recon, coarse, factors[0])
    columns += [err, visualize.to_uint8(coarse), err0]
  else:
    columns.append(visualize.error_map(images, recon, region_size=factors[0]))
  tiles = np.stack(columns, 1)
  written['error_maps.png'] = visualize.image_grid(
      tiles.reshape((-1,) + tiles.shape[2:]), ncols=len(columns))
  for name, picture in written.items():
    visualize.save_png(os.path.join(out_dir, name), picture)
  return sorted(written)


def generator_pictures(out_dir: str, samples: dict[str, np.ndarray],
                       num_grains: int, grain_factors: Sequence[int],
                       num_pictures: int) -> list[str]:
  """Sample grid and the samples' coding maps; returns file names."""
  n = min(num_pictures, len(samples['image']))
  if n == 0:
    return []
  images, factors, _ = _zoom(samples['image'][:n], grain_factors)
  overlay = visualize.coding_map_overlay(images, samples['grain_map'][:n],
                                         num_grains, grain_factors=factors)
  written = {'samples.png': visualize.image_grid(visualize.to_uint8(images)),
             'sample_coding_maps.png': visualize.image_grid(overlay)}
  for name, picture in written.items():
    visualize.save_png(os.path.join(out_dir, name), picture)
  return sorted(written)


def _nonzero_range(*hists: np.ndarray) -> tuple[int, int]:
  used = np.nonzero(sum(np.pad(h, (0, max(map(len, hists)) - len(h)))
                        for h in hists))[0]
  if not used.size:
    return 0, 1
  return int(used[0]), int(used[-1]) + 1


def length_histogram(path: str, hists: dict[str, np.ndarray],
                     title: str, expected: float | None = None,
                     max_bins: int = 40) -> None:
  """Share of images per code-length bin, one outline per entry of `hists`.

  Shares (not counts) so that a split and a sample set of other sizes
  compare; lengths are binned (at most `max_bins` bins over the used range)
  because a dynamic tokenizer's lengths spread over hundreds of values.
  `expected` draws the length the target ratios imply.
  """
  hists = {k: np.asarray(v, np.float64) for k, v in hists.items()}
  lo, hi = _nonzero_range(*hists.values())
  width = max(1, -(-(hi - lo) // max_bins))
  edges = np.arange(lo, hi + width, width)
  fig = Figure(figsize=(7, 4), dpi=100)
  ax = fig.subplots()
  for name, h in hists.items():
    h = np.pad(h, (0, max(0, edges[-1] - h.size)))
    share = np.add.reduceat(h[lo:edges[-1]], edges[:-1] - lo) / max(
        h.sum(), 1.0)
    mean = np.dot(np.arange(h.size), h) / max(h.sum(), 1.0)
    # Single-length bins centred on their length.
    ax.stairs(share, edges - (0.5 if width == 1 else 0.0), linewidth=2,
              label=f'{name} (mean {mean:.1f})')
  if expected is not None:
    ax.axvline(expected, color='k', linestyle='--',
               label=f'target ({expected:.1f})')
  ax.set_xlabel('code length (codes / image)' +
                (f', bins of {width}' if width > 1 else ''))
  ax.set_ylabel('share of images')
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  _save(fig, path)


def rate_distortion(path: str, points: Sequence[dict[str, Any]],
                    trained: dict[str, Any] | None = None) -> None:
  """PSNR, LPIPS and rFID against mean code length (top) and bits (bottom).

  `points` are the `--ratios` budgets (joined by a line, labelled with the
  fine ratio); `trained` is the model's own routing, drawn as a star.
  Metrics that were not computed (no weights) leave an empty panel saying so.
  """
  fig = Figure(figsize=(12, 7), dpi=100)
  axes = fig.subplots(len(RD_AXES), len(RD_METRICS), squeeze=False)
  pts = sorted(points, key=lambda p: p['code_length_mean'])
  for row, (xkey, xlabel) in enumerate(RD_AXES):
    for col, (ykey, ylabel) in enumerate(RD_METRICS):
      ax = axes[row][col]
      have = [p for p in pts if p.get(ykey) is not None]
      if not have and (trained is None or trained.get(ykey) is None):
        ax.text(0.5, 0.5, f'{ylabel}: not computed\n(no weights)',
                ha='center', va='center', transform=ax.transAxes)
      if have:
        xs = [p[xkey] for p in have]
        ax.plot(xs, [p[ykey] for p in have], 'o-', label='budgets')
        for p, x in zip(have, xs):
          ax.annotate(f"r={p['fine_ratio_target']:g}", (x, p[ykey]),
                      textcoords='offset points', xytext=(4, 4), fontsize=8)
      if trained is not None and trained.get(ykey) is not None:
        ax.plot([trained[xkey]], [trained[ykey]], '*', markersize=12,
                label='trained routing')
      ax.set_xlabel(xlabel)
      ax.set_ylabel(ylabel)
      ax.grid(True, alpha=0.3)
      if row == 0 and col == 0:
        ax.legend(fontsize=8)
  fig.suptitle('Rate-distortion over inference budgets of the finest grain')
  fig.tight_layout()
  _save(fig, path)


def tokenizer_report(out_dir: str, res: dict[str, Any], num_grains: int,
                     grain_factors: Sequence[int]) -> list[str]:
  """All tokenizer pictures from `tokenizer_eval.evaluate_tokenizer` output.

  `res['rate_distortion']` points carry their 'code_length_hist'.
  """
  names = tokenizer_pictures(out_dir, res['pictures'], num_grains,
                             grain_factors)
  rd = res['rate_distortion']
  hists = {'trained routing': res['length_hist']}
  hists.update({f"r={p['fine_ratio_target']:g}": p['code_length_hist']
                for p in rd})
  length_histogram(os.path.join(out_dir, 'code_length_hist.png'), hists,
                   'Code length per image',
                   res['figures'].get('code_length_expected'))
  names.append('code_length_hist.png')
  if rd:
    rate_distortion(os.path.join(out_dir, 'rate_distortion.png'), rd,
                    trained=res['figures'])
    names.append('rate_distortion.png')
  return names


def generator_report(out_dir: str, res: dict[str, Any], num_grains: int,
                     grain_factors: Sequence[int],
                     num_pictures: int) -> list[str]:
  """All generator pictures from `generator_eval.evaluate_generator` output."""
  names = generator_pictures(out_dir, res['samples'], num_grains,
                             grain_factors, num_pictures)
  length_histogram(
      os.path.join(out_dir, 'code_length_hist.png'),
      {'data': res['data_length_hist'], 'samples': res['sample_length_hist']},
      'Code length per image: samples vs data',
      res['figures'].get('data_code_length_expected'))
  return names + ['code_length_hist.png']


def _save(fig: Figure, path: str) -> None:
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(path)


__all__ = ['tokenizer_pictures', 'generator_pictures', 'length_histogram',
           'rate_distortion', 'tokenizer_report', 'generator_report',
           'MIN_SIZE']
