"""Importing the authors' PyTorch checkpoints (dqvq.interop.official, convert official).

No torch here: official state dicts are numpy dicts whose names and shapes
come from the reference dump (/work/shared/reference/official-state-dict.json,
or the same file under $DQVQ_REFERENCE), at the paper's size where pure numpy
is quick, else at toy sizes generated the same way.
"""

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

import dqvq
from dqvq import config_lib
from dqvq import convert
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq.interop import official
from dqvq.interop import official_bundle
from dqvq.interop import pretrained
from dqvq.models import dqvae
from dqvq.models import transformer as transformer_lib
from dqvq import sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.environ.get('DQVQ_REFERENCE', os.path.join(
    '/work/shared/reference', 'official-state-dict.json'))
DQVAES = {'dqvae_dual_entropy': 'entropy_dual',
          'dqvae_dual_feature': 'feature_dual',
          'dqvae_triple_feature': 'triple'}


@pytest.fixture(scope='module')
def reference():
  if not os.path.exists(REFERENCE):
    pytest.fail(f'{REFERENCE} is missing; set DQVQ_REFERENCE to the official '
                'state-dict dump.')
  with open(REFERENCE) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def thresholds(tmp_path_factory):
  """An official-format threshold JSON: keys "1".."99", no metadata."""
  path = tmp_path_factory.mktemp('thr') / 'entropy_thresholds.json'
  path.write_text(json.dumps({str(k): 0.5 + k / 50 for k in range(1, 100)}))
  return str(path)


def _views(shapes):
  """Zero-memory arrays of the given shapes (for shape-only checks)."""
  return {k: np.broadcast_to(np.float32(0), tuple(s)) for k, s in shapes.items()}


def _random(shapes, seed=0):
  """Distinct random values per key, so a swapped key cannot go unnoticed."""
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(tuple(s), dtype=np.float32)
          for k, s in shapes.items()}


def _dqvae_table(config):
  return official.entries(tokenizer_lib.abstract_variables(config), 'dqvae')


def _leaf(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return np.asarray(tree)


def stackgpt_shapes(width, position_layers, content_layers, vocab, coarse,
                    fine, block):
  """The official StackGPT keys (what `stackgpt.py` registers) and shapes."""
  t = 'transformer.'
  out = {t + 'pos_emb': (1, block, width),
         t + 'content_coarse_pos_emb.weight': (coarse, width),
         t + 'content_fine_pos_emb.weight': (fine, width),
         t + 'content_emb.weight': (vocab, width),
         t + 'seg_emb.weight': (2, width)}
  for stack, n in (('position', position_layers), ('content', content_layers)):
    for i in range(n):
      p = f'{t}{stack}_transformer.{i}.'
      for ln in ('ln1', 'ln2'):
        out.update({p + ln + '.weight': (width,), p + ln + '.bias': (width,)})
      out[p + 'attn.mask'] = (1, 1, block, block)
      for lin in ('key', 'query', 'value', 'proj'):
        out.update({f'{p}attn.{lin}.weight': (width, width),
                    f'{p}attn.{lin}.bias': (width,)})
      out.update({p + 'mlp.0.weight': (4 * width, width),
                  p + 'mlp.0.bias': (4 * width,),
                  p + 'mlp.2.weight': (width, 4 * width),
                  p + 'mlp.2.bias': (width,)})
  for head, n in (('position_head', fine), ('content_head', vocab)):
    out.update({f'{t}{head}.0.weight': (width,), f'{t}{head}.0.bias': (width,),
                f'{t}{head}.1.weight': (n, width)})
  return out


def _causal(sd):
  for k, v in sd.items():
    if k.endswith('attn.mask'):
      sd[k] = np.tri(v.shape[-1], dtype=np.float32)[None, None]
  return sd


# --- Names and shapes: the paper-size models against the reference dump. ---


@pytest.mark.parametrize('name', sorted(DQVAES))
def test_dqvae_names_and_shapes_are_the_official_ones(name, reference,
                                                      thresholds):
  shapes = {k: tuple(v) for k, v in reference[name].items()}
  config = official.dqvae_config(shapes, entropy_thresholds=thresholds)
  spec = official.official_spec(_dqvae_table(config))
  assert spec == {k: s for k, s in shapes.items() if not k.startswith('loss.')}
  paper = dqvae.paper_kwargs(DQVAES[name])
  for field in ('grain_factors', 'ch', 'ch_mult', 'num_res_blocks',
                'z_channels', 'dec_ch', 'dec_ch_mult', 'dec_num_res_blocks',
                'codebook_size', 'codebook_dim', 'router'):
    assert tuple(np.atleast_1d(config.model[field])) == tuple(
        np.atleast_1d(paper[field])), field
  assert set(config.model.attn_factors) == set(paper['attn_factors'])
  assert config.model.position_embedding == 'fourier+learned'
  assert config.data.resolution == 256
  if paper['router'] == 'entropy':
    assert tuple(config.model.entropy_bin_range) == (0.0, 1.0)
    assert config.loss.budget_kind == 'none'


@pytest.mark.parametrize('name,classes', [('stackgpt_class_imagenet', 1000),
                                          ('stackgpt_uncond_imagenet', 0)])
def test_stackgpt_names_and_shapes_are_the_official_ones(name, classes,
                                                         reference, thresholds):
  shapes = {k: tuple(v) for k, v in reference[name].items()}
  ref_cfg = reference[name + '_config']
  # The toy generator used below writes exactly these names at full size.
  assert stackgpt_shapes(1024, 6, 18, ref_cfg['vocab_size'],
                         ref_cfg['coarse_position_size'],
                         ref_cfg['fine_position_size'], 2048) == shapes
  tok_cfg = official.dqvae_config(
      {k: tuple(v) for k, v in reference['dqvae_dual_entropy'].items()},
      entropy_thresholds=thresholds)
  config = official.transformer_config(shapes, tok_cfg,
                                       official_config=ref_cfg)
  m = config.model
  assert (m.num_classes, m.width, m.num_heads, m.position_layers,
          m.content_layers, m.block_size, m.label_dropout) == (
              classes, 1024, 8, 6, 18, 2048, 0.0)
  table = _transformer_table(config, tok_cfg)
  assert {**official.official_spec(table), **official.mask_spec(config)} == (
      shapes)


def _transformer_table(config, tok_cfg):
  vae = type('Vae', (), dict(grain_factors=tuple(tok_cfg.model.grain_factors),
                             codebook_size=tok_cfg.model.codebook_size))
  layout = sequence.layout_from_config(config, vae)
  model = transformer_lib.from_config(config.model, layout)
  return official.entries(
      {'params': transformer_lib.abstract_params(model)}, 'transformer')


# --- Values: every kind of layer lands in place; round trips are exact. ---


def test_every_dqvae_parameter_lands_in_place(reference):
  shapes = {k: tuple(v) for k, v in reference['dqvae_dual_feature'].items()}
  sd = _random({k: s for k, s in shapes.items() if not k.startswith('loss.')})
  sd.update(_views({k: s for k, s in shapes.items() if k.startswith('loss.')}))
  config = official.dqvae_config(shapes)
  table = _dqvae_table(config)
  official.check_state_dict(shapes, official.official_spec(table), 'test',
                            ignore_prefixes=('loss.',))
  v = official.from_official(sd, table)
  p = v['params']
  conv = _leaf(p, 'encoder/down_2_block_0/conv1/conv/kernel')   # (3,3,128,256)
  w = sd['encoder.down.2.block.0.conv1.weight']                  # (256,128,3,3)
  assert conv.shape == (3, 3, 128, 256) and conv[1, 2, 5, 7] == w[7, 5, 1, 2]
  np.testing.assert_array_equal(conv, w.transpose(2, 3, 1, 0))
  for ours, theirs in [
      ('encoder/down_0_downsample/conv/conv/kernel',
       'encoder.down.0.downsample.conv.weight'),
      ('decoder/up_3_upsample/conv/conv/kernel', 'decoder.up.3.upsample.conv.weight'),
      ('decoder/conv_out/conv/kernel', 'decoder.conv_out.weight'),
      ('encoder/conv_out_coarse/conv/kernel', 'encoder.conv_out_coarse.weight')]:
    np.testing.assert_array_equal(_leaf(p, ours),
                                  sd[theirs].transpose(2, 3, 1, 0))
  one = {'encoder/down_4_block_0/nin_shortcut/conv/kernel':
             'encoder.down.4.block.0.nin_shortcut.weight',
         'quant_conv/conv/kernel': 'quant_conv.weight',
         'post_quant_conv/conv/kernel': 'post_quant_conv.weight'}
  for ours, theirs in one.items():  # 1x1 convs stay convs: (1,1,I,O)
    np.testing.assert_array_equal(_leaf(p, ours)[0, 0], sd[theirs][:, :, 0, 0].T)
  for proj in ('q', 'k', 'v', 'proj_out'):  # attention 1x1 convs -> Dense
    for block in ('encoder/down_3_attn_1', 'decoder/mid/attn_1'):
      theirs = block.replace('/', '.').replace('_attn_', '.attn.').replace(
          'down_', 'down.')
      kernel = _leaf(p, f'{block}/{proj}/linear/kernel')
      w = sd[f'{theirs}.{proj}.weight']
      assert kernel[3, 11] == w[11, 3, 0, 0]
      np.testing.assert_array_equal(_leaf(p, f'{block}/{proj}/linear/bias'),
                                    sd[f'{theirs}.{proj}.bias'])
  for ours, theirs in {
      'encoder/mid_fine/block_2/norm2/GroupNorm_0': 'encoder.mid_fine.block_2.norm2',
      'decoder/norm_out/GroupNorm_0': 'decoder.norm_out',
      'grain_router/feature_norm_coarse/GroupNorm_0':
          'encoder.router.feature_norm_coarse'}.items():
    np.testing.assert_array_equal(_leaf(p, ours + '/scale'), sd[theirs + '.weight'])
    np.testing.assert_array_equal(_leaf(p, ours + '/bias'), sd[theirs + '.bias'])
  for i in (0, 2):  # the router's Linear layers
    np.testing.assert_array_equal(_leaf(p, f'grain_router/gate_{i}/linear/kernel'),
                                  sd[f'encoder.router.gate.{i}.weight'].T)
  fourier = sd['decoder.position_bias_fourier.lff.ffm.conv.weight']  # (256,2,1,1)
  kernel = _leaf(p, 'decoder/position_bias_fourier/conv/kernel')     # (2, 256)
  assert kernel[1, 9] == fourier[9, 1, 0, 0]  # input 0 is x, 1 is y: kept
  for t in ('row_embed', 'col_embed'):
    np.testing.assert_array_equal(_leaf(p, f'decoder/position_bias_learned/{t}'),
                                  sd[f'decoder.position_bias_learned.{t}.weight'])
  cb = v['codebook']['quantize']
  np.testing.assert_array_equal(cb['embedding'], sd['quantize.codebook.weight'][:1024])
  np.testing.assert_array_equal(cb['cluster_size'],
                                sd['quantize.codebook.cluster_size_ema'])
  np.testing.assert_array_equal(cb['embed_sum'], sd['quantize.codebook.embed_ema'])
  # official -> dqvq -> official: the identity, but for the unused pad row.
  back = official.to_official(v, table)
  assert set(back) == {k for k in sd if not k.startswith('loss.')}
  for k, want in back.items():
    if k == 'quantize.codebook.weight':
      np.testing.assert_array_equal(want[:1024], sd[k][:1024])
      assert not np.any(want[1024])
    else:
      np.testing.assert_array_equal(want, sd[k], err_msg=k)


def _tiny_tokenizer_config(thresholds):
  c = config_lib.stage1_config('runlocal,entropy')
  c.model.entropy_thresholds = thresholds
  c.model.entropy_bin_range = (0.0, 1.0)
  return c


TINY_GPT = dict(width=32, position_layers=1, content_layers=2, block=32)


def _tiny_stackgpt(num_classes, seed=1):
  """Toy StackGPT state dict for the toy tokenizer: 2x2 and 4x4 grids, K=64."""
  sos = max(num_classes, 1)
  shapes = stackgpt_shapes(TINY_GPT['width'], TINY_GPT['position_layers'],
                           TINY_GPT['content_layers'], 64 + 2 + sos,
                           4 + 2 + sos, 16 + 2 + sos, TINY_GPT['block'])
  return _causal(_random(shapes, seed))


def test_every_stackgpt_parameter_lands_in_place(thresholds):
  sd = _tiny_stackgpt(num_classes=3)
  tok_cfg = _tiny_tokenizer_config(thresholds)
  config = official.transformer_config(official.shapes_of(sd), tok_cfg,
                                       num_heads=2)
  assert config.model.num_classes == 3 and config.model.num_heads == 2
  table = _transformer_table(config, tok_cfg)
  official.check_state_dict(official.shapes_of(sd), official.official_spec(table),
                            'test', optional=official.mask_spec(config))
  p = official.from_official(sd, table)['params']
  t = 'transformer.'
  for stack, i in (('position', 0), ('content', 1)):
    for proj in ('query', 'key', 'value', 'proj'):
      kernel = _leaf(p, f'{stack}_transformer_{i}/attn/{proj}/kernel')
      w = sd[f'{t}{stack}_transformer.{i}.attn.{proj}.weight']
      assert kernel[2, 17] == w[17, 2]
      np.testing.assert_array_equal(
          _leaf(p, f'{stack}_transformer_{i}/attn/{proj}/bias'),
          sd[f'{t}{stack}_transformer.{i}.attn.{proj}.bias'])
    for m in (0, 2):
      np.testing.assert_array_equal(
          _leaf(p, f'{stack}_transformer_{i}/mlp_{m}/kernel'),
          sd[f'{t}{stack}_transformer.{i}.mlp.{m}.weight'].T)
    for ln in ('ln1', 'ln2'):
      np.testing.assert_array_equal(
          _leaf(p, f'{stack}_transformer_{i}/{ln}/scale'),
          sd[f'{t}{stack}_transformer.{i}.{ln}.weight'])
  for emb in ('content_emb', 'content_coarse_pos_emb', 'content_fine_pos_emb',
              'seg_emb'):
    np.testing.assert_array_equal(_leaf(p, f'{emb}/embedding'),
                                  sd[f'{t}{emb}.weight'])
  np.testing.assert_array_equal(p['pos_emb'], sd[t + 'pos_emb'])
  for head in ('position', 'content'):
    np.testing.assert_array_equal(_leaf(p, f'{head}_head_ln/bias'),
                                  sd[f'{t}{head}_head.0.bias'])
    np.testing.assert_array_equal(_leaf(p, f'{head}_head/kernel'),
                                  sd[f'{t}{head}_head.1.weight'].T)
  back = official.to_official({'params': p}, table)
  assert set(back) == {k for k in sd if not k.endswith('attn.mask')}
  for k, want in back.items():
    np.testing.assert_array_equal(want, sd[k], err_msg=k)


# --- Bad input: clear errors that name the key or the fix. ---


def test_bad_dqvae_state_dicts_name_the_key(reference, thresholds, tmp_path):
  shapes = {k: tuple(v) for k, v in reference['dqvae_dual_entropy'].items()}
  out = str(tmp_path / 'tok')
  bad = dict(shapes)
  del bad['decoder.mid.attn_1.q.bias']
  bad['encoder.extra.weight'] = (3,)
  bad['decoder.up.3.attn.2.v.weight'] = (256, 256, 3, 3)
  with pytest.raises(ValueError) as e:
    official_bundle.convert_dqvae(_views(bad), out, entropy_thresholds=thresholds)
  msg = str(e.value)
  assert 'missing 1: decoder.mid.attn_1.q.bias' in msg
  assert 'unexpected 1: encoder.extra.weight' in msg
  assert ('decoder.up.3.attn.2.v.weight has shape (256, 256, 3, 3), expected '
          '(256, 256, 1, 1)') in msg
  assert 'loss.' not in msg and not os.path.exists(out)
  with pytest.raises(ValueError, match='entropy_thresholds_imagenet_train'):
    official_bundle.convert_dqvae(_views(shapes), out)
  with pytest.raises(ValueError, match='lacks encoder.conv_in.weight'):
    official_bundle.convert_dqvae(_views({k: s for k, s in shapes.items()
                                   if k != 'encoder.conv_in.weight'}), out,
                           entropy_thresholds=thresholds)
  with pytest.raises(ValueError, match='not an official DQ-VAE'):
    official_bundle.convert_dqvae(_views(reference['stackgpt_uncond_imagenet']), out)
  cfg = {'model': {'params': {'encoderconfig': {'params': {
      'ch_mult': [1, 1, 2, 2, 2], 'resolution': 256}}}}}
  with pytest.raises(ValueError, match=r'encoder ch_mult: config \(1, 1, 2, 2, 2'):
    official.dqvae_config(shapes, entropy_thresholds=thresholds,
                          official_config=cfg)


def test_bad_stackgpt_state_dicts_name_the_problem(thresholds):
  tok_cfg = _tiny_tokenizer_config(thresholds)
  sd = _tiny_stackgpt(num_classes=0)
  shapes = official.shapes_of(sd)
  config = official.transformer_config(shapes, tok_cfg, num_heads=2)
  leaky = dict(sd)
  key = 'transformer.content_transformer.1.attn.mask'
  leaky[key] = np.ones_like(sd[key])
  with pytest.raises(ValueError, match=f'{key} is not the causal'):
    official.check_masks(leaky, official.mask_spec(config))
  other = config_lib.stage1_config('runlocal,entropy')
  other.data.resolution = 64  # 4x4 and 8x8 grids: the tables do not fit
  with pytest.raises(ValueError, match='content_coarse_pos_emb.weight has 7 rows'):
    official.transformer_config(shapes, other, num_heads=2)
  with pytest.raises(ValueError, match='n_embd: config 1024, checkpoint 32'):
    official.transformer_config(shapes, tok_cfg,
                                official_config={'n_embd': 1024, 'n_head': 2})
  with pytest.raises(ValueError, match='not divisible by --num_heads 5'):
    official.transformer_config(shapes, tok_cfg, num_heads=5)


# --- End to end: .npz and .pth files -> CLI -> bundles that work. ---


def _tiny_dqvae_state_dict(thresholds):
  table = _dqvae_table(_tiny_tokenizer_config(thresholds))
  sd = _random(official.official_spec(table), seed=2)
  # Trained EMA state: positive counts; the codebook is sum / count.
  sd['quantize.codebook.cluster_size_ema'] = np.abs(
      sd['quantize.codebook.cluster_size_ema']) + 1.0
  sd['loss.discriminator.main.0.weight'] = np.zeros((4, 3, 4, 4), np.float32)
  return sd


def _pickle_str(s):
  b = s.encode()
  return b'X' + struct.pack('<I', len(b)) + b


def _pickle_ints(xs):
  body = b''.join(b'J' + struct.pack('<i', int(x)) for x in xs)
  return b'(' + body + b't' if xs else b')'


def write_lightning_pth(path, state_dict, global_step):
  """A torch zip file as Lightning writes one, without torch.

  Protocol-2 pickle of {'state_dict': {k: tensor}, 'global_step': int,
  'callbacks': {<ModelCheckpoint class>: {}}}: the class key is a global
  that plain `torch_checkpoint.load` refuses, as a real checkpoint's.
  """
  parts, storages = [b'\x80\x02}(', _pickle_str('state_dict'), b'}('], {}
  for i, (k, v) in enumerate(state_dict.items()):
    v = np.ascontiguousarray(v, np.float32)
    storages[str(i)] = v.tobytes()
    strides = [int(np.prod(v.shape[d + 1:])) for d in range(v.ndim)]
    parts += [_pickle_str(k), b'ctorch._utils\n_rebuild_tensor_v2\n(',
              b'(', _pickle_str('storage'), b'ctorch\nFloatStorage\n',
              _pickle_str(str(i)), _pickle_str('cpu'),
              b'J' + struct.pack('<i', v.size), b'tQ',
              b'J' + struct.pack('<i', 0), _pickle_ints(v.shape),
              _pickle_ints(strides), b'\x89',
              b'ccollections\nOrderedDict\n)R', b'tR']
  parts += [b'u', _pickle_str('global_step'),
            b'J' + struct.pack('<i', global_step), _pickle_str('callbacks'),
            b'}', b'cpytorch_lightning.callbacks.model_checkpoint\n'
            b'ModelCheckpoint\n', b'}s', b'u.']
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', b''.join(parts))
    zf.writestr('archive/byteorder', 'little')
    for key, data in storages.items():
      zf.writestr(f'archive/data/{key}', data)


@pytest.fixture(scope='module')
def tiny_tokenizer(tmp_path_factory, thresholds):
  """(state dict, bundle path) of a toy entropy DQ-VAE via `python -m`."""
  tmp = tmp_path_factory.mktemp('official_tok')
  sd = _tiny_dqvae_state_dict(thresholds)
  np.savez(tmp / 'dqvae.npz', **sd)
  out = str(tmp / 'tokenizer')
  run = subprocess.run(
      [sys.executable, '-m', 'dqvq.convert', 'official', '--kind', 'dqvae',
       '--ckpt', str(tmp / 'dqvae.npz'), '--entropy_thresholds', thresholds,
       '--out', out], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
      capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr
  mapped = len([k for k in sd if not k.startswith('loss.')])
  assert f'mapped {mapped} official keys' in run.stdout, run.stdout
  assert "'loss.*': 1" in run.stdout
  return sd, out


def test_converted_tokenizer_encodes_and_decodes(tiny_tokenizer, thresholds):
  sd, path = tiny_tokenizer
  tok = dqvq.load_tokenizer(path)
  want = _tiny_tokenizer_config(thresholds).model
  for field in ('grain_factors', 'ch', 'ch_mult', 'num_res_blocks',
                'attn_factors', 'dec_num_res_blocks', 'codebook_size',
                'router', 'entropy_bin_range', 'position_embedding'):
    assert tuple(np.atleast_1d(tok.config.model[field])) == tuple(
        np.atleast_1d(want[field])), field
  np.testing.assert_array_equal(
      tok.params['decoder']['up_3_attn_0']['k']['linear']['kernel'],
      sd['decoder.up.3.attn.0.k.weight'][:, :, 0, 0].T)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3))
  # Jitted: one compile instead of op-by-op dispatch (seconds on CPU).
  out = jax.jit(lambda t, x: t.encode(x))(tok, images.astype(np.float32))
  assert out['codes'].shape == (2, 4, 4) and out['grain_map'].shape == (2, 2, 2)
  # Codes are the nearest rows of the imported codebook (weight[:K]).
  assert int(np.max(out['codes'])) < 64
  recon = jax.jit(lambda t, c: t.decode(c))(tok, out['codes'])
  assert recon.shape == (2, 32, 32, 3) and np.all(np.isfinite(recon))
  manifest = json.load(open(os.path.join(path, 'bundle.json')))
  assert manifest['meta']['official_keys_mapped'] == len(sd) - 1  # no loss.*
  assert os.path.exists(os.path.join(path, 'entropy_thresholds.json'))


def test_pth_lightning_checkpoint(tiny_tokenizer, thresholds, tmp_path):
  sd, _ = tiny_tokenizer
  path = str(tmp_path / 'dqvae.ckpt')
  write_lightning_pth(path, sd, global_step=7)
  with pytest.raises(pickle.UnpicklingError, match='ModelCheckpoint'):
    pretrained.read_state_dict(path)  # the plain reader refuses unknown globals
  got, info = pretrained.read_checkpoint(path, allow_unknown=True)
  assert info == {'global_step': 7} and sorted(got) == sorted(sd)
  out = str(tmp_path / 'tok')
  assert convert.main(['official', '--kind', 'dqvae', '--ckpt', path,
                       '--entropy_thresholds', thresholds, '--out', out]) == 0
  tok = dqvq.load_tokenizer(out)
  assert tok.step == 7
  np.testing.assert_array_equal(tok.codebook['quantize']['embedding'],
                                sd['quantize.codebook.weight'][:64])
  # No thresholds: an error naming the option, not a traceback.
  assert convert.main(['official', '--kind', 'dqvae', '--ckpt', path,
                       '--out', str(tmp_path / 'x')]) == 1


def test_converted_generator_samples_and_goes_back(tiny_tokenizer, tmp_path):
  tok_sd, tok_path = tiny_tokenizer
  sd = _tiny_stackgpt(num_classes=3)
  sd.update({f'first_stage_model.{k}': v for k, v in tok_sd.items()
             if not k.startswith('loss.')})
  np.savez(tmp_path / 'gpt.npz', **sd)
  out = str(tmp_path / 'gen')
  args = ['--ckpt', str(tmp_path / 'gpt.npz'), '--kind', 'transformer',
          '--num_heads', '2']
  assert convert.main(['--from', 'official', *args, '--out', out]) == 1  # no --tokenizer
  assert convert.main(['--from', 'official', *args, '--tokenizer', tok_path,
                       '--out', out]) == 0
  gen = dqvq.load_generator(out)
  assert gen.layout.num_classes == 3 and gen.model.num_heads == 2
  np.testing.assert_array_equal(
      gen.params['content_transformer_1']['attn']['value']['kernel'],
      sd['transformer.content_transformer.1.attn.value.weight'].T)
  samples = gen.sample(2, class_labels=[0, 2], batch_size=2)
  assert samples['image'].shape == (2, 32, 32, 3)
  assert np.all(samples['writes'] == 1) and list(samples['label']) == [0, 2]
  # Back to official names: the input again (masks and first stage included).
  back_file = str(tmp_path / 'back.npz')
  assert convert.main(['to_official', '--bundle', out, '--out', back_file]) == 0
  back = pretrained.read_state_dict(back_file)
  assert sorted(back) == sorted(sd)
  for k, want in sd.items():
    got = back[k]
    if k.endswith('quantize.codebook.weight'):
      got, want = got[:-1], want[:-1]
    np.testing.assert_array_equal(got, want, err_msg=k)
  # A StackGPT checkpoint whose own DQ-VAE is not the --tokenizer.
  sd['first_stage_model.decoder.conv_in.bias'] = sd[
      'first_stage_model.decoder.conv_in.bias'] + 1.0
  with pytest.raises(ValueError, match='decoder.conv_in.bias differs from the '
                     '--tokenizer'):
    official_bundle.convert_transformer(sd, str(tmp_path / 'gen2'), tok_path,
                                 num_heads=2)
