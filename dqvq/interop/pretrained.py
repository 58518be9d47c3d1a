"""PyTorch weights of the pretrained nets -> dqvq's Flax params.

LPIPS needs torchvision's ImageNet VGG16 and the LPIPS repo's linear heads,
FID pytorch-fid's InceptionV3; none can be downloaded at run time, so
`python -m dqvq.convert lpips|inception` maps the public files once into
Orbax directories that `dqvq.models.perceptual` and `dqvq.models.inception`
load. The maps live here, beside the torch-free readers they share with the
official-checkpoint converter, so the models stay pure Flax.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Sequence

from flax import traverse_util
import numpy as np

from dqvq.interop import torch_checkpoint
from dqvq.models import inception
from dqvq.models import perceptual

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


def check_keys(sd: StateDict, expected: Mapping[str, tuple[int, ...]],
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
  expected, in_ch = {}, 3
  for idx, out_ch in perceptual.VGG16_CONVS:
    expected[f'features.{idx}.weight'] = (out_ch, in_ch, 3, 3)
    expected[f'features.{idx}.bias'] = (out_ch,)
    in_ch = out_ch
  check_keys(vgg_sd, expected, ('classifier.',), 'VGG16 (--vgg16)')
  lin_expected = {f'lin{k}.model.1.weight': (1, c, 1, 1)
                  for k, c in enumerate(perceptual.LPIPS_CHANNELS)}
  check_keys(lin_sd, lin_expected, (), 'LPIPS lin (--lin)')

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


# Flax leaf name -> PyTorch suffix, for BatchNorm and the fc layer.
_BN_NAMES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
             'var': 'running_var'}


def _torch_layout() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """PyTorch name -> (Flax path, PyTorch shape), derived from the module."""
  layout = {}
  for path, leaf in traverse_util.flatten_dict(
      inception.abstract_inception_params()).items():
    *mods, name = path
    s = leaf.shape
    if mods[-1] == 'conv':  # kernel (H, W, I, O) <- weight (O, I, H, W)
      layout['.'.join(mods) + '.weight'] = (path, (s[3], s[2], s[0], s[1]))
    elif mods[-1] == 'bn':
      layout['.'.join(mods) + '.' + _BN_NAMES[name]] = (path, s)
    elif name == 'kernel':  # fc: (in, out) <- (out, in)
      layout['.'.join(mods) + '.weight'] = (path, s[::-1])
    else:
      layout['.'.join(mods) + '.' + name] = (path, s)
  return layout


def inception_params_from_state_dict(
    sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Maps pytorch-fid's FID Inception state dict to FIDInception params.

  `*.num_batches_tracked` BatchNorm counters are accepted and dropped.

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped key.
  """
  layout = _torch_layout()
  sd = {k: v for k, v in sd.items() if not (
      k.endswith('.num_batches_tracked') and
      k[:-len('num_batches_tracked')] + 'running_mean' in layout)}
  expected = {k: shape for k, (_, shape) in layout.items()}
  try:
    check_keys(sd, expected, (), 'FID InceptionV3 (--weights)')
  except ValueError as e:
    if any(k.startswith('AuxLogits.') for k in sd):
      raise ValueError(
          f"{e}. These look like torchvision's ImageNet Inception weights; "
          f'FID needs pytorch-fid\'s {inception.WEIGHTS_FILE}.') from e
    raise
  flat = {}
  for key, (path, _) in layout.items():
    w = np.asarray(sd[key], np.float32)
    if path[-2] == 'conv':
      w = conv_kernel(w)
    elif path[-1] == 'kernel':
      w = np.ascontiguousarray(w.T)
    flat[path] = w
  return traverse_util.unflatten_dict(flat)


def sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def convert_lpips(vgg16: str, lin: str, out: str) -> str:
  """Writes LPIPS params from the two PyTorch files; returns `out`."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise FileExistsError(f'--out {out} already exists; pick a new directory')
  params = lpips_params_from_state_dicts(read_state_dict(vgg16),
                                         read_state_dict(lin))
  perceptual.save_lpips_params(params, out)
  return out


def convert_inception(weights: str, out: str) -> tuple[str, str | None]:
  """Writes FID Inception params; (out, a warning or None).

  The warning says when a .pth is not the published file byte for byte:
  same names and shapes but other values would move FID silently.
  """
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise FileExistsError(f'--out {out} already exists; pick a new directory')
  params = inception_params_from_state_dict(read_state_dict(weights))
  warning = None
  if not weights.endswith('.npz'):
    digest = sha256(weights)
    if digest != inception.WEIGHTS_SHA256:
      warning = (f'{weights} has sha256 {digest[:12]}..., not that of '
                 f'{inception.WEIGHTS_FILE} '
                 f'({inception.WEIGHTS_SHA256[:12]}...); FID / IS will not '
                 'be comparable with published numbers.')
  inception.save_inception_params(params, out)
  return out, warning
