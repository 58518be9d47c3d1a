"""Metric accumulation, TensorBoard writing and progress lines."""

import glob
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from dqvq import metrics


def _read_events(logdir):
  """{tag: [(step, value)]}: scalars as floats, images as decoded arrays."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tensor = tf.make_ndarray(value.tensor)
        plugin = value.metadata.plugin_data.plugin_name
        if plugin == 'images':  # [width, height, png, png, ...]
          decoded = [np.asarray(Image.open(io.BytesIO(b))) for b in tensor[2:]]
          out.setdefault(value.tag, []).append((event.step, decoded))
        else:
          out.setdefault(value.tag, []).append((event.step, float(tensor)))
  return out


def test_writer_writes_readable_scalars_and_images(tmp_path):
  writer = metrics.create_writer(tmp_path, process_index=0)
  metrics.write_scalars(writer, 10, {'loss': jnp.float32(0.5), 'rec': 0.25})
  metrics.write_scalars(writer, 20, {'loss': np.float32(0.125)})
  picture = np.random.default_rng(0).integers(0, 256, (6, 8, 3), np.uint8)
  metrics.write_images(writer, 20, {'panel': picture})
  writer.flush()
  writer.close()
  events = _read_events(str(tmp_path))
  assert events['loss'] == [(10, 0.5), (20, 0.125)]
  assert events['rec'] == [(10, 0.25)]
  (step, decoded), = events['panel']
  assert step == 20
  np.testing.assert_array_equal(decoded[0], picture)


def test_writer_on_other_processes_only_logs(tmp_path):
  writer = metrics.create_writer(tmp_path, process_index=1)
  metrics.write_scalars(writer, 1, {'loss': 1.0})
  writer.flush()
  writer.close()
  assert not glob.glob(str(tmp_path / 'events.out.tfevents.*'))


def test_write_images_rejects_bad_shapes(tmp_path):
  writer = metrics.create_writer(tmp_path, process_index=1)
  with pytest.raises(ValueError, match='panel'):
    metrics.write_images(writer, 0, {'panel': np.zeros((4, 4), np.uint8)})


def test_accumulator_mean_equals_numpy_mean():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(7, 2)).astype(np.float32)
  acc = metrics.MetricsAccumulator()
  for a, b in values:
    acc.update({'loss': jnp.asarray(a), 'rec': jnp.asarray(b, jnp.bfloat16)})
  assert acc.count == 7
  means = acc.compute()
  assert isinstance(means['loss'], float)
  np.testing.assert_allclose(means['loss'], values[:, 0].mean(), rtol=1e-6)
  bf16 = np.asarray(jnp.asarray(values[:, 1], jnp.bfloat16), np.float32)
  np.testing.assert_allclose(means['rec'], bf16.mean(), rtol=1e-6)
  assert acc.count == 0 and acc.compute() == {}  # compute resets by default


def test_accumulator_keeps_sums_on_device_and_handles_new_keys():
  acc = metrics.MetricsAccumulator()
  acc.update({'loss': jnp.float32(1.0)})
  acc.update({'loss': jnp.float32(3.0), 'g_loss': jnp.float32(5.0)})
  acc.add({'loss': jnp.float32(5.0), 'g_loss': jnp.float32(7.0)})  # alias
  sums = acc._sums  # pylint: disable=protected-access
  assert all(isinstance(v, jax.Array) for v in sums.values())
  assert acc.compute(reset=False) == {'loss': 3.0, 'g_loss': 6.0}
  assert acc.count == 3
  with pytest.raises(ValueError, match='scalar'):
    acc.update({'loss': jnp.ones(3)})


@pytest.mark.parametrize('seconds, text', [
    (0, '0s'), (42.4, '42s'), (585, '9m45s'), (3600 + 120 + 3, '1h02m03s'),
    (2 * 86400 + 3 * 3600 + 4 * 60, '2d03h04m'), (float('inf'), '?')])
def test_format_duration(seconds, text):
  assert metrics.format_duration(seconds) == text


def test_progress_rates_from_injected_clock():
  times = iter([100.0, 150.0, 160.0])  # start (after compile), two reports
  lines = []
  rep = metrics.ProgressReporter(
      num_steps=2000, images_per_step=8, clock=lambda: next(times),
      enabled=True, log_fn=lines.append)
  rep.start(1)  # step 1 held the compile: it never enters a rate
  rates = rep.report(101, {'loss': 0.1234, 'rec': 0.0567})
  assert rates == {'steps_per_s': 2.0, 'images_per_s': 16.0}
  assert lines[-1] == ('step 101/2000 (5.0%) | loss 0.1234 | rec 0.0567 | '
                       '2.00 steps/s | 16.0 img/s | ETA 15m50s')
  rates = rep.report(121)  # 20 steps in 10 s since the previous report
  assert rates['steps_per_s'] == pytest.approx(2.0)
  assert 'steps/s' in lines[-1] and 'ETA 15m40s' in lines[-1]


def test_progress_without_start_and_disabled():
  times = iter([5.0, 9.0])
  lines = []
  rep = metrics.ProgressReporter(10, 4, clock=lambda: next(times),
                                 metric_keys=('loss',), enabled=False,
                                 log_fn=lines.append)
  assert rep.report(2, {'loss': 1.0, 'other': 2.0}) == {}  # reference only
  assert rep.report(6)['images_per_s'] == pytest.approx(4.0)
  assert not lines  # not process 0: nothing printed
  line = rep.format_line(6, {'loss': 1.0, 'other': 2.0}, {})
  assert line == 'step 6/10 (60.0%) | loss 1.0000'


def test_progress_update_every_step_excludes_compile():
  # Step 1 ends at t=60 (a minute of compiling), then 1 step per 0.5 s.
  clock_times = {1: 60.0, **{s: 60.0 + 0.5 * (s - 1) for s in range(2, 11)}}
  now = {'t': 0.0}
  lines = []
  rep = metrics.ProgressReporter(10, 2, every=5, clock=lambda: now['t'],
                                 enabled=True, log_fn=lines.append)
  results = {}
  for step in range(1, 11):
    now['t'] = clock_times[step]
    results[step] = rep.update(step, {'loss': 1.0})
  assert results[1] == {} and results[4] == {}
  assert results[5]['steps_per_s'] == pytest.approx(2.0)  # not 5 / 62 s
  assert results[10]['images_per_s'] == pytest.approx(4.0)
  assert len(lines) == 2 and lines[-1].endswith('ETA 0s')
