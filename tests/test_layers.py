"""The packages import one way: a module may import its own layer or a lower one.

The graph is read with ``ast`` from every import statement, those inside functions
included (a lazy import still makes the lower layer depend on the higher one).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configlib", "cluster", "models", "data_pipeline", "trainer")
# lowest first; a module belongs to the longest prefix that names it
LAYERS: list[tuple[str, ...]] = [
    ("configlib",),  # recipe machinery: imports nothing of ours
    ("cluster.env",),  # where am I (local / torchrun / SLURM / Ray)
    ("models",),  # architectures only
    ("data_pipeline",),  # shards, loader, tokenizers, encoders
    ("trainer",),  # config schema, objectives, samplers, backends, loop
    ("cluster",),  # Ray and SLURM runners, which drive the loop
    ("trainer.launch",),  # the entry point that picks a runner
]


def layer_of(module: str) -> int:
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best >= 0, f"{module} is in no layer"
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, name: str) -> set[str]:
    """Project modules ``path`` imports (``from a import b`` counts a and a.b)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    names = {module_name(p): p for p in files}
    return {name: {m for m in imported(p, name) if m in names} for name, p in names.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, targets in edges.items()
        for dst in targets
        if layer_of(dst) > layer_of(src)
    )


def test_no_module_imports_a_higher_layer() -> None:
    edges = graph()
    assert len(edges) > 50  # the walk found the tree
    assert upward_imports(edges) == []


def test_an_upward_import_is_reported() -> None:
    # the check itself can fail: a model importing the trainer, and configlib importing anything
    edges = {"models.mmdit": {"trainer.loop"}, "configlib": {"models.mmdit"}, "trainer.loop": set()}
    assert upward_imports(edges) == [
        "configlib (layer 0) imports models.mmdit (layer 2)",
        "models.mmdit (layer 2) imports trainer.loop (layer 4)",
    ]


def test_configlib_imports_nothing_of_ours() -> None:
    assert graph()["configlib"] == set()


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(out)


def without_packages(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop the edges into a package's ``__init__`` that merely stand for ``from pkg import mod``:
    ``from trainer.objectives import ar`` names both ``trainer.objectives`` and ``.ar``."""
    return {
        src: {d for d in dsts if not any(o.startswith(d + ".") for o in dsts)}
        for src, dsts in edges.items()
    }


def test_no_import_cycles() -> None:
    # a cycle, lazy imports included, means two modules can only be understood together
    assert import_cycles(without_packages(graph())) == []


def test_an_import_cycle_is_reported() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert import_cycles(edges) == [["a", "b", "c"]]
