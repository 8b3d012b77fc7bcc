"""Typer command line: parse arguments, call one library function, print the result."""

from __future__ import annotations

import atexit
import functools
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.progress import Progress, TaskID
from rich.table import Table
from rich.text import Text

from heimdall.cli_measure import bench_cmd, optimize, verify
from heimdall.cli_registry import models_app, promote, rollback
from heimdall.cli_score import score
from heimdall.cli_serve import serve
from heimdall.config import (
    DEFAULT_ALIAS,
    configure_logging,
    heimdall_version,
    load_settings,
    prefer_passive_threads,
    redact_uri,
)
from heimdall.display import (
    ForceOpt,
    JsonOpt,
    ReasonOpt,
    StepDisplay,
    console,
    emit,
    errors,
    out,
    plain,
    progress_bar,
    settings_of,
    show_publish,
    sigma_units,
)

prefer_passive_threads()  # before any command imports torch

if TYPE_CHECKING:
    from heimdall.results import PublishResult

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    # Click's plain help: flags read as flags (no "<bool>"), defaults shown, brackets kept.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
    help="Publish LocalizationNet: checkpoint → verified ONNX → object store → MLflow registry.",
)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"heimdall {heimdall_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    data_dir: Path | None = typer.Option(
        None,
        help="Embedded store: MLflow database and objects "
        "[env HEIMDALL_DATA_DIR; default: .heimdall].",
    ),
    log_level: str | None = typer.Option(
        None,
        metavar="[DEBUG|INFO|WARNING|ERROR]",
        help="Lowest level of log events printed [env HEIMDALL_LOG_LEVEL; default: WARNING].",
    ),
    log_json: bool | None = typer.Option(
        None, "--log-json", help="Logs as JSON lines on stderr [env HEIMDALL_LOG_JSON]."
    ),
    _version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print heimdall's version and exit.",
    ),
) -> None:
    with errors(False):
        settings = load_settings(data_dir=data_dir, log_level=log_level, log_json=log_json)
        configure_logging(
            settings.log_level, json=settings.log_json, secrets=settings.secret_values()
        )
    ctx.obj = settings
    _leave_the_heap_to_the_os()


@functools.cache
def _leave_the_heap_to_the_os() -> None:
    """Skip Python's last collections when a command's process exits.

    The process ends after one command: those collections would walk every object MLflow made
    (0.3-0.5 s) to free memory the OS takes back anyway. Registered by the first command, so a
    program that only imports this module keeps its own exit; atexit runs it after the
    handlers registered later (MLflow's, ``weakref.finalize``).
    """
    atexit.register(gc.freeze)


@app.command(short_help="Train on synthetic RF data and save the best checkpoint.")
def train(
    ctx: typer.Context,
    output: Path = typer.Option(
        None,
        "-o",
        "--output",
        help="Checkpoint path [default: <data dir>/checkpoints/localization-<backbone>"
        ".safetensors].",
    ),
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

    settings = settings_of(ctx)
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
            on_epoch = epoch_progress(bar, task, config.epochs)
            result = train_with_settings(config, output, settings, progress=on_epoch)
    if not publish_after:
        emit(result, as_json, "training")
        return
    if not as_json:
        emit(result, False, "training")
    published = _publish(ctx, result.checkpoint, as_json=as_json)
    if as_json:  # one document on stdout
        emit({"training": result, "publish": published}, True, "training")


def epoch_progress(
    bar: Progress, task: TaskID, epochs: int
) -> Callable[[int, int, float, float], None]:
    """The training progress callback: the bar names the epoch running; off a terminal,
    where there is no bar, each finished epoch is a line on stderr (minutes pass between)."""
    bar.update(task, description=f"epoch 1/{epochs}")

    def on_epoch(epoch: int, total: int, loss: float, km: float) -> None:
        summary = f"loss {loss:.3f}  val median {km:.1f} km"
        running = f"epoch {min(epoch + 1, total)}/{total}"
        bar.update(task, completed=epoch, description=running, info=summary)
        if not console.is_terminal:
            console.print(Text(f"epoch {epoch}/{total}: {summary}"))

    return on_epoch


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.safetensors, .pt, .ckpt)."),
    output: Path = typer.Option(..., "-o", "--output", help="Target .onnx path."),
    opset: int = typer.Option(None, help="ONNX opset (default chosen by measurement)."),
    as_json: bool = JsonOpt,
) -> None:
    """Export a checkpoint to ONNX: atomic, deterministic, traceable.

    The file records the checkpoint's sha256, the model config and heimdall's version.
    """
    from heimdall.export import export_checkpoint

    with errors(as_json):
        options = {"opset_version": opset} if opset is not None else {}
        emit(export_checkpoint(checkpoint, output, **options), as_json, "export")


@app.command()
def validate(model: Path = typer.Argument(..., help="ONNX file."), as_json: bool = JsonOpt) -> None:
    """Check an ONNX file: checker, IO contract, batch axis, files."""
    from heimdall.validate import validate_onnx_model

    with errors(as_json):
        result = validate_onnx_model(model)
    emit(result, as_json, "validation")
    if not as_json:
        verdict = Text.assemble(
            ("valid", "green"),
            f": {model} passes the ONNX checker and LocalizationNet's IO contract "
            f"(opset {result.opset_version})",
        )
        out.print(verdict, soft_wrap=True)


# Commands from other modules are registered where `heimdall --help` lists them.
app.command()(verify)


@app.command()
def upload(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="ONNX file (its .data sidecar goes with it)."),
    bucket: str = typer.Option(
        None, help="Bucket [env HEIMDALL_BUCKET; default: heimdall-models]."
    ),
    key: str = typer.Option(
        None,
        help="Object key [default: models/localization/v<UTC time>-<sha256 prefix>.onnx].",
    ),
    create_bucket: bool = typer.Option(False, "--create-bucket", help="Create a missing bucket."),
    as_json: bool = JsonOpt,
) -> None:
    """Validate an ONNX model, upload it, and read it back.

    Validation is the one `validate` does; nothing it refuses is stored.
    """
    from heimdall.storage import open_store, upload_model
    from heimdall.validate import validate_onnx_model

    settings = settings_of(ctx)
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
            f"[yellow]warning[/yellow]: the stored bytes at {escape(result.replaced_stale)} no "
            f"longer match their sha256; left as they are, uploaded afresh to "
            f"{escape(result.key)}"
        )
    emit(result, as_json, "upload")


@app.command()
def predict(
    ctx: typer.Context,
    model_uri: str = typer.Argument(..., help="models:/NAME@alias, s3://…, file:// or a path."),
    features: Path = typer.Argument(..., help=".npy array of shape (B, 3, 128, 32) float32."),
    chunk_size: int = typer.Option(
        None,
        help="Samples per ONNX Runtime call (default 64): memory grows with it, not with B.",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Predict positions and uncertainties for a saved feature batch."""
    from heimdall.inference import LocalizationModel, load_features

    with errors(as_json):
        batch = load_features(features)  # memory-mapped: predict reads it one chunk at a time
        served = LocalizationModel.load(model_uri, settings=settings_of(ctx))
        model = {"model": redact_uri(model_uri), "version": served.version}
        data = {
            **model,
            "sha256": served.sha256,
            **plain(
                served.predict(
                    batch, **({"chunk_size": chunk_size} if chunk_size is not None else {})
                )
            ),
        }
    if as_json:  # as is: rich's JSON highlighting would cost 220 MiB for 16,384 samples
        typer.echo(json.dumps(data, indent=2))
        return
    version = f"version {served.version}, " if served.version else ""
    served_line = f"model: {model['model']} ({version}sha256 {served.sha256})"
    out.print(Text(served_line), soft_wrap=True)
    table = Table()
    for col in ("#", "lat", "lon", "σx", "σy"):
        table.add_column(col, justify="right")
    for i, (pos, unc) in enumerate(zip(data["positions"], data["uncertainties"], strict=True)):
        table.add_row(str(i), f"{pos[0]:.4f}", f"{pos[1]:.4f}", f"{unc[0]:.3f}", f"{unc[1]:.3f}")
    out.print(table)
    units = sigma_units(served.session.get_modelmeta().custom_metadata_map)
    out.print(Text(units), soft_wrap=True)


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
            settings=settings_of(ctx),
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
        show_publish(result.to_dict())
    return result


@app.command()
def publish(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.safetensors, .pt, .ckpt)."),
    name: str = typer.Option(
        None,
        help="Registered model name [env HEIMDALL_MODEL_NAME; default: "
        "heimdall-localization-onnx].",
    ),
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
    """Export, verify, benchmark, upload and register a checkpoint.

    Re-runs are idempotent: stored bytes and registered versions are found by sha256.
    """
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


@app.command(short_help="Train and publish a demo model, then predict with it by alias.")
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

    settings = settings_of(ctx)
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


app.command()(promote)
app.command()(rollback)
app.add_typer(models_app, name="models")
app.command("bench")(bench_cmd)
app.command()(optimize)
app.command()(serve)
app.command()(score)


if __name__ == "__main__":
    app()
