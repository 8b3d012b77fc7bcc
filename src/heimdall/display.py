"""How the CLI shows results to people: tables, key: value lines, progress bars, error lines.

``--json`` output is the result's own ``to_dict``; everything here is for a person at a terminal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import typer
from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from heimdall.config import Settings, redact_uri
from heimdall.errors import HeimdallError, PublishError, ResourceError

# Messages on stderr are one line each, whatever the width: a log or a pipe reads them whole.
console = Console(stderr=True, soft_wrap=True)
out = Console()


def plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return plain(value.to_dict())
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
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


def short_hash(sha256: Any) -> str:
    """The first 12 hex digits of a sha256, enough to tell versions apart in a table."""
    return f"{sha256[:12]}…" if isinstance(sha256, str) and len(sha256) > 12 else _scalar(sha256)


def when(iso: Any) -> str:
    """``2026-05-01T12:00:00+00:00`` → ``2026-05-01 12:00`` (UTC, said in the column header)."""
    if isinstance(iso, str) and iso.endswith("+00:00"):
        return iso.replace("T", " ")[:16]
    return _scalar(iso)


def _mib(size: Any) -> str:
    return f"{size / 2**20:.1f} MiB" if isinstance(size, int) else _scalar(size)


def fields_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    """A two-column field/value table; nested values as one ``key: value`` line each."""
    cells = [(Text(key), value if isinstance(value, Text) else _cell(value)) for key, value in rows]
    table = Table(title=Text(title), show_header=False, title_justify="left")
    keys, values = _widths([[k for k, _ in cells], [v for _, v in cells]])
    table.add_column("field", style="bold", overflow="fold", width=keys)
    table.add_column("value", overflow="fold", width=values)
    for key, value in cells:
        table.add_row(key, value)
    return table


def records_table(title: str, records: Sequence[Mapping[str, Any]]) -> Table:
    """One row per record, one column per key (in the order the keys first appear)."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    rows = [[_cell(record.get(column)) for column in columns] for record in records]
    widths = _widths([[Text(c), *(row[i] for row in rows)] for i, c in enumerate(columns)])
    table = Table(title=Text(title), title_justify="left")
    for column, width in zip(columns, widths, strict=True):
        table.add_column(column, overflow="fold", width=width)
    for row in rows:
        table.add_row(*row)
    return table


_LONGEST_WHOLE_WORD = 48  # longer words (URIs, a full sha256) fold at the cell's edge


def _widths(columns: Sequence[Sequence[Text]]) -> list[int | None]:
    """Column widths that fit the terminal without cutting a word: names, versions, stages and
    short hashes stay whole, text wraps between words (None: as wide as its content).

    Rich shrinks the widest columns first, inside words too (``heimdall-localizati|on-onnx``);
    here the widest column shrinks only down to its longest word, and words are folded only
    when the table could not fit otherwise.
    """
    natural = [
        max((cell_len(line) for c in cells for line in c.plain.splitlines()), default=1)
        for cells in columns
    ]
    budget = out.width - 3 * len(columns) - 1  # a cell's padding and border take 3 columns
    if sum(natural) <= budget:
        return [None] * len(columns)
    words = [
        min(
            max((cell_len(w) for c in cells for w in c.plain.split()), default=1),
            _LONGEST_WHOLE_WORD,
        )
        for cells in columns
    ]
    widths = list(natural)
    for floor in (words, [1] * len(columns)):
        while sum(widths) > budget:
            wider = [i for i, w in enumerate(widths) if w > floor[i]]
            if not wider:
                break
            widths[max(wider, key=lambda i: widths[i])] -= 1
    return list(widths)


def show(*renderables: RenderableType | None) -> None:
    """Print each renderable that is not None, in order."""
    for renderable in renderables:
        if renderable is not None:
            out.print(renderable)


def emit(result: Any, as_json: bool, title: str) -> None:
    """Print a result: JSON on stdout for programs, tables for people.

    Scalars and nested fields go in one field/value table; a list of records gets a table of
    its own after it.
    """
    data = plain(result)
    if as_json:
        out.print_json(json.dumps(data, default=str))
        return
    items = list(data.items()) if isinstance(data, dict) else [("result", data)]
    fields = [(k, v) for k, v in items if not _is_records(v)]
    show(
        fields_table(title, fields) if fields else None,
        *(records_table(k, v) for k, v in items if _is_records(v)),
    )


def show_publish(data: Mapping[str, Any]) -> None:
    """The publish summary: what was made, its versions, the gates they passed, each step."""
    published = data["published"]
    show(
        fields_table("published", _publish_fields(data)),
        records_table(
            "versions",
            [
                {
                    "variant": p["variant"],
                    "version": p["version"],
                    "alias": p["alias"],
                    "sha256": short_hash(p["sha256"]),
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


def _publish_fields(data: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The publish summary's headline: what was published, where, and how it measured."""
    primary = data["published"][0]
    speedup = data["speedup_batch1"]
    return [
        ("name", data["name"]),
        ("checkpoint sha256", data["checkpoint_sha256"]),
        ("model URI", primary["model_uri"]),
        ("stored at", primary["uri"]),
        ("parity", _verdict(data["parity_passed"])),
        (
            "speed-up, batch 1",
            "not measured" if speedup is None else f"{speedup:.2f}× ONNX Runtime vs PyTorch eager",
        ),
        ("held-out median error", f"{data['heldout_median_error_km']:.1f} km"),
    ]


def _verdict(passed: bool) -> str:
    return "passed" if passed else "FAILED"


def _variants_table(variants: Sequence[Mapping[str, Any]]) -> Table | None:
    if not variants:
        return None
    rows = [
        {
            "variant": v["variant"],
            "gates": _verdict(v["passed"]),
            "sha256": short_hash(v["sha256"]),
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
                ("thresholds", thresholds(parity["gates"]) or "-"),
                ("held-out task check", parity["task"]),
            ]
        diffs = parity["diffs"] if parity is not None else []
        show(
            fields_table(f"{v['variant']} variant", rows),
            parity_table(parity, f"{v['variant']} parity vs PyTorch") if diffs else None,
        )


@contextmanager
def errors(as_json: bool) -> Iterator[None]:
    """Turn HeimdallErrors into a clear message and exit code 1, never a traceback."""
    try:
        yield
    except HeimdallError as exc:
        _print_error(exc, as_json)
    except Exception as exc:
        # Library calls that can allocate much turn this into their own line already
        # (machine.memory_errors); this catches the rest, where a traceback would end it.
        # Imported here: machine loads onnxruntime, which the registry commands never need.
        from heimdall.machine import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
        _print_error(
            ResourceError(
                "out of memory: ask for less (smaller --samples, --batch-sizes, --calibration "
                "or --chunk-size) or free memory, then run the command again"
            ),
            as_json,
        )


def _print_error(exc: HeimdallError, as_json: bool) -> None:
    """The one line (or JSON document) of a failed command, then exit code 1."""
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


def thresholds(gates: dict[str, Any]) -> str:
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


def sigma_units(metadata: dict[str, str]) -> str:
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


JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
ForceOpt = typer.Option(
    False, "--force", help="Move the alias even if quality gates fail (needs --reason)."
)
ReasonOpt = typer.Option(None, "--reason", help="Why --force is used; recorded with the move.")


def settings_of(ctx: typer.Context) -> Settings:
    """The settings the CLI's main callback loaded for this command."""
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings
