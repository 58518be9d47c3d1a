r"""Throughput of the official PyTorch stage-2 step, for side-by-side ratios.

Runs the authors' own class-conditional Dualformer
(CrossmodalGroup/DynamicVectorQuantization,
`configs/stage2/class_imagenet_p6c18.yml`: StackGPT with n_embd 1024, 8
heads, 6 position + 18 content blocks, block_size 2048, dropout 0.1, the
class-aware sos provider and the row-first DualGrainSeperatePermuter) through
the step PyTorch Lightning's automatic optimisation runs for one batch:
`Dualformer.forward` (permuter and sos tokens on the batch's maps, StackGPT
forward and its pad-ignoring losses), content + position loss as
`training_step` weighs them, backward, AdamW from the official
`configure_optimizers` (lr 5e-4, betas (0.9, 0.95), weight decay 0.01 on
Linear weights only), scheduler step.

Only the frozen first stage is left out, as in `stage2_step.py`, which times
a token batch: a stand-in hands `Dualformer.encode_to_z` the code and grain
maps of `benchmarks/stage2_common.py` (same `--batch`, `--seed` and
`--fine_ratio` give the same maps as ours), so the official builds its
streams from the same images, each stream padded to the batch's longest as
the official does: about 644 tokens at half the regions fine (611 inputs for
the default batch of 2), where ours always runs the full 1,283-input layout.

Nothing of the official code is part of this project: point `--official_repo`
at a checkout of it, and run this file with a Python that has torch, numpy,
einops, pyyaml, requests and tqdm (pytorch-lightning too if it installs
there; without it `LightningModule` is stood in by `torch.nn.Module`, which
is all the step uses of it: no Trainer runs):

  /path/to/torch-venv/bin/python benchmarks/official_stage2_step.py \
      --official_repo /path/to/DynamicVectorQuantization --batch 2

`benchmarks/stage2_vs_official.py` runs this and `stage2_step.py` in
alternating processes and prints the ratio. `--tiny` swaps in the toy widths
of `stage2_step.py --tiny` for a smoke run.

Prints per-step times, then one line:
  sequences_per_s=... s_per_step=... peak_mem_mb=...
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import stage2_common  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = 'configs/stage2/class_imagenet_p6c18.yml'
# dqvq.models.transformer.tiny_kwargs, in the official's names (this file
# runs under another interpreter and does not import dqvq).
TINY = dict(n_embd=32, n_head=2, position_layer=1, content_layer=1,
            embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
# What dqvq's paper config trains for (100 ImageNet epochs at batch 240):
# only the cosine multiplier depends on it, not the cost.
TRAINING_STEPS, STEPS_PER_EPOCH = 533_800, 5_338


def _lightning() -> str:
  """Imports pytorch_lightning, or stands in `torch.nn.Module` for it."""
  try:
    import pytorch_lightning  # pylint: disable=g-import-not-at-top
    return f'pytorch-lightning {pytorch_lightning.__version__}'
  except ImportError:
    import types  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    sys.modules['pytorch_lightning'] = types.SimpleNamespace(
        LightningModule=torch.nn.Module)
    return 'LightningModule stand-in'


def _load_official(repo: str, tiny: bool):
  """The official Dualformer from its YAML, less the frozen first stage."""
  repo = os.path.abspath(repo)
  if not os.path.exists(os.path.join(repo, CONFIG)):
    sys.exit(f'--official_repo {repo} is not a DynamicVectorQuantization '
             f'checkout (no {CONFIG} in it).')
  os.chdir(repo)  # The official modules import each other from the root.
  sys.path.insert(0, repo)
  import torch  # pylint: disable=g-import-not-at-top
  import yaml  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top,import-error
  from models.stage2_dynamic.dqtransformer_class2_entropy import Dualformer

  class TokenStage(torch.nn.Module):
    """First-stage stand-in: `encode` returns the maps it is given.

    In `encode_to_z`'s format (`info[2]` the code map, then the grain map),
    so the official permuter and everything after it run unchanged.
    """

    def encode(self, x):
      codes, grain_map = x
      return None, None, (None, None, codes), grain_map, None, None

  class TokenDualformer(Dualformer):

    def init_first_stage_from_ckpt(self, config):
      del config  # The DQ-VAE checkpoint: not needed on token batches.
      self.first_stage_model = TokenStage()

  with open(CONFIG, encoding='utf-8') as f:
    config = yaml.safe_load(f)['model']
  params = config['params']
  if tiny:
    params['transformer_config']['params'].update(TINY)
  model = TokenDualformer(**params)
  # What the official train.py sets before `trainer.fit`.
  model.learning_rate = config['learning_rate']
  model.min_learning_rate = config.get('min_learning_rate', 0.0)
  model.training_steps, model.steps_per_epoch = TRAINING_STEPS, STEPS_PER_EPOCH
  return model


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--official_repo', required=True,
                 help='checkout of CrossmodalGroup/DynamicVectorQuantization')
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--steps', type=int, default=5)
  stage2_common.add_flags(p)
  p.add_argument('--threads', type=int, default=0,
                 help='torch intra-op threads (0: torch default)')
  args = p.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  lightning = _lightning()
  model = _load_official(args.official_repo, args.tiny)
  model.train()
  optimizers, schedulers = model.configure_optimizers()
  opt, sched = optimizers[0], schedulers[0]['scheduler']
  num_params = sum(q.numel() for q in model.transformer.parameters())
  codes, grain_map, labels = stage2_common.random_maps(
      args.batch, args.seed, args.fine_ratio)
  x = (torch.from_numpy(codes).long(), torch.from_numpy(grain_map).long())
  c = torch.from_numpy(labels).long()

  def step():
    # Lightning's automatic optimisation of `training_step`'s loss.
    out = model(x, c)
    loss = (model.content_loss_weight * out['content_loss'] +
            model.position_loss_weight * out['position_loss'])
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())

  median = stage2_common.time_steps(step, args.steps)
  print(stage2_common.describe(grain_map))
  print(f'median step {median:.2f} s (official PyTorch {torch.__version__}, '
        f'{lightning}, {"tiny" if args.tiny else "base"} '
        f'{num_params / 1e6:.1f}M params, batch {args.batch}, fp32, '
        f'{torch.get_num_threads()} threads)')
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'sequences_per_s={args.batch / median:.4f} s_per_step={median:.2f} '
        f'peak_mem_mb={peak_mb:.0f}')


if __name__ == '__main__':
  main()
