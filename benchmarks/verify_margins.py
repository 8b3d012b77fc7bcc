"""How far verify's fp32 gates sit from clean exports and from small export bugs.

    .venv/bin/python -m benchmarks.verify_margins                      # atto and tiny, markdown
    .venv/bin/python -m benchmarks.verify_margins --backbones atto --mutant-seeds 0,1,2

Exports clean models (random weights with trained-like layer scales, plus a briefly trained
atto) and the mutants of tests/unit/test_verify_mutations.py, verifies them on every input
kind with the tests' batch sizes, and prints, per gate, the worst clean value, the gate, and
the weakest mutant. A mutant fails when any gate fails, so its margin is its largest
value/gate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from heimdall.config import configure_logging
from heimdall.export import export_to_onnx
from heimdall.verify import Gates, ParityResult
from tests.unit.test_verify_mutations import (
    CLEAN_BATCH_SIZES,
    MUTANT_BATCH_SIZES,
    MUTANTS,
    TRAINED,
    build_mutant,
    make_model,
    verify,
)

MEASURES = ("max_abs", "mae")
LABELS = {"max_abs": "max abs", "mae": "MAE"}


@dataclass(frozen=True)
class Row:
    backbone: str
    model: str
    mutant: str | None
    values: dict[str, float]  # worst over outputs and batch sizes, per measure

    def ratio(self, gates: Gates) -> float:
        return max(self.values[m] / _gate(gates, m) for m in MEASURES)


def _gate(gates: Gates, measure: str) -> float:
    value = getattr(gates, measure)
    assert value is not None
    return float(value)


def _worst(result: ParityResult) -> dict[str, float]:
    return {m: max(float(getattr(d, m)) for d in result.diffs) for m in MEASURES}


def measure(backbone: str, seeds: list[int], mutant_seeds: list[int], folder: Path) -> list[Row]:
    rows = []
    for seed in seeds:
        model = make_model(backbone, seed)
        name = "trained" if seed == TRAINED else f"seed {seed}"
        clean = export_to_onnx(model, folder / f"{backbone}-{seed}.onnx").path
        rows.append(Row(backbone, name, None, _worst(verify(clean, model, CLEAN_BATCH_SIZES))))
        if seed not in mutant_seeds:
            continue
        for mutant in MUTANTS:
            path = build_mutant(mutant, model, clean, folder / f"{backbone}-{seed}-mutant.onnx")
            result = verify(path, model, MUTANT_BATCH_SIZES)
            rows.append(Row(backbone, name, mutant, _worst(result)))
    return rows


def margins_table(rows: list[Row], gates: Gates) -> str:
    lines = [
        "| backbone | gate | clean worst | threshold | weakest mutant |",
        "|---|---|---|---|---|",
    ]
    for backbone in dict.fromkeys(r.backbone for r in rows):
        clean = [r for r in rows if r.backbone == backbone and r.mutant is None]
        mutants = [r for r in rows if r.backbone == backbone and r.mutant is not None]
        for m in MEASURES:
            gate = _gate(gates, m)
            worst = max(r.values[m] for r in clean)
            smallest, name = min((r.values[m], r.mutant) for r in mutants)
            lines.append(
                f"| {backbone} | {LABELS[m]} | {worst:.1e} ({gate / worst:.1f}× under) | "
                f"{gate:.1e} | {smallest:.1e} {name} ({smallest / gate:.1f}× over) |"
            )
        weakest = min(mutants, key=lambda r: r.ratio(gates))
        worst = max(r.ratio(gates) for r in clean)
        lines.append(
            f"| {backbone} | either (verify fails) | {worst:.2f} of a gate | | "
            f"{weakest.ratio(gates):.1f}× a gate: {weakest.mutant} ({weakest.model}) |"
        )
    return "\n".join(lines)


def detail_table(rows: list[Row], gates: Gates) -> str:
    lines = ["| backbone | model | mutant | max abs | MAE | × gate |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r.backbone} | {r.model} | {r.mutant or 'clean'} | {r.values['max_abs']:.1e} | "
        f"{r.values['mae']:.1e} | {r.ratio(gates):.2f} |"
        for r in rows
    ]
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [TRAINED if v.strip() == "trained" else int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="atto,tiny")
    parser.add_argument("--seeds", default="0,1,2,trained", help="clean models, per backbone")
    parser.add_argument("--tiny-seeds", default="0,1", help="clean tiny models (110 MB each)")
    parser.add_argument("--mutant-seeds", default="0,1,2,trained", help="models to mutate")
    parser.add_argument("--tiny-mutant-seeds", default="0", help="tiny models to mutate")
    parser.add_argument("--json", action="store_true", help="one JSON document instead")
    args = parser.parse_args()
    configure_logging("ERROR")
    torch.set_num_threads(1)
    gates = Gates()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones.split(","):
            tiny = backbone == "tiny"
            seeds = _ints(args.tiny_seeds if tiny else args.seeds)
            mutated = _ints(args.tiny_mutant_seeds if tiny else args.mutant_seeds)
            rows += measure(backbone, seeds, mutated, Path(tmp))
    if args.json:
        print(json.dumps({"gates": gates.to_dict(), "rows": [r.__dict__ for r in rows]}))
        return
    clean, mutant = (", ".join(map(str, b)) for b in (CLEAN_BATCH_SIZES, MUTANT_BATCH_SIZES))
    print(
        f"Normalized region units, 4 input kinds, 1 thread; clean models at batch sizes {clean}, "
        f"mutants at batch size {mutant} only (as the tests run them).\n"
    )
    print(margins_table(rows, gates))
    print()
    print(detail_table(rows, gates))


if __name__ == "__main__":
    main()
