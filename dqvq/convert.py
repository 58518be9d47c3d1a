"""Converts PyTorch weights into dqvq's Flax checkpoints and bundles.

Why: dqvq's LPIPS and users' existing DQ-VAE / DQ-Transformer models exist
only as PyTorch files. Conversion is a one-off, torch-free step (see
`dqvq.interop.torch_checkpoint`: no pickled code runs) whose output dqvq loads.

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
`lpips`: `--vgg16` is torchvision's ImageNet VGG16 state dict (`features.*`
and `classifier.*`; the classifier is ignored) and `--lin` the LPIPS repo's
`weights/v0.1/vgg.pth` (`lin{0..4}.model.1.weight`). `official` reads the
authors' Lightning checkpoints (DQ-VAE or StackGPT, see `dqvq.interop.official`) and
writes a bundle for `dqvq.load_tokenizer` / `dqvq.load_generator`. Inputs may
be PyTorch files (zip or legacy format) or `.npz` archives holding the same
key names, which is how tests exercise the CLI without torch.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dqvq.interop import torch_checkpoint

StateDict = Mapping[str, np.ndarray]


def read_checkpoint(path: str, allow_unknown: bool = False
                    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """(flat {name: array}, {'global_step', 'epoch'} when stored) of a file.

  Reads .pth/.pt/.ckpt (unwrapping Lightning's `{'state_dict': {...}}`) or
  .npz. `allow_unknown` keeps pickled non-tensor objects (Lightning callback
  states, hyper-parameters) as inert placeholders instead of refusing.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'no such weights file: {path}')
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}, {}
  obj = torch_checkpoint.load(path, allow_unknown=allow_unknown)
  info = {}
  if isinstance(obj, dict) and 'state_dict' in obj and isinstance(
      obj['state_dict'], dict):
    info = {k: int(obj[k]) for k in ('global_step', 'epoch')
            if isinstance(obj.get(k), int)}
    obj = obj['state_dict']
  if not isinstance(obj, dict):
    raise ValueError(f'{path}: expected a state dict, found {type(obj)}')
  return torch_checkpoint.flatten(obj), info


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A flat {name: array} from a .pth/.pt/.ckpt or .npz file."""
  return read_checkpoint(path)[0]


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """PyTorch conv weight (O, I, H, W) -> Flax kernel (H, W, I, O)."""
  return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def _check_keys(sd: StateDict, expected: Mapping[str, tuple[int, ...]],
                ignore_prefixes: Sequence[str], what: str) -> None:
  """Raises ValueError naming every missing, unexpected and mis-shaped key."""
  problems = [f'missing {k}' for k in expected if k not in sd]
  problems += [f'unexpected {k}' for k in sd if k not in expected
               and not any(k.startswith(p) for p in ignore_prefixes)]
  problems += [f'{k} has shape {tuple(np.shape(sd[k]))}, expected {s}'
               for k, s in expected.items()
               if k in sd and tuple(np.shape(sd[k])) != s]
  if problems:
    raise ValueError(
        f'{what} state dict does not match: ' + '; '.join(problems))


def lpips_params_from_state_dicts(vgg_sd: StateDict,
                                  lin_sd: StateDict) -> dict[str, Any]:
  """Maps torchvision VGG16 + LPIPS lin state dicts to LPIPS Flax params.

  Args:
    vgg_sd: `features.{i}.{weight,bias}` for the 13 conv indices i of VGG16;
      `classifier.*` keys are allowed and ignored, anything else is an error.
    lin_sd: `lin{k}.model.1.weight` of shape (1, C_k, 1, 1), k = 0..4.

  Returns:
    The 'params' tree of `dqvq.models.perceptual.LPIPS`, float32 numpy.

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped key.
  """
  from dqvq.models import perceptual  # pylint: disable=g-import-not-at-top
  expected, in_ch = {}, 3
  for idx, out_ch in perceptual.VGG16_CONVS:
    expected[f'features.{idx}.weight'] = (out_ch, in_ch, 3, 3)
    expected[f'features.{idx}.bias'] = (out_ch,)
    in_ch = out_ch
  _check_keys(vgg_sd, expected, ('classifier.',), 'VGG16 (--vgg16)')
  lin_expected = {f'lin{k}.model.1.weight': (1, c, 1, 1)
                  for k, c in enumerate(perceptual.LPIPS_CHANNELS)}
  _check_keys(lin_sd, lin_expected, (), 'LPIPS lin (--lin)')

  f32 = lambda a: np.asarray(a, np.float32)
  net = {}
  for idx, _ in perceptual.VGG16_CONVS:
    net[f'features_{idx}'] = {'conv': {
        'kernel': conv_kernel(f32(vgg_sd[f'features.{idx}.weight'])),
        'bias': f32(vgg_sd[f'features.{idx}.bias'])}}
  params: dict[str, Any] = {'net': net}
  for k in range(len(perceptual.LPIPS_CHANNELS)):
    params[f'lin{k}'] = {'conv': {
        'kernel': conv_kernel(f32(lin_sd[f'lin{k}.model.1.weight']))}}
  return params


def _lpips_command(args: argparse.Namespace) -> int:
  from dqvq.models import perceptual  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(args.out)
  if os.path.exists(out):
    raise FileExistsError(f'--out {out} already exists; pick a new directory')
  params = lpips_params_from_state_dicts(read_state_dict(args.vgg16),
                                         read_state_dict(args.lin))
  perceptual.save_lpips_params(params, out)
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
  sd, info = read_checkpoint(ckpt, allow_unknown=True)
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


def _add_inception(sub: argparse._SubParsersAction) -> None:
  from dqvq.models import inception  # pylint: disable=g-import-not-at-top
  inception.add_convert_subcommand(sub)


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
