"""Tests for the FID InceptionV3 and its pytorch-fid weight converter.

`_public_state_dict_table` lists pytorch-fid's state dict (names and PyTorch
shapes) written out from torchvision's layer definitions, independently of
dqvq.models.inception. A random state dict with those names goes through the
converter, and the converted network is compared, end to end (resize, stem,
every Inception block, pool3, fc), with a float64 NumPy forward written
directly on the PyTorch-layout tensors; so a wrong key, transpose, padding,
pool type (Mixed_7c's max pool, count_include_pad=False) or resize fails.
"""

import logging
import os

import jax
import numpy as np
import pytest

from dqvq import convert
from dqvq.eval import fid
from dqvq.interop import pretrained
from dqvq.models import inception
from dqvq.models.layers import count_params
from dqvq import sharding

# torchvision's inception_v3 has 27,161,264 parameters (its docs); the FID
# network drops AuxLogits (3,326,696) and has 8 more classes (8 * 2049).
PUBLIC_TRAINABLE = 27_161_264 - 3_326_696 + 8 * 2049


def _basic(name, cin, cout, kh, kw=None):
  kw = kh if kw is None else kw
  return [(f'{name}.conv.weight', (cout, cin, kh, kw))] + [
      (f'{name}.bn.{s}', (cout,))
      for s in ('running_mean', 'running_var', 'weight', 'bias')]


def _public_state_dict_table():
  t = (_basic('Conv2d_1a_3x3', 3, 32, 3) + _basic('Conv2d_2a_3x3', 32, 32, 3)
       + _basic('Conv2d_2b_3x3', 32, 64, 3) + _basic('Conv2d_3b_1x1', 64, 80, 1)
       + _basic('Conv2d_4a_3x3', 80, 192, 3))
  for name, cin, pf in (('Mixed_5b', 192, 32), ('Mixed_5c', 256, 64),
                        ('Mixed_5d', 288, 64)):
    for br, i, o, k in (('branch1x1', cin, 64, 1), ('branch5x5_1', cin, 48, 1),
                        ('branch5x5_2', 48, 64, 5),
                        ('branch3x3dbl_1', cin, 64, 1),
                        ('branch3x3dbl_2', 64, 96, 3),
                        ('branch3x3dbl_3', 96, 96, 3),
                        ('branch_pool', cin, pf, 1)):
      t += _basic(f'{name}.{br}', i, o, k)
  for br, i, o, k in (('branch3x3', 288, 384, 3),
                      ('branch3x3dbl_1', 288, 64, 1),
                      ('branch3x3dbl_2', 64, 96, 3),
                      ('branch3x3dbl_3', 96, 96, 3)):
    t += _basic(f'Mixed_6a.{br}', i, o, k)
  for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160),
                   ('Mixed_6e', 192)):
    for br, i, o, kh, kw in (
        ('branch1x1', 768, 192, 1, 1), ('branch7x7_1', 768, c7, 1, 1),
        ('branch7x7_2', c7, c7, 1, 7), ('branch7x7_3', c7, 192, 7, 1),
        ('branch7x7dbl_1', 768, c7, 1, 1), ('branch7x7dbl_2', c7, c7, 7, 1),
        ('branch7x7dbl_3', c7, c7, 1, 7), ('branch7x7dbl_4', c7, c7, 7, 1),
        ('branch7x7dbl_5', c7, 192, 1, 7), ('branch_pool', 768, 192, 1, 1)):
      t += _basic(f'{name}.{br}', i, o, kh, kw)
  for br, i, o, kh, kw in (
      ('branch3x3_1', 768, 192, 1, 1), ('branch3x3_2', 192, 320, 3, 3),
      ('branch7x7x3_1', 768, 192, 1, 1), ('branch7x7x3_2', 192, 192, 1, 7),
      ('branch7x7x3_3', 192, 192, 7, 1), ('branch7x7x3_4', 192, 192, 3, 3)):
    t += _basic(f'Mixed_7a.{br}', i, o, kh, kw)
  for name, cin in (('Mixed_7b', 1280), ('Mixed_7c', 2048)):
    for br, i, o, kh, kw in (
        ('branch1x1', cin, 320, 1, 1), ('branch3x3_1', cin, 384, 1, 1),
        ('branch3x3_2a', 384, 384, 1, 3), ('branch3x3_2b', 384, 384, 3, 1),
        ('branch3x3dbl_1', cin, 448, 1, 1), ('branch3x3dbl_2', 448, 384, 3, 3),
        ('branch3x3dbl_3a', 384, 384, 1, 3),
        ('branch3x3dbl_3b', 384, 384, 3, 1), ('branch_pool', cin, 192, 1, 1)):
      t += _basic(f'{name}.{br}', i, o, kh, kw)
  return t + [('fc.weight', (1008, 2048)), ('fc.bias', (1008,))]


TABLE = _public_state_dict_table()


@pytest.fixture(scope='module')
def torch_sd():
  """Random values with the public names/shapes; BatchNorm non-trivial."""
  rng = np.random.default_rng(0)
  sd = {}
  for k, s in TABLE:
    if k.endswith('conv.weight'):
      v = rng.standard_normal(s, np.float32) * np.sqrt(2 / np.prod(s[1:]))
    elif k.endswith('running_var'):
      # Many variances near or below eps = 1e-3, so that eps matters ...
      v = 10 ** rng.uniform(-4, 0.3, s)
    elif k.endswith('bn.weight'):
      # ... with gammas that keep each layer's output scale O(1).
      var = sd[k.replace('weight', 'running_var')]
      v = np.sqrt(var + 1e-3) * rng.uniform(0.5, 1.5, s)
    elif k == 'fc.weight':
      v = rng.standard_normal(s, np.float32) / np.sqrt(2048)
    else:  # BatchNorm bias / running_mean, fc bias.
      v = rng.normal(0, 0.1, s)
    sd[k] = np.asarray(v, np.float32)
  return sd


@pytest.fixture(scope='module')
def params(torch_sd):
  return pretrained.inception_params_from_state_dict(torch_sd)


def test_table_and_module_have_the_public_parameter_count():
  trainable = sum(np.prod(s) for k, s in TABLE if 'running' not in k)
  assert trainable == PUBLIC_TRAINABLE == 23_850_960
  abstract = inception.abstract_inception_params()
  assert count_params(abstract) == sum(np.prod(s) for _, s in TABLE)
  stats = sum(v.size for p, v in jax.tree_util.tree_flatten_with_path(
      abstract)[0] if p[-1].key in ('mean', 'var'))
  assert count_params(abstract) - stats == PUBLIC_TRAINABLE


def test_intermediate_shapes_follow_the_public_network():
  x = jax.ShapeDtypeStruct((1, 75, 75, 3), np.float32)
  _, state = jax.eval_shape(
      lambda p, a: inception.FIDInception().apply(
          {'params': p}, a, capture_intermediates=True,
          mutable=['intermediates']),
      inception.abstract_inception_params(), x)
  inter = state['intermediates']
  want = {'Conv2d_1a_3x3': (149, 32), 'Conv2d_4a_3x3': (71, 192),
          'Mixed_5b': (35, 256), 'Mixed_5d': (35, 288), 'Mixed_6a': (17, 768),
          'Mixed_6e': (17, 768), 'Mixed_7a': (8, 1280), 'Mixed_7b': (8, 2048),
          'Mixed_7c': (8, 2048)}
  for name, (hw, c) in want.items():
    assert inter[name]['__call__'][0].shape == (1, hw, hw, c), name
  out = inter['__call__'][0]
  assert out['pool'].shape == (1, 2048) and out['logits'].shape == (1, 1008)


def test_converter_places_every_tensor(torch_sd, params):
  inception.check_inception_params(params, where='test')
  flat = {'.'.join(p.key for p in path): np.asarray(v) for path, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  rename = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean',
            'running_var': 'var'}
  for key, _ in TABLE:
    mod, leaf = key.rsplit('.', 1)
    w = torch_sd[key]
    if key.endswith('conv.weight'):  # (O, I, H, W) -> (H, W, I, O)
      got = flat[f'{mod}.kernel']
      for o, i, h, wi in ((0, 0, 0, 0), (w.shape[0] - 1, w.shape[1] - 1,
                                         w.shape[2] - 1, w.shape[3] - 1)):
        assert got[h, wi, i, o] == w[o, i, h, wi], key
      np.testing.assert_array_equal(got, w.transpose(2, 3, 1, 0))
    elif key == 'fc.weight':
      np.testing.assert_array_equal(flat['fc.kernel'], w.T)
    elif mod == 'fc':
      np.testing.assert_array_equal(flat['fc.bias'], w)
    else:
      np.testing.assert_array_equal(flat[f'{mod}.{rename[leaf]}'], w)
  # 1x7 and 7x1 kernels keep their orientation.
  assert flat['Mixed_6b.branch7x7_2.conv.kernel'].shape == (1, 7, 128, 128)
  assert flat['Mixed_6b.branch7x7_3.conv.kernel'].shape == (7, 1, 128, 192)


def test_converter_names_bad_keys(torch_sd):
  ok = dict(torch_sd)
  ok['Mixed_5b.branch1x1.bn.num_batches_tracked'] = np.int64(7)  # Dropped.
  pretrained.inception_params_from_state_dict(ok)
  bad = dict(torch_sd)
  del bad['Mixed_6c.branch7x7_2.conv.weight']
  bad['Mixed_7c.branch_pool.bn.bias'] = np.zeros(7, np.float32)
  bad['extra.weight'] = np.zeros(1, np.float32)
  with pytest.raises(ValueError) as e:
    pretrained.inception_params_from_state_dict(bad)
  msg = str(e.value)
  assert 'missing Mixed_6c.branch7x7_2.conv.weight' in msg
  assert 'unexpected extra.weight' in msg
  assert 'Mixed_7c.branch_pool.bn.bias has shape (7,), expected (192,)' in msg
  aux = dict(torch_sd)
  aux['AuxLogits.fc.weight'] = np.zeros((1000, 768), np.float32)
  with pytest.raises(ValueError, match='torchvision.*pt_inception'):
    pretrained.inception_params_from_state_dict(aux)


# ---- float64 NumPy forward on the PyTorch-layout state dict (NHWC) ----


def _np_resize(x, size=299):
  """F.interpolate(bilinear, align_corners=False, antialias=False), NHWC."""
  for axis in (1, 2):
    n_in = x.shape[axis]
    src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).reshape([-1 if a == axis else 1 for a in range(4)])
    x = np.take(x, i0, axis) * (1 - lam) + np.take(x, i1, axis) * lam
  return x


def _windows(x, kh, kw, stride, fill):
  ph, pw = (kh // 2, kw // 2) if stride == 1 else (0, 0)
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=fill)
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  return [xp[:, i:i + stride * (ho - 1) + 1:stride,
             j:j + stride * (wo - 1) + 1:stride] for i in range(kh)
          for j in range(kw)]


def _np_forward(sd, images):
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}

  def conv(x, name, stride=1, pad=(0, 0)):
    w = sd[f'{name}.conv.weight']
    xp = np.pad(x, ((0, 0), (pad[0],) * 2, (pad[1],) * 2, (0, 0)))
    kh, kw = w.shape[2:]
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    y = 0
    for i in range(kh):
      for j in range(kw):  # One 2-D (pixels, I) @ (I, O) matmul per tap.
        tap = xp[:, i:i + stride * (ho - 1) + 1:stride,
                 j:j + stride * (wo - 1) + 1:stride].reshape(-1, w.shape[1])
        y = y + tap @ w[:, :, i, j].T
    y = y.reshape(x.shape[0], ho, wo, -1)
    y = (y - sd[f'{name}.bn.running_mean']) / np.sqrt(
        sd[f'{name}.bn.running_var'] + 1e-3)
    return np.maximum(y * sd[f'{name}.bn.weight'] + sd[f'{name}.bn.bias'], 0)

  maxpool_s2 = lambda x: np.max(_windows(x, 3, 3, 2, 0), axis=0)
  maxpool_same = lambda x: np.max(_windows(x, 3, 3, 1, -np.inf), axis=0)

  def avgpool_no_pad(x):
    count = np.sum(_windows(np.ones_like(x[:1, ..., :1]), 3, 3, 1, 0), axis=0)
    return np.sum(_windows(x, 3, 3, 1, 0), axis=0) / count

  x = _np_resize(np.asarray(images, np.float64))
  x = conv(x, 'Conv2d_1a_3x3', 2)
  x = conv(conv(x, 'Conv2d_2a_3x3'), 'Conv2d_2b_3x3', pad=(1, 1))
  x = conv(maxpool_s2(x), 'Conv2d_3b_1x1')
  x = maxpool_s2(conv(x, 'Conv2d_4a_3x3'))
  for m in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):
    x = np.concatenate([
        conv(x, f'{m}.branch1x1'),
        conv(conv(x, f'{m}.branch5x5_1'), f'{m}.branch5x5_2', pad=(2, 2)),
        conv(conv(conv(x, f'{m}.branch3x3dbl_1'), f'{m}.branch3x3dbl_2',
                  pad=(1, 1)), f'{m}.branch3x3dbl_3', pad=(1, 1)),
        conv(avgpool_no_pad(x), f'{m}.branch_pool')], -1)
  m = 'Mixed_6a'
  x = np.concatenate([
      conv(x, f'{m}.branch3x3', 2),
      conv(conv(conv(x, f'{m}.branch3x3dbl_1'), f'{m}.branch3x3dbl_2',
                pad=(1, 1)), f'{m}.branch3x3dbl_3', 2), maxpool_s2(x)], -1)
  r, c = (3, 0), (0, 3)  # Paddings of the 7x1 and 1x7 convs.
  for m in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):
    b7 = conv(conv(conv(x, f'{m}.branch7x7_1'), f'{m}.branch7x7_2', pad=c),
              f'{m}.branch7x7_3', pad=r)
    bd = conv(x, f'{m}.branch7x7dbl_1')
    for k, pad in ((2, r), (3, c), (4, r), (5, c)):
      bd = conv(bd, f'{m}.branch7x7dbl_{k}', pad=pad)
    x = np.concatenate([conv(x, f'{m}.branch1x1'), b7, bd,
                        conv(avgpool_no_pad(x), f'{m}.branch_pool')], -1)
  m = 'Mixed_7a'
  b7 = conv(conv(conv(x, f'{m}.branch7x7x3_1'), f'{m}.branch7x7x3_2', pad=c),
            f'{m}.branch7x7x3_3', pad=r)
  x = np.concatenate([
      conv(conv(x, f'{m}.branch3x3_1'), f'{m}.branch3x3_2', 2),
      conv(b7, f'{m}.branch7x7x3_4', 2), maxpool_s2(x)], -1)
  for m, pool in (('Mixed_7b', avgpool_no_pad), ('Mixed_7c', maxpool_same)):
    b3 = conv(x, f'{m}.branch3x3_1')
    bd = conv(conv(x, f'{m}.branch3x3dbl_1'), f'{m}.branch3x3dbl_2',
              pad=(1, 1))
    x = np.concatenate([
        conv(x, f'{m}.branch1x1'),
        conv(b3, f'{m}.branch3x3_2a', pad=(0, 1)),
        conv(b3, f'{m}.branch3x3_2b', pad=(1, 0)),
        conv(bd, f'{m}.branch3x3dbl_3a', pad=(0, 1)),
        conv(bd, f'{m}.branch3x3dbl_3b', pad=(1, 0)),
        conv(pool(x), f'{m}.branch_pool')], -1)
  pool3 = x.mean(axis=(1, 2))
  return pool3, pool3 @ sd['fc.weight'].T + sd['fc.bias']


def test_resize_matches_pytorch_bilinear_both_ways():
  rng = np.random.default_rng(1)
  for shape in ((1, 75, 90, 3), (1, 420, 310, 3)):  # Up; down (and mixed).
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(inception.resize_to_fid(x)),
                               _np_resize(x), atol=1e-4)


def test_forward_matches_numpy_reference_sharded(torch_sd, params):
  """One compile: 2 x 75 x 75 images over a 2-device mesh."""
  images = np.random.default_rng(2).uniform(-1, 1, (2, 75, 75, 3)).astype(
      np.float32)
  mesh = sharding.create_mesh(devices=jax.devices()[:2])
  feature_fn = fid.make_feature_fn(inception.FIDInception(), params, mesh=mesh,
                                   logits_key='logits')
  pool, logits = jax.device_get(feature_fn(images))
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert np.isfinite(pool).all() and np.isfinite(logits).all()
  assert np.all(pool >= 0)  # Mean of ReLU outputs.
  assert not np.allclose(pool[0], pool[1], rtol=1e-2)
  # The NumPy forward costs ~5 s per image on a busy CPU: check image 1 only.
  ref_pool, ref_logits = _np_forward(torch_sd, images[1:])
  np.testing.assert_allclose(pool[1:], ref_pool, rtol=1e-3,
                             atol=1e-4 * np.abs(ref_pool).max())
  np.testing.assert_allclose(logits[1:], ref_logits, rtol=1e-3,
                             atol=1e-4 * np.abs(ref_logits).max())
  with pytest.raises(ValueError, match='multiple of 2'):
    feature_fn(images[:1])


def test_rejects_non_rgb_images(params):
  with pytest.raises(ValueError, match=r'\(B, H, W, 3\)'):
    inception.FIDInception().apply({'params': params},
                                   np.zeros((1, 32, 32), np.float32))
  with pytest.raises(ValueError, match='127.5'):
    inception.FIDInception().apply({'params': params},
                                   np.zeros((1, 32, 32, 3), np.uint8))


def test_random_and_missing_weights(tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    rand = inception.load_inception_params('random', seed=3)
  assert 'RANDOMLY' in caplog.text
  inception.check_inception_params(rand, where='test')
  bn = rand['Mixed_7c']['branch_pool']['bn']
  assert np.all(np.asarray(bn['var']) == 1) and np.all(
      np.asarray(bn['mean']) == 0)
  with pytest.raises(ValueError, match='dqvq.convert inception'):
    inception.load_inception_params('')
  with pytest.raises(FileNotFoundError, match='dqvq.convert inception'):
    inception.load_inception_params(str(tmp_path / 'nope'))
  (tmp_path / 'file').write_text('x')
  with pytest.raises(ValueError, match='Orbax checkpoint directory'):
    inception.load_inception_params(str(tmp_path / 'file'))


def test_convert_subcommand_round_trip(torch_sd, params, tmp_path):
  weights = str(tmp_path / 'pt_inception.npz')
  np.savez(weights, **torch_sd)
  parser = convert.build_parser()
  out = str(tmp_path / 'inception_params')
  args = parser.parse_args(['inception', '--weights', weights, '--out', out])
  assert args.func(args) == 0
  loaded = inception.load_inception_params(out)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  with pytest.raises(FileExistsError, match='already exists'):
    args.func(args)
  # A checkpoint with a wrong tree is refused before its arrays are read.
  bad_dir = str(tmp_path / 'bad')
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(bad_dir, {'fc': {'kernel': np.zeros((2, 2), np.float32)}})
  with pytest.raises(ValueError, match=r"missing \['Conv2d_1a_3x3'\]"):
    inception.load_inception_params(bad_dir)
  assert os.path.isdir(out)


def test_convert_warns_on_other_pth_bytes(torch_sd, tmp_path, monkeypatch,
                                          capsys):
  fake = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
  fake.write_bytes(b'not the published file')
  monkeypatch.setattr(pretrained, 'read_state_dict', lambda path: torch_sd)
  parser = convert.build_parser()
  args = parser.parse_args(['inception', '--weights', str(fake), '--out',
                            str(tmp_path / 'out')])
  assert args.func(args) == 0
  assert 'not be comparable' in capsys.readouterr().err
  assert inception.WEIGHTS_SHA256.startswith('6726825d')
