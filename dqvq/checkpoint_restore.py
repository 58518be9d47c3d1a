"""The restore side of `Checkpointer`: fallback, resume_step, config diffs.

Kept apart from the saving and stopping in `dqvq.checkpoint` because restoring
is where a run meets damage and change made since the save, and each case
needs its own answer:
- A committed step that no longer reads (files damaged later) or whose
  arrays fail the checksums stored in its `meta` is skipped with a warning
  and the next older one tried (`restore_latest`); the skipped steps are
  moved aside (`N.unreadable-<time>`, files kept) so the run can save again
  past them.
- When no step restores, `CheckpointRestoreError` lists every step tried
  and the config fields that differ from those the newest readable step was
  saved with: a changed model is the usual reason, and those fields are
  what the user has to set back.
- `restore(step=N)` (`--config.resume_step=N`) resumes from an older step
  with no fallback and moves the newer ones aside (`N.superseded-<time>`).
- `restore_fields` reads only some fields of a saved state (a tokenizer's
  params and codebook, a generator's params): loading a model for inference
  needs neither its optimizer nor its discriminator built or read.

`CheckpointRestorer` is a mixin: it needs the `directory`, `_config`,
`_manager` (an Orbax CheckpointManager with `state`, `data` and `meta`
items) and `all_steps()` that `Checkpointer` sets up. Every public name here
is re-exported by `dqvq.checkpoint`, which users and trainers import.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Sequence

from absl import logging
from etils import epath
from flax import traverse_util
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from dqvq.checksums import verify_checksums  # pylint: disable=g-importing-member

PyTree = Any


class CheckpointRestoreError(RuntimeError):
  """Every checkpoint step that exists failed to restore."""


def abstract_state_of(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs with shardings for every array leaf of `tree`.

  Restoring into these puts each shard straight onto its devices. Usually
  the loop builds the same thing without materialising the state, with
  `jax.eval_shape` and the shardings it plans to use.
  """
  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(leaf, tree)


class CheckpointRestorer:
  """Restores what `Checkpointer` saved; mixed into `Checkpointer`.

  Multi-host: every process must call `restore_latest` / `restore` with the
  same arguments (the moves aside end in a barrier).
  """

  # Set by `Checkpointer.__init__`, which also provides `all_steps()`.
  directory: epath.Path
  _config: Any
  _manager: ocp.CheckpointManager

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata of `step` alone (step, config, metrics).

    Lets a caller rebuild the model a checkpoint needs (e.g. stage 2 loading
    its tokenizer) before restoring the arrays.
    """
    restored = self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'] or {})

  def restore_latest(self, abstract_state: PyTree, data_iter: Any = None
                     ) -> tuple[PyTree, int, dict[str, Any]] | None:
    """Restores the newest step that reads back, or None if there is none.

    Arrays go straight into the shardings of `abstract_state` (a pytree of
    `jax.ShapeDtypeStruct` with `.sharding`, e.g. `jax.eval_shape` output with
    shardings attached), which may differ from the saved ones. `data_iter` is
    restored in place. A step that fails to read (missing or truncated files)
    or whose arrays fail their checksums is skipped with a warning, and the
    previous one tried.

    Raises:
      CheckpointRestoreError: steps exist but none could be restored.
    """
    unplaced = [jax.tree_util.keystr(path) for path, x in
                jax.tree_util.tree_flatten_with_path(abstract_state)[0]
                if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None]
    if unplaced:
      # Orbax would put these whole on the default device (and fail on
      # multi-host), which is what restoring into shardings is meant to avoid.
      logging.warning('Restoring %d leaves without a sharding onto the '
                      'default device (e.g. %s); attach the shardings of the '
                      'train step to the abstract state.', len(unplaced),
                      unplaced[:3])
    # A save of this process may still be in flight; another process may
    # have written since __init__.
    self._manager.wait_until_finished()
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    (state, meta), step, failures = self._newest_readable(
        steps, lambda s: self._restore_step(s, abstract_state, data_iter),
        hint=lambda: self._config_change_hint(steps))
    if failures:
      self._move_aside(sorted(failures), 'unreadable')
      logging.warning('Resumed from step %d; skipped unreadable step(s) %s.',
                      step, sorted(failures))
    return state, step, meta

  def _newest_readable(self, steps: Sequence[int],
                       read: Callable[[int], Any],
                       hint: Callable[[], str] | None = None
                       ) -> tuple[Any, int, dict[int, str]]:
    """`read(step)` of the first of `steps` (newest first) that reads back.

    Returns what it read, its step, and {step: error} of the ones skipped,
    each logged as a warning; raises CheckpointRestoreError, with `hint()`
    (called only then: it may read files), if none reads back.
    """
    failures = {}
    for step in steps:
      try:
        return read(step), step, failures
      except Exception as e:  # pylint: disable=broad-exception-caught
        failures[step] = f'{type(e).__name__}: {e}'
        logging.warning('Checkpoint step %d in %s is unreadable or damaged '
                        '(%s); trying an older step.', step, self.directory,
                        failures[step][:500])
    raise CheckpointRestoreError(
        f'No checkpoint in {self.directory} could be restored. Tried (newest '
        'first):\n  ' + '\n  '.join(
            f'step {s}: {err[:500]}' for s, err in failures.items()) +
        ('\n' + hint() if hint else ''))

  def restore(self, abstract_state: PyTree, data_iter: Any = None,
              step: int | None = None
              ) -> tuple[PyTree, int, dict[str, Any]] | None:
    """`restore_latest`, or with `step` that step and no fallback.

    Resuming from an older step (after a divergence that the newest steps
    already carry) moves the newer steps aside (`N.superseded-<time>`, files
    kept), so the run saves its new steps 'N+1...' again and the next
    restart resumes from those. The request is therefore a one-off: drop
    it once the run has saved past `step`.

    Raises:
      FileNotFoundError: `step` is not a finished checkpoint.
      CheckpointRestoreError: as `restore_latest`, or `step` does not read.
    """
    if not step:
      return self.restore_latest(abstract_state, data_iter)
    self._manager.wait_until_finished()
    self._manager.reload()
    steps = self.all_steps()
    if step not in steps:
      have = (f'steps {", ".join(map(str, steps))}; pick one of them'
              if steps else 'no checkpoint yet; drop it')
      raise FileNotFoundError(
          f'config.resume_step={step}, but {self.directory} holds {have}, or '
          'set 0 for the newest.')
    try:
      state, meta = self._restore_step(step, abstract_state, data_iter)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise CheckpointRestoreError(
          f'Checkpoint step {step} in {self.directory} does not restore '
          f'({type(e).__name__}: {str(e)[:500]}).\n'
          + self._config_change_hint([step])) from e
    newer = [s for s in steps if s > step]
    if newer:
      self._move_aside(newer, 'superseded')
      logging.warning('Resumed from step %d as asked (config.resume_step); '
                      'moved the newer step(s) %s aside. Drop resume_step '
                      'for the next resume.', step, newer)
    return state, step, meta

  def _config_change_hint(self, steps: Sequence[int]) -> str:
    """The config fields that differ from the newest readable stored config.

    A changed model is the usual reason why no step restores (the arrays'
    shapes differ), and the fields are what the user has to set back.
    """
    stored = None
    for step in steps:
      try:
        stored = self.read_meta(step).get('config')
        break
      except Exception:  # pylint: disable=broad-exception-caught
        continue  # that step's meta is damaged too; an older one may do
    if self._config is None or stored is None:
      return ('Check that the state structure matches the config the run '
              'was started with, or move the damaged step directories away '
              'to start over.')
    saved = traverse_util.flatten_dict(stored, sep='.')
    now = traverse_util.flatten_dict(self._config, sep='.')
    show = lambda tree, k: repr(tree[k]) if k in tree else '(absent)'
    diff = [f'{k}: {show(saved, k)} (checkpoint) vs {show(now, k)} (config)'
            for k in sorted(saved.keys() | now.keys())
            if show(saved, k) != show(now, k)]
    if not diff:
      return (f'The config equals the one step {step} was saved with: the '
              'files are damaged, or this code builds another state from the '
              'same config. Move the step directories away to start over.')
    return (f'The config differs from the one step {step} was saved with; '
            'set these back to resume, or train the changed model in a new '
            '--workdir:\n  ' + '\n  '.join(diff[:30]) +
            (f'\n  ... and {len(diff) - 30} more' if len(diff) > 30 else ''))

  def restore_step(self, step: int, abstract_state: PyTree
                   ) -> tuple[PyTree, dict[str, Any]]:
    """Restores one named step (state, meta) into `abstract_state`'s
    shardings, with no fallback: for tools that load a chosen checkpoint."""
    if step not in self.all_steps():
      raise FileNotFoundError(f'No finished checkpoint {step} in '
                              f'{self.directory} (have {self.all_steps()}).')
    return self._restore_step(step, abstract_state, None)

  def restore_fields(self, abstract: dict[str, PyTree],
                     step: int | None = None
                     ) -> tuple[dict[str, PyTree], int]:
    """Only the named top-level fields of a saved state, and their step.

    `abstract` maps field names ('params', 'codebook') to abstract trees
    with shardings, as for `restore_latest`; the other fields are not read.
    The arrays are checked against the checksums saved with the step. With
    `step` None the newest step that reads back is used (damaged ones are
    skipped with a warning but, unlike a training resume, left in place).
    """
    steps = sorted(self.all_steps(), reverse=True)
    if step is not None and step not in steps:
      raise FileNotFoundError(f'No finished checkpoint {step} in '
                              f'{self.directory} (have {sorted(steps)}).')
    if step is not None:
      return self._restore_fields(step, abstract), step
    restored, step, _ = self._newest_readable(
        steps, lambda s: self._restore_fields(s, abstract))
    return restored, step

  def _restore_fields(self, step: int, abstract: dict[str, PyTree]
                      ) -> dict[str, PyTree]:
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    with ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(
          self.directory / str(step) / 'state',
          args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                      partial_restore=True))
    recorded = self.read_meta(step).get('checksums') or {}
    # Saved from a state dataclass (`.params[...]`), read back as a dict.
    verify_checksums(restored, {re.sub(r'^\.(\w+)', r"['\1']", path): value
                                for path, value in recorded.items()})
    return restored

  def _move_aside(self, steps: Sequence[int], why: str) -> None:
    """Renames steps out of Orbax's sight, keeping their files.

    Left in place, an unreadable (or superseded) step would stay
    `latest_step()`, so the resumed run could not save again until it passed
    that step, and the next restart would resume from it again. The new name
    (`N.<why>-<time>`) does not parse as a step, so Orbax ignores it;
    nothing is deleted.
    """
    if jax.process_index() == 0:
      stamp = int(time.time())
      for step in steps:
        src = self.directory / str(step)
        dst = self.directory / f'{step}.{why}-{stamp}'
        if src.exists():
          src.rename(dst)
          logging.warning('Moved %s checkpoint %s to %s.', why, src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'dqvq_checkpoint_{why}')
    self._manager.reload()

  def _restore_step(self, step: int, abstract_state: PyTree, data_iter: Any
                    ) -> tuple[PyTree, dict[str, Any]]:
    items = {'state': ocp.args.StandardRestore(abstract_state),
             'meta': ocp.args.JsonRestore()}
    if data_iter is not None:
      if (self.directory / str(step) / 'data').exists():
        items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
      else:
        logging.warning('Step %d has no data-iterator state; the input '
                        'pipeline starts from its beginning.', step)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    meta = dict(restored['meta'] or {})
    verify_checksums(restored['state'], meta.get('checksums'))
    return restored['state'], meta
