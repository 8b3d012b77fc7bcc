"""The import graph of src/heimdall: its levels and every stage-to-stage import (issue 11).

    .venv/bin/python -m benchmarks.import_graph

Reads the sources with ``ast`` like tests/unit/test_layers.py (same rules: imports at any
depth, ``if TYPE_CHECKING:`` left out). A module's level is the length of its longest chain of
heimdall imports: 0 imports none; the deepest module's level + 1 is the number of levels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from tests.unit.test_layers import (
    CORE,
    KNOWN_PENDING,
    LAYERS,
    component,
    cycles,
    import_graph,
    levels,
    stage_edges,
)


def print_levels(graph: Mapping[str, frozenset[str]], what: str) -> None:
    by_level: dict[int, list[str]] = defaultdict(list)
    for node, level in levels(graph).items():
        by_level[level].append(node.removeprefix("heimdall."))
    print(f"{len(graph)} {what}, {len(by_level)} levels (longest import chain)")
    for level in sorted(by_level):
        print(f"{level:2d}  {', '.join(sorted(by_level[level]))}")
    print()


def main() -> None:
    graph = import_graph()
    components: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        components[component(module)].update(component(t) for t in targets)
    print_levels(graph, "modules")
    print_levels(
        {c: frozenset(targets - {c}) for c, targets in components.items()},
        "components (a package counts as one: registry, storage)",
    )
    found = cycles(graph)
    print(f"import cycles: {len(found)}")
    for cycle in found:
        print("  " + " → ".join(cycle))
    print("\nstage → stage imports (module-level detail):")
    edges = stage_edges(graph)
    for a, b in sorted(edges):
        status = "pending" if (a, b) in KNOWN_PENDING else "NEW"
        via = sorted(
            f"{m.removeprefix('heimdall.')} → {t.removeprefix('heimdall.')}"
            for m, targets in graph.items()
            for t in targets
            if component(m) == a and component(t) == b
        )
        print(f"  {a} → {b} [{status}]: {'; '.join(via)}")
    if not edges:
        print("  none")
    core_up = sorted(
        (m, t)
        for m, targets in graph.items()
        if component(m) in CORE
        for t in targets
        if component(t) not in CORE
    )
    print(f"\ncore modules importing above the core: {len(core_up) or 'none'}")
    for m, t in core_up:
        print(f"  {m} → {t}")
    for name, members in LAYERS.items():
        print(f"{name}: {', '.join(sorted(members))}")


if __name__ == "__main__":
    main()
