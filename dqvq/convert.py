"""Converts PyTorch weights into dqvq's Flax checkpoints and bundles.

Why: dqvq's LPIPS and users' existing DQ-VAE / DQ-Transformer models exist
only as PyTorch files. Conversion is a one-off, torch-free step (see
`dqvq.interop.torch_checkpoint`: no pickled code runs) whose output dqvq loads;
the weight maps are library calls in `dqvq.interop` (`pretrained`, `official`,
`official_bundle`), this module their command line.

Subcommands (each registers in `_SUBCOMMANDS`):

  python -m dqvq.convert lpips --vgg16 vgg16-397923af.pth --lin vgg.pth \
      --out /path/to/lpips_params
  python -m dqvq.convert inception \
      --weights pt_inception-2015-12-05-6726825d.pth --out /path/to/inception
  python -m dqvq.convert official --kind dqvae --ckpt dqvae.ckpt \
      --entropy_thresholds entropy_thresholds_imagenet_train_patch-16.json \
      --out /bundles/tokenizer
  python -m dqvq.convert official --kind transformer --ckpt stackgpt.ckpt \
      --tokenizer /bundles/tokenizer --out /bundles/generator
  python -m dqvq.convert to_official --bundle /bundles/tokenizer --out sd.npz

`--from official` is accepted as a spelling of the `official` subcommand.
`lpips`: `--vgg16` is torchvision's ImageNet VGG16 state dict (`features.*` and
`classifier.*`; the classifier is ignored) and `--lin` the LPIPS repo's
`weights/v0.1/vgg.pth` (`lin{0..4}.model.1.weight`). `official` reads the
authors' Lightning checkpoints (DQ-VAE or StackGPT, see `dqvq.interop.official`)
and writes a bundle for `dqvq.load_tokenizer` / `dqvq.load_generator`. Inputs
may be PyTorch files (zip or legacy format) or `.npz` archives holding the same
key names, which is how tests exercise the CLI without torch.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Callable, Sequence

import numpy as np

from dqvq.interop import pretrained
from dqvq.models import inception


def _lpips_command(args: argparse.Namespace) -> int:
  out = pretrained.convert_lpips(args.vgg16, args.lin, args.out)
  print(f'wrote LPIPS params to {out}')
  return 0


def _add_lpips(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser(
      'lpips', help='torchvision VGG16 + LPIPS vgg.pth -> LPIPS Orbax params',
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--vgg16', required=True,
                 help='torchvision vgg16 state dict (.pth or .npz), e.g. '
                 'vgg16-397923af.pth')
  p.add_argument('--lin', required=True,
                 help="LPIPS heads (.pth or .npz), the LPIPS repo's vgg.pth")
  p.add_argument('--out', required=True,
                 help='output Orbax checkpoint directory (must not exist)')
  p.set_defaults(func=_lpips_command)


def _bin_range(text: str) -> tuple[float, float]:
  parts = [float(p) for p in text.split(',')]
  if len(parts) != 2 or not parts[0] < parts[1]:
    raise argparse.ArgumentTypeError(f'want "LOW,HIGH", got {text!r}')
  return parts[0], parts[1]


def _official_command(args: argparse.Namespace) -> int:
  # pylint: disable=g-import-not-at-top
  from dqvq.interop import official
  from dqvq.interop import official_bundle
  # pylint: enable=g-import-not-at-top
  out = os.path.abspath(args.out)
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f'--out {out} already exists; pick a new directory')
  ckpt = os.path.abspath(args.ckpt)
  # Lightning pickles callback states and hyper-parameters next to the
  # weights; they are kept as inert placeholders (nothing is executed).
  sd, info = pretrained.read_checkpoint(ckpt, allow_unknown=True)
  cfg = official.load_official_config(args.official_config)
  origin = dict(source=ckpt, step=info.get('global_step', 0))
  if args.kind == 'dqvae':
    path, report = official_bundle.convert_dqvae(
        sd, out, entropy_thresholds=args.entropy_thresholds,
        entropy_bin_range=args.entropy_bin_range, fine_ratio=args.fine_ratio,
        resolution=args.resolution, official_config=cfg, **origin)
  else:
    path, report = official_bundle.convert_transformer(
        sd, out, args.tokenizer, num_heads=args.num_heads,
        official_config=cfg, **origin)
  print(f'mapped {report["official_keys_mapped"]} official keys, ignored '
        f'{report["official_keys_ignored"] or "none"}; wrote {path}')
  for note in report['differences']:
    print(f'note: {note}')
  return 0


def _add_official(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser(
      'official', help="the authors' DQ-VAE / StackGPT checkpoint -> bundle",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--ckpt', required=True,
                 help='official Lightning .ckpt/.pth, or .npz of its keys')
  p.add_argument('--kind', required=True, choices=('dqvae', 'transformer'))
  p.add_argument('--out', required=True, help='bundle directory to create')
  p.add_argument('--tokenizer', default=None,
                 help='--kind transformer: the tokenizer bundle it models')
  p.add_argument('--entropy_thresholds', default=None,
                 help='entropy-router DQ-VAE: official threshold JSON')
  p.add_argument('--entropy_bin_range', type=_bin_range, default=None,
                 help='"LOW,HIGH" entropy bins (default: the JSON\'s, (0, 1) '
                 'for official JSONs); use the = form for negatives')
  p.add_argument('--fine_ratio', type=float, default=None,
                 help='dual DQ-VAE: fine share r (default: config or 0.5)')
  p.add_argument('--resolution', type=int, default=None,
                 help='image size when the checkpoint does not fix it')
  p.add_argument('--num_heads', type=int, default=None,
                 help='StackGPT heads, not in the weights (default 8)')
  p.add_argument('--official_config', default=None,
                 help='the official YAML config, cross-checked and used for '
                 'what the weights do not say (n_head, ratio, dropout)')
  p.set_defaults(func=_official_command)


def _to_official_command(args: argparse.Namespace) -> int:
  from dqvq.interop import official_bundle  # pylint: disable=g-import-not-at-top
  if not args.out.endswith('.npz'):
    raise ValueError(f'--out {args.out}: write an .npz (torch-free); load '
                     'it in PyTorch with {k: torch.from_numpy(v)}.')
  if os.path.exists(args.out):
    raise FileExistsError(f'--out {args.out} already exists')
  sd = official_bundle.bundle_to_official(args.bundle)
  np.savez(args.out, **sd)
  print(f'wrote {len(sd)} official keys to {args.out}')
  return 0


def _add_to_official(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser('to_official',
                     help='a dqvq bundle -> official state dict (.npz)')
  p.add_argument('--bundle', required=True, help='tokenizer/generator bundle')
  p.add_argument('--out', required=True, help='output .npz file')
  p.set_defaults(func=_to_official_command)


def _inception_command(args: argparse.Namespace) -> int:
  out, warning = pretrained.convert_inception(args.weights, args.out)
  if warning:
    print(f'warning: {warning}', file=sys.stderr)
  print(f'wrote FID Inception params to {out}')
  return 0


def _add_inception(sub: argparse._SubParsersAction) -> None:
  weights = inception.WEIGHTS_FILE
  p = sub.add_parser(
      'inception', help=f'pytorch-fid {weights} -> FID Inception Orbax params',
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--weights', required=True,
                 help=f'FID Inception state dict (.pth or .npz): {weights}')
  p.add_argument('--out', required=True,
                 help='output Orbax checkpoint directory (must not exist)')
  p.set_defaults(func=_inception_command)


# Each entry adds one subcommand; its parser sets `func(args) -> exit code`.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_lpips, _add_inception, _add_official, _add_to_official]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m dqvq.convert',
      description='Convert PyTorch weights to dqvq Flax checkpoints.')
  sub = parser.add_subparsers(dest='command', required=True)
  for add in _SUBCOMMANDS:
    add(sub)
  return parser


def _rewrite_from(argv: Sequence[str]) -> list[str]:
  """`--from official ...` (the issue's spelling) -> `official ...`."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg == '--from' and i + 1 < len(argv):
      return [argv[i + 1]] + argv[:i] + argv[i + 2:]
    if arg.startswith('--from='):
      return [arg.split('=', 1)[1]] + argv[:i] + argv[i + 1:]
  return argv


def main(argv: Sequence[str] | None = None) -> int:
  argv = _rewrite_from(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, FileNotFoundError, FileExistsError,
          pickle.UnpicklingError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
