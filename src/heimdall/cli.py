"""Typer command line: parse arguments, call one library function, print the result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from heimdall.config import DEFAULT_ALIAS, Settings, configure_logging, load_settings, redact_uri
from heimdall.errors import HeimdallError, PublishError

if TYPE_CHECKING:
    from heimdall.results import PublishResult

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Publish LocalizationNet: checkpoint → verified ONNX → object store → MLflow registry.",
)
console = Console(stderr=True)
out = Console()

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
ForceOpt = typer.Option(
    False, "--force", help="Move the alias even if quality gates fail (needs --reason)."
)
ReasonOpt = typer.Option(None, "--reason", help="Why --force is used; recorded with the move.")


@app.callback()
def main(
    ctx: typer.Context,
    data_dir: Path | None = typer.Option(
        None, help="Embedded store directory \\[env HEIMDALL_DATA_DIR]."
    ),
    log_level: str | None = typer.Option(
        None, help="DEBUG, INFO, WARNING or ERROR \\[env HEIMDALL_LOG_LEVEL, default WARNING]."
    ),
    log_json: bool | None = typer.Option(
        None, "--log-json", help="Logs as JSON lines on stderr \\[env HEIMDALL_LOG_JSON]."
    ),
) -> None:
    with errors(False):
        settings = load_settings(data_dir=data_dir, log_level=log_level, log_json=log_json)
        configure_logging(
            settings.log_level, json=settings.log_json, secrets=settings.secret_values()
        )
    ctx.obj = settings


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def emit(result: Any, as_json: bool, title: str) -> None:
    """Print a result: JSON on stdout for programs, a key/value table for people."""
    data = _plain(result)
    if as_json:
        out.print_json(json.dumps(data, default=str))
        return
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in data.items() if isinstance(data, dict) else [("result", data)]:
        shown = json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
        table.add_row(key, shown)
    out.print(table)


@contextmanager
def errors(as_json: bool) -> Iterator[None]:
    """Turn HeimdallErrors into a clear message and exit code 1, never a traceback."""
    try:
        yield
    except HeimdallError as exc:
        message = redact_uri(str(exc))
        if as_json:
            document: dict[str, Any] = {"error": type(exc).__name__, "message": message}
            if isinstance(exc, PublishError):
                document.update(step=exc.step, existing=exc.existing, steps=exc.steps)
            out.print_json(json.dumps(document, default=str))
        else:
            console.print(f"[red]error[/red] ({type(exc).__name__}): {message}")
        raise typer.Exit(1) from None


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


@app.command()
def train(
    ctx: typer.Context,
    output: Path = typer.Option(None, "-o", "--output", help="Checkpoint path (.safetensors)."),
    backbone: str = typer.Option("atto", help="ConvNeXt size: atto, femto, pico, nano, tiny, …"),
    epochs: int = typer.Option(None, help="Training epochs."),
    samples: int = typer.Option(None, help="Synthetic training samples."),
    seed: int = typer.Option(0),
    backbone_weights: Path = typer.Option(
        None,
        help="torchvision convnext_* ImageNet state-dict file to start from (never downloaded).",
    ),
    publish_after: bool = typer.Option(
        False, "--publish", help="Publish the checkpoint after training."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Train LocalizationNet on synthetic RF data and save the best checkpoint."""
    from heimdall.demo import train_with_settings
    from heimdall.train import TrainConfig

    settings = _settings(ctx)
    overrides = {
        k: v for k, v in {"epochs": epochs, "train_samples": samples}.items() if v is not None
    }
    output = (
        output
        or settings.resolved_data_dir / "checkpoints" / f"localization-{backbone}.safetensors"
    )
    with errors(as_json):
        config = TrainConfig(
            backbone=backbone, seed=seed, backbone_weights=backbone_weights, **overrides
        )
        with progress_bar() as bar:
            task = bar.add_task("training", total=config.epochs, info="")

            def on_epoch(epoch: int, total: int, loss: float, km: float) -> None:
                bar.update(task, completed=epoch, info=f"loss {loss:.3f}  val median {km:.1f} km")

            result = train_with_settings(config, output, settings, progress=on_epoch)
    if not publish_after:
        emit(result, as_json, "training")
        return
    if not as_json:
        emit(result, False, "training")
    published = _publish(ctx, result.checkpoint, as_json=as_json)
    if as_json:  # one document on stdout
        emit({"training": result, "publish": published}, True, "training")


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.safetensors, .pt, .ckpt)."),
    output: Path = typer.Option(..., "-o", "--output", help="Target .onnx path."),
    opset: int = typer.Option(None, help="ONNX opset (default chosen by measurement)."),
    as_json: bool = JsonOpt,
) -> None:
    """Export a checkpoint to ONNX (atomic, deterministic, provenance in the file)."""
    from heimdall.export import export_checkpoint

    with errors(as_json):
        options = {"opset_version": opset} if opset is not None else {}
        emit(export_checkpoint(checkpoint, output, **options), as_json, "export")


@app.command()
def validate(model: Path = typer.Argument(..., help="ONNX file."), as_json: bool = JsonOpt) -> None:
    """Check an ONNX file: checker, IO contract, symbolic batch axis, external data."""
    from heimdall.validate import validate_onnx_model

    with errors(as_json):
        emit(validate_onnx_model(model), as_json, "validation")


def parity_table(result: dict[str, Any]) -> Table:
    table = Table(title="parity PyTorch vs ONNX Runtime")
    for col in ("output", "batch", "max abs", "max rel", "MAE", "worst input"):
        table.add_column(col)
    for d in result["diffs"]:
        table.add_row(
            d["output"],
            str(d["batch_size"]),
            f"{d['max_abs']:.2e}",
            f"{d['max_rel']:.2e}",
            f"{d['mae']:.2e}",
            d["worst_input"],
        )
    return table


@app.command()
def verify(
    model: Path = typer.Argument(..., help="ONNX file."),
    checkpoint: Path = typer.Option(..., help="The checkpoint it was exported from."),
    batch_sizes: str = typer.Option("1,2,3,8,64", help="Comma-separated batch sizes."),
    as_json: bool = JsonOpt,
) -> None:
    """Check the file was exported from the checkpoint, then compare ONNX Runtime with PyTorch.

    Exit 1 when the lineage differs or a gate fails.
    """
    import warnings

    from heimdall.checkpoint import load_checkpoint
    from heimdall.verify import LineageWarning, verify_parity

    with errors(as_json):
        sizes = _int_list(batch_sizes)
        loaded = load_checkpoint(checkpoint)
        with warnings.catch_warnings():
            # Said once below, in the output's own words.
            warnings.simplefilter("ignore", LineageWarning)
            result = verify_parity(model, loaded.model, sizes, checkpoint_sha256=loaded.sha256)
        data = _plain(result)
        if as_json:
            emit(data, True, "parity")
            return
        if result.lineage == "unrecorded":
            console.print(
                f"[yellow]warning[/yellow]: {model} records no checkpoint sha256; "
                "its lineage was not checked"
            )
        out.print(parity_table(data))
        task = data["task"]
        if task:
            out.print(
                f"held-out task check: mean distance {task['mean_distance_m']:.3g} m, "
                f"median error change {task['median_error_change_km']:+.3g} km"
            )
        out.print("[green]parity passed[/green]")


def _int_list(text: str) -> list[int]:
    from heimdall.errors import InputError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}") from None


@app.command()
def upload(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="ONNX file (its .data sidecar goes with it)."),
    bucket: str = typer.Option(
        None, help="Bucket \\[env HEIMDALL_BUCKET, default heimdall-models]."
    ),
    key: str = typer.Option(
        None, help="Object key (default models/localization/v<UTC time>.onnx)."
    ),
    create_bucket: bool = typer.Option(False, "--create-bucket", help="Create a missing bucket."),
    as_json: bool = JsonOpt,
) -> None:
    """Validate an ONNX model as `validate` does, then upload it, verified by reading it back."""
    from heimdall.storage import open_store, upload_model
    from heimdall.validate import validate_onnx_model

    settings = _settings(ctx)
    with errors(as_json):
        # Nothing is stored that `heimdall validate` refuses: not ONNX, or external data that
        # points outside the model's folder. The files the model refers to are the ones sent.
        checked = validate_onnx_model(model)
        with progress_bar() as bar:
            task = bar.add_task("uploading", total=None, info="")

            def on_bytes(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, info=f"{done / 2**20:.1f} MiB")

            result = upload_model(
                model,
                open_store(settings),
                bucket or settings.bucket,
                key,
                create_bucket=create_bucket,
                progress=on_bytes,
                extra_files=checked.external_data_files,
            )
    if result.replaced_stale is not None and not as_json:
        console.print(
            f"[yellow]warning[/yellow]: the stored bytes at {result.replaced_stale} no longer "
            f"match their sha256; left as they are, uploaded afresh to {result.key}"
        )
    emit(result, as_json, "upload")


@app.command()
def predict(
    ctx: typer.Context,
    model_uri: str = typer.Argument(..., help="models:/NAME@alias, s3://…, file:// or a path."),
    features: Path = typer.Argument(..., help=".npy array of shape (B, 3, 128, 32) float32."),
    as_json: bool = JsonOpt,
) -> None:
    """Predict positions and uncertainties for a saved feature batch."""
    from heimdall.inference import predict_file

    with errors(as_json):
        result = predict_file(model_uri, features, settings=_settings(ctx))
        data = _plain(result)
        if as_json:
            emit(data, True, "prediction")
            return
        table = Table(title=f"predictions ({model_uri})")
        for col in ("#", "lat", "lon", "σx", "σy"):
            table.add_column(col)
        for i, (pos, unc) in enumerate(zip(data["positions"], data["uncertainties"], strict=True)):
            table.add_row(
                str(i), f"{pos[0]:.4f}", f"{pos[1]:.4f}", f"{unc[0]:.3f}", f"{unc[1]:.3f}"
            )
        out.print(table)


class StepDisplay:
    """Per-step progress lines for publish (and a byte bar while uploading)."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.tasks: dict[str, Any] = {}
        self.upload: Any = None

    def step(self, name: str, status: str, detail: str) -> None:
        if status == "start":
            self.tasks[name] = self.bar.add_task(name, total=None, info="")
            return
        mark = {"ok": "[green]✓[/green]", "reused": "[cyan]=[/cyan]", "skipped": "·"}
        self.bar.update(self.tasks[name], total=1, completed=1, info=detail, visible=False)
        console.print(f"{mark.get(status, '[red]✗[/red]')} {name:<10} {detail}")

    def bytes(self, done: int, total: int) -> None:
        if self.upload is None:
            self.upload = self.bar.add_task("sending", total=total, info="")
        self.bar.update(
            self.upload,
            completed=done,
            total=total,
            info=f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB",
        )


def _publish(
    ctx: typer.Context,
    checkpoint: Path,
    as_json: bool,
    *,
    name: str | None = None,
    alias: str = DEFAULT_ALIAS,
    stage: str | None = None,
    variants: str = "fp32",
    create_bucket: bool | None = None,
    output_dir: Path | None = None,
    bench: bool = True,
    force: bool = False,
    reason: str | None = None,
) -> PublishResult:
    from heimdall.pipeline import publish as run_publish

    with errors(as_json), progress_bar() as bar:
        display = StepDisplay(bar)
        result = run_publish(
            checkpoint,
            settings=_settings(ctx),
            name=name,
            alias=alias or None,
            stage=stage,
            variants=variants.split(","),
            create_bucket=create_bucket,
            output_dir=output_dir,
            bench=bench,
            force=force,
            reason=reason,
            progress=None if as_json else display.step,
            upload_progress=None if as_json else display.bytes,
        )
    if not as_json:
        emit(result, False, "published")
        if result.report is not None:
            out.print(f"report: {result.report.html}")
    return result


@app.command()
def publish(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.safetensors, .pt, .ckpt)."),
    name: str = typer.Option(None, help="Registered model name \\[env HEIMDALL_MODEL_NAME]."),
    alias: str = typer.Option(
        DEFAULT_ALIAS, help="Alias to point at the new version ('' for none)."
    ),
    stage: str = typer.Option(None, help="Also set MLflow's legacy stage, e.g. Staging."),
    variants: str = typer.Option("fp32", help="Comma-separated: fp32, int8, fp16."),
    create_bucket: bool = typer.Option(
        None, "--create-bucket/--no-create-bucket", help="Create a missing bucket."
    ),
    output_dir: Path = typer.Option(None, help="Where the ONNX files and report go."),
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Time PyTorch vs ONNX Runtime."),
    force: bool = ForceOpt,
    reason: str = ReasonOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Export, verify, benchmark, upload and register a checkpoint (re-runs are idempotent)."""
    result = _publish(
        ctx,
        checkpoint,
        as_json,
        name=name,
        alias=alias,
        stage=stage,
        variants=variants,
        create_bucket=create_bucket,
        output_dir=output_dir,
        bench=bench,
        force=force,
        reason=reason,
    )
    if as_json:
        emit(result, True, "published")


@app.command()
def demo(
    ctx: typer.Context,
    backbone: str = typer.Option("atto", help="ConvNeXt size of the demo model."),
    epochs: int = typer.Option(None, help="Training epochs (default: the demo's)."),
    samples: int = typer.Option(None, help="Synthetic training samples (default: the demo's)."),
    as_json: bool = JsonOpt,
) -> None:
    """Train a demo model, publish it, load it back by alias and predict held-out samples."""
    from heimdall.demo import run_demo
    from heimdall.train import TrainConfig

    settings = _settings(ctx)
    overrides: dict[str, Any] = {
        k: v for k, v in {"epochs": epochs, "train_samples": samples}.items() if v is not None
    }
    with errors(as_json), progress_bar() as bar:
        display = StepDisplay(bar)
        task = bar.add_task("training", total=None, info="")

        def on_epoch(epoch: int, total: int, loss: float, km: float) -> None:
            bar.update(task, completed=epoch, total=total, info=f"val median {km:.1f} km")
            if epoch == total:
                bar.update(task, visible=False)
                console.print(
                    f"[green]✓[/green] {'train':<10} {total} epochs, val median {km:.1f} km"
                )

        result = run_demo(
            settings=settings,
            config=TrainConfig(backbone=backbone, **overrides),
            train_progress=None if as_json else on_epoch,
            progress=None if as_json else display.step,
            upload_progress=None if as_json else display.bytes,
        )
    emit(result.to_dict() if as_json else result.summary(), as_json, "heimdall demo")


@app.command()
def promote(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Argument(..., help="Version number to promote."),
    to: str = typer.Option("production", "--to", help="Alias to move."),
    force: bool = ForceOpt,
    reason: str = ReasonOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Move an alias to a version if every gate passes.

    Gates: READY, verified, bytes unchanged, better than the centre baseline, not worse than
    the alias's current holder.
    """
    from heimdall.gates import promote as run_promote

    with errors(as_json):
        change = run_promote(
            name, version, to=to, force=force, reason=reason, settings=_settings(ctx)
        )
        emit(change, as_json, "promote")


@app.command()
def rollback(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Registered model name."),
    alias: str = typer.Option("production", help="Alias to return to its previous holder."),
    as_json: bool = JsonOpt,
) -> None:
    """Return an alias to the version that held it before."""
    from heimdall.registry import rollback as run_rollback

    with errors(as_json):
        emit(run_rollback(name, alias=alias, settings=_settings(ctx)), as_json, "rollback")


models_app = typer.Typer(no_args_is_help=True, help="Inspect registered models.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """Registered models with their aliases and latest version."""
    from heimdall.registry import list_models

    with errors(as_json):
        models = [m.to_dict() for m in list_models(settings=_settings(ctx))]
        if as_json:
            emit(models, True, "models")
            return
        table = Table(title="registered models")
        columns = list(models[0]) if models else ["name"]
        for col in columns:
            table.add_column(col)
        for row in models:
            table.add_row(*(_cell(row[c]) for c in columns))
        out.print(table)


def _cell(value: Any) -> str:
    return json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)


@models_app.command("show")
def models_show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Option(None, help="One version instead of the model."),
    as_json: bool = JsonOpt,
) -> None:
    """A model's versions, aliases and alias history (or one version's details)."""
    from heimdall.registry import show_model

    with errors(as_json):
        emit(show_model(name, version=version, settings=_settings(ctx)), as_json, name)


@app.command("bench")
def bench_cmd(
    model: Path = typer.Argument(..., help="ONNX file."),
    checkpoint: Path = typer.Option(..., help="The checkpoint it was exported from."),
    batch_sizes: str = typer.Option("1,8,32", help="Comma-separated batch sizes."),
    budget: float = typer.Option(10.0, help="Seconds per batch size."),
    threads: int = typer.Option(None, help="Threads for both runtimes (default: cores)."),
    as_json: bool = JsonOpt,
) -> None:
    """Time PyTorch eager vs ONNX Runtime on the same inputs in one process."""
    from heimdall.bench import benchmark
    from heimdall.checkpoint import load_checkpoint

    with errors(as_json):
        result = benchmark(
            load_checkpoint(checkpoint).model,
            {"fp32": model},
            batch_sizes=_int_list(batch_sizes),
            budget_s=budget,
            threads=threads,
        )
        if as_json:
            emit(result, True, "benchmark")
            return
        out.print(result.to_markdown())


@app.command()
def optimize(
    model: Path = typer.Argument(..., help="fp32 ONNX file."),
    checkpoint: Path = typer.Option(..., help="The checkpoint it was exported from."),
    int8: bool = typer.Option(False, "--int8", help="Static QDQ int8, calibrated on RF data."),
    fp16: bool = typer.Option(False, "--fp16", help="float16 weights (for GPUs), float32 IO."),
    calibration: int = typer.Option(256, help="Calibration samples for --int8."),
    as_json: bool = JsonOpt,
) -> None:
    """Build int8/fp16 variants and gate them; exit 1 if any fails its gate."""
    from heimdall.checkpoint import load_checkpoint
    from heimdall.errors import InputError, VerificationError
    from heimdall.optimize import Variant, build_variant

    with errors(as_json):
        chosen: list[Variant] = []
        if int8:
            chosen.append("int8")
        if fp16:
            chosen.append("fp16")
        if not chosen:
            raise InputError("choose at least one of --int8 and --fp16")
        reference = load_checkpoint(checkpoint).model
        results = [
            build_variant(
                v,
                model,
                model.with_name(f"{model.stem}.{v}.onnx"),
                reference,
                calibration=calibration,
            )
            for v in chosen
        ]
        emit({r.variant: r for r in results}, as_json, "variants")
        failed = [r for r in results if not r.passed]
        if failed:
            raise VerificationError(
                "; ".join(f"{r.variant} failed its gate: {r.reason}" for r in failed)
            )


if __name__ == "__main__":
    app()
