"""The library API refuses what it cannot mean, naming the fix (issue 19).

Each case used to return garbage without a word: unscaled or NaN images
(all-coarse codes, code 0 everywhere), codes outside the codebook (NaN
images), labels an unconditional generator ignored or a float label
truncated, empty sample counts, impossible SamplingConfigs, and a truncated
weight file surfacing as a TensorStore repr. The demo's bundles (exported
from the shared 2-step runs) are the objects a new user would load.
"""

import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dqvq
from dqvq import export
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq import sampling


@pytest.fixture(scope='module')
def tok_bundle(stage1_workdir, tmp_path_factory) -> str:
  return export.export_run(stage1_workdir,
                           str(tmp_path_factory.mktemp('b') / 'tok'))


@pytest.fixture(scope='module')
def tok(tok_bundle):
  return dqvq.load_tokenizer(tok_bundle)


@pytest.fixture(scope='module')
def gen(stage2_workdir, tmp_path_factory):
  return dqvq.load_generator(export.export_run(
      stage2_workdir, str(tmp_path_factory.mktemp('b') / 'gen')))


def _images(tok, n=2):
  res = tok.config.data.resolution
  return jax.random.uniform(jax.random.key(0), (n, res, res, 3),
                            minval=-1.0, maxval=1.0)


def test_encode_refuses_uint8_and_unscaled_images(tok):
  x = _images(tok)
  with pytest.raises(ValueError, match=r'uint8.*x / 127\.5 - 1'):
    tok.encode(np.asarray((x + 1) * 127.5, np.uint8))
  with pytest.raises(ValueError, match=r'\[-1, 1\] \(they look like \[0, 255'):
    tok.encode((x + 1) * 127.5)
  with pytest.raises(ValueError, match=r'span \[-3\.\d+, 2\.\d+\]; encode '
                     r'takes float images in \[-1, 1\] \(rescale them\)'):
    tok.encode(x * 3.0 - 0.1)
  with pytest.raises(ValueError, match=r'\(B, H, W, 3\), channels last'):
    tok.encode(jnp.moveaxis(x, -1, 1))
  # [0, 1] images lie in [-1, 1], and round-off past 1 is tolerated
  # (encoding valid images: test_export.py).
  tokenizer_lib.check_images((x + 1) / 2)
  tokenizer_lib.check_images(x.at[0, 0, 0, 0].set(1.0005))
  with pytest.raises(ValueError, match=r'span \[-1, 1\.01\]'):
    tokenizer_lib.check_images(x.at[0, 0, 0, 0].set(1.01).at[1].set(-1.0))


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite_images(tok, bad):
  x = np.array(_images(tok))
  x[1, 3, 4, 2] = bad
  with pytest.raises(ValueError, match=r'NaN or inf .*finite float images'):
    tok.encode(x)


def test_decode_refuses_codes_outside_the_codebook(tok):
  v = tok.vae.codebook_size
  grid = tok.config.data.resolution // tok.vae.grain_factors[-1]
  codes = jnp.zeros((2, grid, grid), jnp.int32)
  # Both ends of the codebook pass (decoding valid codes: test_export.py).
  tokenizer_lib.check_codes(codes.at[1].set(v - 1), v)
  valid = rf'\[0, {v - 1}\] \(this codebook has {v} codes\)'
  with pytest.raises(ValueError, match=rf'span \[-1, .*{valid}'):
    tok.decode(codes.at[0, 1, 1].set(-1))
  with pytest.raises(ValueError, match=rf'span \[\d+, {v}\].*{valid}'):
    tok.decode(np.full_like(np.asarray(codes), v))
  with pytest.raises(ValueError, match=rf'dtype float32.*{valid}'):
    tok.decode(codes.astype(jnp.float32))
  with pytest.raises(ValueError, match=r'\(B, G, G\)'):
    tok.decode(codes[0])


def test_check_inputs_false_and_jit(tok):
  """Values are only checked on concrete arrays; dtypes also under jit.

  eval_shape traces like jit without compiling: the model itself takes
  uint8 images (the bug), so only the check stands in their way.
  """
  x255 = (_images(tok) + 1) * 127.5
  shapes = jax.eval_shape(tok.encode, x255)  # a tracer has no values
  assert shapes['codes'].dtype == jnp.int32
  with pytest.raises(ValueError, match='x / 127.5 - 1'):
    jax.eval_shape(tok.encode, x255.astype(jnp.uint8))
  unchecked = functools.partial(tok.encode, check_inputs=False)
  out = jax.eval_shape(unchecked, x255.astype(jnp.uint8))
  assert out['codes'].shape[0] == 2


def test_encode_and_decode_are_compiled_once_per_shape_and_budget(tok):
  """One program per input shape and budget, reused for new values (op by
  op, an encode of the demo model cost ~5 s of dispatch per call); a budget
  given as a list works like the tuple."""
  encode, decode = tokenizer_lib._encode, tokenizer_lib._decode
  x = _images(tok)
  out = tok.encode(x, grain_ratios=[0.5, 0.5])
  tok.decode(out['codes'])
  sizes = encode._cache_size(), decode._cache_size()
  again = tok.encode(x * 0.5, grain_ratios=(0.5, 0.5))
  tok.decode(again['codes'])
  assert (encode._cache_size(), decode._cache_size()) == sizes
  np.testing.assert_array_equal(
      tok.encode(x, grain_ratios=(0.5, 0.5))['codes'], out['codes'])


def test_sample_refuses_labels_it_cannot_mean(gen):
  n = gen.layout.num_classes
  assert n > 0
  with pytest.raises(ValueError, match=r'\[3\.7\] must be integers'):
    gen.sample(1, class_labels=[3.7])
  with pytest.raises(ValueError, match=rf'\[{n}\] outside \[0, {n}\)'):
    gen.sample(1, class_labels=[0, n])
  with pytest.raises(ValueError, match=r'\[-1\] outside'):
    gen.sample(1, class_labels=[-1])
  np.testing.assert_array_equal(gen.labels_for(3, [1.0, 2]), [1, 2, 1])
  np.testing.assert_array_equal(gen.labels_for(n + 1), [*range(n), 0])
  # The check runs before the layout reaches the model, so an unconditional
  # layout on the same weights stands in for an unconditional bundle.
  uncond = dataclasses.replace(gen, layout=dataclasses.replace(
      gen.layout, num_classes=0, null_class=False))
  with pytest.raises(ValueError, match='this generator is unconditional'):
    uncond.sample(1, class_labels=[207])
  np.testing.assert_array_equal(uncond.labels_for(2), [0, 0])


@pytest.mark.parametrize('num_images', [0, -2, 2.0, True])
def test_sample_refuses_counts_that_are_not_positive_ints(gen, num_images):
  with pytest.raises(ValueError, match=r'num_images=.*a positive int'):
    gen.sample(num_images)


def test_sample_refuses_bad_batch_size(gen):
  with pytest.raises(ValueError, match=r'batch_size=-4; give an int >= 0'):
    gen.sample(2, batch_size=-4)


@pytest.mark.parametrize('field,value,want', [
    ('top_k_content', -5, r'int >= 0'),
    ('top_k_position', 2.5, r'int >= 0'),
    ('temperature_content', 0.0, r'> 0'),
    ('temperature_position', float('nan'), r'> 0'),
    ('top_p_content', 0.0, r'\(0, 1\]'),
    ('top_p_position', 1.5, r'\(0, 1\]'),
    ('cfg_scale_content', float('inf'), r'finite'),
    ('greedy', 'yes', r'bool'),
    ('min_codes', (-1, 3), r'int >= 0 per granularity'),
    ('max_codes', 64, r'int >= 0 per granularity'),
    ('seed', 1.5, r'int'),
])
def test_sampling_config_refuses_impossible_settings(field, value, want):
  with pytest.raises(ValueError, match=rf'SamplingConfig\.{field}=.*{want}'):
    sampling.SamplingConfig(**{field: value})


def test_sampling_config_counts_become_tuples():
  config = sampling.SamplingConfig(min_codes=[1, 2], max_codes=np.array([4, 9]))
  assert config.min_codes == (1, 2) and config.max_codes == (4, 9)
  assert hash(config) == hash(sampling.SamplingConfig(min_codes=(1, 2),
                                                      max_codes=(4, 9)))


def _damaged_copy(tok_bundle, tmp_path, damage):
  """A copy of the bundle with its largest weight file damaged by `damage`."""
  path = str(tmp_path / 'copy')
  shutil.copytree(tok_bundle, path)
  data = os.path.join(path, 'variables', 'ocdbt.process_0', 'd')
  files = [os.path.join(data, f) for f in os.listdir(data)]
  damage(max(files, key=os.path.getsize))
  return path


def _assert_clear(err, path):
  message = str(err.value)
  assert path in message and 're-export' in message
  assert 'TensorStore' not in message and 'pybind' not in message


def test_truncated_weight_file_is_a_damaged_bundle(tok_bundle, tmp_path,
                                                   capfd, caplog):
  """Caught by the sizes export recorded, before Orbax reads a byte."""
  def truncate(file):
    with open(file, 'r+b') as f:
      f.truncate(os.path.getsize(file) // 2)
  path = _damaged_copy(tok_bundle, tmp_path, truncate)
  with pytest.raises(ValueError, match=r'damaged \(variables/ocdbt.*/d/\w+ '
                     r'has \d+ bytes, the export wrote \d+\)') as err:
    dqvq.load_tokenizer(path)
  _assert_clear(err, path)
  logged = ''.join(capfd.readouterr()) + caplog.text
  assert 'never retrieved' not in logged and 'TensorStore' not in logged


def test_unreadable_weight_file_is_a_damaged_bundle(tok_bundle, tmp_path):
  """Same size, other bytes: the size record passes; then either Orbax's
  read fails (a chunk that no longer decodes) or the weights read back and
  miss the export's fingerprint (raw bytes), by where the write lands."""
  def overwrite(file):
    with open(file, 'r+b') as f:
      f.seek(os.path.getsize(file) // 3)
      f.write(b'\x07' * 4096)
  path = _damaged_copy(tok_bundle, tmp_path, overwrite)
  with pytest.raises(ValueError, match=r'damaged \((Orbax cannot read '
                     r'variables/|the weights do not match the fingerprint '
                     r'\w+ recorded at export)\).*re-export') as err:
    dqvq.load_tokenizer(path)
  if 'Orbax' in str(err.value):
    assert err.value.__cause__ is not None  # Orbax's error, for debugging
  _assert_clear(err, path)
