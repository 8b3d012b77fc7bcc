"""Reproduce the README's performance table: PyTorch eager vs ONNX Runtime fp32 / int8 / fp16.

    .venv/bin/python benchmarks/bench_inference.py                 # markdown report
    .venv/bin/python benchmarks/bench_inference.py --json          # one JSON document
    .venv/bin/python benchmarks/bench_inference.py --tune --profile --budget 30

Exports LocalizationNet (``--backbone``, random weights unless ``--checkpoint``), builds the
requested variants, gates each against the PyTorch model on the held-out set, then times
every engine interleaved in one process with one thread count. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from tune_sessions import OpProfile, profile_ops, tune_session  # a sibling: run as a script

from heimdall import bench, optimize
from heimdall.checkpoint import load_checkpoint
from heimdall.config import configure_logging
from heimdall.export import export_to_onnx
from heimdall.model import LocalizationNet, ModelConfig

VARIANTS = ("fp32", *optimize.VARIANTS)


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tiny", help="model size (default: tiny)")
    parser.add_argument("--checkpoint", type=Path, help="trained .safetensors (default: random)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default 1,8,32)")
    parser.add_argument(
        "--budget", type=float, default=20.0, help="seconds per batch size (default 20)"
    )
    parser.add_argument("--threads", type=int, help="threads for every engine (default: cores)")
    parser.add_argument(
        "--variants", default="fp32,int8,fp16", help=f"comma-separated from {','.join(VARIANTS)}"
    )
    parser.add_argument("--calibration", type=int, default=optimize.DEFAULT_CALIBRATION)
    parser.add_argument("--opset", type=int, help="export opset (default: export.py's)")
    parser.add_argument("--tune", action="store_true", help="time the session candidates too")
    parser.add_argument("--profile", action="store_true", help="ORT per-op profile at batch 1")
    parser.add_argument("--workdir", type=Path, help="keep the ONNX files here (default: temp)")
    parser.add_argument("--seed", type=int, default=0, help="weights and input seed")
    parser.add_argument("--json", action="store_true", help="print one JSON document only")
    args = parser.parse_args(argv)
    args.batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or "fp32" not in args.variants:
        parser.error(f"--variants must include fp32 and come from {VARIANTS}; got {args.variants}")
    return args


def _model(args: argparse.Namespace) -> LocalizationNet:
    if args.checkpoint:
        return load_checkpoint(args.checkpoint).model.eval()
    torch.manual_seed(args.seed)
    return LocalizationNet(ModelConfig(backbone=args.backbone)).eval()


def _gate_table(results: list[optimize.VariantResult]) -> str:
    lines = [
        "| variant | gate | median error fp32 → variant (km) | change | size MB | reason |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        task = r.parity.task if r.parity else None
        errors = (
            f"{task.median_error_km_torch:.3f} → {task.median_error_km_onnx:.3f}" if task else "—"
        )
        change = f"{task.median_error_change_rel:+.2%}" if task else "—"
        verdict = "pass" if r.passed else "FAIL"
        lines.append(
            f"| {r.variant} | {verdict} | {errors} | {change} | {r.size_bytes / 1e6:.1f} | "
            f"{r.reason} |"
        )
    return "\n".join(lines)


def _profile_table(name: str, ops: tuple[OpProfile, ...]) -> str:
    lines = [f"| {name}: op | nodes | ms / run | share |", "|---|---|---|---|"]
    lines += [f"| {o.op} | {o.nodes} | {o.ms_per_run:.3f} | {o.share:.1%} |" for o in ops[:12]]
    return "\n".join(lines)


def _fingerprint(result: bench.BenchmarkResult) -> str:
    env, peak = result.environment, result.peak
    lines = [
        f"- CPU: {env.cpu_model}, {env.physical_cores} physical cores / {env.logical_cpus} "
        f"logical, ISA: {', '.join(env.isa_flags) or 'none detected'}, {env.memory_gib} GiB RAM",
        f"- threads: {result.threads} (torch.set_num_threads = ORT intra_op_num_threads)",
        f"- versions: {', '.join(f'{k} {v}' for k, v in env.versions.items())}; "
        f"python {env.python}; {env.platform}",
        f"- ORT providers available: {', '.join(env.ort_providers)}; used: "
        + "; ".join(f"{e.name} → {e.device}" for e in result.engines),
        f"- model: LocalizationNet-{result.backbone}, {result.flops_per_sample / 1e9:.3f} GFLOP "
        f"per sample ({result.flop_counter}), weights {result.weight_bytes / 1e6:.1f} MB fp32",
        f"- load average (1/5/15 min): {_load(env.load_average)} at start, "
        f"{_load(result.load_average_after)} at end",
    ]
    if peak:
        theory = (
            f"{peak.theoretical_gflops:.0f} GFLOP/s = {peak.cores} cores × {peak.clock_mhz:.0f} "
            f"MHz ({peak.clock_source}) × {peak.flops_per_cycle_per_core} FLOP/cycle"
            if peak.theoretical_gflops and peak.clock_mhz
            else "unknown"
        )
        lines.append(
            f"- FLOP peak: measured {peak.measured_gflops:.0f} GFLOP/s (torch.mm "
            f"{peak.gemm_size}², {peak.threads} threads; '% peak' uses this); theoretical "
            f"{theory}"
        )
        weights_ms = result.weight_bytes / (peak.memory_read_gbps * 1e9) * 1e3
        compute_ms = result.flops_per_sample / (peak.measured_gflops * 1e9) * 1e3
        lines.append(
            f"- batch-1 floors: weights {result.weight_bytes / 1e6:.0f} MB / DRAM read "
            f"{peak.memory_read_gbps:.1f} GB/s = {weights_ms:.1f} ms (fp32; int8 weights are "
            f"4× smaller); compute {compute_ms:.1f} ms at the measured peak"
        )
    return "\n".join(lines)


def _targets(result: bench.BenchmarkResult) -> str:
    """Issue 7's targets, checked against this run (rows are skipped when not measured)."""
    names = {e.name for e in result.engines}
    rows = []

    def row(label: str, value: float, goal: str, met: bool) -> None:
        rows.append(f"| {label} | {value:.2f} | {goal} | {'met' if met else 'not met'} |")

    if {"pytorch", "fp32"} <= names and 1 in result.batch_sizes:
        fp32 = result.timing("fp32", 1)
        row(
            "ORT fp32 / PyTorch latency, batch 1",
            fp32.ratios["pytorch"],
            "≤ 0.30",
            fp32.ratios["pytorch"] <= 0.30,
        )
        if result.peak:
            share = fp32.gflops / result.peak.measured_gflops
            row("ORT fp32 share of measured FLOP peak, batch 1", share, "≥ 0.50", share >= 0.5)
    if {"pytorch", "fp32"} <= names and 32 in result.batch_sizes:
        speedup = 1 / result.timing("fp32", 32).ratios["pytorch"]
        row("ORT fp32 / PyTorch throughput, batch 32", speedup, "≥ 1.3", speedup >= 1.3)
    if {"fp32", "int8"} <= names and 1 in result.batch_sizes:
        speedup = 1 / result.timing("int8", 1).ratios["fp32"]
        row("int8 / ORT fp32 speed, batch 1", speedup, "≥ 1.5", speedup >= 1.5)
    header = "| target | measured | goal | |\n|---|---|---|---|\n"
    return header + "\n".join(rows) if rows else ""


def _load(values: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    configure_logging(level="WARNING" if args.json else "INFO")  # logs go to stderr
    model = _model(args)
    with tempfile.TemporaryDirectory(prefix="heimdall-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        fp32 = workdir / f"{model.config.backbone}.onnx"
        export_kwargs = {"opset_version": args.opset} if args.opset else {}
        export_to_onnx(model, fp32, **export_kwargs)  # type: ignore[arg-type]
        report: dict[str, object] = {"command": " ".join(sys.argv)}
        sections: list[str] = []
        if args.tune:
            tuning = tune_session(fp32, threads=args.threads, budget_s=args.budget)
            report["tuning"] = tuning.to_dict()
            sections.append(
                f"### Session candidates (fp32, batch 1; best: {tuning.best})\n\n"
                + tuning.to_markdown()
            )
            offline = optimize.save_optimized(fp32, workdir / "offline.onnx", level="extended")
            saved = bench.benchmark(
                model,
                {"fp32": fp32, "fp32-offline-optimized": offline},
                batch_sizes=(1,),
                threads=args.threads,
                budget_s=args.budget,
                include_pytorch=False,
                peak=False,
            )
            report["offline_optimized"] = saved.to_dict()
            loads = ", ".join(f"{e.name} {e.load_seconds:.2f} s" for e in saved.engines)
            sections.append(
                f"### Offline-optimized model (extended level)\n\nsession load: {loads}\n\n"
                + saved.to_markdown()
            )
        variants: list[optimize.VariantResult] = []
        for name in args.variants:
            if name == "fp32":
                continue
            started = time.perf_counter()
            variants.append(
                optimize.build_variant(
                    name,  # type: ignore[arg-type]
                    fp32,
                    workdir / f"{model.config.backbone}.{name}.onnx",
                    model,
                    calibration=args.calibration,
                )
            )
            report.setdefault("build_seconds", {})[name] = time.perf_counter() - started  # type: ignore[index]
        if variants:
            report["variants"] = [v.to_dict() for v in variants]
            sections.append("### Variant gates (held-out set)\n\n" + _gate_table(variants))
        engines = {"fp32": fp32, **{v.variant: v.path for v in variants}}
        if args.profile:
            profiles = {
                name: profile_ops(path, threads=args.threads)
                for name, path in engines.items()
                if name != "fp16"
            }
            report["profile"] = {name: [vars(o) for o in ops] for name, ops in profiles.items()}
            sections += [
                f"### ONNX Runtime profile: {n}, batch 1\n\n{_profile_table(n, ops)}"
                for n, ops in profiles.items()
            ]
        result = bench.benchmark(
            model,
            engines,
            batch_sizes=args.batch_sizes,
            threads=args.threads,
            budget_s=args.budget,
            seed=args.seed,
        )
        report["benchmark"] = result.to_dict()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"## LocalizationNet-{result.backbone} inference\n")
    print(result.to_markdown())
    print()
    print(_fingerprint(result))
    targets = _targets(result)
    if targets:
        print(f"\n### Issue 7 targets\n\n{targets}")
    for section in sections:
        print(f"\n{section}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
