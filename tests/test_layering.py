"""The package's layers import only downward (issue 16).

Read with `ast` (nothing is imported): every `dqvq` import, at module level
or inside a function, is an edge. No module may reach itself through them,
and the layers that inference, conversion and configs stand on (models/,
inference/, interop/, config_lib, sequence, sampling) may not import a
trainer or an entry point: a user loading a tokenizer must not pull in
optimizers, discriminators or flag parsing.
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'dqvq')

# `python -m dqvq.<verb>` and the tools: flags -> one library call.
ENTRY_POINTS = ('dqvq.train', 'dqvq.sample', 'dqvq.evaluate', 'dqvq.export',
                'dqvq.tokenize', 'dqvq.convert', 'dqvq.codec', 'dqvq.study',
                'dqvq.tools')
LOWER_LAYERS = ('dqvq.models', 'dqvq.inference', 'dqvq.interop',
                'dqvq.config_lib', 'dqvq.sequence', 'dqvq.sampling')


def module_files(root: str = PACKAGE) -> dict[str, str]:
  """Module name -> file, for every .py under `root`."""
  out = {}
  base = os.path.dirname(root)
  for dirpath, _, files in os.walk(root):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, base)[:-3].replace(os.sep, '.')
        out[name.removesuffix('.__init__')] = path
  return out


def import_graph(files: dict[str, str]) -> dict[str, set[str]]:
  """Module -> the dqvq modules it imports (a package's __init__ by name)."""
  graph = {}
  for name, path in files.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.level == 0 and (
          node.module or '').split('.')[0] == 'dqvq':
        for alias in node.names:
          full = f'{node.module}.{alias.name}'
          deps.add(full if full in files else node.module)
      elif isinstance(node, ast.Import):
        deps.update(a.name for a in node.names
                    if a.name.split('.')[0] == 'dqvq')
    deps.discard(name)
    graph[name] = {d for d in deps if d in files}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
  return any(name == p or name.startswith(p + '.') for p in prefixes)


def downward_violations(graph: dict[str, set[str]]) -> list[str]:
  bad = []
  for name, deps in sorted(graph.items()):
    if not _under(name, LOWER_LAYERS):
      continue
    for d in sorted(deps):
      if _under(d, ('dqvq.trainers',) + ENTRY_POINTS):
        bad.append(f'{name} imports {d}')
  return bad


def test_no_import_circle():
  found = cycles(import_graph(module_files()))
  assert not found, f'import circles: {found}'


def test_lower_layers_import_no_trainer_or_entry_point():
  bad = downward_violations(import_graph(module_files()))
  assert not bad, '\n'.join(bad)


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
  """The checker itself: a planted circle and a model importing a trainer."""
  pkg = tmp_path / 'dqvq'
  for sub in ('', 'models', 'trainers'):
    (pkg / sub).mkdir(exist_ok=True)
    (pkg / sub / '__init__.py').write_text('')
  (pkg / 'models' / 'a.py').write_text('from dqvq.trainers import b\n')
  (pkg / 'trainers' / 'b.py').write_text(
      'def f():\n  from dqvq.models import a\n')
  graph = import_graph(module_files(str(pkg)))
  assert cycles(graph) == [['dqvq.models.a', 'dqvq.trainers.b']]
  assert downward_violations(graph) == [
      'dqvq.models.a imports dqvq.trainers.b']


@pytest.mark.parametrize('module', ['dqvq.inference.tokenizer',
                                    'dqvq.inference.generator'])
def test_inference_objects_import_models_directly(module):
  deps = import_graph(module_files())[module]
  assert any(_under(d, ('dqvq.models',)) for d in deps), deps
