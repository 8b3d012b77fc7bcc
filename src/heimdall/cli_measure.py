"""The commands that run an ONNX file against its checkpoint: verify, bench and optimize."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.text import Text

from heimdall.display import (
    JsonOpt,
    call_bar,
    console,
    emit,
    errors,
    out,
    parity_table,
    plain,
    records_table,
    show_variants,
    thresholds,
)


def verify(
    model: Path = typer.Argument(..., help="ONNX file."),
    checkpoint: Path = typer.Option(..., help="The checkpoint it was exported from."),
    batch_sizes: str = typer.Option("1,2,3,8,64", help="Comma-separated batch sizes."),
    as_json: bool = JsonOpt,
) -> None:
    """Compare ONNX Runtime with PyTorch on the source checkpoint.

    First checks that the file was exported from the checkpoint. Exit 1 when the lineage
    differs or a gate fails.
    """
    import warnings

    from heimdall.checkpoint import load_checkpoint
    from heimdall.verify import LineageWarning, verify_parity

    with errors(as_json):
        sizes = _int_list(batch_sizes)
        loaded = load_checkpoint(checkpoint)
        with warnings.catch_warnings(), call_bar("verifying", as_json) as progress:
            # Said once below, in the output's own words.
            warnings.simplefilter("ignore", LineageWarning)
            result = verify_parity(
                model,
                loaded.model,
                sizes,
                checkpoint_sha256=loaded.sha256,
                progress=progress,
            )
        data = plain(result)
        if as_json:
            emit(data, True, "parity")
            return
        if result.lineage == "unrecorded":
            console.print(
                f"[yellow]warning[/yellow]: {escape(str(model))} records no checkpoint sha256; "
                "its lineage was not checked"
            )
        out.print(parity_table(data))
        task = data["task"]
        if task:
            out.print(
                f"held-out task check: mean distance {task['mean_distance_m']:.3g} m, "
                f"median error change {task['median_error_change_km']:+.3g} km"
            )
        verdict = Text.assemble(("parity passed", "green"), f": {thresholds(data['gates'])}")
        out.print(verdict, soft_wrap=True)


def _int_list(text: str) -> list[int]:
    from heimdall.errors import InputError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}") from None


def bench_cmd(
    model: Path = typer.Argument(..., help="ONNX file."),
    checkpoint: Path = typer.Option(..., help="The checkpoint it was exported from."),
    batch_sizes: str = typer.Option("1,8,32", help="Comma-separated batch sizes."),
    budget: float = typer.Option(10.0, help="Seconds per batch size."),
    threads: int = typer.Option(None, help="Threads for both runtimes (default: cores)."),
    as_json: bool = JsonOpt,
) -> None:
    """Time PyTorch eager vs ONNX Runtime on the same inputs.

    Both run in this process with the same number of threads.
    """
    from heimdall.bench import benchmark
    from heimdall.checkpoint import load_checkpoint
    from heimdall.parity import check_lineage

    with errors(as_json):
        sizes, loaded = _int_list(batch_sizes), load_checkpoint(checkpoint)
        check_lineage(model, loaded.sha256)  # a speed-up against another model means nothing
        reference = loaded.model
        with call_bar("benchmarking", as_json) as progress:
            result = benchmark(
                reference,
                {"fp32": model},
                batch_sizes=sizes,
                budget_s=budget,
                threads=threads,
                progress=progress,
            )
        if as_json:
            emit(result, True, "benchmark")
            return
        shown = ("engine", "batch", "p50 ms", "p90 ms", "p99 ms", "samples/s", "GFLOP/s")
        rows = [{k: r[k] for k in (*shown, "speedup vs PyTorch")} for r in result.rows()]
        out.print(records_table("benchmark (all columns: --json)", rows))


def optimize(
    model: Path = typer.Argument(..., help="fp32 ONNX file."),
    checkpoint: Path = typer.Option(..., help="The checkpoint it was exported from."),
    int8: bool = typer.Option(False, "--int8", help="Static QDQ int8, calibrated on RF data."),
    fp16: bool = typer.Option(False, "--fp16", help="float16 weights (for GPUs), float32 IO."),
    calibration: int = typer.Option(256, help="Calibration samples for --int8."),
    as_json: bool = JsonOpt,
) -> None:
    """Build int8/fp16 variants and gate them against PyTorch.

    Exit 1 if any fails its gate.
    """
    from heimdall.checkpoint import load_checkpoint
    from heimdall.errors import InputError, VerificationError
    from heimdall.optimize import Variant, build_variant
    from heimdall.parity import check_lineage

    with errors(as_json):
        chosen: list[Variant] = []
        if int8:
            chosen.append("int8")
        if fp16:
            chosen.append("fp16")
        if not chosen:
            raise InputError("choose at least one of --int8 and --fp16")
        loaded = load_checkpoint(checkpoint)
        check_lineage(model, loaded.sha256)  # variants of another checkpoint's export: refused
        reference, results = loaded.model, []
        for v in chosen:
            with call_bar(f"building {v}", as_json) as progress:
                target = model.with_name(f"{model.stem}.{v}.onnx")
                results.append(
                    build_variant(
                        v, model, target, reference, calibration=calibration, progress=progress
                    )
                )
        if as_json:
            emit({r.variant: r for r in results}, True, "variants")
        else:
            show_variants([r.to_dict() for r in results])
        failed = [r for r in results if not r.passed]
        if failed:
            raise VerificationError(
                "; ".join(f"{r.variant} failed its gate: {r.reason}" for r in failed)
            )
