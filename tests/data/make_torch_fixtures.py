"""Writes the tiny PyTorch checkpoint fixtures that test dqvq.torch_checkpoint.

dqvq reads .pth files without torch, so its tests need files that real torch
wrote, in both serialisation formats, plus the values torch itself sees. This
script is run ONCE, by hand, in a throwaway environment that has torch (never
the project venv), and its outputs are committed:

  python3.11 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
  /tmp/torchvenv/bin/python tests/data/make_torch_fixtures.py

Outputs (a few KB each), next to this script:
  tiny_zip.pth        torch.save default (zip) format.
  tiny_legacy.pth     _use_new_zipfile_serialization=False (legacy pickles).
  tiny_expected.npz   the expected values, keys joined with '/'; bfloat16
                      tensors are stored as float32 (exact).
"""

import collections
import os

import numpy as np
import torch


def make_checkpoint() -> dict:
  """A Lightning-like nested checkpoint covering what the reader handles."""
  g = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=g)
  shared = torch.arange(12, dtype=torch.float32)
  conv = torch.nn.Conv2d(2, 3, kernel_size=1)
  bn = torch.nn.BatchNorm2d(3)
  with torch.no_grad():
    conv.weight.copy_(torch.randn(3, 2, 1, 1, generator=g))
    bn(torch.randn(2, 3, 2, 2, generator=g))  # Non-trivial running stats.
  state_dict = collections.OrderedDict()
  state_dict['w_f32'] = torch.randn(3, 4, generator=g)
  state_dict['w_f16'] = torch.randn(2, 3, generator=g).half()
  state_dict['w_f64'] = torch.randn(2, generator=g).double()
  state_dict['w_bf16'] = torch.randn(5, generator=g).bfloat16()
  state_dict['idx_i64'] = torch.arange(6).reshape(2, 3) - 2
  state_dict['idx_i32'] = torch.arange(4, dtype=torch.int32)
  state_dict['mask_bool'] = torch.tensor([True, False, True])
  state_dict['bytes_u8'] = torch.tensor([0, 7, 255], dtype=torch.uint8)
  state_dict['scalar'] = torch.tensor(3.5)
  state_dict['empty'] = torch.zeros(0, 3)
  state_dict['transposed'] = base.t()  # Non-contiguous: strides (1, 6).
  state_dict['offset_view'] = base[1:, 2:5]  # Storage offset 8, stride (6, 1).
  state_dict['shared_a'] = shared[:6].view(2, 3)  # Two views of one storage.
  state_dict['shared_b'] = shared[6:].view(3, 2)
  state_dict['param'] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
  for k, v in conv.state_dict().items():
    state_dict['conv.' + k] = v
  for k, v in bn.state_dict().items():
    state_dict['bn.' + k] = v
  return {
      'epoch': 3,
      'global_step': 10,
      'state_dict': state_dict,
      'nested': {'inner': {'x': torch.ones(2, 2, dtype=torch.float16)},
                 'plain': [1, 2.5, 'three']},
      'bn_state': bn.state_dict(),  # An OrderedDict with `_metadata`.
  }


def flatten(tree, prefix=''):
  """{'a': {'b': t}} -> {'a/b': numpy}, tensors only."""
  out = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, key + '/'))
    elif isinstance(v, torch.Tensor):
      v = v.detach()
      if v.dtype == torch.bfloat16:
        v = v.float()
      out[key] = v.numpy().copy()
  return out


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  ckpt = make_checkpoint()
  torch.save(ckpt, os.path.join(here, 'tiny_zip.pth'))
  torch.save(ckpt, os.path.join(here, 'tiny_legacy.pth'),
             _use_new_zipfile_serialization=False)
  # Round-trip through torch.load so the expectation is what torch reads.
  loaded = torch.load(os.path.join(here, 'tiny_zip.pth'), weights_only=True)
  expected = flatten(loaded)
  np.savez(os.path.join(here, 'tiny_expected.npz'), **expected)
  legacy = flatten(torch.load(os.path.join(here, 'tiny_legacy.pth'),
                              weights_only=True))
  assert legacy.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(legacy[k], expected[k])
  print(f'wrote {len(expected)} tensors; torch {torch.__version__}')


if __name__ == '__main__':
  main()
