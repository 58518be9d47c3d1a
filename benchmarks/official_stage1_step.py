r"""Throughput of the official PyTorch stage-1 step, for side-by-side ratios.

Runs the authors' own DualGrainVQModel
(CrossmodalGroup/DynamicVectorQuantization,
`configs/stage1/dqvae-dual-r-05_imagenet.yml`: dual-grain feature router,
LPIPS, PatchGAN, adaptive weight, budget loss, EMA codebook) through the step
that PyTorch Lightning 1.5's automatic optimisation runs for one batch with
its two optimizers: for each optimizer, toggle the other's parameters off,
run the full forward (the official code runs it once per optimizer), the
loss for that optimizer index, backward, Adam step, scheduler step.

Nothing of the official code is part of this project: point `--official_repo`
at a checkout of it, and run this file with a Python that has torch, einops,
omegaconf, requests, tqdm, pillow and pytorch-lightning (only its
`LightningModule` is used, no Trainer; run with 2.6), and torchvision if one
installs beside that torch (otherwise VGG16's layer list is rebuilt here):

  /path/to/torch-venv/bin/python benchmarks/official_stage1_step.py \
      --official_repo /path/to/DynamicVectorQuantization --batch 2

`benchmarks/stage1_vs_official.py` runs this and `stage1_step.py` in
alternating processes and prints the ratio. The VGG16 inside LPIPS gets
random weights (`pretrained=False`; nothing can be downloaded, and the cost
is the same); the LPIPS heads come from the checkout's `modules/lpips/vgg.pth`.

Prints per-step times, then one line:
  images_per_s=... s_per_step=... peak_mem_mb=...
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time


# torchvision's VGG16 `features` (configuration "D"): the only part LPIPS uses.
_VGG16_LAYERS = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512,
                 'M', 512, 512, 512, 'M')


def _install_vgg16_stand_in() -> None:
  """A `torchvision.models.vgg16` for torch builds with no torchvision.

  The CPU torch wheels here have no matching torchvision; LPIPS only slices
  `vgg16(...).features`, whose layer list (and so its indices and cost) this
  rebuilds exactly as torchvision does.
  """
  import importlib.machinery  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  def vgg16(*args, **kwargs):
    del args, kwargs
    layers, channels = [], 3
    for width in _VGG16_LAYERS:
      if width == 'M':
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers += [nn.Conv2d(channels, width, 3, padding=1),
                   nn.ReLU(inplace=True)]
        channels = width
    return types.SimpleNamespace(features=nn.Sequential(*layers))

  # Lightning (and torchmetrics under it) probe for torchvision when first
  # imported and would then use its other modules: import them before the
  # stand-in exists, so they see none.
  import pytorch_lightning  # pylint: disable=g-import-not-at-top,unused-import
  package = types.ModuleType('torchvision')
  package.__spec__ = importlib.machinery.ModuleSpec('torchvision', None)
  package.__path__ = []  # A package, so `import torchvision.transforms` works.
  package.models = types.SimpleNamespace(vgg16=vgg16)
  # Used at import time by the official picture helpers
  # (dynamic_modules/utils.py builds a ToPILImage transform), which the step
  # never calls: any attribute is an inert callable.
  package.transforms = types.ModuleType('torchvision.transforms')
  package.transforms.__getattr__ = lambda name: (lambda *a, **k: None)
  sys.modules['torchvision'] = package
  sys.modules['torchvision.transforms'] = package.transforms


def _load_official(repo: str, resolution: int):
  """Builds the official model from its own YAML config, inside the checkout."""
  os.chdir(repo)  # The official code loads 'modules/lpips/vgg.pth' relatively.
  sys.path.insert(0, repo)
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
    original_vgg16 = torchvision.models.vgg16

    def vgg16_random(*args, pretrained=False, **kwargs):
      del args, pretrained  # No download: same architecture, random weights.
      return original_vgg16(weights=None, **kwargs)

    torchvision.models.vgg16 = vgg16_random
  except ImportError:
    _install_vgg16_stand_in()
  from omegaconf import OmegaConf  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top,import-error
  from utils.utils import instantiate_from_config
  config = OmegaConf.load('configs/stage1/dqvae-dual-r-05_imagenet.yml')
  params = config.model.params
  for key in ('encoderconfig', 'decoderconfig'):
    params[key].params.resolution = resolution
  model = instantiate_from_config(config.model)
  return model, config


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--official_repo', required=True,
                 help='checkout of CrossmodalGroup/DynamicVectorQuantization')
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--resolution', type=int, default=256)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--threads', type=int, default=0,
                 help='torch intra-op threads (0: torch default)')
  args = p.parse_args()
  repo = os.path.abspath(args.official_repo)
  marker = os.path.join(repo, 'models', 'stage1_dynamic', 'dqvae_dual_feat.py')
  if not os.path.exists(marker):
    sys.exit(f'--official_repo {repo} is not a DynamicVectorQuantization '
             f'checkout (no {marker}).')

  import torch  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model, config = _load_official(repo, args.resolution)
  model.train()
  model.loss.perceptual_loss.eval()  # As the official loss constructs it.
  lr = config.model.base_learning_rate * config.data.params.batch_size
  generator_params = (
      list(model.encoder.parameters()) + list(model.decoder.parameters()) +
      list(model.quantize.parameters()) +
      list(model.quant_conv.parameters()) +
      list(model.post_quant_conv.parameters()))
  disc_params = list(model.loss.discriminator.parameters())
  opt_ae = torch.optim.Adam(generator_params, lr=lr, betas=(0.5, 0.9))
  opt_disc = torch.optim.Adam(disc_params, lr=lr, betas=(0.5, 0.9))
  sched_ae = torch.optim.lr_scheduler.LambdaLR(opt_ae, lambda s: 1.0)
  sched_disc = torch.optim.lr_scheduler.LambdaLR(opt_disc, lambda s: 1.0)
  x = torch.rand(args.batch, 3, args.resolution, args.resolution) * 2 - 1

  def toggle(on, off):
    for q in on:
      q.requires_grad_(True)
    for q in off:
      q.requires_grad_(False)

  def step():
    # optimizer_idx 0: the generator update.
    toggle(generator_params, disc_params)
    xrec, qloss, _, gate = model(x)
    aeloss, _ = model.loss(qloss, x, xrec, 0, 0,
                           last_layer=model.get_last_layer(), split='train',
                           gate=gate)
    opt_ae.zero_grad()
    aeloss.backward()
    opt_ae.step()
    sched_ae.step()
    # optimizer_idx 1: the discriminator update, from a second full forward.
    toggle(disc_params, generator_params)
    xrec, qloss, _, gate = model(x)
    discloss, _ = model.loss(qloss, x, xrec, 1, 0,
                             last_layer=model.get_last_layer(), split='train')
    opt_disc.zero_grad()
    discloss.backward()
    opt_disc.step()
    sched_disc.step()
    toggle(generator_params + disc_params, [])
    return float(aeloss.detach()), float(discloss.detach())

  step()  # warm-up
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    losses = step()
    times.append(time.perf_counter() - t0)
    print(f'step {i}: {times[-1]:.2f} s (losses {losses[0]:.4f} '
          f'{losses[1]:.4f})', flush=True)
  median = statistics.median(times)
  print(f'median step {median:.2f} s (official PyTorch {torch.__version__}, '
        f'batch {args.batch}, {args.resolution} px, fp32, '
        f'{torch.get_num_threads()} threads)')
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'images_per_s={args.batch / median:.4f} s_per_step={median:.2f} '
        f'peak_mem_mb={peak_mb:.0f}')


if __name__ == '__main__':
  main()
