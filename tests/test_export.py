"""Export -> bundle -> library API gives what the training checkpoint gives."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dqvq
from dqvq import export
from dqvq.inference import bundle
from dqvq.inference import generator as generator_lib
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq import sampling


def _images(tok, n=2, seed=0):
  res = tok.config.data.resolution
  return jax.random.uniform(jax.random.key(seed), (n, res, res, 3),
                            minval=-1.0, maxval=1.0)


def test_tokenizer_bundle_round_trip(stage1_workdir, tmp_path):
  path = export.export_run(stage1_workdir, str(tmp_path / 'tok'),
                           programs=['encode', 'decode'])
  manifest = json.load(open(os.path.join(path, 'bundle.json')))
  assert manifest['kind'] == 'tokenizer' and manifest['config']['stage'] == 1
  assert not os.path.exists(os.path.join(path, 'variables', 'opt_state'))
  ref = tokenizer_lib.load_stage1(stage1_workdir)
  tok = dqvq.load_tokenizer(path)
  assert tok.fingerprint == ref.fingerprint
  x = _images(tok)
  want, got = ref.encode(x), tok.encode(x)
  for k in ('codes', 'grain_map', 'code_length'):
    np.testing.assert_array_equal(got[k], want[k])
  np.testing.assert_array_equal(tok.decode(got['codes']),
                                ref.decode(want['codes']))
  # The serialized programs, with a batch size they were not traced at.
  x3 = _images(tok, n=3, seed=1)
  enc = bundle.load_program(path, 'encode').call(tok.variables, x3)
  np.testing.assert_array_equal(enc['codes'], tok.encode(x3)['codes'])
  dec = bundle.load_program(path, 'decode').call(tok.variables, enc['codes'])
  np.testing.assert_allclose(dec, tok.decode(enc['codes']), atol=1e-5)


def test_tokenizer_budget_at_inference(stage1_workdir, tmp_path):
  """The demo's router takes a per-call budget through the exported bundle:
  its regions, ranked by the gate, go fine in the requested share, so photos
  get longer codes for a larger fine share (the exact per-image budget is
  tested in test_dqvae.py, the entropy router's budget thresholds in
  test_entropy.py)."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  tok = dqvq.load_tokenizer(export.export_run(stage1_workdir,
                                              str(tmp_path / 'tok')))
  res = tok.config.data.resolution
  photos = [skimage.data.astronaut(), skimage.data.coffee(),
            skimage.data.chelsea()]
  x = jnp.stack([jax.image.resize(jnp.asarray(p[:300, :300], jnp.float32),
                                  (res, res, 3), 'bilinear') for p in photos])
  x = x / 127.5 - 1.0
  lengths = [np.asarray(tok.encode(x, grain_ratios=(1.0 - r, r))
                        ['code_length']) for r in (0.1, 0.5, 0.9)]
  assert np.all(lengths[0] <= lengths[1]) and np.all(lengths[1] <= lengths[2])
  assert lengths[0].sum() < lengths[2].sum()
  lo, hi = [(tok.vae.grain_factors[0] // f) ** 2 * tok.encode(x)[
      'grain_map'][0].size for f in tok.vae.grain_factors]
  assert np.all((lengths[0] >= lo) & (lengths[2] <= hi))


def test_generator_bundle_samples_like_the_run(stage2_workdir, tmp_path):
  path = export.export_run(stage2_workdir, str(tmp_path / 'gen'),
                           programs=['sample'], program_batch=2)
  assert os.path.exists(os.path.join(path, 'tokenizer', 'bundle.json'))
  run = generator_lib.load_run(stage2_workdir)
  gen = dqvq.load_generator(path)
  config = sampling.SamplingConfig(top_k_content=20, seed=3)
  want = run.sample(2, class_labels=[1, 4], config=config, batch_size=2)
  got = gen.sample(2, class_labels=[1, 4], config=config, batch_size=2)
  for k in ('content', 'position', 'codes', 'grain_map', 'label'):
    np.testing.assert_array_equal(got[k], want[k])
  np.testing.assert_array_equal(got['image'], want['image'])
  assert np.all(got['writes'] == 1)
  # The exported sample program draws the same tokens for the same key.
  program = bundle.load_program(path, 'sample')
  key = jax.random.fold_in(jax.random.key(3), 0)
  out = program.call(gen.params, jnp.array([1, 4], jnp.int32),
                     jax.random.key_data(key))
  ref = generator_lib.Generator(gen.model, gen.params, gen.layout,
                                gen.tokenizer, gen.config, gen.mesh)
  ref = ref.sample(2, class_labels=[1, 4], batch_size=2,
                   config=sampling.SamplingConfig(seed=3))
  np.testing.assert_array_equal(out['content'], ref['content'])
  np.testing.assert_array_equal(out['codes'], ref['codes'])


def test_bundle_errors_name_the_fix(stage1_workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match='dqvq.export --workdir'):
    dqvq.load_tokenizer(stage1_workdir)
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    export.export_run(str(tmp_path), str(tmp_path / 'x'))
  path = export.export_run(stage1_workdir, str(tmp_path / 'tok'))
  with pytest.raises(FileExistsError, match='pick a new'):
    export.export_run(stage1_workdir, path)
  with pytest.raises(ValueError, match='load it with dqvq.load_tokenizer'):
    dqvq.load_generator(path)
  with pytest.raises(FileNotFoundError, match='--programs encode'):
    bundle.load_program(path, 'encode')
  # A bundle whose config no longer matches its weights.
  manifest_file = os.path.join(path, 'bundle.json')
  manifest = json.load(open(manifest_file))
  manifest['config']['model']['codebook_size'] *= 2
  json.dump(manifest, open(manifest_file, 'w'))
  with pytest.raises(ValueError, match='has shape'):
    dqvq.load_tokenizer(path)
