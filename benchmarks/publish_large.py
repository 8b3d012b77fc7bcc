"""Publish a random-weight LocalizationNet (ConvNeXt-Large by default) and measure every step.

    python -m benchmarks.publish_large                       # large: several minutes, ~3-5 GB RAM
    python -m benchmarks.publish_large --backbone atto       # quick check
    python -m benchmarks.publish_large --json > publish.json
    python -m benchmarks.publish_large --profile prof/       # + cProfile of metadata and register

Issue 11's target: metadata + register under 10 s together, and peak RSS at most 3x the ONNX
file. One process builds the model and saves it as safetensors; a fresh process (imports
only, nothing of the first one's memory) runs ``heimdall.pipeline.publish`` on that file in a
throwaway embedded data dir (local object store, SQLite MLflow), fp32 only, ``bench=False``.

Per step: wall seconds (publish's own ``StepRecord``), CPU seconds of the whole process (all
threads, ``time.process_time``), bytes read and written through syscalls (``rchar``/``wchar``
of ``/proc/self/io``, page-cache hits included: "reads" = bytes read / ONNX file size counts how
often the step went through the file) and the step's peak RSS: the kernel's high-water mark
(``VmHWM``), reset at every step start through ``/proc/self/clear_refs``. That reset also resets
``ru_maxrss``, so the process peak is the largest high-water mark of all windows (before the
publish, each step, between steps); ``--no-step-peaks`` skips the resets and reports
``getrusage(RUSAGE_SELF).ru_maxrss`` instead (same figure, no per-step split). A sampler thread
keeps the Python stack at each step's highest RSS sample (it needs the GIL, so it sees what
holds memory after a C call returns, not inside it).

A checkpoint of more than ``pipeline.ISOLATED_EXPORT_BYTES`` of weights is exported in a
process of its own: its peak and CPU seconds (``RUSAGE_CHILDREN`` of the publishing process; the
largest child by far) are reported beside the publishing process's, with the sum of both while
it ran.

The embedded MLflow store's schema is created before the publish (timed as ``store_init``): a
fresh SQLite store runs every migration on first use, which is not a publish cost.
The quality gates are opened (as tests/fixtures/mlflow_server.py's GATES_OPEN): random weights
predict about the region centre, which the baseline gate (at most half the centre's error)
rightly refuses.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
GATES_OPEN = {"gate_baseline_fraction": 1000.0, "gate_champion_tolerance": 1000.0}
PROFILED_STEPS = ("metadata", "register")
# Calls that read, hash, parse or copy a whole model file: counted in each profiled step.
HEAVY_CALLS = (
    ("sha256_chunks", "heimdall/files.py"),
    ("fetch", "heimdall/storage/base.py"),
    ("copyfile", "shutil.py"),
    ("load_model", "onnx/__init__.py"),
    ("check_model", "onnx/checker.py"),
    ("infer_shapes", "onnx/shape_inference.py"),
    ("validate_onnx_model", "heimdall/validate.py"),
    ("__init__", "onnxruntime_inference_collection.py"),
    ("save_model", "mlflow/onnx/__init__.py"),
)
# heimdall functions --trace wraps in every heimdall module that holds them.
TRACED_HEIMDALL = (
    "load_checkpoint",
    "load_exact",
    "export_to_onnx",
    "export_checkpoint_isolated",
    "record_torch_reference",
    "validate_onnx_model",
    "load_structure",
    "check_external_data",
    "verify_parity",
    "open_session",
    "evaluate_heldout",
    "sha256_chunks",
    "fetch",
    "upload_model",
    "get_model_metadata",
    "register_model",
    "stage_model_dir",
    "move_alias_gated",
    "write_report",
)


# --- child: build and save the model -----------------------------------------------------------


def prepare(backbone: str, seed: int, checkpoint: Path) -> dict[str, Any]:
    import torch

    from heimdall.checkpoint import save_checkpoint
    from heimdall.model import LocalizationNet, ModelConfig

    torch.manual_seed(seed)
    model = LocalizationNet(ModelConfig(backbone=backbone))
    started = time.perf_counter()
    sha256 = save_checkpoint(model, checkpoint)
    return {
        "backbone": backbone,
        "parameters": model.get_params_count().total,
        "checkpoint_bytes": checkpoint.stat().st_size,
        "checkpoint_sha256": sha256,
        "save_seconds": round(time.perf_counter() - started, 3),
    }


# --- child: publish and measure ----------------------------------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _io() -> dict[str, int]:
    pairs = (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(v) for k, v in pairs}


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _short(filename: str) -> str:
    return re.sub(r".*/(site-packages|src|lib/python3\.\d+)/", "", filename)


class Watermarks:
    """Peak RSS of nested windows (steps, traced calls) from the kernel's high-water mark.

    Every reading takes ``VmHWM``, credits it to each open window, then resets it through
    ``/proc/self/clear_refs`` (when ``reset``), so a window's peak is the largest reading taken
    while it was open, and ``peak`` the largest of all.
    """

    def __init__(self, reset: bool) -> None:
        self.reset = reset
        self.peak = 0
        self.open: list[dict[str, Any]] = []

    def reading(self) -> None:
        hwm = _status_kib("VmHWM") * 1024
        self.peak = max(self.peak, hwm)
        for window in self.open:
            window["peak"] = max(window["peak"], hwm)
        if self.reset:
            Path("/proc/self/clear_refs").write_text("5")

    def enter(self) -> dict[str, Any]:
        self.reading()
        window = {
            "peak": 0,
            "rss": _rss_bytes(),
            "wall": time.perf_counter(),
            "cpu": time.process_time(),
            "io": _io(),
        }
        self.open.append(window)
        return window

    def leave(self, window: dict[str, Any]) -> dict[str, Any]:
        """The window's wall and CPU seconds, bytes read and written, and RSS figures."""
        self.reading()
        self.open.remove(window)
        io = _io()
        return {
            "meter_wall_s": time.perf_counter() - window["wall"],
            "cpu_s": time.process_time() - window["cpu"],
            "read_bytes": io["rchar"] - window["io"]["rchar"],
            "written_bytes": io["wchar"] - window["io"]["wchar"],
            "rss_start_bytes": window["rss"],
            "rss_end_bytes": _rss_bytes(),
            "peak_rss_bytes": window["peak"] if self.reset else None,
        }


class StepMeter:
    """Per-step figures, fed by publish's progress callback; optionally cProfile per step."""

    def __init__(self, marks: Watermarks, profile_dir: Path | None) -> None:
        self.marks = marks
        self.profile_dir = profile_dir
        self.steps: dict[str, dict[str, Any]] = {}
        self.current: str | None = None
        self._window: dict[str, Any] = {}
        self._profiler: Any = None

    def progress(self, name: str, status: str, detail: str) -> None:
        if status == "start":
            self.current = name
            self._window = self.marks.enter()
            if self.profile_dir is not None and name.split("[")[0] in PROFILED_STEPS:
                import cProfile

                self._profiler = cProfile.Profile()
                self._profiler.enable()
            return
        if self._profiler is not None:
            self._profiler.disable()
            assert self.profile_dir is not None
            self._profiler.dump_stats(str(self.profile_dir / f"{name}.prof"))
            self._profiler = None
        self.steps[name] = {"status": status, **self.marks.leave(self._window)}
        self.current = None


class CallTracer:
    """Wraps the calls that read, hash, parse, copy or load a whole model, wherever looked up.

    Each call is recorded with its step, its two nearest callers (file:line), wall seconds and
    RSS before, at peak and after. The real functions run; only the lookup names are replaced.
    """

    def __init__(self, marks: Watermarks, meter: StepMeter) -> None:
        self.marks = marks
        self.meter = meter
        self.calls: list[dict[str, Any]] = []

    def install(self) -> None:
        import shutil

        import mlflow.onnx
        import onnx
        import onnx.checker
        import onnx.shape_inference
        import torch

        for owner, attr in (
            (onnx, "load"),
            (onnx, "load_model"),
            (onnx, "save_model"),
            (onnx.checker, "check_model"),
            (onnx.shape_inference, "infer_shapes"),
            (torch.onnx, "export"),
            (shutil, "copyfile"),
            (mlflow.onnx, "save_model"),
        ):
            setattr(owner, attr, self._wrap(getattr(owner, attr), f"{owner.__name__}.{attr}"))
        wrapped: dict[Any, Any] = {}
        modules = [m for n, m in sys.modules.items() if n.startswith("heimdall") and m is not None]
        for module in modules:  # the names each heimdall module imported, replaced in each
            for attr in TRACED_HEIMDALL:
                original = getattr(module, attr, None)
                if callable(original) and not isinstance(original, type):
                    if original not in wrapped:
                        label = f"{original.__module__}.{attr}"
                        wrapped[original] = self._wrap(original, label)
                    setattr(module, attr, wrapped[original])

    def _wrap(self, function: Callable[..., Any], label: str) -> Callable[..., Any]:
        tracer = self

        @functools.wraps(function)
        def traced(*args: Any, **kwargs: Any) -> Any:
            callers: list[str] = []
            frame = sys._getframe(1)
            while frame is not None and len(callers) < 2:
                if frame.f_code.co_filename != __file__:
                    code = frame.f_code
                    callers.append(f"{_short(code.co_filename)}:{frame.f_lineno} {code.co_name}")
                frame = frame.f_back  # type: ignore[assignment]
            window = tracer.marks.enter()
            try:
                return function(*args, **kwargs)
            finally:
                figures = tracer.marks.leave(window)
                tracer.calls.append(
                    {
                        "step": tracer.meter.current,
                        "call": label,
                        "callers": callers,
                        "depth": len(tracer.marks.open),
                        **figures,
                    }
                )

        return traced


def run_publish(
    checkpoint: Path, data_dir: Path, step_peaks: bool, profile_dir: Path | None, trace: bool
) -> dict[str, Any]:
    import resource

    from heimdall.config import Settings
    from heimdall.pipeline import ISOLATED_EXPORT_BYTES, publish
    from heimdall.registry import list_models

    imported_rss = _rss_bytes()
    settings = Settings(
        data_dir=data_dir,
        tracking_uri=None,
        registry_uri=None,
        artifact_uri=None,
        s3_endpoint_url=None,
        s3_access_key_id=None,
        s3_secret_access_key=None,
        **GATES_OPEN,
    )
    started = time.perf_counter()
    list_models(settings=settings)  # creates the SQLite schema: every migration, once
    store_init = time.perf_counter() - started
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    marks = Watermarks(reset=step_peaks)
    meter = StepMeter(marks, profile_dir)
    tracer = CallTracer(marks, meter)
    if trace:
        tracer.install()
    load_start = os.getloadavg()[0]
    marks.reading()
    started = time.perf_counter()
    result = publish(checkpoint, settings=settings, bench=False, progress=meter.progress)
    total = time.perf_counter() - started
    marks.reading()
    records = {r.name: r for r in result.steps}
    steps = []
    for name, measured in meter.steps.items():
        record = records.get(name)
        wall = record.seconds if record is not None else measured["meter_wall_s"]
        steps.append({"step": name, "wall_s": wall, **measured})
    primary = result.primary
    peak = marks.peak if step_peaks else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The export process of a large checkpoint (pipeline.ISOLATED_EXPORT_BYTES), if one ran.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = usage.ru_maxrss * 1024
    return {
        "onnx_path": str(primary.onnx_path),
        "onnx_bytes": primary.upload.size,
        "onnx_sha256": primary.upload.sha256,
        "version": primary.version.uri,
        "imported_rss_bytes": imported_rss,
        "store_init_s": store_init,
        "publish_wall_s": total,
        "load_at_publish_start": load_start,
        "peak_rss_bytes": peak,
        "peak_rss_source": "max VmHWM over windows" if step_peaks else "ru_maxrss",
        "export_isolated": checkpoint.stat().st_size >= ISOLATED_EXPORT_BYTES,
        "children_peak_rss_bytes": children,
        "children_cpu_s": usage.ru_utime + usage.ru_stime,
        "steps": steps,
        "calls": tracer.calls,
        "profiles": _heavy_calls(profile_dir) if profile_dir is not None else {},
    }


def _heavy_calls(profile_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Per profiled step: how often each whole-file call ran and its cumulative seconds."""
    import pstats

    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(profile_dir.glob("*.prof")):
        stats: dict[Any, Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
        rows = []
        for (filename, line, func), (_, calls, _, cumulative, _) in stats.items():
            for name, where in HEAVY_CALLS:
                if func == name and filename.endswith(where):
                    where_short = re.sub(r".*/(site-packages|src)/", "", filename)
                    rows.append(
                        {
                            "call": f"{where_short}:{line} {func}",
                            "calls": calls,
                            "cum_s": cumulative,
                        }
                    )
        found[path.stem] = sorted(rows, key=lambda r: -r["cum_s"])
    return found


# --- parent: orchestrate, report ---------------------------------------------------------------


def _child(args: list[str], out: Path) -> dict[str, Any]:
    """Run this module in a fresh interpreter; return its JSON and its rusage from wait4."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks.publish_large", *args, "--out", str(out)]
    process = subprocess.Popen(cmd, env=env, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {process.returncode}")
    data: dict[str, Any] = json.loads(out.read_text())
    data["child_cpu_s"] = usage.ru_utime + usage.ru_stime
    data["child_ru_maxrss_bytes"] = usage.ru_maxrss * 1024
    return data


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    load_start = os.getloadavg()
    checkpoint = workdir / f"localizationnet-{args.backbone}.safetensors"
    prepare_args = ["--child-prepare", args.backbone, str(args.seed), str(checkpoint)]
    prepared = _child(prepare_args, workdir / "prepare.json")
    publish_args = ["--child-publish", str(checkpoint), str(workdir / "data")]
    if args.no_step_peaks:
        publish_args.append("--no-step-peaks")
    if args.trace:
        publish_args.append("--trace")
    if args.profile is not None:
        publish_args += ["--profile", str(args.profile.resolve())]
    published = _child(publish_args, workdir / "publish.json")
    load_end = os.getloadavg()
    size = published["onnx_bytes"]
    meta_register = sum(
        s["wall_s"] for s in published["steps"] if s["step"].split("[")[0] in PROFILED_STEPS
    )
    return {
        "backbone": args.backbone,
        "seed": args.seed,
        "parameters": prepared["parameters"],
        "checkpoint_bytes": prepared["checkpoint_bytes"],
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": load_end,
        **published,
        "metadata_plus_register_s": meta_register,
        "peak_rss_over_model": published["peak_rss_bytes"] / size,
        "targets": {
            "metadata_plus_register_under_10_s": meta_register < 10.0,
            "peak_rss_at_most_3x_model": published["peak_rss_bytes"] <= 3 * size,
        },
    }


def _mib(n: float) -> str:
    return f"{n / MiB:.0f}"


def print_report(r: dict[str, Any]) -> None:
    size = r["onnx_bytes"]
    print(
        f"{r['backbone']}: {r['parameters'] / 1e6:.1f} M parameters, ONNX {size / MiB:.1f} MiB, "
        f"checkpoint {r['checkpoint_bytes'] / MiB:.1f} MiB; {r['cpu_count']} CPUs, load average "
        f"{r['load_average_start'][0]:.2f} at start, {r['load_at_publish_start']:.2f} at publish, "
        f"{r['load_average_end'][0]:.2f} at end"
    )
    print(
        f"{'step':<12}{'wall s':>8}{'CPU s':>8}{'read MiB':>10}{'reads':>7}{'wrote MiB':>10}"
        f"{'peak RSS MiB':>13}{'x model':>8}"
    )
    for s in r["steps"]:
        peak = s["peak_rss_bytes"]
        print(
            f"{s['step']:<12}{s['wall_s']:>8.2f}{s['cpu_s']:>8.2f}{_mib(s['read_bytes']):>10}"
            f"{s['read_bytes'] / size:>7.1f}{_mib(s['written_bytes']):>10}"
            + (f"{_mib(peak):>13}{peak / size:>8.2f}" if peak is not None else f"{'-':>13}{'-':>8}")
        )
    targets = r["targets"]
    print(
        f"publish {r['publish_wall_s']:.1f} s (store schema created before it in "
        f"{r['store_init_s']:.1f} s); RSS after imports {_mib(r['imported_rss_bytes'])} MiB"
    )
    print(
        f"metadata + register: {r['metadata_plus_register_s']:.2f} s "
        f"({'met' if targets['metadata_plus_register_under_10_s'] else 'NOT met'}: < 10 s)"
    )
    print(
        f"peak RSS: {_mib(r['peak_rss_bytes'])} MiB = {r['peak_rss_over_model']:.2f}x the model "
        f"({r['peak_rss_source']}; "
        f"{'met' if targets['peak_rss_at_most_3x_model'] else 'NOT met'}: <= 3x)"
    )
    children = r["children_peak_rss_bytes"]
    if r["export_isolated"]:  # else only short-lived forks (MLflow's subprocess calls) ran
        export = next((s for s in r["steps"] if s["step"] == "export"), None)
        beside = export["rss_end_bytes"] if export else 0  # what the publisher held meanwhile
        print(
            f"export process: {r['children_cpu_s']:.1f} s CPU, peak RSS {_mib(children)} MiB = "
            f"{children / size:.2f}x the model; "
            f"with the publishing process beside it ({_mib(beside)} MiB) "
            f"{_mib(children + beside)} MiB = {(children + beside) / size:.2f}x"
        )
    if r["calls"]:
        print("traced calls (RSS MiB; 'peak +' is over RSS before the call, in model sizes):")
        print(
            f"{'step':<10}{'call':<44}{'wall s':>7}{'before':>7}{'peak':>6}{'after':>6}"
            f"{'peak +':>7}"
        )
        for c in r["calls"]:
            indent = "  " * max(c["depth"] - 1, 0)
            print(
                f"{c['step'] or '-':<10}{indent + c['call']:<44.44}{c['meter_wall_s']:>7.2f}"
                f"{_mib(c['rss_start_bytes']):>7}{_mib(c['peak_rss_bytes']):>6}"
                f"{_mib(c['rss_end_bytes']):>6}"
                f"{(c['peak_rss_bytes'] - c['rss_start_bytes']) / size:>7.2f}"
                f"  < {' < '.join(c['callers'])}"
            )
    for step, rows in r["profiles"].items():
        print(f"cProfile {step}:")
        for row in rows:
            print(f"  {row['calls']:>3}x {row['cum_s']:>7.2f} s  {row['call']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="large", help="LocalizationNet backbone")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--workdir", type=Path, help="keep checkpoint, exports and store here")
    parser.add_argument("--profile", type=Path, help="write cProfile of metadata/register here")
    parser.add_argument("--no-step-peaks", action="store_true", help="ru_maxrss only")
    parser.add_argument("--trace", action="store_true", help="RSS and time of whole-file calls")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--child-prepare", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-publish", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trace and args.no_step_peaks:
        parser.error("--trace needs the per-window peaks; leave out --no-step-peaks")

    if args.child_prepare:
        backbone, seed, path = args.child_prepare
        args.out.write_text(json.dumps(prepare(backbone, int(seed), Path(path))))
        return
    if args.child_publish:
        ckpt, data = (Path(p) for p in args.child_publish)
        measured = run_publish(ckpt, data, not args.no_step_peaks, args.profile, args.trace)
        args.out.write_text(json.dumps(measured))
        return

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="publish-large-") as tmp:
            report = run(args, Path(tmp))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
