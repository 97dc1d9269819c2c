"""The import graph points down only: every module has a layer and imports no higher layer.

The layer table is the architecture (README "Architecture"); a new module must be placed here.
Imports anywhere in a file count (function-local ones too), as in ../shared/tools/importgraph.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (module or package prefix, layer); the longest matching prefix wins.
LAYERS = {
    "pallas_kernels": 0,
    "deltajax.tree": 0,
    "deltajax.rope": 0,
    "deltajax.errors": 0,
    "deltajax.data": 0,
    "deltajax.quant": 0,
    "deltajax.jax_cache": 0,
    "deltajax.progress": 0,
    "deltajax.ops": 1,
    "deltajax.model": 1,
    "deltajax.parallel.sharding": 1,
    "deltajax.io": 1,
    "deltajax.containers": 2,
    "deltajax.accounting": 2,
    "deltajax.methods": 3,
    "deltajax.io.delta_ckpt": 4,
    "deltajax.steps": 4,
    "deltajax.parallel.sharded": 4,
    "deltajax.serve.multitenant": 4,
    "deltajax.delta": 5,
    "deltajax.serve": 6,
    "deltajax.eval": 6,
    "deltajax.train": 6,
    "deltajax.config": 4,
    "deltajax.cli": 7,
    "deltajax": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("deltajax", "pallas_kernels"):
        for p in (ROOT / pkg).rglob("*.py"):
            rel = p.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts)
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def _layer(mod: str) -> int:
    best = max((k for k in LAYERS if mod == k or mod.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"module {mod} has no layer in tests/test_layers.py LAYERS"
    return LAYERS[best]


def _imports(mod: str, path: Path, mods) -> set[str]:
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                       for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != mod:
                out.add(t)
    return out


def test_every_import_points_down_or_sideways():
    mods = _modules()
    bad = []
    for mod, path in sorted(mods.items()):
        for dep in sorted(_imports(mod, path, mods)):
            if _layer(dep) > _layer(mod):
                bad.append(f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})")
    assert not bad, "upward imports:\n  " + "\n  ".join(bad)


def test_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
