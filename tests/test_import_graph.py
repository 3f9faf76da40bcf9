"""The library's modules import each other without cycles (issue 15): every `import` and
`from ... import` of `ssl3d_jax`, at module level or inside a function, is an edge of the graph,
and no strongly connected component may hold more than one module.

In-function imports count: they hide a cycle from Python's import machinery, not from the
reader who has to follow the code.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def module_files(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """{dotted module name: file} of every module under `package_dir` (packages by `__init__`)."""
    out = {}
    for f in sorted(package_dir.rglob("*.py")):
        parts = f.relative_to(package_dir.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
    """{module: modules of the same package it imports, anywhere in its source}."""
    mods = module_files(package_dir)
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        package = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` mod.
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m:
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_library_has_no_import_cycle():
    graph = import_graph(ROOT / "ssl3d_jax")
    assert len(graph) > 40 and graph["ssl3d_jax.run"], "the graph was not built"
    assert "ssl3d_jax.train.arms" in graph["ssl3d_jax.train.classify"]
    found = cycles(graph)
    assert not found, "import cycles (in-function imports included): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_a_cycle_through_an_in_function_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("import pkg.a as a\n")
    (pkg / "d.py").write_text("from pkg import a\n")  # imports into the cycle, not part of it
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("")
    assert cycles(import_graph(pkg)) == []


def test_the_library_does_not_import_the_repository_configs_package():
    # The configs/ folder is the repository's (and the CLI's); the library reads a task's config
    # file by path (ssl3d_jax.tasks.task_config), so it works wherever the files are.
    found = []
    for name, f in module_files(ROOT / "ssl3d_jax").items():
        source = f.read_text()
        for node in ast.walk(ast.parse(source, str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            found += [f"{name}: import {t}" for t in targets if t.split(".")[0] == "configs"]
        if 'import_module(f"configs.' in source or "import_module('configs." in source:
            found.append(f"{name}: importlib.import_module('configs.…')")
    assert not found, found
