"""The packages' import graph, read from the source with ``ast`` (function-level imports included).

* no import cycle anywhere in ``ta_opd``, ``slime`` (slime_ta_opd/slime) and a top-level ``slime_patch``;
* ``ta_opd`` is the leaf library: it imports neither ``slime`` (ours or upstream's), nor Ray, nor an
  HTTP client or server library.

An edge ``a -> b`` is any ``import``/``from ... import`` statement in module ``a``, at any depth (module
level, inside a function, under ``if TYPE_CHECKING``), naming module ``b`` of these packages (``from
pkg import name`` names the submodule ``pkg.name`` when there is one, else ``pkg``). A package's
``__init__`` is an ordinary module: importing ``pkg.mod`` is an edge to ``pkg.mod`` only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ta_opd": ROOT / "ta_opd", "slime": ROOT / "slime_ta_opd" / "slime", "slime_patch": ROOT / "slime_patch"}
FORBIDDEN_IN_TA_OPD = ("slime", "slime_patch", "ray", "aiohttp", "requests", "httpx", "urllib3", "fastapi", "uvicorn")


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for root in PACKAGES.values():
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _imported_names(module: str, path: Path) -> list[tuple[str, str, int]]:
    """Every import statement of ``module`` as (name, fallback, line), names absolute.

    ``import x.y`` gives (x.y, x.y); ``from x import y`` gives (x.y, x): the submodule x.y if there is one,
    else the module x that defines the name y.
    """
    out: list[tuple[str, str, int]] = []
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out += [(f"{prefix}.{alias.name}", prefix, node.lineno) for alias in node.names]
    return out


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for name, fallback, _ in _imported_names(module, path):
            target = name if name in mods else fallback
            while target and target not in mods and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in mods and target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graphs are a few hundred modules deep at most
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
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in components:  # a shortest way back to the start, inside the component
        start, members = comp[0], set(comp)
        paths = {start: [start]}
        frontier = [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        cycles.append(paths[last] + [start])
    return cycles


def test_the_walker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n    return g\n")
    (pkg / "b.py").write_text("from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import f\nimport os\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGES", {"pkg": pkg})
    mods = _modules()
    graph = _graph(mods)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.a"}
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_no_import_cycles():
    graph = _graph(_modules())
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("path", sorted(PACKAGES["ta_opd"].rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_ta_opd_imports_no_stack_ray_or_http(path):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    bad = [
        f"{path.relative_to(ROOT)}:{line}: imports {fallback}"
        for _, fallback, line in _imported_names(module, path)
        if fallback.split(".")[0] in FORBIDDEN_IN_TA_OPD
    ]
    assert not bad, "ta_opd is the leaf library:\n" + "\n".join(sorted(set(bad)))
