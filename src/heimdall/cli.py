"""Typer command line: parse arguments, call one library function, print the result."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from heimdall.config import (
    DEFAULT_ALIAS,
    Settings,
    configure_logging,
    heimdall_version,
    load_settings,
    redact_uri,
)
from heimdall.errors import HeimdallError, PublishError

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
# Messages on stderr are one line each, whatever the width: a log or a pipe reads them whole.
console = Console(stderr=True, soft_wrap=True)
out = Console()

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
ForceOpt = typer.Option(
    False, "--force", help="Move the alias even if quality gates fail (needs --reason)."
)
ReasonOpt = typer.Option(None, "--reason", help="Why --force is used; recorded with the move.")


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


def _scalar(value: Any) -> str:
    """One value for people: floats to 4 significant digits (``--json`` keeps every digit)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_inline(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(_inline(v) for v in value) or "-"
    return _scalar(value)


def _is_records(value: Any) -> bool:
    """A non-empty list of dicts: shown as a table of its own, not squeezed into a cell."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _decoded(value: Any) -> Any:
    """A string that holds a JSON object or list (ONNX metadata, MLflow tags) as that data."""
    if isinstance(value, str) and value.startswith(("{", "[")):
        try:
            return json.loads(value)
        except ValueError:  # "[lat, lon]" and other text in brackets
            return value
    return value


def _lines(value: Any, indent: str = "") -> list[str]:
    """Nested data as one ``key: value`` line per field, deeper fields indented."""
    value = _decoded(value)
    if not isinstance(value, dict) or not value:
        if _is_records(value):
            return [f"{indent}{_inline(v)}" for v in value]
        return [f"{indent}{_inline(value)}"]
    lines = []
    for key, raw in value.items():
        item = _decoded(raw)
        if (isinstance(item, dict) and item) or _is_records(item):
            lines += [f"{indent}{key}:", *_lines(item, indent + "  ")]
        else:
            lines.append(f"{indent}{key}: {_inline(item)}")
    return lines


def _cell(value: Any) -> Text:
    """A table cell as literal text: brackets in values are not Rich markup."""
    return Text("\n".join(_lines(value)))


def _short(sha256: Any) -> str:
    return f"{sha256[:12]}…" if isinstance(sha256, str) and len(sha256) > 12 else _scalar(sha256)


def _when(iso: Any) -> str:
    """``2026-05-01T12:00:00+00:00`` → ``2026-05-01 12:00`` (UTC, said in the column header)."""
    if isinstance(iso, str) and iso.endswith("+00:00"):
        return iso.replace("T", " ")[:16]
    return _scalar(iso)


def _mib(size: Any) -> str:
    return f"{size / 2**20:.1f} MiB" if isinstance(size, int) else _scalar(size)


def fields_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    """A two-column field/value table; nested values as one ``key: value`` line each."""
    table = Table(title=Text(title), show_header=False, title_justify="left")
    table.add_column("field", style="bold", overflow="fold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(Text(key), value if isinstance(value, Text) else _cell(value))
    return table


def records_table(title: str, records: Sequence[Mapping[str, Any]]) -> Table:
    """One row per record, one column per key (in the order the keys first appear)."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    table = Table(title=Text(title), title_justify="left")
    for column in columns:
        # Names are never cut: a narrow terminal folds them onto more lines instead.
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(*(_cell(record.get(column)) for column in columns))
    return table


def _show(*renderables: RenderableType | None) -> None:
    for renderable in renderables:
        if renderable is not None:
            out.print(renderable)


def emit(result: Any, as_json: bool, title: str) -> None:
    """Print a result: JSON on stdout for programs, tables for people.

    Scalars and nested fields go in one field/value table; a list of records gets a table of
    its own after it.
    """
    data = _plain(result)
    if as_json:
        out.print_json(json.dumps(data, default=str))
        return
    items = list(data.items()) if isinstance(data, dict) else [("result", data)]
    fields = [(k, v) for k, v in items if not _is_records(v)]
    _show(
        fields_table(title, fields) if fields else None,
        *(records_table(k, v) for k, v in items if _is_records(v)),
    )


def show_publish(data: Mapping[str, Any]) -> None:
    """The publish summary: what was made, its versions, the gates they passed, each step."""
    published = data["published"]
    primary = published[0]
    speedup = data["speedup_batch1"]
    _show(
        fields_table(
            "published",
            [
                ("name", data["name"]),
                ("checkpoint sha256", data["checkpoint_sha256"]),
                ("model URI", primary["model_uri"]),
                ("stored at", primary["uri"]),
                ("parity", _verdict(data["parity_passed"])),
                (
                    "speed-up, batch 1",
                    "not measured"
                    if speedup is None
                    else f"{speedup:.2f}× ONNX Runtime vs PyTorch eager",
                ),
                ("held-out median error", f"{data['heldout_median_error_km']:.1f} km"),
            ],
        ),
        records_table(
            "versions",
            [
                {
                    "variant": p["variant"],
                    "version": p["version"],
                    "alias": p["alias"],
                    "sha256": _short(p["sha256"]),
                    "size": _mib(p["size_bytes"]),
                    "upload": "new" if p["uploaded"] else "reused",
                    "register": "reused" if p["reused_version"] else "new",
                }
                for p in published
            ],
        ),
        records_table(
            "gates",
            [
                {
                    "variant": p["variant"],
                    "gate": g["name"],
                    "result": _verdict(g["passed"]),
                    "detail": g["detail"],
                }
                for p in published
                for g in p["gates"]
            ],
        ),
        _variants_table(data["variants"]),
        records_table(
            "steps",
            [{**s, "seconds": f"{s['seconds']:.1f}"} for s in data["steps"]],
        ),
    )
    if data["report"] is not None:  # on a line of its own: a path to copy, never folded
        out.print(Text(f"report: {data['report']}"), soft_wrap=True)


def _verdict(passed: bool) -> str:
    return "passed" if passed else "FAILED"


def _variants_table(variants: Sequence[Mapping[str, Any]]) -> Table | None:
    if not variants:
        return None
    rows = [
        {
            "variant": v["variant"],
            "gates": _verdict(v["passed"]),
            "sha256": _short(v["sha256"]),
            "size": _mib(v["size_bytes"]),
            "seconds": f"{v['seconds']:.1f}",
            "reason": v["reason"],
        }
        for v in variants
    ]
    return records_table("variants", rows)


def show_variants(variants: Sequence[Mapping[str, Any]]) -> None:
    """Each optimized variant: its file, recipe and gates, then its parity rows."""
    for v in variants:
        parity = v["parity"]
        rows = [
            ("file", v["path"]),
            ("made from", v["source"]),
            ("gates", _verdict(v["passed"])),
            ("reason", v["reason"]),
            ("sha256", v["sha256"]),
            ("size", _mib(v["size_bytes"])),
            ("seconds", f"{v['seconds']:.1f}"),
            ("recipe", v["recipe"]),
        ]
        if parity is not None:
            rows += [
                ("thresholds", _thresholds(parity["gates"]) or "-"),
                ("held-out task check", parity["task"]),
            ]
        diffs = parity["diffs"] if parity is not None else []
        _show(
            fields_table(f"{v['variant']} variant", rows),
            parity_table(parity, f"{v['variant']} parity vs PyTorch") if diffs else None,
        )


def show_model(data: Mapping[str, Any], version: str | None) -> None:
    """A model: its aliases, one row per version, the alias history (and one version's details)."""
    versions = data["versions"]
    details = None
    if version is not None and versions:
        one = versions[0]
        details = fields_table(
            f"version {one['version']}",
            [
                ("model URI", one["uri"]),
                *((k, one[k]) for k in ("aliases", "status", "stage", "verification", "sha256")),
                *((k, one[k]) for k in ("source", "onnx_uri", "run_id", "created_at")),
                ("description", one["description"]),
                ("tags", one["tags"]),
            ],
        )
    moves = [(alias, e) for alias, events in data["alias_history"].items() for e in events]
    history = [
        {
            "alias": alias,
            "at (UTC)": _when(e["at"]),
            "action": e["action"],
            "version": e["version"],
            "previous": e.get("previous"),
            "reason": e.get("reason"),
        }
        for alias, e in sorted(moves, key=lambda move: str(move[1]["at"]))  # one timeline
    ]
    # MLflow's legacy stages are rare next to aliases: a column only when a version has one.
    staged = any(v["stage"] for v in versions)
    _show(
        fields_table(
            "model",
            [
                ("name", data["name"]),
                ("description", data["description"]),
                ("aliases", {a: f"version {n}" for a, n in data["aliases"].items()}),
                ("tags", data["tags"]),
            ],
        ),
        records_table(
            "versions",
            [
                {
                    "version": v["version"],
                    "aliases": "\n".join(v["aliases"]) or "-",  # narrower than a, b
                    "sha256": _short(v["sha256"]),
                    "status": v["status"],
                    "parity": v["verification"],
                    "created (UTC)": _when(v["created_at"]),
                }
                | ({"stage": v["stage"]} if staged else {})
                for v in versions
            ],
        )
        if versions
        else Text("no versions"),
        details,
        records_table("alias history", history) if history else None,
    )


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
            # One line: a message quoting a third-party error may hold newlines of its own.
            line = Text(" ".join(message.split()))
            console.print(Text.assemble(("error", "red"), f" ({type(exc).__name__}): ", line))
        raise typer.Exit(1) from None


def progress_bar() -> Progress:
    """A transient bar on a terminal; nothing at all on a pipe or in a log file."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


@contextmanager
def call_bar(description: str, as_json: bool) -> Iterator[Callable[[int, int], None] | None]:
    """The ``progress(done, total)`` callback of one long library call, drawn as a transient
    bar (none for ``--json``, nor off a terminal)."""
    if as_json:
        yield None
        return
    with progress_bar() as bar:
        task = bar.add_task(description, total=None, info="")

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, info=f"{done / max(total, 1):.0%}")

        yield update


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


def parity_table(result: Mapping[str, Any], title: str = "parity PyTorch vs ONNX Runtime") -> Table:
    table = Table(title=Text(title), title_justify="left")
    for col in ("output", "batch", "max abs", "max rel", "MAE", "worst input"):
        table.add_column(col, overflow="fold")
    for d in result["diffs"]:
        table.add_row(
            Text(d["output"]),
            str(d["batch_size"]),
            f"{d['max_abs']:.2e}",
            f"{d['max_rel']:.2e}",
            f"{d['mae']:.2e}",
            Text(d["worst_input"]),
        )
    return table


def _thresholds(gates: dict[str, Any]) -> str:
    """The gates a parity check applied, in words with their units."""
    elementwise = ", ".join(
        f"{label} ≤ {gates[key]:.3g}"
        for key, label in (("max_abs", "max abs"), ("max_rel", "max rel"), ("mae", "MAE"))
        if gates.get(key) is not None
    )
    parts = [f"{elementwise} (normalized region units)"] if elementwise else []
    if gates.get("mean_distance_m") is not None:
        parts.append(f"held-out mean distance ≤ {gates['mean_distance_m']:.3g} m")
    if gates.get("median_error_increase_rel") is not None:
        parts.append(f"median error increase ≤ {gates['median_error_increase_rel']:.1%}")
    return "; ".join(parts)


@app.command()
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
        data = _plain(result)
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
        verdict = Text.assemble(("parity passed", "green"), f": {_thresholds(data['gates'])}")
        out.print(verdict, soft_wrap=True)


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
    as_json: bool = JsonOpt,
) -> None:
    """Predict positions and uncertainties for a saved feature batch."""
    from heimdall.inference import LocalizationModel, load_features

    with errors(as_json):
        batch = load_features(features)
        served = LocalizationModel.load(model_uri, settings=_settings(ctx))
        data = _plain(served.predict(batch))
    if as_json:
        emit(data, True, "prediction")
        return
    version = f"version {served.version}, " if served.version else ""
    served_line = f"model: {redact_uri(model_uri)} ({version}sha256 {served.sha256})"
    out.print(Text(served_line), soft_wrap=True)
    table = Table()
    for col in ("#", "lat", "lon", "σx", "σy"):
        table.add_column(col, justify="right")
    for i, (pos, unc) in enumerate(zip(data["positions"], data["uncertainties"], strict=True)):
        table.add_row(str(i), f"{pos[0]:.4f}", f"{pos[1]:.4f}", f"{unc[0]:.3f}", f"{unc[1]:.3f}")
    out.print(table)
    units = _sigma_units(served.session.get_modelmeta().custom_metadata_map)
    out.print(Text(units), soft_wrap=True)


def _sigma_units(metadata: dict[str, str]) -> str:
    """What the columns measure; σ is in the model's normalized region units, not degrees."""
    units = "lat, lon in degrees; σx, σy in normalized region units"
    try:
        lat, lon = json.loads(metadata["heimdall.normalization"])["scale"]
    except (KeyError, TypeError, ValueError):
        return f"{units} (× the region's half-extent gives degrees)"
    return f"{units} (σx × {lat:g}° and σy × {lon:g}°, the region's half-extent, give degrees)"


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
        mark = {"ok": ("✓", "green"), "reused": ("=", "cyan"), "skipped": ("·", "")}
        self.bar.update(self.tasks[name], total=1, completed=1, info=detail, visible=False)
        if status not in mark:  # the error line that follows says why, once
            detail = "failed"
        console.print(Text.assemble(mark.get(status, ("✗", "red")), f" {name:<10} {detail}"))

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
    from heimdall.storage import open_store

    settings = _settings(ctx)
    with errors(as_json):
        change = run_rollback(name, alias=alias, settings=settings, store=open_store(settings))
        emit(change, as_json, "rollback")


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
        if not models:
            out.print("no registered models")
            return
        # The descriptions are long and alike: `models show` has them.
        rows = [
            {
                "name": m["name"],
                "latest version": m["latest_version"],
                "aliases": {a: f"version {n}" for a, n in m["aliases"].items()},
                "updated (UTC)": _when(m["updated_at"]),
            }
            for m in models
        ]
        out.print(records_table("registered models", rows))


@models_app.command("show")
def models_show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Option(None, help="One version instead of the model."),
    as_json: bool = JsonOpt,
) -> None:
    """A model's versions, aliases and alias history (or one version's details)."""
    from heimdall.registry import show_model as details_of

    with errors(as_json):
        details = details_of(name, version=version, settings=_settings(ctx))
        if as_json:
            emit(details, True, name)
        else:
            show_model(details.to_dict(), version)


@app.command("bench")
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

    with errors(as_json):
        sizes, reference = _int_list(batch_sizes), load_checkpoint(checkpoint).model
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
    """Build int8/fp16 variants and gate them against PyTorch.

    Exit 1 if any fails its gate.
    """
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
        results = []
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


if __name__ == "__main__":
    app()
