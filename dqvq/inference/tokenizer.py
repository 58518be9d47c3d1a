"""A trained DQ-VAE, frozen, as stage 2 and the tools use it.

`load_stage1(workdir)` reads the config stored with a stage-1 run's
checkpoint, rebuilds the model and restores its weights (params and EMA
codebook). `Tokenizer.encode` turns images into the code map and grain map
that `dqvq.sequence` turns into token streams, and `decode` turns code maps
back into images. The fingerprint (a hash of every weight) is what token
datasets record, so stage 2 can refuse tokens made by another checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dqvq import checkpoint as ckpt_lib
from dqvq.cpu import tuning as cpu_tuning
from dqvq.inference import bundle as bundle_lib
from dqvq.models import dqvae
from dqvq import sharding

Array = jax.Array


@flax.struct.dataclass
class Tokenizer:
  """Frozen DQ-VAE weights plus the static module (a pytree: jit-friendly)."""
  params: Any
  codebook: Any
  vae: Any = flax.struct.field(pytree_node=False)
  config: Any = flax.struct.field(pytree_node=False)  # the stage-1 config
  step: int = flax.struct.field(pytree_node=False, default=0)
  fingerprint: str = flax.struct.field(pytree_node=False, default='')
  workdir: str = flax.struct.field(pytree_node=False, default='')

  @property
  def variables(self) -> dict[str, Any]:
    return {'params': self.params, 'codebook': self.codebook}

  def encode(self, images: Array,
             grain_ratios: tuple[float, ...] | None = None, *,
             check_inputs: bool = True) -> dict[str, Array]:
    """Images (B, H, W, 3) in [-1, 1] -> code map, grain map, code length.

    'codes' (B, G, G) lies on the finest grid (a coarse region's code repeats
    over its cells), 'grain_map' (B, g, g) holds grain ids (0 = coarsest) and
    'code_length' (B,) the codes each image takes. `grain_ratios` (coarse to
    fine shares, summing to 1) sets the code budget per image instead of the
    trained one; every router but 'none' takes it.

    `check_inputs` (default True) refuses what the model would silently turn
    into garbage codes: non-float (e.g. uint8) images, values outside
    [-1, 1] (a forgotten rescale: [0, 255] images come out all coarse), NaN
    or inf (code 0 everywhere), and non-NHWC shapes; see `check_images`.
    Under jit only dtype and shape can be checked (a tracer has no values),
    so check before jitting; False skips every check.
    """
    if check_inputs:
      check_images(images)
    if grain_ratios is not None:
      grain_ratios = tuple(float(r) for r in grain_ratios)
    return _encode(self.vae, self.variables, images, grain_ratios)

  def decode(self, codes: Array, *, check_inputs: bool = True) -> Array:
    """Code map (B, G, G) -> images in [-1, 1].

    The decoder's output is clipped to [-1, 1], the range of every image
    this project reads or writes. The official decoder returns it unclipped
    (about 1% of its pixels lie outside on random-init parity runs); to
    compare raw arrays with it, apply `vae.decode_codes` instead
    (tests/test_official_parity.py does).

    `check_inputs` (default True) refuses non-integer codes and ids outside
    [0, codebook_size), which the codebook lookup would turn into NaN
    images; see `check_codes` (values only outside jit, as for `encode`).
    """
    if check_inputs:
      check_codes(codes, self.vae.codebook_size)
    return _decode(self.vae, self.variables, codes)


# Compiled once per model, budget and input shape, and inlined when a caller
# is itself traced (stage 2's step). Run op by op instead, one encode of a
# batch cost the demo model ~5 s of dispatch on CPU, every call.
@functools.partial(jax.jit, static_argnames=('vae', 'grain_ratios'))
def _encode(vae: Any, variables: Any, images: Array,
            grain_ratios: tuple[float, ...] | None) -> dict[str, Array]:
  out = vae.apply(variables, images, train=False, grain_ratios=grain_ratios,
                  method=vae.encode, rngs={'router': jax.random.key(0),
                                           'gumbel': jax.random.key(0)})
  return {'codes': out['codes'].astype(jnp.int32),
          'grain_map': out['grain_map'].astype(jnp.int32),
          'code_length': out['code_length'].astype(jnp.int32)}


@functools.partial(jax.jit, static_argnames=('vae',))
def _decode(vae: Any, variables: Any, codes: Array) -> Array:
  out = vae.apply(variables, codes, method=vae.decode_codes)
  return jnp.clip(out, -1.0, 1.0)


# How far past [-1, 1] images may stray (resampling, float round-off) before
# `check_images` calls them out of range.
RANGE_TOLERANCE = 1e-3


def _value_range(x: Any) -> tuple[Any, Any] | None:
  """(min, max) of a concrete array as host scalars; None under jit or empty.

  Two reductions where the array lives (no host copy of the batch); NaN
  propagates through both, so a non-finite min or max means non-finite
  values.
  """
  if isinstance(x, jax.core.Tracer) or not x.size:
    return None
  if isinstance(x, jax.Array):
    return tuple(v.item() for v in jax.device_get((jnp.min(x), jnp.max(x))))
  return np.min(x).item(), np.max(x).item()


def check_images(images: Any) -> None:
  """Raises ValueError unless `images` are float NHWC RGB batches in [-1, 1].

  The model itself accepts any array and returns codes for it, so a user who
  forgets to rescale would only see bad tokens; each error names the fix.
  [0, 1] images pass (they lie in [-1, 1]). dtype and shape are checked
  always, values (a min/max reduction) only on concrete arrays.
  """
  x = images if hasattr(images, 'dtype') else np.asarray(images)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f'images have dtype {x.dtype}; encode takes float images in [-1, 1]: '
        'convert uint8 [0, 255] pixels with x / 127.5 - 1.')
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(
        f'images have shape {tuple(x.shape)}; encode takes RGB batches '
        '(B, H, W, 3), channels last (add a batch axis with x[None]).')
  span = _value_range(x)
  if span is None:
    return
  lo, hi = float(span[0]), float(span[1])
  if not (np.isfinite(lo) and np.isfinite(hi)):
    raise ValueError(f'images hold NaN or inf (min {lo}, max {hi}); encode '
                     'takes finite float images in [-1, 1].')
  if lo < -1.0 - RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
    hint = ('they look like [0, 255] pixels: use x / 127.5 - 1'
            if lo >= -RANGE_TOLERANCE and 2.0 < hi <= 255.0 + RANGE_TOLERANCE
            else 'rescale them')
    raise ValueError(f'images span [{lo:.4g}, {hi:.4g}]; encode takes float '
                     f'images in [-1, 1] ({hint}).')


def check_codes(codes: Any, codebook_size: int) -> None:
  """Raises ValueError unless `codes` are (B, G, G) ids in [0, codebook_size).

  An id past the codebook (or negative) looks up no embedding and decodes to
  NaN; float codes would be truncated. Values are checked only on concrete
  arrays, as in `check_images`.
  """
  x = codes if hasattr(codes, 'dtype') else np.asarray(codes)
  valid = (f'integer code ids in [0, {codebook_size - 1}] (this codebook has '
           f'{codebook_size} codes)')
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f'codes have dtype {x.dtype}; decode takes {valid}, as '
                     "encode returns them in 'codes'.")
  if x.ndim != 3:
    raise ValueError(f'codes have shape {tuple(x.shape)}; decode takes code '
                     "maps (B, G, G) on the finest grid (encode's 'codes').")
  span = _value_range(x)
  if span is not None and not (0 <= span[0] and span[1] < codebook_size):
    raise ValueError(f'codes span [{span[0]}, {span[1]}]; decode takes '
                     f'{valid}.')


def fingerprint(tree: Any) -> str:
  """SHA-256 (first 16 hex digits) over every leaf's path, dtype and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    arr = np.asarray(jax.device_get(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()[:16]


def _stage1_config(meta_config: dict[str, Any],
                   workdir: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(meta_config)
  thresholds = config.model.get('entropy_thresholds')
  if config.model.get('router') != 'entropy':
    return config  # the table is only read by the entropy router
  if isinstance(thresholds, str) and thresholds and not os.path.exists(
      thresholds):
    # The run directory was moved: look for the table next to the checkpoints.
    local = os.path.join(workdir, os.path.basename(thresholds))
    if not os.path.exists(local):
      raise FileNotFoundError(
          f'The stage-1 run routes with {thresholds}, which does not exist '
          f'(nor {local}); copy the entropy threshold JSON back.')
    config.model.entropy_thresholds = local
  return config


def abstract_variables(config: ml_collections.ConfigDict) -> Any:
  """Shapes of the DQ-VAE's inference variables {'params', 'codebook'}."""
  vae = dqvae.from_config(config.model)
  res = config.data.resolution
  rngs = {k: jax.random.key(0)
          for k in ('params', 'gumbel', 'restart', 'router', 'dropout')}
  shapes = jax.eval_shape(lambda: vae.init(rngs, jnp.zeros((1, res, res, 3))))
  return {'params': shapes['params'], 'codebook': shapes['codebook']}


def _inference_vae(config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh | None) -> Any:
  """The DQ-VAE for the devices it will run on (`dqvq.cpu.tuning`)."""
  devices = mesh.devices.flat if mesh is not None else jax.devices()
  return dqvae.from_config(config.model,
                            cpu_kernels=cpu_tuning.cpu_kernels(devices))


def for_platforms(tok: Tokenizer, platforms: Sequence[str] | None
                  ) -> Tokenizer:
  """`tok` with the convolutions every one of `platforms` should run.

  CPU kernels only when all of them are CPUs (None: this process's
  platform); a program exported for cuda or tpu holds none of them.
  """
  targets = set(platforms or (jax.default_backend(),))
  cpu = targets == {'cpu'} and cpu_tuning.enabled()
  return tok.replace(vae=tok.vae.clone(cpu_kernels=cpu))


def save_bundle(tok: Tokenizer, path: str,
                meta: dict[str, Any] | None = None) -> str:
  """Writes `tok` as a 'tokenizer' bundle (see dqvq.inference.bundle)."""
  meta = {'step': tok.step, 'fingerprint': tok.fingerprint,
          'source': tok.workdir, **(meta or {})}
  return bundle_lib.save(path, kind='tokenizer', config=tok.config,
                         variables=tok.variables, meta=meta)


def load_bundle(path: str, mesh: jax.sharding.Mesh | None = None
                ) -> Tokenizer:
  """`dqvq.load_tokenizer`: a Tokenizer from a bundle directory."""
  manifest = bundle_lib.read_manifest(path, kind='tokenizer')
  config = manifest['config']
  variables = bundle_lib.restore_variables(
      path, abstract_variables(config), mesh)
  tok = Tokenizer(params=variables['params'], codebook=variables['codebook'],
                  vae=_inference_vae(config, mesh), config=config,
                  step=int(manifest['meta'].get('step', 0)),
                  workdir=manifest['path'],
                  fingerprint=fingerprint((variables['params'],
                                           variables['codebook'])))
  recorded = manifest['meta'].get('fingerprint')
  if recorded and recorded != tok.fingerprint:
    raise bundle_lib.damaged_error(
        path, f'the weights do not match the fingerprint {recorded} recorded '
        'at export')
  return tok


def load_stage1(workdir: str, mesh: jax.sharding.Mesh | None = None
                ) -> Tokenizer:
  """The newest readable checkpoint of the stage-1 run in `workdir`."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(
        f'No stage-1 checkpoints in {workdir!r}: train the tokenizer first '
        '(python -m dqvq.train --config configs/<name>_stage1.py --workdir '
        f'{workdir}) or point config.tokenizer.workdir at a finished run.')
  checkpointer = ckpt_lib.Checkpointer(workdir, save_every=0)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f'{ckpt_dir} holds no finished checkpoint.')
  meta = checkpointer.read_meta(step)
  if not meta.get('config'):
    raise ValueError(f'Checkpoint {step} in {workdir} stores no config; it was '
                     'not written by dqvq.train.')
  config = _stage1_config(meta['config'], workdir)
  if config.get('stage', 1) != 1:
    raise ValueError(f'{workdir} is a stage-{config.stage} run, not a '
                     'tokenizer (stage 1).')
  mesh = mesh or sharding.create_mesh()
  abstract = abstract_variables(config)
  replicated = sharding.replicated(mesh)
  target = sharding.with_shardings(
      abstract, jax.tree.map(lambda _: replicated, abstract))
  # Only what inference uses: no optimizer, discriminator or LPIPS is built.
  variables, step = checkpointer.restore_fields(target)
  checkpointer.close()
  vae = _inference_vae(config, mesh)
  params, codebook = variables['params'], variables['codebook']
  return Tokenizer(params=params, codebook=codebook, vae=vae, config=config,
                   step=step, workdir=os.path.abspath(workdir),
                   fingerprint=fingerprint((params, codebook)))


__all__ = ['Tokenizer', 'load_stage1', 'load_bundle', 'save_bundle',
           'abstract_variables', 'fingerprint', 'check_images', 'check_codes']
