"""Writes official_reference.npz: the authors' own modules' outputs, for parity.

dqvq claims that an official checkpoint, converted, computes what the
official code computes. tests/test_official_parity.py checks that against
this file, which holds tiny random-weight official models and what the
official PyTorch modules output for fixed inputs:

  dual/     DualGrainEncoder (feature router) + VectorQuantize2 +
            DecoderPositional (fourier+learned): 32 px, grids 4 and 8, K 32,
            32 channels throughout (GroupNorm's 32 groups need 32).
  triple/   TripleGrainEncoder (feature router), same quantizer and
            decoder: 32 px, grids 2, 4 and 8.
  stackgpt/ StackGPT, class-conditional (3 classes), width 64, 4 heads, 2 + 2
            layers, block 96, on the dual tokenizer's grids and codebook.

Each model's state dict is stored under `<model>/sd/<official key>` (float
weights rounded to float16 to keep the file small; the official forward ran
on exactly those values in float32). The official code is not part of this
project, so this script is run ONCE, by hand, with a checkout of
CrossmodalGroup/DynamicVectorQuantization and a Python with torch and einops
(the official modules import `pytorch_lightning` only for a base class; a
stand-in is installed if it is missing), and its output is committed:

  python tests/data/make_official_reference.py \
      --official_repo /path/to/DynamicVectorQuantization

What it runs is the official modules' own forward in eval mode, composed as
the official models compose them (`DualGrainVQModel.encode/decode`,
`TripleGrainVQModel.encode/decode`, `Dualformer.forward` with the
`DualGrainSeperatePermuter` (row-first) and `ClassAwareSOSProvider` token
ids). StackGPT runs each image alone (batch 1), because the official batch
pads the coarse stream to the longest one, which moves the fine tokens'
absolute positions with the batch (reference 2.2); per image is what a
converted model must reproduce.

Weights are random, larger than the official init (whose zero `pos_emb` and
N(0, 0.02) tables would hide most paths), and the quantizer's codebook is
drawn from the encoder's own features so codes are spread over it. The
script checks that every route (coarse, fine, median) occurs and that no
nearest-code or router decision is a near tie, so float rounding cannot
flip a code between frameworks.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, 'official_reference.npz')
K = 32              # codebook size of both tokenizers
CLASSES = 3         # StackGPT classes
GPT = dict(n_embd=64, n_head=4, position_layer=2, content_layer=2,
           block_size=96)


def _import_official(repo: str) -> None:
  sys.path.insert(0, repo)
  try:
    import pytorch_lightning  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pl = types.ModuleType('pytorch_lightning')
    pl.LightningModule = nn.Module
    sys.modules['pytorch_lightning'] = pl


def _round16(t: torch.Tensor) -> None:
  t.copy_(t.to(torch.float16).to(torch.float32))


def _randomize_dqvae(model: nn.Module, g: torch.Generator) -> None:
  """Random norms, biases and position tables; conv weights keep torch's
  fan-in init (activations stay O(1) through the deep stacks)."""
  for name, p in model.named_parameters():
    with torch.no_grad():
      if name.endswith('bias'):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif 'norm' in name and p.dim() == 1:
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      elif 'position_bias' in name:
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      elif 'router' in name:  # decisive gates: no near ties
        p.mul_(4.0)


def _randomize_gpt(model: nn.Module, g: torch.Generator) -> None:
  for name, p in model.named_parameters():
    with torch.no_grad():
      if p.dim() == 1 and ('ln' in name or name.endswith('.0.weight')):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))  # LayerNorm
      elif name.endswith('bias'):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif 'emb' in name:  # token tables and the absolute positions
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))


class _VQModel(nn.Module):
  """The official VQ models' inference parts, under their attribute names
  (so the state dict keys are the checkpoint's, minus `loss.*`)."""

  def __init__(self, encoder, z: int, triple: bool):
    super().__init__()
    from modules.dynamic_modules.DecoderPositional import Decoder  # pylint: disable=g-import-not-at-top
    from modules.vector_quantization.quantize2_mask import VectorQuantize2  # pylint: disable=g-import-not-at-top
    self.encoder = encoder
    self.decoder = Decoder(ch=32, in_ch=z, out_ch=3, ch_mult=[1, 1, 1],
                           num_res_blocks=0, resolution=32,
                           attn_resolutions=[8], latent_size=8,
                           window_size=2, position_type='fourier+learned')
    self.quantize = VectorQuantize2(codebook_size=K, codebook_dim=z,
                                    channel_last=False, accept_image_fmap=True,
                                    commitment_beta=0.25, decay=0.99,
                                    restart_unused_codes=True)
    self.quant_conv = nn.Conv2d(z, z, 1)
    self.post_quant_conv = nn.Conv2d(z, z, 1)
    self.key = 'h_triple' if triple else 'h_dual'

  def encode(self, x):
    """`DualGrainVQModel.encode` / `TripleGrainVQModel.encode`, plus the
    router logits (recomputed from the encoder's branches)."""
    h = self.encoder(x, None)
    z = self.quant_conv(h[self.key])
    quant, _, info = self.quantize(x=z, temp=0.0,
                                   codebook_mask=h['codebook_mask'])
    return quant, info[2], h['indices'], h['gate'], z

  def decode(self, quant):
    return self.decoder(self.post_quant_conv(quant), None)


def _dqvae(kind: str, g: torch.Generator) -> _VQModel:
  if kind == 'dual':
    from modules.dynamic_modules.EncoderDual import DualGrainEncoder  # pylint: disable=g-import-not-at-top
    from modules.dynamic_modules.RouterDual import DualGrainFeatureRouter  # pylint: disable=g-import-not-at-top
    router = ('modules.dynamic_modules.RouterDual.DualGrainFeatureRouter',
              DualGrainFeatureRouter)
    enc_cls, ch_mult, attn = DualGrainEncoder, [1, 1, 1, 1], [4]
  else:
    from modules.dynamic_modules.EncoderTriple import TripleGrainEncoder  # pylint: disable=g-import-not-at-top
    from modules.dynamic_modules.RouterTriple import TripleGrainFeatureRouter  # pylint: disable=g-import-not-at-top
    router = ('modules.dynamic_modules.RouterTriple.TripleGrainFeatureRouter',
              TripleGrainFeatureRouter)
    enc_cls, ch_mult, attn = TripleGrainEncoder, [1, 1, 1, 1, 1], [4]
  z = 32
  encoder = enc_cls(
      ch=32, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn,
      dropout=0.0, resamp_with_conv=True, in_channels=3, resolution=32,
      z_channels=z, router_config={'target': router[0], 'params': dict(
          num_channels=z, normalization_type='group-32',
          gate_type='2layer-fc-SiLu')})
  model = _VQModel(encoder, z, kind == 'triple')
  _randomize_dqvae(model, g)
  return model.eval()


def _margin(values: torch.Tensor, largest: bool) -> float:
  """Smallest gap between the best and second-best entry along -1."""
  top = torch.topk(values, 2, dim=-1, largest=largest).values
  return float((top[..., 0] - top[..., 1]).abs().min())


def make_dqvae(kind: str, out: dict[str, np.ndarray]) -> None:
  """The first seed whose draw has every route and no near tie."""
  for seed in range(100):
    if _make_dqvae(kind, seed, out):
      return
  raise RuntimeError(f'{kind}: no seed gave decisive codes and routes.')


def _make_dqvae(kind: str, seed: int, out: dict[str, np.ndarray]) -> bool:
  g = torch.Generator().manual_seed(seed)
  model = _dqvae(kind, g)
  images = torch.rand((2, 3, 32, 32), generator=g) * 2 - 1
  with torch.no_grad():
    for p in model.parameters():
      _round16(p)
    # Codebook rows: the features themselves, jittered, so codes spread.
    z = model.encode(images)[4].permute(0, 2, 3, 1).reshape(-1, 32)
    rows = z[torch.randperm(len(z), generator=g)[:K]]
    book = model.quantize.codebook
    book.weight[:K] = rows + 0.1 * rows.std() * torch.randn(rows.shape,
                                                             generator=g)
    book.weight[K] = torch.randn(32, generator=g)
    _round16(book.weight)
    book.embed_ema.copy_(book.weight[:K])
    book.cluster_size_ema.copy_(torch.rand(K, generator=g))
    quant, codes, grains, gate, z = model.encode(images)
    dec = model.decode(quant)
    dist = book.compute_distances(z.permute(0, 2, 3, 1))
  routes = {'dual': 2, 'triple': 3}[kind]
  code_gap = _margin(dist, largest=False)
  gate_gap = _margin(gate.permute(0, 2, 3, 1), largest=True)
  if (sorted(set(grains.flatten().tolist())) != list(range(routes))
      or code_gap < 2e-3 or gate_gap < 2e-3):
    return False
  print(f'{kind}: seed {seed}, grain map {grains.tolist()}, {len(set(codes.flatten().tolist()))}'
        f' distinct codes, nearest-code gap {code_gap:.3g}, router gap '
        f'{gate_gap:.3g}, decoder output in [{float(dec.min()):.2f}, '
        f'{float(dec.max()):.2f}]')
  for k, v in model.state_dict().items():
    v = v.numpy()
    out[f'{kind}/sd/{k}'] = (v.astype(np.float16)
                             if v.dtype == np.float32 else v)
  out[f'{kind}/images'] = images.permute(0, 2, 3, 1).numpy()
  out[f'{kind}/grain_map'] = grains.numpy().astype(np.int32)
  out[f'{kind}/codes'] = codes.numpy().astype(np.int32)
  out[f'{kind}/decoded'] = dec.permute(0, 2, 3, 1).numpy()
  return True


def make_stackgpt(out: dict[str, np.ndarray]) -> None:
  """Two images with different coarse counts, each run alone."""
  from modules.dynamic_modules.permuter import DualGrainSeperatePermuter  # pylint: disable=g-import-not-at-top
  from modules.dynamic_modules.stackgpt import StackGPT  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(3)
  nc, nf = 16, 64
  model = StackGPT(
      vocab_size=K + 2 + CLASSES, coarse_position_size=nc + 2 + CLASSES,
      fine_position_size=nf + 2 + CLASSES, segment_size=2,
      embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0, content_pad_code=K,
      coarse_position_pad_code=nc, fine_position_pad_code=nf,
      activate_pad_ignore=True, **GPT).eval()
  _randomize_gpt(model, g)
  with torch.no_grad():
    for p in model.parameters():
      _round16(p)
  permuter = DualGrainSeperatePermuter(
      coarse_hw=4, fine_hw=8, content_pad_code=K, content_eos_code=K + 1,
      coarse_position_pad_code=nc, coarse_position_eos_code=nc + 1,
      fine_position_pad_code=nf, fine_position_eos_code=nf + 1,
      fine_position_order='row-first')
  rng = np.random.default_rng(4)
  grain = np.ones((2, 4, 4), np.int64)
  grain[0].flat[rng.choice(16, 5, replace=False)] = 0    # 5 coarse regions
  grain[1].flat[rng.choice(16, 11, replace=False)] = 0   # 11
  codes = rng.integers(0, K, (2, 8, 8))
  coarse = np.repeat(np.repeat(grain == 0, 2, 1), 2, 2)
  # A coarse region's code sits on its top-left cell (the permuter reads it).
  codes = np.where(coarse, np.repeat(np.repeat(codes[:, ::2, ::2], 2, 1), 2, 2),
                   codes)
  labels = np.array([0, 2])
  for i in range(2):
    z = permuter(torch.from_numpy(codes[i:i + 1]),
                 torch.from_numpy(grain[i:i + 1]))
    c = int(labels[i])
    cat = lambda sos, x: torch.cat([torch.full((1, 1), sos), x], 1)
    with torch.no_grad():  # ClassAwareSOSProvider ids; segments 0 / 1
      logits = model(
          coarse_content=cat(c + K + 2, z['coarse_content']),
          fine_content=cat(c + K + 2, z['fine_content']),
          coarse_position=cat(c + nc + 2, z['coarse_position']),
          fine_position=cat(c + nf + 2, z['fine_position']),
          coarse_seg=cat(0, z['coarse_segment']),
          fine_seg=cat(1, z['fine_segment']))
    out[f'stackgpt/position_logits_{i}'] = logits['position_logits'][0].numpy()
    out[f'stackgpt/content_logits_{i}'] = logits['content_logits'][0].numpy()
    print(f'stackgpt image {i}: {int((grain[i] == 0).sum())} coarse regions, '
          f'{logits["content_logits"].shape[1]} inputs')
  for k, v in model.state_dict().items():
    if k.endswith('attn.mask'):
      continue  # causal masks: optional for the converter, 4 x 96^2 floats
    out[f'stackgpt/sd/transformer.{k}'] = v.numpy().astype(np.float16)
  out['stackgpt/codes'] = codes.astype(np.int32)
  out['stackgpt/grain_map'] = grain.astype(np.int32)
  out['stackgpt/labels'] = labels.astype(np.int32)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--official_repo', required=True,
                 help='checkout of CrossmodalGroup/DynamicVectorQuantization')
  args = p.parse_args()
  _import_official(os.path.abspath(args.official_repo))
  torch.set_grad_enabled(False)
  out: dict[str, np.ndarray] = {}
  make_dqvae('dual', out)
  make_dqvae('triple', out)
  make_stackgpt(out)
  np.savez_compressed(OUT, **out)
  print(f'wrote {OUT}: {os.path.getsize(OUT) / 1e6:.2f} MB, {len(out)} arrays')


if __name__ == '__main__':
  main()
