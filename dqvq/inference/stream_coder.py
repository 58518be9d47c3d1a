"""Token streams to range-coded bytes, with the DQ-Transformer's probabilities.

`StreamCoder` codes one image's coarse-to-fine streams (`dqvq.sequence`) at
a time: the range coder (`constriction`) gets, for every position and code
in turn, the distribution the transformer predicts for it. `dqvq.codec`
wraps it into files, the library API and the CLI.

Exactness. Decoding must recompute, bit for bit, the probabilities the
encoder used: floating-point differences between the two are the classic
way such a codec breaks. Both therefore walk the sequence the same way
(`StreamCoder._walk`): one image at a time, one slot per call of the same
two compiled KV-cached steps (`DQTransformer.decode_position`, then
`decode_content`), fed the same buffers (the encoder fills them token by
token as the decoder does, never with the tokens still to come), on one
device. The host turns each step's float32 logits into integer frequencies
with one function (`quantize`). The alphabet of each token is its legal
set, by the sampler's own rules (`stream_legality.legal_positions`: uncovered
cells of the stream's grid, eos when allowed, the finest stream forced in
raster order; codes 0..V-1), so no bit goes to an impossible token, a
forced token costs nothing, and no payload, however damaged, decodes to an
illegal stream (the walk always ends).

Portability. Files decode where the transformer computes the same logits:
the same weights, dqvq, jax and device kind. On CPU the XLA options that
were seen to change the logits (the optimisation level the test suite
lowers) are pinned for the two steps; GPU autotuning is not (untested). The
file's checksum covers the decoded tokens, so any divergence is an error,
never a wrong image.

Cost. Two compiled calls and two host round trips per token, so the time
grows with the number of codes (measured by `benchmarks/codec_rd.py`, in
benchmarks/README.md). Paper-size models take the same number of much
larger steps; batching images would need a fixed batch layout on both sides
and is not done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable

import constriction
import jax
import jax.numpy as jnp
import numpy as np

from dqvq.inference import codec_format
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq import sampling
from dqvq import sequence
from dqvq import stream_legality

# Frequencies sum to 2**PRECISION: the range coder's own model precision.
PRECISION = 24
_Categorical = constriction.stream.model.Categorical


def generator_fingerprint(gen: Any) -> str:
  """16 hex digits naming what decides the coded tokens of a generator.

  The tokenizer's fingerprint (its weights), the transformer's weights and
  the token layout (vocabularies, capacities, position indexing): a file
  only decodes with the same three.
  """
  h = hashlib.sha256()
  h.update(gen.tokenizer.fingerprint.encode())
  h.update(tokenizer_lib.fingerprint(gen.params).encode())
  h.update(repr(gen.layout).encode())
  return h.hexdigest()[:16]


def quantize(logits: np.ndarray) -> np.ndarray:
  """Logits of the legal symbols -> int64 frequencies summing to 2**PRECISION.

  Every symbol gets at least 1 (it stays codable); the rounding remainder
  goes to the first most frequent one. Plain float64 numpy on the host, the
  same call on both sides: bitwise-equal logits give equal frequencies.
  """
  x = np.asarray(logits, np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError('The transformer gave non-finite logits; its weights '
                     'cannot code images.')
  p = np.exp(x - x.max())
  p /= p.sum()
  total = 1 << PRECISION
  freqs = 1 + np.floor(p * (total - x.size)).astype(np.int64)
  freqs[np.argmax(freqs)] += total - freqs.sum()
  return freqs


def _model(freqs: np.ndarray) -> Any:
  return _Categorical(freqs.astype(np.float64), perfect=False)


def _log2_softmax(logits: np.ndarray, i: int) -> float:
  x = np.asarray(logits, np.float64)
  top = x.max()
  return float((x[i] - top - np.log(np.sum(np.exp(x - top)))) / math.log(2))


@dataclasses.dataclass
class Coded:
  """One compressed image: its file and what the bits went to."""
  data: bytes
  header_bits: int
  position_bits: float   # -log2 p of the coded positions (legal softmax)
  content_bits: float    # -log2 p of the coded codes

  @property
  def cross_entropy_bits(self) -> float:
    return self.position_bits + self.content_bits


class StreamCoder:
  """The compiled steps and single-device weights of one generator."""

  def __init__(self, gen: Any):
    self.gen, self.layout = gen, gen.layout
    self.device = jax.local_devices()[0]
    # One device: a replicated call would compute every step on all of them
    # (the tokenizer's eager ops too).
    self.params = jax.device_put(gen.params, self.device)
    self.tokenizer = jax.device_put(gen.tokenizer, self.device)
    self.fingerprint = generator_fingerprint(gen)
    model, lay = gen.model, gen.layout
    tables = stream_legality.budget_tables(
        lay, sampling.SamplingConfig())
    t_in = lay.length - 1
    grain_ids = lay.grain_ids()
    col = lambda a, t: jax.lax.dynamic_index_in_dim(a, t, 1, keepdims=False)

    def position_step(params, cache, buf, t, k, count):
      """Position logits of slot t+1 and their legal set, from slot t."""
      key_valid = ~buf['pad'][:, :t_in] & (jnp.arange(t_in) <= t)
      tokens = {name: col(buf[name], t) for name in ('content', 'position',
                                                     'pad')}
      tokens['grain'] = col(grain_ids[None], t)
      tokens['abs_index'] = col(lay.absolute_index(buf['pad']), t)
      logits, h_p, cache = model.apply(
          {'params': params}, tokens, t, key_valid, cache,
          method=model.decode_position)
      _, writes = sequence.decode(buf['content'], buf['position'], lay)
      legal = stream_legality.legal_positions(
          writes.reshape(1, -1) > 0, count[None], k, lay, tables)
      return logits[0], legal[0], h_p, cache

    def content_step(params, cache, h_p, buf, t):
      """Code logits of slot t+1, told its position as training tells it."""
      streams = dict(buf, grain=jnp.broadcast_to(grain_ids, buf['pad'].shape))
      target = sequence.model_inputs(streams, lay)['targets']
      key_valid = ~buf['pad'][:, :t_in] & (jnp.arange(t_in) <= t)
      logits, cache = model.apply(
          {'params': params}, h_p, col(target['position'], t),
          col(target['grain'], t), col(target['pad'], t), t, key_valid, cache,
          method=model.decode_content)
      return logits[0], cache

    # XLA:CPU's float results depend on these XLA_FLAGS (the test suite's
    # fast compiles change the logits, files then fail their checksum in a
    # default process); pinned here, files move between such processes.
    pinned = ({'xla_backend_optimization_level': 3,
               'xla_llvm_disable_expensive_passes': False}
              if self.device.platform == 'cpu' else None)
    self._position_step = jax.jit(position_step, donate_argnums=1,
                                  compiler_options=pinned)
    self._content_step = jax.jit(content_step, donate_argnums=1,
                                 compiler_options=pinned)

  def _walk(self, label: int, choose: Callable[[str, np.ndarray, np.ndarray,
                                                 int], int]
            ) -> dict[str, np.ndarray]:
    """Runs the sequence slot by slot; `choose` gives each coded token.

    choose(kind, logits, legal ids, slot) -> the token id of `slot`, for
    kind 'position' and 'content'. Returns the (L,) streams. Slots follow the
    sampler (`sampling.make_sampler` with one image): each stream from its
    sos to its eos, the eos slot fed (its keys serve later slots) before the
    next stream's sos; the finest eos ends the image.
    """
    lay, v = self.layout, self.layout.codebook_size
    buf = {name: np.array(a) for name, a in stream_legality.initial_streams(
        lay, jnp.array([label], jnp.int32)).items()}
    cache = jax.device_put(self.gen.model.init_cache(1), self.device)
    cache_p, cache_c = cache['position'], cache['content']
    codes = np.arange(v)
    t, k, count = 0, 0, 0
    for _ in range(lay.length):
      logits, legal, h_p, cache_p = self._position_step(
          self.params, cache_p, buf, np.int32(t), np.int32(k),
          np.int32(count))
      at_eos = buf['content'][0, t] == v + 1
      if not at_eos:
        logits, legal = jax.device_get((logits, legal))
        pos = choose('position', logits, np.flatnonzero(legal), t + 1)
        buf['position'][0, t + 1], buf['pad'][0, t + 1] = pos, False
      con_logits, cache_c = self._content_step(self.params, cache_c, h_p, buf,
                                               np.int32(t))
      # On the host before `buf` changes again (a CPU call may alias it).
      con_logits = jax.device_get(con_logits)
      if at_eos:  # the next stream starts at its sos
        k, count = k + 1, 0
        t = lay.stream_starts[k]
        continue
      if pos == lay.num_cells[k] + 1:
        buf['content'][0, t + 1] = v + 1
        if k == lay.num_grains - 1:
          return {name: a[0] for name, a in buf.items()}
      else:
        buf['content'][0, t + 1] = choose('content', con_logits[:v], codes,
                                          t + 1)
        count += 1
      t += 1
    raise AssertionError('The walk passed the end of the sequence.')

  def encode(self, content: np.ndarray, position: np.ndarray, label: int,
             header: codec_format.Header) -> Coded:
    """One image's (L,) streams -> its file (`codec_format`)."""
    encoder = constriction.stream.queue.RangeEncoder()
    coded, bits = [], {'position': 0.0, 'content': 0.0, 'quantized': 0.0}
    known = {'position': position, 'content': content}

    def choose(kind, logits, ids, slot):
      token = int(known[kind][slot])
      i = int(np.searchsorted(ids, token))
      if i == ids.size or ids[i] != token:
        raise ValueError(
            f'The image\'s {kind} token {token} at slot {slot} is illegal '
            'under the sampler\'s rules, so the model gives it probability '
            '0; the tokenizer and the generator\'s layout disagree.')
      if ids.size > 1:  # a forced token costs nothing
        freqs = quantize(logits[ids])
        model = _model(freqs)
        encoder.encode(np.int32(i), model)
        coded.append((model, i))
        bits[kind] -= _log2_softmax(logits[ids], i)
        bits['quantized'] += PRECISION - math.log2(freqs[i])
      return token

    walked = self._walk(label, choose)
    if not (np.array_equal(walked['content'], content) and
            np.array_equal(walked['position'], position)):
      raise AssertionError('The coded walk differs from the streams.')
    payload = _shortest_payload(
        codec_format.payload_bytes(encoder.get_compressed()), coded,
        bits['quantized'])
    data = codec_format.pack(header, payload, content, position)
    return Coded(data, 8 * (len(data) - len(payload)), bits['position'],
                 bits['content'])

  def decode(self, payload: bytes, label: int) -> dict[str, np.ndarray]:
    """A payload -> the (L,) streams it codes (legal whatever the bytes).

    Raises CodecError where the range decoder finds the bytes impossible
    under the model (it raises on some damaged payloads; others decode to
    other tokens, which the file's checksum catches).
    """
    decoder = constriction.stream.queue.RangeDecoder(
        codec_format.words(payload))

    def choose(kind, logits, ids, slot):
      if ids.size == 1:
        return int(ids[0])
      try:
        return int(ids[decoder.decode(_model(quantize(logits[ids])))])
      except (AssertionError, ValueError, RuntimeError) as e:
        raise codec_format.CodecError(
            f'The payload is damaged: no {kind} token at slot {slot} is coded '
            f'there ({e}).') from e

    return self._walk(label, choose)


def _shortest_payload(payload: bytes, coded: list[tuple[Any, int]],
                      info: float) -> bytes:
  """The shortest head of `payload` (its last byte maybe rounded up) that
  still decodes to the same symbols, read with zeros after its end.

  The range coder seals its stream with whole 32-bit words, about 16 bits
  more than the information on average: 1-2% of a demo image. A shorter
  head is kept only once a replay of the coder's own decoder with the same
  models gives back every symbol, so the real decoder, which rebuilds those
  models from the same symbols, does too. `info` (the bits of the symbols
  under the quantised models) is where the search starts.
  """
  def replays(head: bytes) -> bool:
    decoder = constriction.stream.queue.RangeDecoder(codec_format.words(head))
    try:
      return all(decoder.decode(model) == i for model, i in coded)
    except (AssertionError, ValueError, RuntimeError):
      return False  # bytes the model cannot decode at all

  for m in range(max(0, math.ceil(info / 8) - 1), len(payload)):
    head = payload[:m]
    rounded = int.from_bytes(head, 'big') + 1
    heads = [head] + ([rounded.to_bytes(m, 'big')]
                      if m and rounded < 256 ** m else [])
    for candidate in heads:
      if replays(candidate):
        return candidate
  return payload
