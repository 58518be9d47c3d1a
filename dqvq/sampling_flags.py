"""The sampling flags that `python -m dqvq.sample` and `dqvq.evaluate` share.

Both verbs draw samples with the same choices (temperature, top-k/p,
guidance, code floors and caps, seed); the flags are defined here once so
that neither verb imports the other.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from dqvq import sampling

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags of `sampling.SamplingConfig` and the class labels."""
  flags.DEFINE_multi_integer('class_label', [], 'Class ids (cycled); default: '
                             'every class in turn.')
  flags.DEFINE_float('temperature', 1.0, 'Contents.')
  flags.DEFINE_float('temperature_position', None,
                     'Positions (default --temperature).')
  flags.DEFINE_integer('top_k', 0, 'Contents; 0 = off.')
  flags.DEFINE_integer('top_k_position', 0, 'Positions.')
  flags.DEFINE_float('top_p', 1.0, 'Contents; 1 = off.')
  flags.DEFINE_float('top_p_position', 1.0, 'Positions.')
  flags.DEFINE_float('cfg_scale', 1.0, 'Guidance on contents (1 = off).')
  flags.DEFINE_float('cfg_scale_position', None,
                     'Guidance on positions (default --cfg_scale).')
  flags.DEFINE_bool('greedy', False, 'Argmax instead of sampling.')
  flags.DEFINE_list('min_codes', None, 'Floor per granularity.')
  flags.DEFINE_list('max_codes', None, 'Cap per granularity.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def _ints(values: Sequence[str] | None) -> tuple[int, ...] | None:
  return tuple(int(v) for v in values) if values else None


def from_flags() -> sampling.SamplingConfig:
  """The SamplingConfig the parsed `define_flags` flags name."""
  return sampling.SamplingConfig(
      temperature_content=FLAGS.temperature,
      temperature_position=(FLAGS.temperature
                            if FLAGS.temperature_position is None
                            else FLAGS.temperature_position),
      top_k_content=FLAGS.top_k, top_k_position=FLAGS.top_k_position,
      top_p_content=FLAGS.top_p, top_p_position=FLAGS.top_p_position,
      greedy=FLAGS.greedy, cfg_scale_content=FLAGS.cfg_scale,
      cfg_scale_position=FLAGS.cfg_scale if FLAGS.cfg_scale_position is None
      else FLAGS.cfg_scale_position,
      min_codes=_ints(FLAGS.min_codes), max_codes=_ints(FLAGS.max_codes),
      seed=FLAGS.seed)
