"""dqvq.codec: images to .dqvq files and back, exactly (issue 17).

The generators are the demo's `:runlocal` models at random init (a random
transformer is as good an entropy model as any for exactness), saved as
bundles and loaded as users load them: one class-conditional with slot
positions, one unconditional with compact positions. Nothing trains.
"""

import os
import subprocess
import sys

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
import dqvq
from dqvq import codec
from dqvq.inference import codec_format
from dqvq.inference import generator as generator_lib
from dqvq.inference import image_codec
from dqvq.inference import stream_coder
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq.models import dqvae
from dqvq.models import transformer as transformer_lib
from dqvq import sequence
from dqvq import sharding
from dqvq import visualize
import test_train

LABELS = [1, 5, 9]


def _random_generator(seed: int, num_classes: int, position_index: str
                      ) -> generator_lib.Generator:
  """The demo's tiny tokenizer and transformer, randomly initialised."""
  demo = conftest.load_config('demo')
  c1 = demo.stage1_config('runlocal')
  res = c1.data.resolution
  vae = dqvae.from_config(c1.model)
  rngs = {k: jax.random.key(seed) for k in ('params', 'gumbel', 'restart',
                                            'router', 'dropout')}
  v = jax.jit(vae.init)(rngs, jnp.zeros((1, res, res, 3)))
  tok = tokenizer_lib.Tokenizer(
      params=v['params'], codebook=v['codebook'], vae=vae, config=c1,
      fingerprint=tokenizer_lib.fingerprint((v['params'], v['codebook'])))
  c2 = demo.get_config('runlocal')
  c2.model.num_classes = num_classes
  c2.model.position_index = position_index
  model, layout = generator_lib.build_model(c2, tok)
  params = nn.unbox(jax.jit(
      lambda r: transformer_lib.init_variables(model, r))(
          jax.random.key(seed + 1))['params'])
  return generator_lib.Generator(model, params, layout, tok, c2,
                                 sharding.create_mesh())


@pytest.fixture(scope='module')
def bundles(tmp_path_factory):
  root = tmp_path_factory.mktemp('codec_bundles')
  return {
      'cond': generator_lib.save_bundle(_random_generator(0, 14, 'slot'),
                                        str(root / 'cond')),
      'uncond': generator_lib.save_bundle(_random_generator(1, 0, 'compact'),
                                          str(root / 'uncond'))}


@pytest.fixture(scope='module')
def gen(bundles):
  return dqvq.load_generator(bundles['cond'])


@pytest.fixture(scope='module')
def uncond(bundles):
  return dqvq.load_generator(bundles['uncond'])


@pytest.fixture(scope='module')
def images(gen):
  res = gen.config.data.resolution
  smooth = jnp.linspace(-1.0, 1.0, res)[None, :, None, None] * jnp.ones(
      (1, 1, res, 3))
  noise = jax.random.uniform(jax.random.key(5), (2, res, res, 3),
                             minval=-1.0, maxval=1.0)
  return np.asarray(jnp.concatenate([noise, smooth]))


@pytest.fixture(scope='module')
def files(gen, images):
  return gen.compress(images, class_labels=LABELS)


def _reference(gen, images, labels=None, grain_ratios=None):
  """`tok.encode` and `sequence.encode` of the images, `tok.decode` of their
  codes (compiled: eagerly every op would compile, ~10 s)."""
  tok, lay = gen.tokenizer, gen.layout

  @jax.jit
  def run(x):
    enc = tok.encode(x, grain_ratios)
    return dict(enc, decoded=tok.decode(enc['codes']), **sequence.encode(
        enc['codes'], enc['grain_map'], lay, labels))
  return jax.device_get(run(images))


@pytest.fixture(scope='module')
def reference(gen, images):
  return _reference(gen, images, jnp.array(LABELS))


def test_round_trip_gives_the_encoded_tokens_and_image(gen, images, files,
                                                       reference):
  got = image_codec.decompress_tokens(gen, files)
  np.testing.assert_array_equal(got['content'], reference['content'])
  np.testing.assert_array_equal(got['position'], reference['position'])
  np.testing.assert_array_equal(got['label'], LABELS)
  codes, writes = sequence.decode(got['content'], got['position'],
                                  gen.layout)
  np.testing.assert_array_equal(codes, reference['codes'])
  assert np.all(writes == 1)
  # The same codes through the decoder; two compiled programs' float results
  # differ in the last bits, as across any two fusions.
  back = gen.decompress(files)
  assert back.shape == images.shape and back.dtype == np.float32
  np.testing.assert_allclose(back, reference['decoded'], atol=1e-5)
  assert len(set(files)) == len(files)


def test_files_do_not_depend_on_the_batch(gen, images, files):
  alone = [gen.compress(images[i], class_labels=[label])[0]
           for i, label in enumerate(LABELS)]
  assert alone == files  # byte for byte
  together = image_codec.decompress_tokens(gen, files)
  for i, data in enumerate(files):
    one = image_codec.decompress_tokens(gen, [data])
    np.testing.assert_array_equal(one['content'][0], together['content'][i])
    np.testing.assert_array_equal(one['position'][0], together['position'][i])
  # uint8 pixels are the same images.
  pixels = visualize.to_uint8(images[:1])
  assert gen.compress(pixels, class_labels=[1]) == gen.compress(
      pixels.astype(np.float32) / 127.5 - 1.0, class_labels=[1])


def test_unconditional_compact_generator_round_trips(uncond, images):
  files = uncond.compress(images, grain_ratios=(0.1, 0.9))
  header, _ = codec_format.unpack(files[0])
  assert header.label is None and header.size == 26
  want = _reference(uncond, images, grain_ratios=(0.1, 0.9))
  got = image_codec.decompress_tokens(uncond, files)
  np.testing.assert_array_equal(got['content'], want['content'])
  np.testing.assert_array_equal(got['position'], want['position'])
  with pytest.raises(ValueError, match='unconditional'):
    uncond.compress(images, class_labels=[1])


def test_file_size_matches_the_cross_entropy(gen, images):
  bits = image_codec.measure_bits(gen, images, class_labels=LABELS,
                            grain_ratios=(0.1, 0.9))
  header = 8 * 28
  np.testing.assert_array_equal(bits['header_bits'], header)
  np.testing.assert_array_equal(bits['file_bits'],
                                bits['header_bits'] + bits['payload_bits'])
  ce, payload = bits['cross_entropy_bits'], bits['payload_bits']
  assert np.all(ce > 0) and np.all(bits['position_bits'] > 0)
  # 1% over the batch; per file also one byte, the file's granularity.
  assert abs(payload.sum() - ce.sum()) <= 0.01 * ce.sum(), bits
  assert np.all(np.abs(payload - ce) <= 0.01 * ce + 8), bits
  # The fixed-rate count: codes x 8 bits + 16 regions x 1 bit.
  np.testing.assert_allclose(bits['fixed_rate_bits'],
                             bits['num_codes'] * 8 + 16)
  np.testing.assert_allclose(bits['bpp'], bits['file_bits'] / 32**2)


def test_quantize():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=300).astype(np.float32) * 8
  logits[7] = -1e4  # far below the rest: still codable
  freqs = stream_coder.quantize(logits)
  assert freqs.sum() == 2**stream_coder.PRECISION and freqs.min() >= 1
  assert freqs[7] == 1 and freqs.argmax() == logits.argmax()
  np.testing.assert_array_equal(freqs, stream_coder.quantize(logits.copy()))
  p = np.exp(logits - logits.max())
  # Each symbol moves by at most the floor and the +1 (n / 2**24 in all).
  np.testing.assert_allclose(freqs / freqs.sum(), p / p.sum(),
                             atol=freqs.size / 2**stream_coder.PRECISION)
  with pytest.raises(ValueError, match='non-finite'):
    stream_coder.quantize(np.array([0.0, np.nan]))


def _flip(data: bytes, byte: int, bit: int) -> bytes:
  out = bytearray(data)
  out[byte] ^= 1 << bit
  return bytes(out)


@pytest.mark.parametrize('damage, message', [
    (lambda d: d[:-1], r'truncated: its header announces \d+ payload bytes, '
     r'\d+ are there'),
    (lambda d: d[:12], r'truncated: 12 bytes, shorter than the header'),
    (lambda d: d[:20], r'truncated inside its header'),
    (lambda d: d + b'\0', r'1 bytes past the \d+ payload bytes'),
    (lambda d: b'\x89PNG\r\n\x1a\n' + d, r'not a \.dqvq file'),
    (lambda d: b'', r'not a \.dqvq file'),
    (lambda d: d[:4] + bytes([2]) + d[5:],
     r'version-2 \.dqvq file; this dqvq reads version 1: upgrade dqvq'),
    (lambda d: _flip(d, 30, 0), r'checksum mismatch: the file is damaged'),
    (lambda d: _flip(d, len(d) - 1, 0), r'checksum mismatch'),
    (lambda d: _flip(d, 40, 7), r'checksum mismatch'),
    (lambda d: _flip(d, 18, 0), r'checksum mismatch'),  # the class label
    (lambda d: d[:28] + b'\xff' * (len(d) - 28), r'(?i)payload is damaged|'
     r'checksum mismatch'),
    (lambda d: d[:28] + bytes(len(d) - 28), r'(?i)payload is damaged|'
     r'checksum mismatch'),
    (lambda d: _flip(d, 7, 3), r'compressed by generator [0-9a-f]{16}; this '
     r'one is [0-9a-f]{16}: decompress it with the bundle'),
])
def test_damaged_files_raise_a_clear_error(gen, files, damage, message):
  with pytest.raises(image_codec.CodecError, match=message):
    gen.decompress([damage(files[0])])


def test_every_payload_bit_flip_is_caught(gen, files):
  data = files[2]
  header = codec_format.unpack(data)[0].size
  for byte in range(header, len(data), max(1, (len(data) - header) // 12)):
    with pytest.raises(image_codec.CodecError, match='checksum mismatch'):
      image_codec.decompress_tokens(gen, [_flip(data, byte, byte % 8)])


def test_wrong_generator_is_refused(uncond, files):
  with pytest.raises(image_codec.CodecError, match=r'file 0 was compressed by '
                     r'generator [0-9a-f]{16}; this one is'):
    uncond.decompress(files[:1])


def test_illegal_tokens_fail_loudly(gen, reference):
  position = reference['position'][0].copy()
  start = gen.layout.stream_starts[0]
  assert position[start + 2] < gen.layout.num_cells[0]  # two coarse codes
  position[start + 2] = position[start + 1]  # a cell coded twice
  coder = image_codec.coder_for(gen)
  header = codec_format.Header(coder.fingerprint, 32, 32, LABELS[0])
  with pytest.raises(ValueError, match=r'position token \d+ at slot \d+ is '
                     r'illegal under the sampler\'s rules'):
    coder.encode(reference['content'][0], position, LABELS[0], header)


def test_labels_and_images_are_checked(gen, images):
  with pytest.raises(ValueError, match='class-conditional: give class_labels'):
    gen.compress(images)
  with pytest.raises(ValueError, match=r'outside \[0, 14\)'):
    gen.compress(images, class_labels=[14])
  with pytest.raises(ValueError, match=r'codes \(B, 32, 32, 3\) images'):
    gen.compress(images[:, :16], class_labels=[1])
  with pytest.raises(ValueError, match=r'\[0, 255\] pixels'):
    gen.compress((images + 1) * 127.5, class_labels=[1])
  # With label dropout the null class codes images that have no class.
  null = generator_lib.Generator(
      None, None, sequence.StreamLayout((4, 8), 256, 14, null_class=True),
      None, None, None)
  labels = image_codec.labels_for  # pylint: disable=protected-access
  np.testing.assert_array_equal(labels(null, 3, ()), [14] * 3)
  np.testing.assert_array_equal(labels(null, 3, [2, 14]), [2, 14, 2])


def test_cli_round_trip_and_wrong_bundle(bundles, gen, images, tmp_path):
  names = []
  for i, image in enumerate(visualize.to_uint8(images)):
    names.append(str(tmp_path / f'img{i}.png'))
    visualize.save_png(names[-1], image)
  packed = codec.run('compress', bundles['cond'], names, str(tmp_path / 'z'),
                     class_labels=[3])
  assert [os.path.basename(p) for p in packed] == [
      'img0.dqvq', 'img1.dqvq', 'img2.dqvq']
  pngs = codec.run('decompress', bundles['cond'], packed, str(tmp_path / 'x'))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for png, path in zip(pngs, packed):
    with open(path, 'rb') as f:
      want = visualize.to_uint8(gen.decompress([f.read()]))[0]
    np.testing.assert_array_equal(np.asarray(Image.open(png)), want)
  # The wrong generator: one line, exit code 2, before anything compiles.
  proc = subprocess.run(
      [sys.executable, '-m', 'dqvq.codec', 'decompress', '--bundle',
       bundles['uncond'], '--in', packed[0], '--out', str(tmp_path / 'y')],
      cwd=test_train.ROOT, env=test_train.cli_env(), capture_output=True,
      text=True, timeout=300)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert lines[-1].startswith(f'CodecError: {packed[0]} was compressed by '
                              'generator '), proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
