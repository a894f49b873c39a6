"""The package's import structure: a strict downward graph, no import inside a function."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "coopjax"


def _modules() -> dict:
  mods = {}
  for f in ROOT.rglob("*.py"):
    parts = f.relative_to(ROOT.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    mods[name] = f
  return mods


def _targets(mods: dict, module: str, node) -> list[str]:
  names = []
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom):
    base = node.module or ""
    if node.level:
      pkg = module.split(".")
      if mods[module].name != "__init__.py":
        pkg = pkg[:-1]
      pkg = pkg[: len(pkg) - node.level + 1]
      base = ".".join(pkg + ([base] if base else []))
    names = [base] + [f"{base}.{a.name}" for a in node.names]
  return [n for n in names if n in mods]


def _graph():
  mods = _modules()
  edges = {m: set() for m in mods}
  lazy = []
  for module, path in mods.items():
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        for target in _targets(mods, module, node):
          if target == module or "coopjax" in (module, target):
            continue
          edges[module].add(target)
          if id(node) not in top:
            lazy.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} imports {target}")
  return edges, lazy


def test_no_coopjax_import_inside_a_function():
  _, lazy = _graph()
  assert not lazy, "\n".join(lazy)


def test_no_import_cycle():
  edges, _ = _graph()
  # Tarjan's strongly connected components.
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in edges:
    if v not in index:
      visit(v)
  assert not cycles, cycles


def test_the_checker_sees_a_cycle_and_a_lazy_import(tmp_path, monkeypatch):
  """The checks above can fail: a two-module package with both defects is caught."""
  pkg = tmp_path / "coopjax"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from coopjax import b\n")
  (pkg / "b.py").write_text("def f():\n  from coopjax import a\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
  edges, lazy = _graph()
  assert edges["coopjax.a"] == {"coopjax.b"} and edges["coopjax.b"] == {"coopjax.a"}
  assert lazy == ["coopjax/b.py:2 imports coopjax.a"]
