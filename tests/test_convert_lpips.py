"""Tests for `python -m dqvq.convert lpips` and its key mapping.

State dicts use the official key names (torchvision `features.<i>`, LPIPS
`lin<k>.model.1.weight`) with random values of the official shapes. The
converted LPIPS is compared with a numpy reimplementation of the official
LPIPS forward written directly on those NCHW / (O, I, H, W) tensors, so a
wrong transpose, key or layer order anywhere fails the test.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dqvq import convert
from dqvq.interop import pretrained
from dqvq.models import perceptual

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, 'tests', 'data')
VGG_IDX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG_OUT = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
LIN_CH = (64, 128, 256, 512, 512)


@pytest.fixture(scope='module')
def state_dicts():
  rng = np.random.default_rng(0)
  vgg, cin = {}, 3
  for idx, cout in zip(VGG_IDX, VGG_OUT):
    he = np.sqrt(2.0 / (cin * 9))  # Keeps activations O(1) through 13 layers.
    vgg[f'features.{idx}.weight'] = (
        rng.standard_normal((cout, cin, 3, 3)) * he).astype(np.float32)
    vgg[f'features.{idx}.bias'] = rng.uniform(-0.1, 0.1, cout).astype(
        np.float32)
    cin = cout
  # torchvision also ships the classifier; it must be ignored (kept tiny here).
  vgg['classifier.0.weight'] = np.zeros((2, 2), np.float32)
  vgg['classifier.6.bias'] = np.zeros(2, np.float32)
  lin = {f'lin{k}.model.1.weight': rng.uniform(0, 0.1, (1, c, 1, 1)).astype(
      np.float32) for k, c in enumerate(LIN_CH)}
  return vgg, lin


def _np_conv3x3(x, w, b):
  """NCHW 3x3 conv, padding 1, stride 1, as torch.nn.Conv2d; float64."""
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  h, wd = x.shape[2:]
  out = np.zeros((x.shape[0], w.shape[0], h, wd))
  for i in range(3):
    for j in range(3):
      out += np.einsum('nchw,oc->nohw', xp[:, :, i:i + h, j:j + wd],
                       w[:, :, i, j].astype(np.float64))
  return out + b[None, :, None, None]


def _np_maxpool(x):
  n, c, h, w = x.shape
  return x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(
      n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def _np_lpips(vgg, lin, x0, x1):
  """The official LPIPS forward (eval mode), NCHW, from torch-layout dicts."""
  shift = np.array([-0.030, -0.088, -0.188])[None, :, None, None]
  scale = np.array([0.458, 0.448, 0.450])[None, :, None, None]

  def features(x):
    h, taps = (x - shift) / scale, []
    for idx in VGG_IDX:
      if idx in (5, 10, 17, 24):
        h = _np_maxpool(h)
      h = np.maximum(_np_conv3x3(h, vgg[f'features.{idx}.weight'],
                                 vgg[f'features.{idx}.bias']), 0)
      if idx in (2, 7, 14, 21, 28):
        taps.append(h)
    return taps

  total = 0.0
  for k, (f0, f1) in enumerate(zip(features(x0), features(x1))):
    n0 = f0 / (np.sqrt((f0**2).sum(1, keepdims=True)) + 1e-10)
    n1 = f1 / (np.sqrt((f1**2).sum(1, keepdims=True)) + 1e-10)
    w = lin[f'lin{k}.model.1.weight'][0, :, 0, 0].astype(np.float64)
    total = total + np.einsum('nchw,c->nhw', (n0 - n1)**2, w).mean((1, 2))
  return total


def test_every_parameter_lands_in_place(state_dicts):
  vgg, lin = state_dicts
  params = pretrained.lpips_params_from_state_dicts(vgg, lin)
  perceptual.check_lpips_params(params, where='test')
  for idx in VGG_IDX:
    conv = params['net'][f'features_{idx}']['conv']
    w = vgg[f'features.{idx}.weight']
    assert conv['kernel'].shape == (3, 3, w.shape[1], w.shape[0])
    np.testing.assert_array_equal(conv['kernel'],
                                  np.transpose(w, (2, 3, 1, 0)))
    assert conv['kernel'][2, 0, 1, 3] == w[3, 1, 2, 0]  # [kh,kw,i,o]<-[o,i,kh,kw]
    np.testing.assert_array_equal(conv['bias'], vgg[f'features.{idx}.bias'])
  for k in range(5):
    kernel = params[f'lin{k}']['conv']['kernel']
    assert kernel.shape == (1, 1, LIN_CH[k], 1)
    np.testing.assert_array_equal(kernel[0, 0, :, 0],
                                  lin[f'lin{k}.model.1.weight'][0, :, 0, 0])


def test_converted_lpips_matches_numpy_official_forward(state_dicts):
  vgg, lin = state_dicts
  params = pretrained.lpips_params_from_state_dicts(vgg, lin)
  rng = np.random.default_rng(1)
  x0 = rng.uniform(-1, 1, (2, 3, 32, 32))
  x1 = np.clip(x0 + rng.normal(0, 0.5, x0.shape), -1, 1)
  want = _np_lpips(vgg, lin, x0, x1)
  nhwc = lambda x: jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)
  got = jax.jit(perceptual.LPIPS().apply)({'params': params}, nhwc(x0),
                                          nhwc(x1))
  assert np.all(want > 0)
  np.testing.assert_allclose(got, want, rtol=2e-4)


def test_mismatched_state_dicts_name_the_keys(state_dicts):
  vgg, lin = state_dicts
  bad = dict(vgg)
  del bad['features.28.bias']
  bad['features.3.weight'] = np.zeros(1)
  bad['features.0.weight'] = np.zeros((64, 4, 3, 3))
  with pytest.raises(ValueError) as e:
    pretrained.lpips_params_from_state_dicts(bad, lin)
  msg = str(e.value)
  assert 'missing features.28.bias' in msg
  assert 'unexpected features.3.weight' in msg
  assert 'features.0.weight has shape (64, 4, 3, 3)' in msg
  assert 'classifier' not in msg
  bad_lin = dict(lin, **{'lin2.model.1.weight': np.zeros((1, 64, 1, 1))})
  with pytest.raises(ValueError, match=r'lin2\.model\.1\.weight has shape'):
    pretrained.lpips_params_from_state_dicts(vgg, bad_lin)


def test_cli_end_to_end_with_npz(state_dicts, tmp_path):
  vgg, lin = state_dicts
  np.savez(tmp_path / 'vgg16.npz', **vgg)
  np.savez(tmp_path / 'lin.npz', **lin)
  out = tmp_path / 'lpips_params'
  cmd = [sys.executable, '-m', 'dqvq.convert', 'lpips',
         '--vgg16', str(tmp_path / 'vgg16.npz'),
         '--lin', str(tmp_path / 'lin.npz'), '--out', str(out)]
  env = dict(os.environ, PYTHONPATH=REPO)
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert run.returncode == 0, run.stderr
  loaded = perceptual.load_lpips_params(str(out))
  np.testing.assert_array_equal(
      loaded['net']['features_10']['conv']['kernel'],
      np.transpose(vgg['features.10.weight'], (2, 3, 1, 0)))
  np.testing.assert_array_equal(loaded['lin4']['conv']['kernel'][0, 0, :, 0],
                                lin['lin4.model.1.weight'][0, :, 0, 0])
  # Refuses to overwrite, and reports bad input as an error, not a traceback.
  assert convert.main(['lpips', '--vgg16', str(tmp_path / 'vgg16.npz'),
                       '--lin', str(tmp_path / 'lin.npz'),
                       '--out', str(out)]) == 1
  assert convert.main(['lpips', '--vgg16', str(tmp_path / 'lin.npz'),
                       '--lin', str(tmp_path / 'lin.npz'),
                       '--out', str(tmp_path / 'other')]) == 1
  assert not (tmp_path / 'other').exists()


def test_reads_torch_files_and_unwraps_state_dict():
  sd = pretrained.read_state_dict(os.path.join(DATA, 'tiny_zip.pth'))
  assert 'w_f32' in sd and 'conv.weight' in sd and 'epoch' not in sd
  assert sd['conv.weight'].shape == (3, 2, 1, 1)
  with pytest.raises(FileNotFoundError, match='no such weights file'):
    pretrained.read_state_dict(os.path.join(DATA, 'absent.pth'))
