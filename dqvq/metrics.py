"""Training-loop metrics: on-device accumulation, writers, progress lines.

The loop should touch the host only at logging steps: every step's metrics are
added to running sums on device (one small jitted add, dispatched
asynchronously), and one `jax.device_get` per logging interval turns the sums
into means. The writer is clu's default writer (absl log + TensorBoard event
files in the workdir); only process 0 writes files, other hosts just log.

Why not clu's pieces directly: `clu.metrics.Average` in a `Collection` needs
metric names that are Python identifiers fixed in a class, while our keys
('g_loss', 'val/rec', ...) come from the step's output dict; a pytree sum is
the same arithmetic with no class to declare. `clu.periodic_actions.
ReportProgress` (0.0.12) gives steps/s and an ETA with minute resolution, but
only through `platform.work_unit().set_notes`, without images/s, the loss, or
an injectable clock, so `ProgressReporter` below does the same job in the
format the README promises.

`quiet_console` is the default console of the `python -m dqvq...` verbs:
dqvq's own INFO lines (progress, validation, the end-of-run summary) and
every library's warnings, without the dozens of Orbax, TFDS and clu INFO
lines per logging step (clu's LoggingWriter repeats every scalar that
TensorBoard already gets); absl's `--verbosity`/`-v` brings them back.
"""

from __future__ import annotations

import logging as std_logging
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from clu import metric_writers
import jax
import jax.numpy as jnp
import numpy as np

MetricWriter = metric_writers.MetricWriter


def create_writer(workdir: str | os.PathLike[str],
                  process_index: int | None = None) -> MetricWriter:
  """clu's default writer with TensorBoard event files in `workdir`.

  Hosts other than process 0 get a logging-only writer, so a pod writes one
  set of event files instead of one per host.
  """
  if process_index is None:
    process_index = jax.process_index()
  return metric_writers.create_default_writer(
      os.fspath(workdir), just_logging=process_index > 0, asynchronous=True)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _OwnInfoFilter(std_logging.Filter):
  """INFO and above from dqvq's own modules, WARNING and above from all."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING or
            (record.levelno >= std_logging.INFO and
             os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)))


class _ConsoleFormatter(std_logging.Formatter):
  """'12:03:04 message'; warnings and errors say so first."""

  def __init__(self) -> None:
    super().__init__('%(asctime)s %(message)s', datefmt='%H:%M:%S')

  def format(self, record: std_logging.LogRecord) -> str:
    line = super().format(record)
    if record.levelno >= std_logging.WARNING:
      time_part, _, rest = line.partition(' ')
      line = f'{time_part} {record.levelname}: {rest}'
    return line


def quiet_console() -> None:
  """Short console lines, only dqvq's own INFO (see the module docstring).

  Call it after absl parsed the flags (absl's handler exists then), and only
  when the user did not ask for a verbosity.
  """
  handler = logging.get_absl_handler()
  handler.addFilter(_OwnInfoFilter())
  handler.setFormatter(_ConsoleFormatter())


def _to_float(value: Any) -> float:
  return float(np.asarray(jax.device_get(value)))


def write_scalars(writer: MetricWriter, step: int,
                  metrics: Mapping[str, Any]) -> None:
  """Writes scalars (floats, numpy or jax scalars) at `step`."""
  writer.write_scalars(int(step), {k: _to_float(v) for k, v in metrics.items()})


def write_images(writer: MetricWriter, step: int,
                 images: Mapping[str, np.ndarray]) -> None:
  """Writes uint8 images, each (H, W, C) or (N, H, W, C), at `step`.

  clu's SummaryWriter passes them to `tf.summary.image`, which takes uint8
  as is (floats would have to be in [0, 1]); a 3-D image gets a batch axis.
  """
  batch = {}
  for key, image in images.items():
    image = np.asarray(jax.device_get(image))
    if image.ndim not in (3, 4) or image.shape[-1] not in (1, 3, 4):
      raise ValueError(f'Image {key!r} has shape {image.shape}; expected '
                       '(H, W, C) or (N, H, W, C) with C in (1, 3, 4).')
    batch[key] = image
  writer.write_images(int(step), batch)


@jax.jit
def _add(sums: dict[str, jax.Array],
         metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return jax.tree.map(lambda s, m: s + jnp.asarray(m, jnp.float32), sums,
                      metrics)


class MetricsAccumulator:
  """Running means of per-step metric dicts, kept on device.

  `update` never blocks: it dispatches one jitted add of the step's scalars to
  float32 running sums (float32 so bf16 or int metrics neither overflow nor
  lose precision over an interval). `compute` does the interval's single
  device-to-host transfer. Keys may differ between steps (e.g. the GAN terms
  appear once the discriminator starts); each key is averaged over the steps
  that reported it.
  """

  def __init__(self) -> None:
    self._sums: dict[str, jax.Array] = {}
    self._counts: dict[str, int] = {}

  def update(self, metrics: Mapping[str, Any]) -> None:
    """Adds one step's metrics (scalars) to the running sums."""
    for key, value in metrics.items():
      if np.ndim(value) != 0:
        raise ValueError(f'Metric {key!r} has shape {np.shape(value)}; '
                         'reduce it to a scalar in the train step.')
    known = {k: v for k, v in metrics.items() if k in self._sums}
    if known:
      self._sums.update(_add({k: self._sums[k] for k in known}, known))
    for key, value in metrics.items():
      if key not in known:
        self._sums[key] = jnp.asarray(value, jnp.float32)
    for key in metrics:
      self._counts[key] = self._counts.get(key, 0) + 1

  add = update  # the name the training loop uses

  @property
  def count(self) -> int:
    """Steps seen since the last reset (for the most frequent key)."""
    return max(self._counts.values(), default=0)

  def compute(self, reset: bool = True) -> dict[str, float]:
    """Host means over the steps since the last reset (one device_get)."""
    sums = jax.device_get(self._sums)
    means = {k: float(sums[k]) / self._counts[k] for k in sums}
    if reset:
      self.reset()
    return means

  def reset(self) -> None:
    self._sums = {}
    self._counts = {}


def format_duration(seconds: float) -> str:
  """12345 -> '3h25m45s'; 585 -> '9m45s'; 42 -> '42s'; inf -> '?'."""
  if seconds is None or not math.isfinite(seconds):
    return '?'
  total = max(0, int(round(seconds)))
  days, rest = divmod(total, 86400)
  hours, rest = divmod(rest, 3600)
  minutes, secs = divmod(rest, 60)
  if days:
    return f'{days}d{hours:02d}h{minutes:02d}m'
  if hours:
    return f'{hours}h{minutes:02d}m{secs:02d}s'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


def _format_value(value: float) -> str:
  if value == 0 or 1e-3 <= abs(value) < 1e4:
    return f'{value:.4f}'
  return f'{value:.3e}'


class ProgressReporter:
  """Progress lines with steps/s, images/s and an ETA.

  Rates are measured between consecutive calls of `report` (or `start`). The
  first call only sets the clock's reference: call `start(step)` right after
  the first step, whose call returns once tracing and compilation are done,
  so the compile time never enters a rate. Without `start`, the first
  `report` becomes the reference and its line carries no rates.
  """

  def __init__(self,
               num_steps: int,
               images_per_step: int,
               *,
               every: int | None = None,
               clock: Callable[[], float] = time.monotonic,
               metric_keys: Sequence[str] | None = None,
               enabled: bool | None = None,
               log_fn: Callable[[str], None] | None = None) -> None:
    """Sets up the reporter.

    Args:
      num_steps: total steps of the run, for the percentage and ETA.
      images_per_step: global batch size, for images/s.
      every: `update` reports on steps divisible by this (and the last one);
        None reports on every call.
      clock: seconds, injectable so tests are deterministic.
      metric_keys: metrics shown in the line, in order; None shows all given.
      enabled: print lines; defaults to process 0 only.
      log_fn: where lines go; defaults to absl `logging.info`.
    """
    self.num_steps = int(num_steps)
    self.images_per_step = int(images_per_step)
    self._every = int(every) if every else None
    self._clock = clock
    self._metric_keys = tuple(metric_keys) if metric_keys else None
    self._enabled = (jax.process_index() == 0) if enabled is None else enabled
    self._log_fn = log_fn or (lambda line: logging.info('%s', line))
    self._last: tuple[int, float] | None = None

  def start(self, step: int) -> None:
    """Sets the reference (step, time) that the next report measures from."""
    self._last = (int(step), self._clock())

  def update(self, step: int,
             metrics: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per-step hook: reports on every `every`-th step and the last one.

    Safe to call after every step (cheap: one clock read on the first call,
    nothing on other off-steps) or only at logging steps. The first call
    sets the reference if it is not a reporting step, which is how calling
    it after every step keeps the compile out of the rates without `start`.
    Returns the rates on reporting steps, else {}.
    """
    step = int(step)
    due = (self._every is None or step % self._every == 0 or
           step >= self.num_steps)
    if not due:
      if self._last is None:
        self.start(step)
      return {}
    return self.report(step, metrics)

  def report(self, step: int,
             metrics: Mapping[str, float] | None = None) -> dict[str, float]:
    """Logs one progress line; returns {'steps_per_s', 'images_per_s'}.

    Returns {} when there was no reference yet or no step since it.
    """
    step, now = int(step), self._clock()
    rates = {}
    if self._last is not None and step > self._last[0] and now > self._last[1]:
      steps_per_s = (step - self._last[0]) / (now - self._last[1])
      rates = {'steps_per_s': steps_per_s,
               'images_per_s': steps_per_s * self.images_per_step}
    self._last = (step, now)
    if self._enabled:
      self._log_fn(self.format_line(step, metrics or {}, rates))
    return rates

  def format_line(self, step: int, metrics: Mapping[str, float],
                  rates: Mapping[str, float]) -> str:
    """'step 120/2000 (6.0%) | loss 0.1234 | 3.21 steps/s | ... | ETA 9m45s'."""
    pct = 100.0 * step / max(self.num_steps, 1)
    parts = [f'step {step}/{self.num_steps} ({pct:.1f}%)']
    keys = self._metric_keys or tuple(metrics)
    parts += [f'{k} {_format_value(float(metrics[k]))}'
              for k in keys if k in metrics]
    if rates:
      sps = rates['steps_per_s']
      parts.append(f'{sps:.2f} steps/s')
      parts.append(f"{rates['images_per_s']:.1f} img/s")
      eta = max(self.num_steps - step, 0) / sps
      parts.append(f'ETA {format_duration(eta)}')
    return ' | '.join(parts)


Progress = ProgressReporter
