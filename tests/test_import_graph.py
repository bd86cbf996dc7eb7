"""The import graph of the `jpeft` package: imports go down the layer order, no cycles, and no module inside
the package imports the façade.

The graph is built in a fresh `python -c` process from the installed package's source: every `import` and
`from ... import` of a `jpeft` module, function-local ones included (a cycle hidden inside a function is
still a cycle). An edge goes to each module an import statement names (`from jpeft.methods import lora` ->
`jpeft.methods` and `jpeft.methods.lora`); the implicit import of parent packages is not an edge.

The layer order (README: Layout) is the table `LAYERS`, lowest first: a module may import from its own layer
or a lower one only. A module belongs to the layer whose prefix names it most closely; `app` (the package
itself, `api`, `cli*`, `loading`, `generate`, ...) is every top-level module the table names no lower layer for.
"""

from __future__ import annotations

import json
import subprocess
import sys

GRAPH = r'''
import ast, importlib.util, json, pathlib, sys

def files():
    out = {}
    for pkg in ("jpeft", "jpeft.torch_bridge", "jpeft.kernels"):
        root = pathlib.Path(importlib.util.find_spec(pkg).submodule_search_locations[0])
        for p in root.rglob("*.py"):
            rel = p.relative_to(root).with_suffix("").parts
            name = ".".join((pkg,) + tuple(x for x in rel if x != "__init__"))
            out.setdefault(name, p)
    return out

mods = files()

def targets(module, node):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        is_pkg = mods[module].name == "__init__.py"
        parts = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]

graph = {}
for name, path in mods.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            edges |= {t for t in targets(name, node) if t in mods and t != name}
    graph[name] = sorted(edges)

index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def visit(v):
    index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
    for w in graph[v]:
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))
for v in sorted(graph):
    if v not in index:
        visit(v)
print(json.dumps({"graph": graph, "cycles": sccs}))
'''


def _graph() -> dict:
    out = subprocess.run([sys.executable, "-c", GRAPH], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (  # lowest first
    ("base", ("jpeft.errors", "jpeft.dtypes", "jpeft.cache", "jpeft.runtime")),
    ("quant", ("jpeft.quant",)),
    ("kernels", ("jpeft.kernels",)),
    ("sites", ("jpeft.sites",)),  # the site protocol: what models and methods share
    ("models", ("jpeft.models",)),
    ("torch_bridge", ("jpeft.torch_bridge",)),  # file formats: models.config and quant, never methods
    ("optim", ("jpeft.optim",)),  # plain optax transforms
    ("methods", ("jpeft.methods",)),
    ("parallel", ("jpeft.parallel",)),  # meshes and partition rules; takes the step function as an argument
    ("train", ("jpeft.train",)),
    ("app", ("jpeft",)),
)


def layer_of(module: str) -> tuple[int, str]:
    """(rank, name) of the layer whose prefix names `module` most closely."""
    best = max(((len(p), rank) for rank, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    if best is None:
        raise AssertionError(f"{module} is outside the jpeft package")
    return best[1], LAYERS[best[1]][0]


def upward_edges(graph: dict[str, list[str]]) -> list[str]:
    """Every import `a -> b` whose target sits in a higher layer than its importer, as text."""
    out = []
    for module, targets in sorted(graph.items()):
        (rank, name) = layer_of(module)
        for target in targets:
            t_rank, t_name = layer_of(target)
            if t_rank > rank:
                out.append(f"{module} ({name}) -> {target} ({t_name})")
    return out


def test_imports_go_down_the_layer_order():
    graph = _graph()["graph"]
    used = {layer_of(m)[1] for m in graph}
    assert used == {name for name, _ in LAYERS}, f"layers naming no module: {sorted({n for n, _ in LAYERS} - used)}"
    bad = upward_edges(graph)
    assert bad == [], f"{len(bad)} import(s) against the layer order (README: Layout):\n  " + "\n  ".join(bad)


def test_the_layer_check_reports_a_planted_upward_import():
    """The checker itself: the real graph plus one import from quant up into kernels is reported, alone."""
    graph = _graph()["graph"]
    assert upward_edges(graph) == []
    planted = {**graph, "jpeft.quant.kernel": [*graph["jpeft.quant.kernel"], "jpeft.kernels.nf4_matmul"]}
    assert upward_edges(planted) == ["jpeft.quant.kernel (quant) -> jpeft.kernels.nf4_matmul (kernels)"]


def test_no_import_cycles_among_jpeft_modules():
    res = _graph()
    assert len(res["graph"]) > 40 and "jpeft.torch_bridge.hf_names" in res["graph"]  # the walk found the package
    assert "jpeft.methods.lora" in res["graph"]["jpeft.methods.catalog"]  # and its edges
    assert res["cycles"] == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in res["cycles"])


API_IMPORTERS_ALLOWED = {"jpeft"}  # the package's own __init__ re-exports the façade; nothing else imports it


def test_no_module_inside_the_package_imports_the_facade():
    graph = _graph()["graph"]
    importers = {m for m, edges in graph.items() if "jpeft.api" in edges}
    assert importers <= API_IMPORTERS_ALLOWED, sorted(importers - API_IMPORTERS_ALLOWED)
    assert "jpeft.api" in graph["jpeft"]


def test_the_graph_check_finds_a_cycle(tmp_path):
    """The checker itself: the same algorithm reports a planted two-module cycle."""
    code = GRAPH.replace('mods = files()', 'mods = {"a": A, "b": B}').replace(
        "import ast,", "A = pathlib.Path(sys.argv[1]); B = pathlib.Path(sys.argv[2])\nimport ast,")
    code = "import pathlib, sys\n" + code
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.py"), str(tmp_path / "b.py")], check=True,
                         capture_output=True, text=True)
    assert json.loads(out.stdout)["cycles"] == [["a", "b"]]
