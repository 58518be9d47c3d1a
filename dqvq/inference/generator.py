"""A trained DQ-Transformer with its tokenizer: Algorithm 1 as a library call.

`Generator` is what `dqvq.load_generator(BUNDLE)` returns and what
`python -m dqvq.sample` drives: the model, its params (replicated over the
mesh), the stream layout and the frozen DQ-VAE that turns sampled code maps
into images. It can come from a training run (`load_run`, the newest or a
named checkpoint) or from a bundle (`load_bundle`), and `save_bundle` writes
one, tokenizer included, so a bundle alone is enough to make images.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import tqdm

from dqvq import checkpoint as ckpt_lib
from dqvq import config_lib
from dqvq.inference import bundle as bundle_lib
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq.models import transformer as transformer_lib
from dqvq import sampling
from dqvq import sequence
from dqvq import sharding
from dqvq import visualize


def decode_streams(tok: tokenizer_lib.Tokenizer, content: jax.Array,
                   position: jax.Array, layout: sequence.StreamLayout,
                   previews: bool = True) -> dict[str, jax.Array]:
  """Sampled streams -> images, code maps, grain maps and write counts.

  `previews` adds the coarse-only decode, a second decoder pass that
  evaluation has no use for. Plain traceable code: the generator runs it
  under `shard_map`, the exported sample program as it is.
  """
  codes, writes = sequence.decode(content, position, layout)
  grain_map = sequence.grain_map_from_streams(position, layout)
  out = dict(image=tok.decode(codes), codes=codes, writes=writes,
             grain_map=grain_map)
  if previews:
    out['preview'] = tok.decode(
        sampling.preview_codes(content, position, layout))
  return out

@dataclasses.dataclass
class Generator:
  """DQ-Transformer + tokenizer; `sample` returns images and their tokens.

  `sample_batches` yields the same batch by batch, left on the devices;
  `compress` / `decompress` use the model as an image codec
  (`dqvq.inference.image_codec`).
  """
  model: Any
  params: Any
  layout: sequence.StreamLayout
  tokenizer: tokenizer_lib.Tokenizer
  config: ml_collections.ConfigDict  # the stage-2 config
  mesh: jax.sharding.Mesh
  step: int = 0
  _compiled: dict[Any, Callable[..., Any]] = dataclasses.field(
      default_factory=dict, repr=False)

  def labels_for(self, n: int, class_labels: Sequence[int] = ()) -> np.ndarray:
    """n labels cycling through `class_labels` (all classes when empty).

    Refuses labels the sampler could not mean rather than bending them: any
    label for an unconditional model (it would be ignored), non-integral
    values (3.7 would become 3) and classes outside [0, num_classes).
    """
    pool = np.ravel(np.asarray(() if class_labels is None else class_labels))
    num_classes = self.layout.num_classes
    if not num_classes:
      if pool.size:
        raise ValueError(
            f'class_labels={pool.tolist()}, but this generator is '
            'unconditional (trained without classes): sample without '
            'class_labels.')
      return np.zeros((n,), np.int32)
    if pool.size and not (
        np.issubdtype(pool.dtype, np.integer) or
        (np.issubdtype(pool.dtype, np.floating) and
         np.all(np.isfinite(pool)) and np.all(pool == np.round(pool)))):
      raise ValueError(f'class_labels={pool.tolist()} must be integers (class '
                       f'ids in [0, {num_classes})).')
    pool = pool.astype(np.int64) if pool.size else np.arange(num_classes)
    bad = pool[(pool < 0) | (pool >= num_classes)]
    if bad.size:
      raise ValueError(f'class labels {bad.tolist()} outside [0, {num_classes})'
                       f': this generator has {num_classes} classes.')
    return np.resize(pool, (n,)).astype(np.int32)

  def _sampler(self, config: sampling.SamplingConfig) -> Callable[..., Any]:
    if config not in self._compiled:
      self._compiled[config] = sampling.make_sampler(self.model, config)
    return self._compiled[config]

  def _pictures(self, previews: bool) -> Callable[..., Any]:
    """Streams -> images and code maps, each device decoding its own rows.

    Under plain jit XLA replicates the scattered code maps (and so the
    decoded images) over the mesh; `shard_map` keeps every output sharded
    like the sampler's, so decoding is data-parallel and the images stay
    where evaluation's Inception reads them.
    """
    key = ('pictures', previews)
    if key not in self._compiled:
      pictures = functools.partial(decode_streams, layout=self.layout,
                                   previews=previews)
      rows = sharding.batch_sharding(self.mesh).spec
      self._compiled[key] = functools.partial(jax.jit(jax.shard_map(
          pictures, mesh=self.mesh, in_specs=(P(), rows, rows),
          out_specs=rows)), self.tokenizer)
    return self._compiled[key]

  def sample_batches(self, num_images: int, *,
                     class_labels: Sequence[int] = (),
                     config: sampling.SamplingConfig | None = None,
                     batch_size: int = 0, previews: bool = True
                     ) -> Iterator[SampledBatch]:
    """Samples `num_images` images batch by batch, leaving them on the mesh.

    What `sample` gathers, one `SampledBatch` at a time, so that a consumer
    (FID over 50k samples) can reduce each batch on the devices and bring
    back only what it needs instead of every image on every host. Batches
    hold `batch_size` rows (default 4 per device, rounded up to the
    devices); the last one is padded. `previews=False` skips the
    coarse-only decode. Arguments are checked here, before anything
    compiles, not at the first `next`.
    """
    _check_count('num_images', num_images, 1, 'a positive int: how many '
                 'images to sample')
    _check_count('batch_size', batch_size, 0, 'an int >= 0 (0 = 4 per '
                 'device)')
    labels = self.labels_for(num_images, class_labels)
    config = config or sampling.SamplingConfig()
    n_dev = self.mesh.devices.size
    batch = -(-(batch_size or 4 * n_dev) // n_dev) * n_dev
    return self._batches(labels, config, batch, previews)

  def _batches(self, labels: np.ndarray, config: sampling.SamplingConfig,
               batch: int, previews: bool) -> Iterator[SampledBatch]:
    sampler, pictures = self._sampler(config), self._pictures(previews)
    key = jax.random.key(config.seed)
    batch_sharding = sharding.batch_sharding(self.mesh)
    for i, lo in enumerate(range(0, len(labels), batch)):
      chunk = labels[lo:lo + batch]
      padded = np.resize(chunk, (batch,))  # static shape; extras dropped
      # Every process holds the same labels; each places its devices' part.
      labels_dev = jax.make_array_from_callback(
          padded.shape, batch_sharding, lambda idx, x=padded: x[idx])
      out = sampler(self.params, labels_dev, jax.random.fold_in(key, i))
      yield SampledBatch({**pictures(out['content'], out['position']),
                          'content': out['content'],
                          'position': out['position'],
                          'num_codes': out['num_codes']}, chunk)

  def sample(self, num_images: int, *, class_labels: Sequence[int] = (),
             config: sampling.SamplingConfig | None = None,
             batch_size: int = 0,
             on_batch: Callable[[int], None] | None = None
             ) -> dict[str, np.ndarray]:
    """Samples `num_images` images (Algorithm 1, KV-cached).

    Returns host arrays: 'image' and 'preview' (N, H, W, 3) in [-1, 1] (the
    preview decodes the coarse granularity alone), 'codes', 'grain_map',
    'writes', the token streams 'content'/'position', 'num_codes' and
    'label'. Batches of `batch_size` (default 4 per device, rounded up to
    the devices) are sharded over the mesh; `on_batch(n)` is called after
    each with the images it added (progress bars). Every process receives
    all N images as float32 (N x H x W x 3 x 8 bytes with the previews):
    for many images, reduce `sample_batches` on the devices instead, as
    `dqvq.eval.generator_eval` does.
    """
    results: dict[str, list[np.ndarray]] = {}
    batches = self.sample_batches(num_images, class_labels=class_labels,
                                  config=config, batch_size=batch_size)
    labels = []
    for sampled in batches:
      host = sharding.host_gather(sampled.arrays)
      for name, value in host.items():
        results.setdefault(name, []).append(value[:sampled.count])
      labels.append(sampled.labels)
      if on_batch is not None:
        on_batch(sampled.count)
    res = {name: np.concatenate(v) for name, v in results.items()}
    res['label'] = np.concatenate(labels)
    return res

  def compress(self, images: Any, *, class_labels: Sequence[int] = (),
               grain_ratios: Sequence[float] | None = None) -> list[bytes]:
    """One .dqvq file (bytes) per image, coded with this model's
    probabilities; see `dqvq.inference.image_codec.compress`."""
    # pylint: disable-next=g-import-not-at-top
    from dqvq.inference import image_codec
    return image_codec.compress(self, images, class_labels, grain_ratios)

  def decompress(self, files: Sequence[bytes]) -> np.ndarray:
    """.dqvq files -> (N, H, W, 3) float32 images in [-1, 1], like
    `sample`'s 'image'; see `dqvq.inference.image_codec.decompress`."""
    # pylint: disable-next=g-import-not-at-top
    from dqvq.inference import image_codec
    return image_codec.decompress(self, files)


@dataclasses.dataclass(frozen=True)
class SampledBatch:
  """One batch of `Generator.sample_batches`, still on the devices.

  `arrays` are global arrays of the padded batch, sharded over the mesh
  like the sampler's labels: 'image' (B, H, W, 3) in [-1, 1], 'preview'
  (unless turned off), 'codes', 'writes', 'grain_map', 'content',
  'position' and 'num_codes'. Only the first `count` rows are samples;
  `labels` are their class labels (host, every process).
  """
  arrays: dict[str, jax.Array]
  labels: np.ndarray

  @property
  def count(self) -> int:
    return len(self.labels)

  def mask(self) -> np.ndarray:
    """(B,) bool: True for the rows that are samples, False for padding."""
    return np.arange(self.arrays['image'].shape[0]) < self.count


def _check_count(name: str, value: Any, least: int, want: str) -> None:
  """Refuses a non-int (bool and float included) or one below `least`."""
  if (isinstance(value, (bool, np.bool_)) or
      not isinstance(value, numbers.Integral) or value < least):
    raise ValueError(f'{name}={value!r}; give {want}.')


def build_model(config: ml_collections.ConfigDict,
                tok: tokenizer_lib.Tokenizer
                ) -> tuple[transformer_lib.DQTransformer,
                           sequence.StreamLayout]:
  """The DQ-Transformer a stage-2 config trains over `tok`, and its layout."""
  layout = sequence.layout_from_config(config, tok.vae)
  model = transformer_lib.from_config(config.model, layout,
                                      config_lib.compute_dtype(config))
  return model, layout


def _replicated_params(model: transformer_lib.DQTransformer,
                       mesh: jax.sharding.Mesh) -> Any:
  abstract = {'params': transformer_lib.abstract_params(model)}
  replicated = sharding.replicated(mesh)
  return sharding.with_shardings(
      abstract, jax.tree.map(lambda _: replicated, abstract))


def tokenizer_workdir_of(config: ml_collections.ConfigDict,
                         workdir: str) -> str:
  """The stage-1 run that `config` names, or the one beside a moved run.

  A stage-2 run records its tokenizer's absolute path; after the two runs
  were moved together (`dqvq.train` writes WORKDIR/stage1 beside
  WORKDIR/stage2), the sibling `stage1` directory is that tokenizer.
  """
  recorded = config.tokenizer.workdir
  if os.path.isdir(recorded):
    return recorded
  sibling = os.path.join(os.path.dirname(os.path.abspath(workdir)), 'stage1')
  if os.path.isdir(os.path.join(sibling, 'checkpoints')):
    return sibling
  raise FileNotFoundError(
      f'The stage-2 run {workdir} was trained on the tokenizer {recorded}, '
      f'which does not exist (nor {sibling}); put the stage-1 run back or '
      'beside it as stage1/.')


def load_run(workdir: str | None = None, checkpoint: str | None = None,
             mesh: jax.sharding.Mesh | None = None) -> Generator:
  """The newest (or the named `checkpoint` step) of a stage-2 run."""
  step = None
  if checkpoint:
    checkpoint = os.path.abspath(checkpoint.rstrip('/'))
    workdir, step = os.path.dirname(os.path.dirname(checkpoint)), int(
        os.path.basename(checkpoint))
  if not workdir:
    raise ValueError('Give --workdir or --checkpoint.')
  mesh = mesh or sharding.create_mesh()
  ckpt = ckpt_lib.Checkpointer(workdir, save_every=0)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir} holds no finished checkpoint.')
  if step not in ckpt.all_steps():
    raise FileNotFoundError(
        f'No finished checkpoint {step} in {workdir}/checkpoints; it has '
        f'steps {ckpt.all_steps()} (use --workdir for the newest).')
  config = ml_collections.ConfigDict(ckpt.read_meta(step).get('config') or {})
  if config.get('stage') != 2:
    raise ValueError(f'{workdir} step {step} is not a stage-2 run.')
  tok = tokenizer_lib.load_stage1(tokenizer_workdir_of(config, workdir), mesh)
  model, layout = build_model(config, tok)
  # Only the params: the optimizer state is neither built nor read.
  variables, step = ckpt.restore_fields(_replicated_params(model, mesh),
                                        step if checkpoint else None)
  ckpt.close()
  return Generator(model, variables['params'], layout, tok, config, mesh,
                   step=step)


def save_bundle(gen: Generator, path: str,
                meta: dict[str, Any] | None = None) -> str:
  """Writes a 'generator' bundle: the tokenizer's bundle in path/tokenizer."""
  path = bundle_lib.save(path, kind='generator', config=gen.config,
                         variables={'params': gen.params},
                         meta={'step': gen.step, **(meta or {})})
  tokenizer_lib.save_bundle(gen.tokenizer, os.path.join(path, 'tokenizer'))
  return path


def load_bundle(path: str, mesh: jax.sharding.Mesh | None = None
                ) -> Generator:
  """`dqvq.load_generator`: a Generator from a bundle directory."""
  manifest = bundle_lib.read_manifest(path, kind='generator')
  mesh = mesh or sharding.create_mesh()
  config = manifest['config']
  tok = tokenizer_lib.load_bundle(os.path.join(manifest['path'], 'tokenizer'),
                                  mesh)
  config.tokenizer.workdir = tok.workdir
  model, layout = build_model(config, tok)
  variables = bundle_lib.restore_variables(
      path, {'params': transformer_lib.abstract_params(model)}, mesh)
  return Generator(model, variables['params'], layout, tok, config, mesh,
                   step=int(manifest['meta'].get('step', 0)))


def sample_to_dir(gen: Generator, out: str, num_images: int, *,
                  config: sampling.SamplingConfig | None = None,
                  class_labels: Sequence[int] = (), batch_size: int = 0
                  ) -> dict[str, np.ndarray]:
  """Samples `num_images` into `out`: images/, previews/, grids, tokens.npz.

  What `python -m dqvq.sample` and the end of a stage-2 run write. Every
  process samples its shard; process 0 writes the files.
  """
  start = time.time()
  with tqdm.tqdm(total=num_images, unit='img', desc='sampling') as bar:
    res = gen.sample(num_images, class_labels=class_labels, config=config,
                     batch_size=batch_size, on_batch=bar.update)
  seconds = time.time() - start
  if jax.process_index() != 0:
    return res
  images = visualize.to_uint8(res['image'])
  previews = visualize.to_uint8(res['preview'])
  for i in range(num_images):
    visualize.save_png(os.path.join(out, 'images', f'{i:05d}.png'), images[i])
    visualize.save_png(os.path.join(out, 'previews', f'{i:05d}.png'),
                       previews[i])
  visualize.save_png(os.path.join(out, 'grid.png'),
                     visualize.image_grid(images))
  visualize.save_png(os.path.join(out, 'preview_grid.png'),
                     visualize.image_grid(previews))
  np.savez(os.path.join(out, 'tokens.npz'),
           **{k: v for k, v in res.items() if k not in ('image', 'preview')})
  logging.info('%d images in %.1fs (%.2f images/s, %.1f codes/image; '
               'complete: %s) -> %s', num_images, seconds,
               num_images / seconds, float(np.mean(res['num_codes'])),
               bool(np.all(res['writes'] == 1)), out)
  return res


__all__ = ['Generator', 'SampledBatch', 'load_run', 'load_bundle',
           'save_bundle', 'sample_to_dir', 'build_model']
