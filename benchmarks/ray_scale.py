"""Scale-out on Ray: serving with 1 and 2 replicas, scoring with 1 and 2 actors (issue 21).

    .venv/bin/python benchmarks/ray_scale.py            # full run: tiny model, 30 s per point
    .venv/bin/python benchmarks/ray_scale.py --quick    # smoke run: atto model, 5 s per point

Needs root (it makes a network namespace, as the tests do) and runs everything in it: a
two-node Ray cluster with one CPU per node (tests/fixtures/ray_cluster.py), the servers, the
scoring jobs and the clients, all on 127.0.0.1. A random-weights LocalizationNet is registered
on an embedded store and served by alias.

Serving: 32 closed-loop clients (one sample per request) for a fixed time against
``heimdall serve`` (one process) and ``heimdall serve --ray`` with 1 and 2 replicas (one per
node): throughput, p50 and p99, Ray's p50 overhead at one replica (target ≤ 1.3× heimdall
serve) and the scaling efficiency throughput(2) / (2 × throughput(1)) (target ≥ 0.8 on 2
cores), and the resident memory of each replica process. Then a node failure under load:
the second node's raylet is killed; failed requests and seconds until every request succeeds
again (target ≤ 30 s). Scoring: ``heimdall score`` in one process against ``--ray --actors 1``
and ``--actors 2``: samples per second of the whole job (Ray's figures include connecting and
starting the actors) and the efficiency at 2 actors. Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.process import ManagedProcess  # noqa: E402
from tests.fixtures.ray_cluster import SERVE_PORT, RayCluster, make_cluster, read_load  # noqa: E402
from tests.fixtures.registered import publish_random  # noqa: E402

HEIMDALL = str(Path(sys.executable).parent / "heimdall")
URL = f"http://127.0.0.1:{SERVE_PORT}"


@dataclass(frozen=True)
class Point:
    """One serving measurement."""

    label: str
    requests: int
    failed: int
    throughput: float  # successful requests per second
    p50_ms: float
    p99_ms: float
    rss_mib: list[float]


def publish(workdir: Path, backbone: str) -> tuple[dict[str, str], str]:
    """Register a random-weights model; its environment and ``models:/NAME@staging``."""
    from heimdall.config import Settings
    from heimdall.registry import set_alias
    from heimdall.storage import open_store

    settings = Settings(data_dir=workdir / "data", tracking_uri=None)
    store = open_store(settings)
    name = f"ray-scale-{os.urandom(3).hex()}"
    version = publish_random(workdir, name, settings, store, seed=0, backbone=backbone)
    set_alias(name, version, "staging", settings=settings, store=store)
    return {"HEIMDALL_DATA_DIR": str(settings.data_dir)}, f"models:/{name}@staging"


def rss_mib(cluster: RayCluster, title: str) -> list[float]:
    """Resident memory of the namespace's processes whose command line holds ``title``."""
    sizes = []
    for pid in cluster._pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if title.encode() in cmdline:
            kib = next(int(line.split()[1]) for line in status.splitlines() if line[:6] == "VmRSS:")
            sizes.append(round(kib / 1024, 1))
    return sorted(sizes)


def measure(
    cluster: RayCluster, workdir: Path, label: str, model: str, args: argparse.Namespace
) -> tuple[Point, list[dict[str, object]]]:
    """32 closed-loop clients for ``args.seconds`` after a warm-up."""
    log, stop = workdir / f"{label}.jsonl", workdir / f"{label}.stop"
    url = f"{URL}/v2/models/{model}/infer"
    client = cluster.start(
        f"load-{label}",
        [
            sys.executable,
            "-m",
            "tests.fixtures.ray_cluster",
            "load",
            url,
            log,
            stop,
            "--clients",
            str(args.clients),
        ],
    )
    started = time.time()
    time.sleep(args.warmup + args.seconds)
    memory = rss_mib(cluster, "ServeReplica") if "ray" in label else []
    stop.touch()
    assert client.proc is not None
    client.proc.wait(timeout=60)
    records = read_load(log)
    window = [
        r
        for r in records
        if started + args.warmup <= float(r["t"]) < started + args.warmup + args.seconds
    ]  # type: ignore[arg-type]
    ok = sorted(float(r["seconds"]) for r in window if r["status"] == 200)  # type: ignore[arg-type]
    point = Point(
        label=label,
        requests=len(window),
        failed=len(window) - len(ok),
        throughput=len(ok) / args.seconds,
        p50_ms=1000 * statistics.median(ok) if ok else float("nan"),
        p99_ms=1000 * ok[int(0.99 * (len(ok) - 1))] if ok else float("nan"),
        rss_mib=memory,
    )
    return point, records


def server(
    cluster: RayCluster, env: dict[str, str], uri: str, replicas: int | None
) -> ManagedProcess:
    ray = ["--ray", "--replicas", str(replicas)] if replicas else []
    process = cluster.start(
        f"serve-{replicas or 'local'}",
        [HEIMDALL, "serve", uri, "--port", str(SERVE_PORT), "--poll-interval", "600", *ray],
        env=env,
    )
    if not process.wait_until(partial(cluster.wait_ready, f"{URL}/v2/health/ready", 5), 300):
        process.stop()
        raise SystemExit(f"server did not become ready:\n{process.log_tail()}")
    return process


def serving(
    cluster: RayCluster, workdir: Path, env: dict[str, str], uri: str, args: argparse.Namespace
) -> tuple[list[Point], dict[str, float]]:
    model = uri.removeprefix("models:/").split("@")[0]
    points = []
    for replicas in (None, 1, 2):
        process = server(cluster, env, uri, replicas)
        try:
            label = f"ray-{replicas}" if replicas else "heimdall-serve"
            points.append(measure(cluster, workdir, label, model, args)[0])
            if replicas == 2:
                failure = node_failure(cluster, workdir, model, args)
        finally:
            process.stop(grace=30)
    return points, failure


def node_failure(
    cluster: RayCluster, workdir: Path, model: str, args: argparse.Namespace
) -> dict[str, float]:
    """Kill the worker node's raylet under load; restart the node afterwards."""
    log, stop = workdir / "failure.jsonl", workdir / "failure.stop"
    client = cluster.start(
        "load-failure",
        [
            sys.executable,
            "-m",
            "tests.fixtures.ray_cluster",
            "load",
            f"{URL}/v2/models/{model}/infer",
            log,
            stop,
            "--clients",
            str(args.clients),
        ],
    )
    time.sleep(args.warmup)
    killed = time.time()
    cluster.kill_worker_node()
    time.sleep(args.failure_seconds)
    stop.touch()
    assert client.proc is not None
    client.proc.wait(timeout=60)
    cluster.start_worker_node()
    after = [r for r in read_load(log) if float(r["t"]) >= killed]  # type: ignore[arg-type]
    failed = [r for r in after if r["status"] != 200]
    last = max((float(r["t"]) + float(r["seconds"]) for r in failed), default=killed)  # type: ignore[arg-type]
    return {"requests": len(after), "failed": len(failed), "seconds": last - killed}


def scoring(
    cluster: RayCluster, workdir: Path, env: dict[str, str], uri: str, args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    import numpy as np

    from heimdall.data import generate

    folder = workdir / "archive"
    folder.mkdir()
    for i in range(args.files):
        np.save(folder / f"rec-{i:03d}.npy", generate(args.samples, seed=i)[0])
    rates = {}
    for label, extra in (
        ("one process", []),
        ("ray 1 actor", ["--ray", "--actors", "1"]),
        ("ray 2 actors", ["--ray", "--actors", "2"]),
    ):
        out = workdir / f"{label.replace(' ', '-')}.parquet"
        done = cluster.run(
            [HEIMDALL, "score", uri, folder, "-o", out, "--json", *extra], env=env, timeout=3600
        )
        if done.returncode != 0:
            raise SystemExit(f"score {label} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout)
        rates[label] = (result["rows"] / result["seconds"], result["seconds"])
    return rates


def report(
    points: list[Point],
    failure: dict[str, float],
    rates: dict[str, tuple[float, float]],
    args: argparse.Namespace,
) -> str:
    by = {p.label: p for p in points}
    local, one, two = by["heimdall-serve"], by["ray-1"], by["ray-2"]
    lines = [
        f"## Ray scale-out ({args.backbone}, {args.clients} clients, {args.seconds:g} s per point,"
        f" 2 Ray nodes × 1 CPU, {os.cpu_count()} cores)",
        "",
        "| server | requests | failed | req/s | p50 ms | p99 ms | RSS per replica MiB |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {p.label} | {p.requests} | {p.failed} | {p.throughput:.1f} | {p.p50_ms:.1f} | "
            f"{p.p99_ms:.1f} | {', '.join(map(str, p.rss_mib)) or '-'} |"
            for p in points
        ),
        "",
        f"- Ray overhead at one replica: p50 {one.p50_ms / local.p50_ms:.2f}× heimdall serve "
        "(target ≤ 1.3)",
        f"- serving scaling efficiency at 2 replicas: {two.throughput / (2 * one.throughput):.2f}"
        " (target ≥ 0.8)",
        f"- node failure under load: {failure['failed']:.0f} of {failure['requests']:.0f} requests"
        f" failed; every request succeeds again {failure['seconds']:.1f} s after the kill"
        " (target ≤ 30 s)",
        "",
        f"| scoring ({args.files} × {args.samples} samples) | samples/s | job seconds |",
        "|---|---|---|",
        *(f"| {label} | {rate:.1f} | {seconds:.1f} |" for label, (rate, seconds) in rates.items()),
        "",
        f"- scoring scaling efficiency at 2 actors: "
        f"{rates['ray 2 actors'][0] / (2 * rates['ray 1 actor'][0]):.2f} (target ≥ 0.8)",
    ]
    return "\n".join(lines)


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--backbone", help="ConvNeXt size (default tiny; --quick atto)")
    parser.add_argument("--seconds", type=float, help="per serving point (default 30; --quick 5)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--files", type=int, help="scoring input files (default 16; --quick 8)")
    parser.add_argument("--samples", type=int, help="samples per file (default 256; --quick 128)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.backbone = args.backbone or ("atto" if quick else "tiny")
    args.seconds = args.seconds or (5.0 if quick else 30.0)
    args.files = args.files or (8 if quick else 16)
    args.samples = args.samples or (128 if quick else 256)
    args.warmup = 3.0 if quick else 10.0
    args.failure_seconds = 45.0 if quick else 60.0
    return args


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    with tempfile.TemporaryDirectory(prefix="ray-scale-") as tmp:
        workdir = Path(tmp)
        env, uri = publish(workdir, args.backbone)
        cluster = make_cluster()
        try:
            rates = scoring(cluster, workdir, env, uri, args)
            points, failure = serving(cluster, workdir, env, uri, args)
        finally:
            cluster.stop()
    print(report(points, failure, rates, args))


if __name__ == "__main__":
    main()
