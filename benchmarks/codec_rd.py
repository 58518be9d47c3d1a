r"""Rate-distortion of `dqvq.codec` on held-out images, beside JPEG and WebP.

The images are the demo's validation crops (photographs the demo never
trains on, `dqvq.data.demo.VALIDATION_PHOTOS`), taken to the generator's
resolution as evaluation does (shorter side, centre crop). For each budget
(the fine share r of the tokenizer's grain_ratios (1 - r, r)) every image is
compressed, decompressed and checked to give back exactly the coded tokens;
its file size (header included) is set beside the transformer's
cross-entropy and the fixed-rate count, and its PSNR (uint8 levels) beside
what JPEG and WebP (Pillow) reach on the same image at the largest quality
whose file is no bigger (at matched bits per pixel; where even quality 0/1
is bigger, that smallest file is used and the row says so). Class labels
are each crop's source photograph, as the demo's stage-2 validation uses
them.

  python benchmarks/codec_rd.py --bundle GENERATOR --out DIR \
      [--num_images 48] [--ratios 0.1,0.3,0.5,0.7,0.9]

Writes DIR/codec_rd.json (per budget: means, and per image) and
DIR/codec_rd.png (PSNR against bpp), and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

from dqvq.cpu import tuning as cpu_tuning  # pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq.data import demo  # pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq.data import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq.eval import reconstruction  # pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq.inference import generator as generator_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq.inference import image_codec  # pylint: disable=g-import-not-at-top,wrong-import-position
from dqvq import sequence  # pylint: disable=g-import-not-at-top,wrong-import-position


def held_out_images(resolution: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(n, R, R, 3) uint8 validation crops, evenly spread, and their labels."""
  crops = list(demo.iter_crops(demo.VALIDATION_PHOTOS))
  pick = np.linspace(0, len(crops) - 1, min(n, len(crops))).round().astype(int)
  images, labels = [], []
  for i in pick:
    _, label, crop = crops[i]
    img = transforms.resize_shorter_side(Image.fromarray(crop), resolution)
    images.append(transforms.center_crop(np.asarray(img), resolution))
    labels.append(label)
  return np.stack(images), np.array(labels)


def _psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Per-image PSNR (dB) of uint8 or [-1, 1] images, on uint8 levels."""
  as_model = lambda a: (transforms.to_model_range(a) if a.dtype == np.uint8
                        else a)
  return np.asarray(reconstruction.psnr(as_model(x), as_model(y)))


def _pillow(image: np.ndarray, fmt: str, quality: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, quality=quality,
                              **({'optimize': True} if fmt == 'JPEG' else {}))
  return buf.getvalue()


def matched(image: np.ndarray, fmt: str, max_bytes: int
            ) -> tuple[int, int, float]:
  """(quality, bytes, PSNR) of the best quality with a file <= max_bytes.

  Bisection over Pillow's quality (file size grows with it); quality 1
  (JPEG) / 0 (WebP) when even that is bigger.
  """
  lo, hi = (1 if fmt == 'JPEG' else 0), 95
  best = lo
  while lo <= hi:
    mid = (lo + hi) // 2
    if len(_pillow(image, fmt, mid)) <= max_bytes:
      best, lo = mid, mid + 1
    else:
      hi = mid - 1
  data = _pillow(image, fmt, best)
  with Image.open(io.BytesIO(data)) as img:
    back = np.asarray(img.convert('RGB'))
  return best, len(data), float(_psnr(image[None], back[None])[0])


def run_budget(gen, images: np.ndarray, labels: np.ndarray,
               ratio: float | None) -> dict:
  """One budget: sizes, cross-entropy, exactness and PSNR of every image."""
  lay = gen.layout
  ratios = None if ratio is None else (1.0 - ratio, ratio)
  start = time.time()
  coded, num_codes = image_codec.encode_images(gen, images, labels, ratios)
  encode_s = time.time() - start
  files = [c.data for c in coded]
  start = time.time()
  tokens = image_codec.decompress_tokens(gen, files)
  decode_s = time.time() - start
  # Exactness: the decoded streams are the tokenizer's, code for code.
  x = images.astype(np.float32) / 127.5 - 1.0
  want = sequence.encode(*[gen.tokenizer.encode(x, ratios)[k]
                           for k in ('codes', 'grain_map')], lay,
                         labels if lay.num_classes else None)
  exact = bool(np.array_equal(tokens['content'], want['content']) and
               np.array_equal(tokens['position'], want['position']))
  recon = image_codec.decompress(gen, files)
  psnr = _psnr(images, recon)
  bits = image_codec.bits_table(gen, coded, num_codes)
  res = gen.config.data.resolution ** 2
  rows = []
  for i, data in enumerate(files):
    row = {k: float(v[i]) for k, v in bits.items()}
    row['psnr'] = float(psnr[i])
    for fmt in ('JPEG', 'WEBP'):
      q, size, p = matched(images[i], fmt, len(data))
      row[fmt.lower()] = {'quality': q, 'bpp': 8 * size / res, 'psnr': p,
                          'within_budget': size <= len(data)}
    rows.append(row)
  mean = lambda k: float(np.mean(bits[k]))
  payload, ce = bits['payload_bits'].sum(), bits['cross_entropy_bits'].sum()
  summary = {
      'fine_ratio': ratio, 'images': len(rows), 'exact_round_trip': exact,
      'bpp': mean('bpp'), 'header_bits': mean('header_bits'),
      'payload_bpp': mean('payload_bits') / res,
      'cross_entropy_bpp': mean('cross_entropy_bits') / res,
      'payload_over_cross_entropy': float(payload / ce - 1.0),
      'max_payload_over_cross_entropy': float(np.max(
          bits['payload_bits'] / bits['cross_entropy_bits'] - 1.0)),
      'fixed_rate_bpp': mean('fixed_rate_bits') / res,
      'mean_codes': mean('num_codes'), 'psnr': float(np.mean(psnr)),
      'encode_s_per_image': encode_s / len(rows),
      'decode_s_per_image': decode_s / len(rows)}
  for fmt in ('jpeg', 'webp'):
    summary[fmt] = {
        'bpp': float(np.mean([r[fmt]['bpp'] for r in rows])),
        'psnr': float(np.mean([r[fmt]['psnr'] for r in rows])),
        'within_budget': int(sum(r[fmt]['within_budget'] for r in rows))}
  return {'summary': summary, 'images': rows}


def pillow_curve(images: np.ndarray, fmt: str) -> list[dict]:
  """Mean bpp and PSNR of Pillow's format over a sweep of qualities."""
  res = images.shape[1] * images.shape[2]
  out = []
  for q in (1, 5, 10, 20, 30, 50, 70, 90):
    sizes, psnrs = [], []
    for image in images:
      data = _pillow(image, fmt, q)
      with Image.open(io.BytesIO(data)) as img:
        back = np.asarray(img.convert('RGB'))
      sizes.append(8 * len(data) / res)
      psnrs.append(float(_psnr(image[None], back[None])[0]))
    out.append({'quality': q, 'bpp': float(np.mean(sizes)),
                'psnr': float(np.mean(psnrs))})
  return out


def plot(path: str, budgets: list[dict], curves: dict[str, list[dict]]
         ) -> None:
  fig = Figure(figsize=(7, 5), dpi=100)
  ax = fig.subplots()
  pts = [b['summary'] for b in budgets]
  ax.plot([p['bpp'] for p in pts], [p['psnr'] for p in pts], 'o-',
          label='dqvq.codec (file size)')
  ax.plot([p['fixed_rate_bpp'] for p in pts], [p['psnr'] for p in pts], 'x:',
          label='fixed-rate count (codes x log2 V + grain map)')
  for i, p in enumerate(pts):  # labels alternate above and below the line
    ax.annotate(f"r={p['fine_ratio']:g}" if p['fine_ratio'] is not None
                else 'trained', (p['bpp'], p['psnr']),
                textcoords='offset points', xytext=(-8, 8 if i % 2 else -14),
                fontsize=7)
  for name, curve in curves.items():
    ax.plot([c['bpp'] for c in curve], [c['psnr'] for c in curve], 's--',
            label=f'{name} (Pillow, q {curve[0]["quality"]}-'
            f'{curve[-1]["quality"]})')
  ax.set_xlabel('bits per pixel')
  ax.set_ylabel('PSNR (dB)')
  ax.set_xscale('log')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title('Held-out demo crops: dqvq.codec vs JPEG / WebP')
  fig.tight_layout()
  fig.savefig(path)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--bundle', required=True, help='A generator bundle.')
  p.add_argument('--out', required=True, help='Output directory.')
  p.add_argument('--num_images', type=int, default=48)
  p.add_argument('--ratios', default='0.1,0.3,0.5,0.7,0.9',
                 help='Fine shares; "trained" for the trained budget.')
  args = p.parse_args()
  cpu_tuning.prepare_process()
  gen = generator_lib.load_bundle(args.bundle)
  images, labels = held_out_images(gen.config.data.resolution,
                                   args.num_images)
  if not gen.layout.num_classes:
    labels = np.zeros(0, np.int32)
  budgets = []
  for r in args.ratios.split(','):
    ratio = None if r.strip() == 'trained' else float(r)
    budgets.append(run_budget(gen, images, labels, ratio))
    s = budgets[-1]['summary']
    print(f"r={r:>7}: {s['bpp']:.4f} bpp (payload {s['payload_bpp']:.4f}, "
          f"cross-entropy {s['cross_entropy_bpp']:.4f}, "
          f"{100 * s['payload_over_cross_entropy']:+.2f}%; fixed-rate "
          f"{s['fixed_rate_bpp']:.4f}) {s['mean_codes']:.1f} codes, "
          f"{s['psnr']:.2f} dB, exact={s['exact_round_trip']} | JPEG "
          f"{s['jpeg']['bpp']:.3f} bpp {s['jpeg']['psnr']:.2f} dB "
          f"({s['jpeg']['within_budget']}/{s['images']} within) | WebP "
          f"{s['webp']['bpp']:.3f} bpp {s['webp']['psnr']:.2f} dB "
          f"({s['webp']['within_budget']}/{s['images']} within)", flush=True)
  curves = {'JPEG': pillow_curve(images, 'JPEG'),
            'WebP': pillow_curve(images, 'WEBP')}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'codec_rd.json'), 'w') as f:
    json.dump({'bundle': os.path.abspath(args.bundle),
               'budgets': budgets, 'pillow': curves}, f, indent=1)
  plot(os.path.join(args.out, 'codec_rd.png'), budgets, curves)
  print(f'Wrote {args.out}/codec_rd.json and codec_rd.png')


if __name__ == '__main__':
  main()
