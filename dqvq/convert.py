"""Converts PyTorch weights into dqvq's Flax parameter checkpoints.

Why: dqvq's LPIPS (and, later, imported official DQ-VAE checkpoints) must use
the exact published weights, which exist only as PyTorch files. Conversion is
a one-off, torch-free step (see `dqvq.torch_checkpoint`) whose output is an
Orbax checkpoint the trainer loads.

Usage (subcommands; more, such as `official`, register in `_SUBCOMMANDS`):

  python -m dqvq.convert lpips --vgg16 vgg16-397923af.pth --lin vgg.pth \
      --out /path/to/lpips_params

`--vgg16` is torchvision's ImageNet VGG16 state dict (`features.*` and
`classifier.*`; the classifier is ignored) and `--lin` the LPIPS repo's
`weights/v0.1/vgg.pth` (`lin{0..4}.model.1.weight`). Inputs may be PyTorch
files (zip or legacy format) or `.npz` archives holding the same key names,
which is how tests exercise the CLI without torch.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dqvq import torch_checkpoint

StateDict = Mapping[str, np.ndarray]


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A flat {name: array} from a .pth/.pt/.ckpt or .npz file.

  A Lightning-style `{'state_dict': {...}}` wrapper is unwrapped.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'no such weights file: {path}')
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  obj = torch_checkpoint.load(path)
  if isinstance(obj, dict) and 'state_dict' in obj and isinstance(
      obj['state_dict'], dict):
    obj = obj['state_dict']
  if not isinstance(obj, dict):
    raise ValueError(f'{path}: expected a state dict, found {type(obj)}')
  return torch_checkpoint.flatten(obj)


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


# Each entry adds one subcommand; its parser sets `func(args) -> exit code`.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_lpips]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m dqvq.convert',
      description='Convert PyTorch weights to dqvq Flax checkpoints.')
  sub = parser.add_subparsers(dest='command', required=True)
  for add in _SUBCOMMANDS:
    add(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, FileNotFoundError, FileExistsError,
          pickle.UnpicklingError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
