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

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import requests

HEADER_LENGTH = "Inference-Header-Content-Length"


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
