r"""Per-HLO-op time breakdown of a jitted function on CPU, via jax.profiler.

Captures one call in a profiler trace and sums event durations per XLA op
(thunk) name, so one sees which convolutions / fusions dominate a step.
Dot thunks run asynchronously, so matmul time is under-reported; use it
to rank convolutions and fusions, and stage1_ab.py for end-to-end numbers.
"""

from __future__ import annotations

import collections
import re
import glob
import os
import tempfile
from typing import Any, Callable

import jax
from jax._src.lib import _profile_data  # pylint: disable=g-direct-tensorflow-import


def op_times(fn: Callable[..., Any], *args: Any) -> dict[str, float]:
  """Seconds per op name, summed over all threads, for one call of fn."""
  jax.block_until_ready(fn(*args))  # Compile and warm up outside the trace.
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      jax.block_until_ready(fn(*args))
    path = glob.glob(os.path.join(d, '**', '*.xplane.pb'), recursive=True)[0]
    data = _profile_data.ProfileData.from_file(path)
  totals = collections.defaultdict(float)
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        totals[(plane.name, line.name, ev.name)] += ev.duration_ns * 1e-9
  return dict(totals)


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Maps each top-level instruction name to (result shape, op_name)."""
  ops = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)[ {]', line)
    if not m:
      continue
    meta = re.search(r'op_name="([^"]*)"', line)
    ops[m.group(1)] = (m.group(2), meta.group(1) if meta else '')
  return ops


def breakdown(fn: Callable[..., Any], *args: Any,
              categorize: Callable[[str, str, str], str]) -> dict[str, float]:
  """Seconds per category of one call: categorize(event, shape, op_name)."""
  jitted = jax.jit(fn)
  ops = hlo_ops(jitted.lower(*args).compile().as_text())
  per_cat = collections.defaultdict(float)
  for (_, line, event), secs in op_times(jitted, *args).items():
    if not line.startswith('tf_XLAEigen') or event not in ops:
      continue
    shape, op_name = ops[event]
    per_cat[categorize(event, shape, op_name)] += secs
  return dict(per_cat)


def default_category(event: str, shape: str, op_name: str) -> str:
  """conv fwd / conv input grad / weight grad / norm / other, with shape."""
  del event
  parts = op_name.split('/')
  if 'conv_general_dilated' in op_name:
    kind = 'conv dx' if 'transpose(' in op_name else 'conv fwd'
    return f'{kind} {shape}'
  if 'dot_general' in op_name and 'conv' in op_name:
    return 'conv dW (matmul)'
  for key in ('GroupNorm', 'norm', 'attn', 'lpips', 'LPIPS', 'disc'):
    if any(key in p for p in parts):
      return f'other in {key}'
  return 'other'
