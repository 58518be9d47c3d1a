"""DQ-Transformer image coding as a library: images <-> .dqvq bytes.

What `Generator.compress` / `Generator.decompress` and the `python -m
dqvq.codec` verb call. Each image is encoded by the generator's tokenizer into
coarse-to-fine token streams (`dqvq.sequence`), which are range-coded with the
transformer's own probabilities (`dqvq.inference.stream_coder`) inside the
`dqvq.inference.codec_format` container. Decoding replays the same compiled
KV-cached steps with the decoded tokens, so it gives back exactly the coded
tokens, and the image is the tokenizer's decode of them. `measure_bits` puts the
file sizes beside the model's cross-entropy and the fixed-rate count. A damaged,
truncated or foreign file, or one from another generator, raises `CodecError`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

from dqvq.inference import codec_format
from dqvq.inference import stream_coder
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq import sequence

CodecError = codec_format.CodecError


# Images <-> streams through the tokenizer, one compiled program each: run
# eagerly, every op of the DQ-VAE would compile on its own (8 s, not 2).
@functools.partial(jax.jit, static_argnums=(2, 3))
def _streams_of(tok: Any, images: Any, grain_ratios: Any,
                layout: sequence.StreamLayout, labels: Any) -> dict[str, Any]:
  enc = tok.encode(images, grain_ratios, check_inputs=False)
  return sequence.encode(enc['codes'], enc['grain_map'], layout, labels)


@functools.partial(jax.jit, static_argnums=3)
def _images_of(tok: Any, content: Any, position: Any,
               layout: sequence.StreamLayout) -> Any:
  codes, _ = sequence.decode(content, position, layout)
  return tok.decode(codes, check_inputs=False)


def coder_for(gen: Any) -> stream_coder.StreamCoder:
  """The generator's StreamCoder, built once (fingerprint and compiles)."""
  cache = gen._compiled  # pylint: disable=protected-access
  if 'codec' not in cache:
    cache['codec'] = stream_coder.StreamCoder(gen)
  return cache['codec']


def _model_images(gen: Any, images: Any) -> np.ndarray:
  """(B, R, R, 3) float images in [-1, 1]; uint8 pixels are rescaled."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[None]
  res = gen.config.data.resolution
  if x.ndim != 4 or x.shape[1:] != (res, res, 3):
    raise ValueError(f'images have shape {x.shape}; this generator codes '
                     f'(B, {res}, {res}, 3) images (resize and crop them, as '
                     '`python -m dqvq.codec compress` does).')
  if x.dtype == np.uint8:
    from dqvq.data import transforms  # pylint: disable=g-import-not-at-top
    x = transforms.to_model_range(x)
  return x


def labels_for(gen: Any, n: int, class_labels: Sequence[int]) -> np.ndarray:
  """One label per image: the given ones (cycled), or the null class.

  The null class id (`num_classes`, where the model was trained with label
  dropout) is a label like the others here: an image need not have a class.
  """
  lay = gen.layout
  given = np.ravel(np.asarray(() if class_labels is None else class_labels))
  if lay.num_classes and not given.size:
    if not lay.null_class:
      raise ValueError('This generator is class-conditional: give '
                       f'class_labels (class ids in [0, {lay.num_classes}), '
                       'one per image or one for all).')
    return np.full((n,), lay.num_classes, np.int32)
  null = np.zeros((n,), bool)
  if lay.null_class and given.size:
    null = np.resize(given == lay.num_classes, (n,))
    given = np.where(given == lay.num_classes, 0, given)
  return np.where(null, lay.num_classes, gen.labels_for(n, given)).astype(
      np.int32)


def token_streams(gen: Any, images: Any, class_labels: Sequence[int] = (),
                  grain_ratios: Sequence[float] | None = None
                  ) -> dict[str, np.ndarray]:
  """The token streams `encode_images` codes (arguments as `compress`).

  Host (B, L) 'content' and 'position', (B,) 'label' (as the headers hold
  it; 0 for an unconditional generator) and (B,) 'num_codes', from the
  same compiled program on the same device as the coder's, so a caller can
  check decoded files against exactly what was coded.
  """
  coder, lay = coder_for(gen), gen.layout
  x = _model_images(gen, images)
  labels = labels_for(gen, x.shape[0], class_labels)
  tokenizer_lib.check_images(x)
  streams = jax.device_get(_streams_of(
      coder.tokenizer, x, None if grain_ratios is None else tuple(
          float(r) for r in grain_ratios), lay,
      labels if lay.num_classes else None))
  if np.any(streams['truncated']):
    raise ValueError(
        f'Images {np.flatnonzero(streams["truncated"]).tolist()} have more '
        f'codes than the generator\'s stream capacities {lay.capacities}: '
        'code them with a smaller fine share (grain_ratios).')
  return {'content': np.asarray(streams['content']),
          'position': np.asarray(streams['position']),
          'label': labels,
          'num_codes': np.asarray(streams['num_codes'])}


def encode_images(gen: Any, images: Any, class_labels: Sequence[int] = (),
                  grain_ratios: Sequence[float] | None = None
                  ) -> tuple[list[stream_coder.Coded], np.ndarray]:
  """Images -> their coded files and (B,) code counts (see `compress`)."""
  coder, lay = coder_for(gen), gen.layout
  res = gen.config.data.resolution
  streams = token_streams(gen, images, class_labels, grain_ratios)
  coded = []
  for i, label in enumerate(streams['label']):
    header = codec_format.Header(coder.fingerprint, res, res,
                                 int(label) if lay.num_classes else None)
    coded.append(coder.encode(streams['content'][i], streams['position'][i],
                              int(label), header))
  return coded, streams['num_codes']


def compress(gen: Any, images: Any, class_labels: Sequence[int] = (),
             grain_ratios: Sequence[float] | None = None) -> list[bytes]:
  """`Generator.compress`: one .dqvq file (bytes) per image.

  images: (B, R, R, 3) or (R, R, 3), uint8 pixels or floats in [-1, 1]
  (what `Generator.sample` returns). class_labels: for a class-conditional
  generator, one per image or one for all (default: the null class, where
  the model has one). grain_ratios: the tokenizer's budget, coarse to fine.
  """
  return [c.data for c in encode_images(gen, images, class_labels,
                                        grain_ratios)[0]]


def decompress_tokens(gen: Any, files: Sequence[bytes],
                      names: Sequence[str] | None = None
                      ) -> dict[str, np.ndarray]:
  """Files -> (N, L) 'content', 'position' streams and (N,) 'label'."""
  coder, lay = coder_for(gen), gen.layout
  if isinstance(files, (bytes, bytearray)):
    files = [files]
  if not len(files):  # pylint: disable=g-explicit-length-test
    raise ValueError('No files to decompress.')
  out = {'content': [], 'position': [], 'label': []}
  for i, data in enumerate(files):
    name = names[i] if names else f'file {i}'
    header, payload = codec_format.unpack(data, name)
    if header.fingerprint != coder.fingerprint:
      raise codec_format.CodecError(
          f'{name} was compressed by generator {header.fingerprint}; this one '
          f'is {coder.fingerprint}: decompress it with the bundle that '
          'compressed it.')
    res = gen.config.data.resolution
    if (header.height, header.width) != (res, res) or (
        header.label is None) != (not lay.num_classes) or (
            header.label is not None and header.label >= lay.num_sos):
      raise codec_format.CodecError(f'{name}: the header is damaged (image '
                                    f'{header.height}x{header.width}, label '
                                    f'{header.label}).')
    label = header.label or 0
    try:
      streams = coder.decode(payload, label)
    except codec_format.CodecError as e:
      raise codec_format.CodecError(f'{name}: {e}') from e
    if codec_format.checksum(header, payload, streams['content'],
                             streams['position']) != header.checksum:
      raise codec_format.CodecError(
          f'{name}: checksum mismatch: the file is damaged, or this process '
          'computes the transformer\'s probabilities otherwise than the one '
          'that compressed it did (another device kind or jax version).')
    for key in ('content', 'position'):
      out[key].append(streams[key])
    out['label'].append(label)
  return {k: np.stack(v) for k, v in out.items()}


def decompress(gen: Any, files: Sequence[bytes],
               names: Sequence[str] | None = None) -> np.ndarray:
  """`Generator.decompress`: files -> (N, R, R, 3) float32 images in [-1, 1]
  (as `Generator.sample`'s 'image')."""
  tokens = decompress_tokens(gen, files, names)
  return np.asarray(_images_of(coder_for(gen).tokenizer, tokens['content'],
                               tokens['position'], gen.layout))


def bits_table(gen: Any, coded: Sequence[stream_coder.Coded],
               num_codes: np.ndarray) -> dict[str, np.ndarray]:
  """Per image: what the files cost next to the model's cross-entropy.

  'file_bits' (the whole file), 'header_bits', 'payload_bits',
  'cross_entropy_bits' (sum of -log2 p of the coded tokens under the
  transformer's softmax over each token's legal set, before quantisation;
  'position_bits' + 'content_bits'), 'fixed_rate_bits' (codes x log2 V +
  regions x log2 K, the count the README's tables give), 'num_codes' and
  'bpp' (file bits per pixel).
  """
  lay = gen.layout
  out = {
      'file_bits': np.array([8 * len(c.data) for c in coded]),
      'header_bits': np.array([c.header_bits for c in coded]),
      'position_bits': np.array([c.position_bits for c in coded]),
      'content_bits': np.array([c.content_bits for c in coded]),
      'num_codes': np.asarray(num_codes),
      'fixed_rate_bits': np.array([sequence.bits_per_image(
          n, lay.codebook_size, lay.num_cells[0], lay.num_grains)[
              'bits_per_image'] for n in num_codes])}
  out['payload_bits'] = out['file_bits'] - out['header_bits']
  out['cross_entropy_bits'] = out['position_bits'] + out['content_bits']
  out['bpp'] = out['file_bits'] / gen.config.data.resolution ** 2
  return out


def measure_bits(gen: Any, images: Any, class_labels: Sequence[int] = (),
                 grain_ratios: Sequence[float] | None = None
                 ) -> dict[str, np.ndarray]:
  """`bits_table` of compressing `images` (arguments as `compress`)."""
  return bits_table(gen, *encode_images(gen, images, class_labels,
                                        grain_ratios))


# ----------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------
