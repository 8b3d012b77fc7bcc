"""The import graph of src/heimdall follows ``cli → orchestration → stages → core`` (issue 11).

Imports are read with ``ast`` (at any depth, inside functions too; ``if TYPE_CHECKING:`` blocks
do not run, so they do not count), so the test imports nothing it checks.
Layers, bottom up: core (torch-free), torch (the model), stages, orchestration, cli.
``benchmarks/import_graph.py`` prints the graph's levels and its stage-to-stage edges.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "heimdall"

# Torch-free modules every layer may use; they import nothing but each other.
CORE = frozenset(
    {
        "errors",
        "config",
        "contract",
        "files",
        "runtime",
        "retry",
        "timing",
        "machine",
        "tracking",
        "data",
        "objects",
        "onnxfile",
        "parity",
        "parity_graph",
        "optimize_graph",
        "heldout",
    }
)
# The PyTorch model and what trains and stores it: core below, no stage.
TORCH = frozenset({"model", "checkpoint", "train", "roofline"})
# Stages work on one thing (an ONNX file, the object store, the registry, a report); they build
# on the core and the PyTorch layer, never on each other.
STAGES = frozenset(
    {"export", "validate", "verify", "optimize", "bench", "storage", "registry", "report"}
)
# Compositions of stages, and the public API (``heimdall``, the package itself); serving
# (``inference``) composes registry, storage and runtime as publishing does.
ORCHESTRATION = frozenset(
    {
        "heimdall",
        "inference",
        "gates",
        "results",
        "steps",
        "preflight",
        "pipeline",
        "demo",
        "legacy",
    }
)
# The inference side: HTTP serving that follows the registry, and batch scoring; torch-free.
SERVING = frozenset({"serving", "scoring", "scoring_workers"})
CLI = frozenset({"cli", "cli_registry", "cli_measure", "cli_serve", "cli_score", "display"})
LAYERS = {
    "core": CORE,
    "torch": TORCH,
    "stages": STAGES,
    "orchestration": ORCHESTRATION,
    "serving": SERVING,
    "cli": CLI,
}
# What each layer may import, besides itself (stages: not each other, see below).
MAY_IMPORT = {
    "core": {"core"},
    "torch": {"core", "torch"},
    "stages": {"core", "torch"},
    "orchestration": {"core", "torch", "stages", "orchestration"},
    "serving": {"core", "stages", "orchestration"},
    "cli": {"core", "torch", "stages", "orchestration", "serving"},
}
FORBIDDEN = frozenset({("optimize", "verify"), ("verify", "validate"), ("verify", "export")})
# Stage-to-stage imports still to remove. Empty this set as they go: the test fails while an
# edge listed here no longer exists, so the list never claims more than the code does.
KNOWN_PENDING: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path) -> str:
    """``src/heimdall/registry/client.py`` → ``heimdall.registry.client`` (packages by __init__)."""
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def component(module: str) -> str:
    """The layer unit a module belongs to: ``heimdall.registry.client`` → ``registry``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _runtime_nodes(tree: ast.AST, optional: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node and whether it sits in a ``try`` that catches ImportError (an optional
    import), except those under ``if TYPE_CHECKING:``, which never run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield child, optional
                yield from _runtime_nodes(child, optional)
            continue
        yield node, optional
        if isinstance(node, ast.Try) and _catches_import_error(node):
            for child in node.body:
                yield child, True
                yield from _runtime_nodes(child, True)
            for rest in (*node.handlers, *node.orelse, *node.finalbody):
                yield rest, optional
                yield from _runtime_nodes(rest, optional)
            continue
        yield from _runtime_nodes(node, optional)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _catches_import_error(node: ast.Try) -> bool:
    caught = {
        n.id
        for handler in node.handlers
        if handler.type is not None
        for n in ast.walk(handler.type)
        if isinstance(n, ast.Name)
    }
    return bool(caught & {"ImportError", "ModuleNotFoundError"})


def imported_names(path: Path, module: str, *, optional: bool = True) -> Iterator[str]:
    """Dotted names ``path`` (module ``module``) imports at run time, relative imports resolved;
    ``optional=False`` leaves out imports inside a ``try`` that catches ImportError."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node, is_optional in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if is_optional and not optional:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


@functools.cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SOURCE / PACKAGE).rglob("*.py"))}


@functools.cache
def import_graph() -> dict[str, frozenset[str]]:
    """Each heimdall module → the heimdall modules it imports (``from a import b``: a.b if a
    module, else a)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for imported in imported_names(path, name):
            if imported == PACKAGE or imported.startswith(PACKAGE + "."):
                while imported not in known:
                    imported = imported.rpartition(".")[0]
                targets.add(imported)
        graph[name] = frozenset(targets - {name})
    return graph


@functools.cache
def required_third_party() -> dict[str, frozenset[str]]:
    """Each heimdall module → the other packages it cannot load without (optional ones left
    out: ``machine`` probes torch's backends only where torch is installed)."""
    return {
        name: frozenset(n.split(".")[0] for n in imported_names(path, name, optional=False) if n)
        - {PACKAGE}
        for name, path in modules().items()
    }


def layer(name: str) -> str:
    """The layer of a component (``registry``) or module (``heimdall.registry.client``)."""
    unit = component(name) if name.startswith(PACKAGE) else name
    return next(layer for layer, members in LAYERS.items() if unit in members)


def component_edges(graph: Mapping[str, frozenset[str]]) -> set[tuple[str, str]]:
    return {
        (component(a), component(b))
        for a, targets in graph.items()
        for b in targets
        if component(a) != component(b)
    }


def stage_edges(graph: Mapping[str, frozenset[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in component_edges(graph) if a in STAGES and b in STAGES}


def cycles(graph: Mapping[str, frozenset[str]]) -> list[list[str]]:
    """Each import cycle once, as the modules along it (depth-first search)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def levels(graph: Mapping[str, frozenset[str]]) -> dict[str, int]:
    """Each module's level: 0 imports no heimdall module, else 1 + its highest import's."""

    @functools.cache
    def level(node: str) -> int:
        return 1 + max((level(t) for t in graph[node]), default=-1)

    return {node: level(node) for node in graph}


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking() -> None:
    graph = import_graph()
    assert "heimdall.export" in graph["heimdall.cli"]  # imported inside a command
    assert "heimdall.model" not in graph["heimdall.validate"]  # only under TYPE_CHECKING
    assert "heimdall.registry.client" in graph and "heimdall.storage" in graph


def test_an_import_guarded_by_import_error_is_optional(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text(
        "import numpy\n"
        "def probe():\n"
        "    try:\n"
        "        import torch\n"
        "    except ImportError:\n"
        "        import json\n"
    )
    assert set(imported_names(module, "probe", optional=False)) == {"numpy", "json"}
    assert "torch" in set(imported_names(module, "probe"))


def test_every_module_has_a_layer() -> None:
    placed = frozenset().union(*LAYERS.values())
    assert sorted({component(m) for m in import_graph()} - placed) == []
    assert sum(len(members) for members in LAYERS.values()) == len(placed), "a unit in two layers"


def test_imports_go_down_the_layers() -> None:
    upward = sorted(
        f"{module} ({layer(module)}) → {target} ({layer(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer(target) not in {layer(module), *MAY_IMPORT[layer(module)]}
    )
    assert upward == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("core", sorted(CORE))
def test_core_module_imports_only_core_and_never_torch(core: str) -> None:
    name = f"{PACKAGE}.{core}"
    assert name in import_graph(), f"{name} is listed as core but does not exist"
    above = sorted(t for t in import_graph()[name] if component(t) not in CORE)
    assert above == [], f"{name} imports modules above the core"
    # Optional imports (inside ``try/except ImportError``) leave a torch-free install working.
    assert "torch" not in required_third_party()[name]


def test_serving_never_needs_torch() -> None:
    """A `serve` install has no torch: nothing serving or scoring imports, at any depth, does."""
    graph = import_graph()
    reached: set[str] = set()
    todo = [m for m in graph if component(m) in SERVING]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    torch_side = sorted(m for m in reached if component(m) in TORCH)
    needs_torch = sorted(m for m in reached if "torch" in required_third_party()[m])
    assert torch_side == [] and needs_torch == []


@pytest.mark.parametrize(("stage", "other"), sorted(FORBIDDEN))
def test_forbidden_stage_import_is_gone(stage: str, other: str) -> None:
    assert (stage, other) not in component_edges(import_graph())


def test_no_stage_imports_another_but_the_known_pending() -> None:
    assert stage_edges(import_graph()) - KNOWN_PENDING == set()


@pytest.mark.parametrize(("stage", "other"), sorted(KNOWN_PENDING))
def test_known_pending_edge_still_exists(stage: str, other: str) -> None:
    assert (stage, other) in stage_edges(import_graph()), (
        f"{stage} → {other} is gone: remove it from KNOWN_PENDING in {Path(__file__).name}"
    )


def test_cycle_finder_and_levels_on_a_small_graph() -> None:
    graph = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset()}
    assert cycles(graph) == []
    assert levels(graph) == {"a": 2, "b": 1, "c": 0}
    assert cycles({**graph, "c": frozenset({"a"})}) == [["a", "b", "c", "a"]]


def test_the_readme_layout_names_every_module() -> None:
    """The README's Layout block lists each module once, so the map matches the code."""
    readme = (SOURCE.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed = set()
    for line in block.splitlines():
        package = re.match(r"\s*(\w+)/\s+", line)  # "  storage/   s3, …": the package too
        if package:
            listed.add(package[1])
            line = line[package.end() :]
        names = re.split(r"(?<=\S)\s{3,}", line.strip())[0]  # not the description column
        listed |= set(re.findall(r"\w+", names))
    modules = {
        path.stem if path.stem != "__init__" else path.parent.name
        for path in (SOURCE / "heimdall").rglob("*.py")
    } - {"__main__"}

    assert sorted(m for m in modules if m not in listed) == []
