"""The package's imports point one way: core -> seeds -> ingest -> models -> billing -> stripe -> operations -> cli/defs.

Every import counts, including one inside a function: a lazy import hides a cycle, it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "billing_dags"

#: each top-level part of the package and its layer; a module may import only its own layer and the ones below
LAYERS = {
    "__init__": 0,
    "core": 0,
    "seeds": 1,
    "ingest": 2,
    "models": 3,
    "billing": 4,
    "stripe": 5,
    "operations": 6,
    "cli": 7,
    "defs": 7,
    "definitions": 7,
}
#: third-party packages only the top knows: Dagster and its Celery and Kubernetes executors (defs, and the CLI to
#: run jobs and workers), argparse and rich (the CLI)
TOP_ONLY = {
    "dagster": {"defs", "definitions", "cli"},
    **{lib: {"defs", "definitions", "cli"} for lib in ("dagster_celery", "dagster_k8s", "celery", "kombu", "redis")},
    "argparse": {"cli"},
    "rich": {"cli"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(billing_dags modules, third-party top-level names) that ``name`` imports anywhere in its file."""
    ours, theirs = set(), set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

    def add(target: str) -> None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            ours.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (add(alias.name) if alias.name.split(".")[0] == "billing_dags" else theirs.add(alias.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "billing_dags":
                theirs.add(target.split(".")[0])
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                add(full if full in modules else target)
    return ours, theirs


def _part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    ours, theirs = {}, {}
    for name, path in modules.items():
        ours[name], theirs[name] = _imports(name, path, modules)
    return ours, theirs


def test_every_part_of_the_package_has_a_layer():
    assert {_part(m) for m in _modules()} <= set(LAYERS), "a new top-level folder needs a layer in LAYERS"


def test_imports_point_one_way():
    ours, _ = _graph()
    wrong = [
        f"{a} (layer {LAYERS[_part(a)]}) imports {b} (layer {LAYERS[_part(b)]})"
        for a, targets in sorted(ours.items())
        for b in sorted(targets)
        if LAYERS[_part(b)] > LAYERS[_part(a)]
    ]
    assert not wrong, "imports pointing up the layers:\n" + "\n".join(wrong)


def test_nothing_but_the_cli_imports_the_cli_and_defs_never_does():
    ours, _ = _graph()
    wrong = [f"{a} imports {b}" for a, targets in sorted(ours.items()) for b in sorted(targets) if _part(b) == "cli" and _part(a) != "cli"]
    assert not wrong, "\n".join(wrong)


def test_only_the_top_knows_dagster_argparse_and_rich():
    _, theirs = _graph()
    wrong = [f"{a} imports {lib}" for a, libs in sorted(theirs.items()) for lib in sorted(libs) if lib in TOP_ONLY and _part(a) not in TOP_ONLY[lib]]
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_cycle():
    ours, _ = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(ours.get(v, ())):
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

    for v in sorted(ours):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from billing_dags.cli.main import x\n", {"billing_dags.cli.main"}),
        ("def f():\n    from billing_dags.billing import build\n", {"billing_dags.billing.build"}),
    ],
)
def test_the_graph_sees_top_level_and_function_level_imports(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    ours, _ = _imports("billing_dags.core.probe", path, _modules())
    assert ours == expected
