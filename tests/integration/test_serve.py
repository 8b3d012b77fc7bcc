"""`heimdall serve` as a process over real HTTP, on the embedded store and on `mlflow server`.

Concurrent clients run while the alias is promoted and rolled back: no request fails, every
answer names one version and carries that version's numbers. Tampered bytes are refused while
the old version keeps serving; bad input, oversized requests and forged webhooks are refused in
one line; on `mlflow server` + PostgreSQL + SeaweedFS the signed webhook swaps the model long
before the poll interval.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from mlflow import MlflowClient

from benchmarks.serve_load import ClosedLoop, heimdall_sender, load
from heimdall.data import generate
from heimdall.export import export_to_onnx
from heimdall.inference import LocalizationModel
from heimdall.model import LocalizationNet, ModelConfig
from heimdall.registry import rollback, set_alias
from tests.fixtures.mlflow_server import MlflowBackend
from tests.fixtures.process import ManagedProcess, free_port, http_ok
from tests.fixtures.registered import publish
from tests.unit.test_serving_follower import tamper, variant

pytestmark = pytest.mark.integration

ALIAS = "live"
SECRET = "whsec-" + secrets.token_hex(8)
HEIMDALL = str(Path(sys.executable).parent / "heimdall")


@dataclass
class Served:
    """A running `heimdall serve` and the versions it can be moved between."""

    backend: MlflowBackend
    process: ManagedProcess
    url: str
    name: str
    versions: tuple[str, ...]
    files: tuple[Path, ...]
    features: np.ndarray
    expected: dict[str, np.ndarray]  # version → positions for ``features``
    ready_statuses: list[int]  # what /v2/health/ready answered before the first 200

    def point(self, version: str) -> None:
        settings = self.backend.settings()
        set_alias(self.name, version, ALIAS, settings=settings, store=self.backend.store())

    def roll_back(self) -> None:
        settings = self.backend.settings()
        rollback(self.name, alias=ALIAS, settings=settings, store=self.backend.store())

    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    """Three valid exports with different numbers, from one export of a random atto model."""
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(7)
    base = export_to_onnx(LocalizationNet(ModelConfig(backbone="atto")).eval(), root / "a.onnx")
    return tuple(variant(base.path, root / f"v{i}.onnx", seed=i) for i in range(3))


def start_server(
    backend: MlflowBackend, files: tuple[Path, ...], tmp: Path, *options: str
) -> Iterator[Served]:
    settings, store = backend.settings(), backend.store()
    name = f"serve-{secrets.token_hex(3)}"
    versions = tuple(publish(path, name, settings, store) for path in files)
    features, _ = generate(2, seed=3)
    expected = {
        v: LocalizationModel.load(f).predict(features).positions
        for v, f in zip(versions, files, strict=True)
    }
    port = free_port()
    process = ManagedProcess(
        "heimdall-serve",
        [HEIMDALL, "serve", f"models:/{name}@{ALIAS}", "--port", str(port), "--json", *options],
        cwd=tmp,
    )
    # Only what this backend needs: the developer's shell must not point the server elsewhere.
    process.env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HEIMDALL_"))},
        **backend.env(),
        "HEIMDALL_DATA_DIR": str(backend.data_dir),
        "HEIMDALL_WEBHOOK_SECRET": SECRET,
    }
    if backend.kind == "embedded":
        process.env.pop("MLFLOW_TRACKING_URI")
    served = Served(
        backend, process, f"http://127.0.0.1:{port}", name, versions, files, features, expected, []
    )
    served.point(versions[0])
    process.start()
    try:
        assert _wait_ready(served, timeout_s=90), process.log_tail()
        yield served
    finally:
        process.stop()


def _wait_ready(served: Served, timeout_s: float) -> bool:
    """Probe readiness often enough to see the 503 between binding the port and the load."""
    deadline = time.monotonic() + timeout_s
    process = served.process.proc
    while time.monotonic() < deadline and process is not None and process.poll() is None:
        if _ready(served):
            return True
        time.sleep(0.02)
    return False


def _ready(served: Served) -> bool:
    try:
        status = requests.get(f"{served.url}/v2/health/ready", timeout=2).status_code
    except requests.RequestException:
        status = 0
    if status != 200:
        served.ready_statuses.append(status)
    return status == 200


@pytest.fixture(scope="module")
def embedded(
    embedded_mlflow: MlflowBackend,
    onnx_files: tuple[Path, ...],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve-embedded")
    yield from start_server(
        embedded_mlflow, onnx_files, tmp, "--poll-interval", "1", "--max-request-samples", "64"
    )


def metric(served: Served, line: str) -> float:
    """The value of one sample line of /metrics (0 when absent)."""
    text = requests.get(f"{served.url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def answers_match(served: Served, loop: ClosedLoop) -> list[str]:
    """Every answer succeeded and holds its named version's numbers; the versions in order."""
    answers = loop.stop()
    failed = [a for a in answers if not a.ok]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:3]}"
    for answer in answers:
        assert answer.version in served.expected
        np.testing.assert_allclose(answer.positions, served.expected[answer.version], rtol=1e-4)
    return [a.version for a in answers if a.version is not None]


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


# --- the embedded store -----------------------------------------------------------------------


def test_ready_only_after_the_first_verified_load(embedded: Served) -> None:
    # Before 200 the port was closed (0), then answered 503 while the model loaded: never
    # ready without a model, and never closed again once open.
    statuses = embedded.ready_statuses
    assert 503 in statuses, statuses
    assert set(statuses) <= {0, 503} and statuses == sorted(statuses), statuses
    ready = json.loads(
        next(
            line
            for line in embedded.process.log_path.read_text(errors="replace").splitlines()
            if '"url"' in line
        )
    )
    first = embedded.expected[embedded.versions[0]]
    assert (ready["name"], ready["version"], ready["alias"]) == (embedded.name, "1", ALIAS)
    assert ready["sha256"] == LocalizationModel.load(embedded.files[0]).sha256
    assert ready["url"] == embedded.url
    send = heimdall_sender(embedded.url, embedded.name, embedded.features)
    with requests.Session() as session:
        answer = send(session)
    assert answer.version == "1"
    np.testing.assert_allclose(answer.positions, first, rtol=1e-4)


def promote_and_roll_back(served: Served, settle_s: float, timeout_s: float) -> Moves:
    """Under 4 closed-loop clients: the alias to version 2, then rolled back to 1."""
    send = heimdall_sender(served.url, served.name, served.features)
    with load(send, clients=4) as loop:
        time.sleep(settle_s)
        moved = time.perf_counter()
        served.point(served.versions[1])
        to_new = loop.first_from("2", after=moved, timeout_s=timeout_s)
        back = time.perf_counter()
        served.roll_back()
        to_old = loop.first_from("1", after=back, timeout_s=timeout_s)
        return Moves(to_new, to_old, answers_match(served, loop))


@dataclass(frozen=True)
class Moves:
    to_new_s: float | None  # from the call that moved the alias to the first answer of v2
    to_old_s: float | None
    versions: list[str]  # of every answer, in the order they were sent


def test_promote_and_rollback_under_concurrent_clients_lose_no_request(embedded: Served) -> None:
    moves = promote_and_roll_back(embedded, settle_s=0.5, timeout_s=20)

    assert moves.to_new_s is not None and moves.to_old_s is not None
    versions = moves.versions
    assert versions[0] == "1" and "2" in versions and versions[-1] == "1"
    print(
        f"poll 1 s: promote served in {moves.to_new_s:.2f} s, rollback in {moves.to_old_s:.2f} "
        f"s, {len(versions)} requests, 0 failed"
    )


def test_tampered_bytes_are_refused_counted_and_the_old_version_keeps_serving(
    embedded: Served,
) -> None:
    tampered = embedded.versions[2]
    backend = embedded.backend
    tamper(tampered, embedded.name, backend.settings(), backend.store(), embedded.files[0])
    refused = 'heimdall_refused_versions_total{reason="sha256"}'
    send = heimdall_sender(embedded.url, embedded.name, embedded.features)

    with load(send, clients=2) as loop:
        embedded.point(tampered)
        deadline = time.monotonic() + 20
        while metric(embedded, refused) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.5)  # two more polls: the refused version is not tried again
        versions = answers_match(embedded, loop)

    assert metric(embedded, refused) == 1
    assert set(versions) == {"1"}
    assert requests.get(f"{embedded.url}/v2/health/ready", timeout=5).status_code == 200
    log = embedded.process.log_path.read_text(errors="replace")
    assert log.count("serving.version_refused") == 1
    embedded.point(embedded.versions[0])


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        (
            "infer",
            {
                "inputs": [
                    {
                        "name": "mel_spectrogram",
                        "shape": [1, 3, 128, 31],
                        "datatype": "FP32",
                        "data": [0.0] * (3 * 128 * 31),
                    }
                ]
            },
            400,
            "shape",
        ),
        (
            "infer",
            {
                "inputs": [
                    {
                        "name": "mel_spectrogram",
                        "shape": [1, 3, 128, 32],
                        "datatype": "FP32",
                        "data": [float("nan")] * (3 * 128 * 32),
                    }
                ]
            },
            400,
            "NaN",
        ),
        ("infer", b"{not json", 400, "JSON"),
        ("versions/99/infer", {"inputs": []}, 404, "version '99'"),
    ],
)
def test_bad_input_gets_a_4xx_with_one_line(
    embedded: Served, path: str, body: object, status: int, says: str
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()

    response = requests.post(
        f"{embedded.url}/v2/models/{embedded.name}/{path}", data=data, timeout=10
    )

    assert response.status_code == status
    error = response.json()["error"]
    assert says in error and "\n" not in error


def test_huge_requests_are_refused_with_bounded_memory(embedded: Served) -> None:
    before = rss_kib(embedded.pid())
    host, port = "127.0.0.1", int(embedded.url.rsplit(":", 1)[1])
    path = f"/v2/models/{embedded.name}/infer"
    # A declared 8 GB body: refused from its Content-Length, nothing read.
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {8 << 30}\r\n\r\n".encode()
        )
        assert b" 413 " in sock.recv(4096).split(b"\r\n")[0] + b" "
    # 256 MiB streamed without a length: refused once the cap (64 samples) is passed.
    chunk = b"0" * (1 << 20)
    try:
        streamed = requests.post(
            f"{embedded.url}{path}", data=(chunk for _ in range(256)), timeout=30
        ).status_code
    except requests.ConnectionError:  # the server may answer and close before the upload ends
        streamed = 413
    # A small body declaring a million samples: refused before any tensor is allocated.
    header = {
        "inputs": [
            {
                "name": "mel_spectrogram",
                "shape": [10**6, 3, 128, 32],
                "datatype": "FP32",
                "data": [0.0],
            }
        ]
    }
    declared = requests.post(f"{embedded.url}{path}", json=header, timeout=10)
    after = rss_kib(embedded.pid())

    assert streamed == 413
    assert declared.status_code == 413 and "\n" not in declared.json()["error"]
    assert after - before < 64 * 1024, f"RSS grew from {before} to {after} KiB"
    print(f"server RSS {before / 1024:.0f} → {after / 1024:.0f} MiB around the huge requests")


def test_unsigned_or_wrongly_signed_webhooks_are_refused(embedded: Served) -> None:
    body = json.dumps(
        {
            "entity": "model_version_alias",
            "action": "created",
            "data": {"name": embedded.name, "alias": ALIAS, "version": "2"},
        }
    )
    now = str(int(time.time()))
    forged = {
        "X-MLflow-Delivery-Id": "d-1",
        "X-MLflow-Timestamp": now,
        "X-MLflow-Signature": "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    }
    hook = f"{embedded.url}/v2/webhooks/mlflow"

    wrong = requests.post(hook, data=body, headers=forged, timeout=5)
    unsigned = requests.post(hook, data=body, timeout=5)

    assert wrong.status_code == 401 and "wrong X-MLflow-Signature" in wrong.json()["error"]
    assert unsigned.status_code == 401
    assert metric(embedded, 'heimdall_webhook_deliveries_total{outcome="bad_signature"}') == 1
    assert SECRET not in wrong.text + unsigned.text


def test_sigterm_stops_the_server_gracefully(embedded: Served) -> None:
    process = embedded.process.proc
    assert process is not None

    process.send_signal(signal.SIGTERM)

    assert process.wait(timeout=30) == 0
    assert not http_ok(f"{embedded.url}/v2/health/live")()


# --- mlflow server + PostgreSQL + SeaweedFS, with the webhook ---------------------------------


@pytest.fixture(scope="module")
def on_server(
    mlflow_server: MlflowBackend,
    onnx_files: tuple[Path, ...],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve-server")
    yield from start_server(mlflow_server, onnx_files[:2], tmp, "--poll-interval", "60")


def test_the_signed_webhook_swaps_long_before_the_poll_interval(on_server: Served) -> None:
    client = MlflowClient(on_server.backend.tracking_uri)
    hook = client.create_webhook(
        name=f"heimdall-{on_server.name}",
        url=f"{on_server.url}/v2/webhooks/mlflow",
        events=["model_version_alias.created"],
        secret=SECRET,
    )
    try:
        # Settling past the server's webhook cache (MLFLOW_WEBHOOK_CACHE_TTL=1 here).
        moves = promote_and_roll_back(on_server, settle_s=1.5, timeout_s=30)
    finally:
        client.delete_webhook(hook.webhook_id)

    # Both swaps came within the test's 30 s deadline, under the 60 s poll interval, and both
    # deliveries notified the follower: the webhook, not a poll, swapped the model.
    assert moves.to_new_s is not None, on_server.process.log_tail()
    assert moves.to_old_s is not None, on_server.process.log_tail()
    assert "2" in moves.versions and moves.versions[-1] == "1"
    assert metric(on_server, 'heimdall_webhook_deliveries_total{outcome="notified"}') >= 2
