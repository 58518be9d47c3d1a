r"""Exports a training run as an inference bundle (see dqvq.inference.bundle).

  python -m dqvq.export --workdir /runs/stage1 --out /bundles/tokenizer
  python -m dqvq.export --workdir /runs/stage2 --out /bundles/generator \
      [--checkpoint /runs/stage2/checkpoints/STEP] \
      [--programs encode,decode,sample --program_batch 8 --platforms cpu,cuda]

The stage comes from the run's checkpoint: a stage-1 run gives a tokenizer
bundle, a stage-2 run a generator bundle with its tokenizer inside. Only
inference weights are written (no optimizer, discriminator or data state; the
codebook is the EMA one training kept). `--programs` adds serialized
`jax.export` programs, callable without dqvq's Python model code:
encode(variables, images) and decode(variables, codes) with a symbolic batch
size, sample(params, labels, key_data) at `--program_batch` (the sampler's
buffers have static shapes). Read them with `dqvq.inference.bundle`'s
`load_program`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp

from dqvq import checkpoint as ckpt_lib
from dqvq.cpu import tuning as cpu_tuning
from dqvq.inference import generator as generator_lib
from dqvq.inference import tokenizer as tokenizer_lib
from dqvq import sampling

PROGRAMS = ('encode', 'decode', 'sample')
_DIR = 'programs'


def _write(path: str, name: str, fn: Callable[..., Any], args: Sequence[Any],
           platforms: Sequence[str] | None) -> dict[str, Any]:
  exported = jax.export.export(jax.jit(fn), platforms=platforms)(*args)
  os.makedirs(os.path.join(path, _DIR), exist_ok=True)
  with open(os.path.join(path, _DIR, f'{name}.jax'), 'wb') as f:
    f.write(exported.serialize())
  return {'in_avals': [str(a) for a in exported.in_avals],
          'out_avals': [str(a) for a in exported.out_avals],
          'platforms': list(exported.platforms)}


def export_tokenizer_programs(tok: tokenizer_lib.Tokenizer, path: str,
                              names: Sequence[str],
                              platforms: Sequence[str] | None = None
                              ) -> dict[str, Any]:
  """encode / decode with a symbolic batch dimension 'b'."""
  tok = tokenizer_lib.for_platforms(tok, platforms)
  res = tok.config.data.resolution
  grid = res // tok.vae.grain_factors[-1]  # codes live on the finest grid
  (b,) = jax.export.symbolic_shape('b')
  variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                           tok.variables)
  specs = {}
  if 'encode' in names:
    specs['encode'] = _write(
        path, 'encode',
        lambda v, x: tok.replace(**v).encode(x),
        (variables, jax.ShapeDtypeStruct((b, res, res, 3), jnp.float32)),
        platforms)
  if 'decode' in names:
    specs['decode'] = _write(
        path, 'decode', lambda v, c: tok.replace(**v).decode(c),
        (variables, jax.ShapeDtypeStruct((b, grid, grid), jnp.int32)),
        platforms)
  return specs


def export_sample_program(gen: generator_lib.Generator, path: str,
                          batch: int, config: sampling.SamplingConfig,
                          platforms: Sequence[str] | None = None
                          ) -> dict[str, Any]:
  """sample(params, labels (batch,), key_data (2,) uint32) -> streams + images.

  Raw key data rather than a typed key keeps the program's signature plain
  arrays for any caller.
  """
  sampler = sampling.make_sampler(gen.model, config)
  tok = tokenizer_lib.for_platforms(gen.tokenizer, platforms)

  def sample(params, labels, key_data):
    out = sampler(params, labels, jax.random.wrap_key_data(key_data))
    pics = generator_lib.decode_streams(tok, out['content'],
                                        out['position'], gen.layout,
                                        previews=False)
    return {'image': pics['image'], 'codes': pics['codes'],
            'grain_map': pics['grain_map'], 'content': out['content'],
            'position': out['position'], 'num_codes': out['num_codes']}

  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        gen.params)
  return {'sample': _write(
      path, 'sample', sample,
      (params, jax.ShapeDtypeStruct((batch,), jnp.int32),
       jax.ShapeDtypeStruct((2,), jnp.uint32)), platforms)}


def export_run(workdir: str | None, out: str, *, checkpoint: str | None = None,
               programs: Sequence[str] = (), program_batch: int = 1,
               platforms: Sequence[str] | None = None) -> str:
  """Bundle of a stage-1 or stage-2 run; returns the bundle path."""
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown:
    raise ValueError(f'--programs {unknown} unknown; choose from {PROGRAMS}.')
  if checkpoint:
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(
        checkpoint.rstrip('/'))))
  if not workdir or not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(f'{workdir!r} is not a training workdir (no '
                            'checkpoints/); give --workdir of a dqvq.train run.')
  ckpt = ckpt_lib.Checkpointer(workdir, save_every=0)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f'{workdir} holds no finished checkpoint.')
  stage = ckpt.read_meta(step).get('config', {}).get('stage', 1)
  ckpt.close()
  meta = {'exported_from': os.path.abspath(workdir)}
  if stage == 1:
    if checkpoint:
      raise ValueError('--checkpoint names a stage-2 step; a stage-1 export '
                       'takes the newest step of --workdir.')
    if 'sample' in programs:
      raise ValueError('A tokenizer bundle has no sample program.')
    tok = tokenizer_lib.load_stage1(workdir)
    path = tokenizer_lib.save_bundle(tok, out, meta)
  else:
    gen = generator_lib.load_run(workdir, checkpoint)
    path = generator_lib.save_bundle(gen, out, meta)
    tok = gen.tokenizer
  specs: dict[str, Any] = {}
  if programs:
    specs.update(export_tokenizer_programs(tok, path, programs, platforms))
  if 'sample' in programs:
    specs.update(export_sample_program(gen, path, program_batch,
                                       sampling.SamplingConfig(), platforms))
  if specs:
    with open(os.path.join(path, _DIR, 'programs.json'), 'w') as f:
      json.dump(specs, f, indent=1)
  return path


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags; only when run as a script (dqvq.train defines
  --workdir too, and absl refuses a second definition in one process)."""
  flags.DEFINE_string('workdir', None, 'A dqvq.train run directory.')
  flags.DEFINE_string('checkpoint', None,
                      'A stage-2 step directory instead of the newest.')
  flags.DEFINE_string('out', None, 'The bundle directory to create.')
  flags.DEFINE_list('programs', [], f'Subset of {PROGRAMS}.')
  flags.DEFINE_integer('program_batch', 1,
                       'Batch of the exported sample program.')
  flags.DEFINE_list('platforms', None, 'Platforms of the programs (cpu, '
                    "cuda, rocm, tpu); default: this machine's.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.out or not (FLAGS.workdir or FLAGS.checkpoint):
    raise app.UsageError('--out and --workdir (or --checkpoint) are needed.')
  cpu_tuning.prepare_process()  # CPU runs only; may restart once
  path = export_run(FLAGS.workdir, FLAGS.out, checkpoint=FLAGS.checkpoint,
                    programs=FLAGS.programs,
                    program_batch=FLAGS.program_batch,
                    platforms=FLAGS.platforms)
  logging.info('Wrote %s', path)
  print(path)


if __name__ == '__main__':
  define_flags()
  app.run(main)
