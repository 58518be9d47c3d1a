"""Token datasets: written == encoded, metadata, verify, grain reader, CLI.

One 2-step demo stage-1 run (module fixture) is the tokenizer; the token
dataset is written from small slices of the demo splits so the file stays
fast on two CPU cores.
"""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from dqvq.data import pipeline
from dqvq.data import sources as sources_lib
from dqvq.data import token_pipeline
from dqvq.data import tokens as tokens_lib
from dqvq.inference import tokenizer as tokenizer_lib

BATCH = 16
TRAIN, EVAL = 48, 40  # examples in the sliced splits
# The demo's train split holds 14 whole photographs; its fixed validation
# crops stand in for both splits here (disjoint slices).
SOURCES = {'train': f'validation[:{TRAIN}]',
           'validation': f'validation[-{EVAL}:]'}


@pytest.fixture(scope='module')
def tokenizer(stage1_workdir) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.load_stage1(stage1_workdir)


@pytest.fixture(scope='module')
def data_config(tokenizer) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(tokenizer.config.data.to_dict())
  c.train_split, c.eval_split = SOURCES['train'], SOURCES['validation']
  return c


@pytest.fixture(scope='module')
def tokens_dir(tokenizer, data_config, stage1_workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('tokens'))
  tokens_lib.write_token_dataset(tokenizer, out, data_config=data_config,
                                 batch_size=BATCH, flip=True,
                                 stage1_workdir=stage1_workdir)
  return out


def _stored(tokens_dir, split):
  src = tokens_lib.open_token_split(tokens_dir, split)
  rows = [src[i] for i in range(len(src))]
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


def test_tokens_equal_encoding_of_eval_images(tokens_dir, tokenizer,
                                              data_config):
  stored = _stored(tokens_dir, 'validation')
  assert stored['codes'].dtype == np.int16
  assert stored['grain_map'].dtype == np.uint8
  np.testing.assert_array_equal(stored['index'], np.arange(EVAL))
  source = sources_lib.load_sources(data_config).eval
  encode = jax.jit(tokenizer.encode)
  want = {'codes': [], 'grain_map': [], 'label': [], 'codes_flipped': [],
          'grain_map_flipped': []}
  for batch in pipeline.make_eval_dataset(source, resolution=32,
                                          host_batch_size=BATCH):
    n = int(batch['mask'].sum())
    for suffix, images in (('', batch['image']),
                           ('_flipped', batch['image'][:, :, ::-1])):
      out = jax.device_get(encode(np.ascontiguousarray(images)))
      want['codes' + suffix].append(out['codes'][:n])
      want['grain_map' + suffix].append(out['grain_map'][:n])
    want['label'].append(batch['label'][:n])
  for key, parts in want.items():
    np.testing.assert_array_equal(stored[key], np.concatenate(parts), key)
  assert len(np.unique(stored['codes'])) > 1  # a real test, not all zeros


def test_metadata_complete(tokens_dir, tokenizer, stage1_workdir):
  meta = tokens_lib.read_metadata(tokens_dir)
  assert meta['fingerprint'] == tokenizer.fingerprint
  assert meta['stage1_step'] == tokenizer.step == 2
  assert meta['stage1_workdir'] == os.path.abspath(stage1_workdir)
  assert meta['resolution'] == 32 and meta['grain_factors'] == [8, 4]
  assert meta['codebook_size'] == 256 and meta['codes_dtype'] == 'int16'
  assert (meta['code_grid'], meta['region_grid']) == (8, 4)
  assert meta['num_classes'] == 17 and meta['flip'] is True
  assert meta['dataset'] == 'dqvq_demo' and meta['batch_size'] == BATCH
  assert meta['encode_devices'] == 8 and meta['platform'] == 'cpu'
  for split, n in (('train', TRAIN), ('validation', EVAL)):
    info = meta['splits'][split]
    assert info['source_split'] == SOURCES[split]
    assert info['num_examples'] == info['num_source_examples'] == n
    assert info['num_skipped'] == 0
    lengths = _stored(tokens_dir, split)['grain_map'] * 3 + 1  # 1 or 4
    np.testing.assert_allclose(info['mean_code_length'],
                               lengths.sum(axis=(1, 2)).mean())


def test_verify_passes_and_rejects_other_checkpoints(tokens_dir, tokenizer,
                                                     tmp_path):
  tokens_lib.verify_token_dataset(tokenizer, tokens_dir, num_images=20)
  # Another device layout (one device, as on a pod) verifies with tolerance.
  host = tokenizer.replace(params=jax.device_get(tokenizer.params),
                           codebook=jax.device_get(tokenizer.codebook))
  tokens_lib.verify_token_dataset(host, tokens_dir)
  # Tokens recorded as made by another checkpoint.
  other = str(tmp_path / 'other')
  shutil.copytree(tokens_dir, other)
  meta_path = os.path.join(other, tokens_lib.METADATA_FILE)
  with open(meta_path) as f:
    meta = json.load(f)
  meta['fingerprint'] = '0123456789abcdef'
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  with pytest.raises(ValueError, match=r'another stage-1 checkpoint(.|\n)*'
                     r'0123456789abcdef(.|\n)*python -m dqvq.tokenize '
                     r'--stage1_workdir'):
    tokens_lib.verify_token_dataset(tokenizer, other)
  # Same fingerprint, other weights: caught by re-encoding.
  perturb = jax.jit(lambda t: jax.tree.map(
      lambda p: p + 0.5 * jax.numpy.sign(p), t))  # one compile, same shardings
  changed = tokenizer.replace(params=perturb(tokenizer.params))
  with pytest.raises(ValueError, match=r'differ from what this tokenizer '
                     r'encodes(.|\n)*exactly(.|\n)*python -m dqvq.tokenize'):
    tokens_lib.verify_token_dataset(changed, tokens_dir)


def test_missing_token_dir_names_the_command(tmp_path):
  for path in (str(tmp_path / 'nope'), str(tmp_path)):
    with pytest.raises(FileNotFoundError, match='python -m dqvq.tokenize'):
      token_pipeline.create_token_datasets(path, global_batch_size=8, seed=0)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _rows(batches, key='codes'):
  return np.concatenate([b[key] for b in batches])


def test_dataset_shapes_eval_coverage_and_sharding(tokens_dir):
  stored = _stored(tokens_dir, 'validation')
  shards = [token_pipeline.create_token_datasets(
      tokens_dir, global_batch_size=8, eval_batch_size=12, seed=0,
      shard_index=i, shard_count=2) for i in range(2)]
  batch = next(iter(shards[0].train))
  want = {'codes': (np.int32, (4, 8, 8)), 'grain_map': (np.int32, (4, 4, 4)),
          'label': (np.int32, (4,)), 'mask': (np.bool_, (4,))}
  assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == want
  assert shards[0].num_classes == 17 and shards[0].host_batch_size == 4
  assert shards[0].num_eval_examples == EVAL
  evals = [list(s.eval) for s in shards]
  assert [len(e) for e in evals] == [s.eval_batches for s in shards] == [4, 4]
  for i, batches in enumerate(evals):  # host i holds examples i, i+2, ...
    mask = np.concatenate([b['mask'] for b in batches])
    assert mask.sum() == EVAL // 2 and mask[:EVAL // 2].all()
    for key in ('codes', 'grain_map', 'label'):
      np.testing.assert_array_equal(_rows(batches, key)[mask],
                                    stored[key][i::2])
  # Train: the two hosts split one global permutation.
  single = token_pipeline.create_token_datasets(tokens_dir, global_batch_size=8,
                                            seed=0, shard_count=1,
                                            shard_index=0)
  whole = _take(iter(single.train), 2)
  halves = [_take(iter(s.train), 2) for s in shards]
  for step in range(2):
    interleaved = np.stack([halves[0][step]['codes'],
                            halves[1][step]['codes']], axis=1)
    np.testing.assert_array_equal(interleaved.reshape(8, 8, 8),
                                  whole[step]['codes'])


def _keys(codes, grain_map):
  n = len(codes)
  return [r.tobytes() for r in np.concatenate(
      [codes.reshape(n, -1), grain_map.reshape(n, -1)], 1).astype(np.int32)]


def test_train_order_seeded_flipped_and_resumable(tokens_dir):
  stored = _stored(tokens_dir, 'train')
  make = lambda seed: token_pipeline.create_token_datasets(
      tokens_dir, global_batch_size=BATCH, seed=seed, shard_count=1,
      shard_index=0).train
  epochs = _take(iter(make(1)), 2 * TRAIN // BATCH)
  np.testing.assert_array_equal(_rows(epochs), _rows(_take(iter(make(1)), 6)))
  assert not np.array_equal(_rows(epochs), _rows(_take(iter(make(2)), 6)))
  # Each epoch is a new permutation; each row is the plain or flipped tokens.
  lookup = {k: (i, False) for i, k in enumerate(
      _keys(stored['codes'], stored['grain_map']))}
  lookup.update({k: (i, True) for i, k in enumerate(
      _keys(stored['codes_flipped'], stored['grain_map_flipped']))})
  assert len(lookup) == 2 * TRAIN  # all distinct: rows identify examples
  per_epoch = len(epochs) // 2
  picked = [[lookup[k] for k in _keys(_rows(part), _rows(part, 'grain_map'))]
            for part in (epochs[:per_epoch], epochs[per_epoch:])]
  for epoch in picked:
    assert sorted(i for i, _ in epoch) == list(range(TRAIN))
  assert [i for i, _ in picked[0]] != [i for i, _ in picked[1]]
  assert 0 < sum(f for epoch in picked for _, f in epoch) < 2 * TRAIN
  # get_state / set_state resumes at exactly the next batch.
  it = iter(make(1))
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 2)
  resumed = iter(make(1))
  resumed.set_state(json.loads(json.dumps(state)))
  for a, b in zip(expected, _take(resumed, 2)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_cli_end_to_end(stage1_workdir, demo_data_dir, tmp_path, capsys):
  from dqvq import tokenize  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'cli_tokens')
  argv = [f'--stage1_workdir={stage1_workdir}', f'--out={out}',
          '--splits=validation[:32]', f'--batch_size={BATCH}',
          f'--data_dir={demo_data_dir}']
  meta = tokenize.main(argv)
  printed = capsys.readouterr().out
  assert 'Verified' in printed and 'mean code length' in printed
  assert list(meta['splits']) == ['validation']
  assert meta['splits']['validation']['num_examples'] == 32
  assert meta['splits']['validation']['source_split'] == 'validation[:32]'
  with pytest.raises(FileExistsError):
    tokenize.main(argv)
  ds = token_pipeline.create_token_datasets(out, global_batch_size=BATCH, seed=0,
                                        train_split='validation')
  assert next(iter(ds.train))['codes'].shape == (BATCH, 8, 8)
