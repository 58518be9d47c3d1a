"""dqvq: dynamic vector quantization (DQ-VAE, DQ-Transformer) in JAX/Flax.

The library surface: `load_tokenizer(BUNDLE)` and `load_generator(BUNDLE)`
read the bundles that `python -m dqvq.export` (a training run) and
`python -m dqvq.convert official` (the authors' checkpoints) write.

  tok = dqvq.load_tokenizer('/bundles/tokenizer')
  out = tok.encode(images)            # images (B, H, W, 3) in [-1, 1]
  recon = tok.decode(out['codes'])
  gen = dqvq.load_generator('/bundles/generator')
  samples = gen.sample(8, class_labels=[207])['image']

encode / decode check their inputs first (`check_inputs=True`): float images
in [-1, 1] (uint8 pixels: x / 127.5 - 1), integer codes within the codebook;
sample checks the count and the class labels. Imports are lazy so that
`import dqvq` stays cheap.
"""

from __future__ import annotations

from typing import Any


def load_tokenizer(path: str, mesh: Any = None) -> Any:
  """A `dqvq.inference.tokenizer.Tokenizer` (encode / decode) from a bundle."""
  from dqvq.inference import tokenizer  # pylint: disable=g-import-not-at-top
  return tokenizer.load_bundle(path, mesh)


def load_generator(path: str, mesh: Any = None) -> Any:
  """A `dqvq.inference.generator.Generator` (sample) from a generator bundle."""
  from dqvq.inference import generator  # pylint: disable=g-import-not-at-top
  return generator.load_bundle(path, mesh)


__all__ = ['load_tokenizer', 'load_generator']
