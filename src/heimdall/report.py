"""Publish report: ``report.json`` (schema versioned) and a self-contained ``report.html``.

Every figure is drawn from the run's own numbers with matplotlib (SVG inlined), so the HTML
needs no network, no scripts and no files beside it.
"""

from __future__ import annotations

import html
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ReportPaths:
    json: Path
    html: Path
    created: bool = True  # False: an earlier publish of the same version wrote it


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _latency_plot(latency: dict[str, dict[str, list[float]]]) -> str:
    """Box plot of per-call latency (ms) by batch size for each runtime."""
    runtimes = sorted(latency)
    batches = sorted({b for r in runtimes for b in latency[r]}, key=int)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(len(runtimes), 1)
    for i, runtime in enumerate(runtimes):
        data = [latency[runtime].get(b, []) for b in batches]
        positions = [j + i * width for j in range(len(batches))]
        parts = ax.boxplot(
            data, positions=positions, widths=width * 0.9, showfliers=False, patch_artist=True
        )
        for box in parts["boxes"]:
            box.set_facecolor(f"C{i}")
        ax.plot([], [], color=f"C{i}", label=runtime, linewidth=6)
    ax.set_xticks([j + width * (len(runtimes) - 1) / 2 for j in range(len(batches))])
    ax.set_xticklabels([f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("latency per call (ms)")
    ax.legend()
    return _svg(fig)


def _throughput_plot(throughput: dict[str, dict[str, float]]) -> str:
    """Samples per second by batch size for each runtime."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, (runtime, by_batch) in enumerate(sorted(throughput.items())):
        batches = sorted(by_batch, key=int)
        ax.plot(
            [int(b) for b in batches],
            [by_batch[b] for b in batches],
            "o-",
            color=f"C{i}",
            label=runtime,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s")
    ax.legend()
    return _svg(fig)


def _scatter_plot(true: list[list[float]], pred: list[list[float]]) -> str:
    """Predicted vs true emitter positions on the held-out set."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for (lat_t, lon_t), (lat_p, lon_p) in zip(true, pred, strict=True):
        ax.plot([lon_t, lon_p], [lat_t, lat_p], color="0.8", linewidth=0.5, zorder=1)
    ax.scatter([p[1] for p in true], [p[0] for p in true], s=8, label="true", zorder=2)
    ax.scatter([p[1] for p in pred], [p[0] for p in pred], s=8, label="predicted (ONNX)", zorder=3)
    ax.set_xlabel("longitude (°)")
    ax.set_ylabel("latitude (°)")
    ax.legend()
    return _svg(fig)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _decision(report: dict[str, Any]) -> str:
    """The held-out baseline and every gate with its threshold, value and verdict."""
    held = report.get("heldout") or {}
    baseline = (
        f"<p>Held-out set {html.escape(str(held.get('identity', '—')))}: median error "
        f"{_fmt(held.get('median_error_km'))} km; always predicting the region centre "
        f"{_fmt(held.get('baseline_median_error_km'))} km.</p>"
    )
    rows = [
        {
            "variant": g.get("variant"),
            "alias": g.get("alias"),
            "gate": g.get("name"),
            "threshold and value": g.get("detail"),
            "verdict": "pass" if g.get("passed") else "FAIL",
        }
        for g in report.get("gates", [])
    ]
    return baseline + _table(rows)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;color:#222}
table{border-collapse:collapse;margin:0.5rem 0 1.5rem}td,th{border:1px solid #ccc;
padding:0.2rem 0.5rem;text-align:left;font-size:0.9rem}th{background:#f3f3f3}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem}.ok{color:#17803d}.bad{color:#b3261e}
"""


def render_html(report: dict[str, Any]) -> str:
    """Self-contained HTML for a report document."""
    card = report.get("model_card", {})
    status = "passed" if report.get("success") else "FAILED"
    sections = [
        f"<h1>Heimdall model report — {html.escape(str(card.get('name', 'LocalizationNet')))}</h1>",
        f"<p>Status: <b class={'ok' if report.get('success') else 'bad'}>{status}</b></p>",
        "<h2>Model card</h2>",
        _table([{"field": k, "value": v} for k, v in card.items()]),
        "<h2>Steps</h2>",
        _table(report.get("steps", [])),
        "<h2>Decision: quality gates</h2>",
        _decision(report),
        "<h2>Parity PyTorch vs ONNX Runtime</h2>",
        _table(report.get("parity", [])),
    ]
    if report.get("latency_ms"):
        sections += ["<h2>Latency distribution</h2>", _latency_plot(report["latency_ms"])]
    if report.get("machine_busy"):
        sections.append(
            "<p class=bad><b>Machine busy</b> while timing: other processes held the cores, so "
            "these latencies and speed-ups are not reliable figures.</p>"
        )
    if report.get("throughput"):
        sections += [
            "<h2>Throughput</h2>",
            _throughput_plot(report["throughput"]),
            _table(report.get("benchmark", [])),
        ]
    if report.get("heldout"):
        held = report["heldout"]
        sections += [
            "<h2>Held-out localization</h2>",
            _table([{k: v for k, v in held.items() if k not in ("true", "predicted")}]),
            _scatter_plot(held["true"], held["predicted"]),
        ]
    body = "\n".join(sections)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>Heimdall report</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def write_report(report: dict[str, Any], out_dir: Path) -> ReportPaths:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` once; never overwrite.

    Both files are written into a temporary sibling folder that is then renamed to ``out_dir``:
    readers never see half a report, and when ``out_dir`` already holds one (another publish of
    the same version got there first) it is kept and returned with ``created=False``.
    """
    out_dir = Path(out_dir)
    paths = ReportPaths(json=out_dir / "report.json", html=out_dir / "report.html")
    if paths.json.is_file():
        return replace(paths, created=False)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    document = {"schema_version": REPORT_SCHEMA_VERSION, **report}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "report.json").write_text(json.dumps(document, indent=2, default=str))
        (tmp / "report.html").write_text(render_html(document))
        try:
            os.rename(tmp, out_dir)
        except OSError:  # taken meanwhile (ENOTEMPTY/EEXIST): keep the first report
            if paths.json.is_file():
                return replace(paths, created=False)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
