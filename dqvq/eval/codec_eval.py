"""The generator as an image codec, measured on held-out images.

`dqvq.evaluate` codes the first held-out images into .dqvq files with the
DQ-Transformer as entropy model (`dqvq.inference.image_codec`) and puts the
measured file size beside the fixed-rate count (codes x log2 V + regions x log2
K) and the model's cross-entropy, which the payload should match within 1%;
every file must decode to exactly the tokens it coded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from dqvq.inference import generator as generator_lib
from dqvq.inference import image_codec


@dataclasses.dataclass
class HeldOut:
  """The first `limit` valid images of this host's split, with their labels.

  Filled from the host batches as the data pass streams them past
  (`add`), so the codec figures need no second read of the split and keep
  at most `limit` images on the host.
  """
  limit: int
  images: list[np.ndarray] = dataclasses.field(default_factory=list)
  labels: list[np.ndarray] = dataclasses.field(default_factory=list)

  @property
  def count(self) -> int:
    return sum(len(x) for x in self.images)

  def add(self, host_batch: dict[str, Any]) -> None:
    """Keeps the batch's valid rows ('mask'), up to `limit` in all."""
    take = self.limit - self.count
    if take <= 0:
      return
    valid = np.asarray(host_batch['mask'], bool)
    self.images.append(np.asarray(host_batch['image'])[valid][:take])
    self.labels.append(np.asarray(host_batch['label'])[valid][:take])

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """(N, R, R, 3) images in [-1, 1] and (N,) int32 labels."""
    if not self.images:
      return np.zeros((0,)), np.zeros((0,), np.int32)
    return (np.concatenate(self.images),
            np.concatenate(self.labels).astype(np.int32))


def host_local(gen: generator_lib.Generator) -> generator_lib.Generator:
  """`gen` with its weights on this process's devices only.

  The codec runs on one device of one process (each image is a sequential
  walk), and `jax.device_put` cannot move an array that spans other
  processes' devices to a local one. The weights are replicated over the
  mesh, so every process already holds a full copy: its first local shard.
  One process is `gen` itself (its compiled codec steps are kept).
  """
  if jax.process_count() == 1:
    return gen

  def local(x: Any) -> Any:
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return x
    if not x.sharding.is_fully_replicated:
      raise ValueError('The codec figures need replicated generator weights; '
                       f'got an array sharded as {x.sharding}.')
    return x.addressable_shards[0].data

  tok = gen.tokenizer
  return dataclasses.replace(
      gen, params=jax.tree.map(local, gen.params),
      tokenizer=tok.replace(params=jax.tree.map(local, tok.params),
                            codebook=jax.tree.map(local, tok.codebook)),
      _compiled={})


def codec_figures(gen: generator_lib.Generator, images: np.ndarray,
                  labels: np.ndarray) -> dict[str, Any]:
  """The images as .dqvq files: measured bits per pixel and exactness.

  Codes `images` (host, [-1, 1]) with their data `labels` (as the stage-2
  validation conditions; ignored by an unconditional generator) at the
  trained routing, decodes the files again and compares the decoded token
  streams with the coded ones. Runs on the calling process only.

  Returns flat figures, means over the images: 'codec_bpp' (whole files,
  header included), 'codec_payload_bpp', 'codec_cross_entropy_bpp' (the
  transformer's -log2 p of the coded tokens), 'codec_fixed_rate_bpp'
  (codes x log2 V + regions x log2 K), 'codec_header_bits' (per file),
  'codec_payload_over_cross_entropy' (total payload / total cross-entropy;
  the range coder should stay within 1% of 1), its largest per-file value,
  'codec_images' and 'codec_round_trip_exact' (always True: a file that
  does not decode to its tokens raises).

  Raises:
    image_codec.CodecError: a file decoded to other tokens or labels than
      it coded (or failed its checksum).
  """
  local = host_local(gen)
  given = labels if local.layout.num_classes else ()
  coded, num_codes = image_codec.encode_images(local, images, given)
  files = [c.data for c in coded]
  want = image_codec.token_streams(local, images, given)
  got = image_codec.decompress_tokens(local, files)
  bad = [i for i in range(len(files)) if not (
      np.array_equal(got['content'][i], want['content'][i]) and
      np.array_equal(got['position'][i], want['position'][i]) and
      got['label'][i] == want['label'][i])]
  if bad:
    raise image_codec.CodecError(
        f'Held-out images {bad} did not decode to the tokens they coded: the '
        'codec is not exact on this generator and device.')
  bits = image_codec.bits_table(local, coded, num_codes)
  pixels = float(gen.config.data.resolution ** 2)
  per_pixel = lambda key: float(np.mean(bits[key])) / pixels
  ce = bits['cross_entropy_bits']
  return {
      'codec_images': float(len(files)),
      'codec_bpp': per_pixel('file_bits'),
      'codec_payload_bpp': per_pixel('payload_bits'),
      'codec_cross_entropy_bpp': per_pixel('cross_entropy_bits'),
      'codec_fixed_rate_bpp': per_pixel('fixed_rate_bits'),
      'codec_header_bits': float(np.mean(bits['header_bits'])),
      'codec_payload_over_cross_entropy': float(
          bits['payload_bits'].sum() / ce.sum()),
      'codec_max_payload_over_cross_entropy': float(np.max(
          bits['payload_bits'] / ce)),
      'codec_round_trip_exact': True}
