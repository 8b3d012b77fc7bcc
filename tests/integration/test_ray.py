"""Scale-out on a real two-node Ray cluster (tests/fixtures/ray_cluster.py), loopback only.

Scoring runs first: the serving app, once started, holds one CPU of each node until the
module's end. Speed targets (recovery ≤ 30 s, throughput) live in benchmarks/ray_scale.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from heimdall.data import generate
from heimdall.gates import promote
from heimdall.inference import evaluate_heldout
from heimdall.registry import rollback
from heimdall.scoring import score
from tests.fixtures.mlflow_server import GATES_OPEN_ENV, MlflowBackend
from tests.fixtures.process import ManagedProcess
from tests.fixtures.ray_cluster import SERVE_PORT, RayCluster, read_load
from tests.fixtures.registered import publish_random

pytestmark = pytest.mark.integration

HEIMDALL = str(Path(sys.executable).parent / "heimdall")
SECRET = "ray-test-webhook-secret"
URL = f"http://127.0.0.1:{SERVE_PORT}"
WEBHOOK = """
import json, sys, time, urllib.request, uuid
from heimdall.serving.webhook import sign
url, secret, name, alias = sys.argv[1:5]
body = json.dumps({"entity": "model_version_alias", "action": "created",
                   "timestamp": int(time.time()), "data": {"name": name, "alias": alias}}).encode()
delivery, stamp = str(uuid.uuid4()), str(int(time.time()))
headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery,
           "X-MLflow-Timestamp": stamp, "X-MLflow-Signature": sign(body, secret, delivery, stamp)}
with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=10) as r:
    print(r.read().decode())
"""
REPLICAS = """
import json, ray
from ray.util.state import list_actors
ray.init(logging_level="ERROR")
alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
         if "Replica" in (a.class_name or "") and "heimdall" in (a.class_name or "")]
print("NODES", json.dumps(sorted(a.node_id for a in alive)))
"""

# serve_on_ray with more replicas than nodes (one per node), then what Serve still holds.
START_TOO_MANY = """
import json, sys
from heimdall.config import load_settings
from heimdall.errors import HeimdallError
from heimdall.serving.backend import Limits
from heimdall.serving.ray import serve_on_ray
uri, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    serve_on_ray(uri, settings=load_settings(), host="127.0.0.1", port=port, replicas=3,
                 poll_interval_s=600, limits=Limits(), providers=None, start_timeout_s=timeout)
except HeimdallError as exc:
    print("ERROR", json.dumps(str(exc)))
import ray
from ray import serve
ray.init(logging_level="ERROR")
print("APPS", json.dumps(sorted(serve.status().applications)))
"""


@dataclass(frozen=True)
class Published:
    backend: MlflowBackend
    name: str
    versions: tuple[str, str]

    def env(self) -> dict[str, str]:
        return {"HEIMDALL_DATA_DIR": str(self.backend.data_dir), **GATES_OPEN_ENV}


@pytest.fixture(scope="module")
def published(
    embedded_mlflow: MlflowBackend, tmp_path_factory: pytest.TempPathFactory
) -> Published:
    """Two atto versions of one model; version 1 holds ``production``."""
    settings, store = embedded_mlflow.settings(), embedded_mlflow.store()
    name, folder = f"ray-{os.urandom(3).hex()}", tmp_path_factory.mktemp("ray-model")
    versions = [publish_random(folder, name, settings, store, seed=seed) for seed in (21, 22)]
    promote(
        name,
        versions[0],
        evaluate=partial(evaluate_heldout, settings=settings),
        settings=settings,
        store=store,
    )
    return Published(embedded_mlflow, name, (versions[0], versions[1]))


def archive(folder: Path, files: int, samples: int) -> Path:
    folder.mkdir()
    for i in range(files):
        features, _ = generate(samples, seed=100 + i)
        np.save(folder / f"rec-{i:03d}.npy", features)
    return folder


def test_score_on_ray_over_both_nodes_equals_one_process(
    ray_cluster: RayCluster, published: Published, tmp_path: Path
) -> None:
    source = archive(tmp_path / "in", files=3, samples=12)
    uri = f"models:/{published.name}/{published.versions[0]}"
    here = score(uri, source, tmp_path / "here.parquet", settings=published.backend.settings())
    # Two actors of one CPU each on two one-CPU nodes: one actor per node.
    result = ray_cluster.run(
        [
            HEIMDALL,
            "score",
            uri,
            source,
            "-o",
            tmp_path / "ray.parquet",
            "--ray",
            "--actors",
            "2",
            "--batch-size",
            "5",
            "--json",
        ],
        env=published.env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(result.stdout)
    assert (document["rows"], document["ray"], document["sha256"]) == (36, True, here.sha256)
    a, b = pq.read_table(here.output), pq.read_table(tmp_path / "ray.parquet")
    assert a.column("source").to_pylist() == b.column("source").to_pylist()
    assert a.column("row").to_pylist() == b.column("row").to_pylist()
    assert set(b.column("model_version").to_pylist()) == {published.versions[0]}
    for column in ("lat", "lon", "sigma_x", "sigma_y"):
        np.testing.assert_allclose(a[column].to_numpy(), b[column].to_numpy(), rtol=1e-5)


def test_score_on_ray_reports_a_bad_sample_in_one_line_and_writes_nothing(
    ray_cluster: RayCluster, published: Published, tmp_path: Path
) -> None:
    source = archive(tmp_path / "in", files=2, samples=4)
    bad = np.load(source / "rec-001.npy")
    bad[2, 0, 0, 0] = np.inf
    np.save(source / "rec-001.npy", bad)
    output = tmp_path / "out.parquet"
    uri = f"models:/{published.name}/{published.versions[0]}"
    result = ray_cluster.run(
        [HEIMDALL, "score", uri, source, "-o", output, "--ray", "--actors", "1"],
        env=published.env(),
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "rec-001.npy: features hold NaN or infinite" in errors[0]
    assert errors[0].endswith("in sample(s) [2]")
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_score_on_ray_scores_every_sample_once_when_a_worker_dies(
    ray_cluster: RayCluster, published: Published, tmp_path: Path
) -> None:
    source = archive(tmp_path / "in", files=8, samples=20)
    output = tmp_path / "out.parquet"
    uri = f"models:/{published.name}/{published.versions[0]}"
    job = ray_cluster.start(
        "score-ray",
        [
            HEIMDALL,
            "score",
            uri,
            source,
            "-o",
            output,
            "--ray",
            "--actors",
            "2",
            "--batch-size",
            "1",
        ],
        env=published.env(),
    )
    assert job.wait_until(lambda: "scored rec-000.npy" in job.log_tail(), timeout=180), (
        job.log_tail()
    )
    assert job.proc is not None and job.proc.poll() is None, "the job ended before the kill"
    victim = ray_cluster.kill_one("MapWorker")
    assert victim, "no Ray Data worker to kill"
    assert job.proc is not None and job.proc.wait(timeout=300) == 0, job.log_tail()
    table = pq.read_table(output)
    keys = list(
        zip(table.column("source").to_pylist(), table.column("row").to_pylist(), strict=True)
    )
    assert len(keys) == 160 and len(set(keys)) == 160


def test_more_replicas_than_nodes_fail_in_one_line_at_the_deadline_and_leave_no_app(
    ray_cluster: RayCluster, published: Published
) -> None:
    # Runs before ray_server: the app it would replace is named alike.
    uri = f"models:/{published.name}@production"
    # A hang (serve.run waiting for a replica that no node can take) ends in TimeoutExpired.
    result = ray_cluster.run(
        [sys.executable, "-c", START_TOO_MANY, uri, str(SERVE_PORT), "20"],
        env=published.env(),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {x.split(" ", 1)[0]: x.split(" ", 1)[1] for x in result.stdout.splitlines() if " " in x}
    assert "ERROR" in lines, result.stdout[-2000:] + result.stderr[-2000:]
    message = json.loads(lines["ERROR"])
    assert "\n" not in message and "did not start 3 replicas" in message, message
    # How many of the two placeable replicas have loaded by then depends on the machine's load.
    assert "running" in message and "2 node(s) are alive" in message, message
    assert "heimdall" not in json.loads(lines["APPS"])


@pytest.fixture(scope="module")
def ray_server(ray_cluster: RayCluster, published: Published) -> Iterator[ManagedProcess]:
    """``heimdall serve --ray`` with two replicas, polling rarely: alias moves arrive by webhook."""
    server = ray_cluster.start(
        "heimdall-serve-ray",
        [
            HEIMDALL,
            "--log-level",
            "INFO",
            "serve",
            f"models:/{published.name}@production",
            "--ray",
            "--replicas",
            "2",
            "--port",
            str(SERVE_PORT),
            "--poll-interval",
            "600",
        ],
        env={**published.env(), "HEIMDALL_WEBHOOK_SECRET": SECRET},
    )
    ready = partial(ray_cluster.wait_ready, f"{URL}/v2/health/ready", 5)
    if not server.wait_until(ready, timeout=240):  # False at once if the server exits
        server.stop()
        pytest.fail(f"heimdall serve --ray was not ready in 240 s:\n{server.log_tail()}")
    # The driver reports what the replicas serve, asked through a deployment handle.
    assert server.wait_until(lambda: "serving.ray_ready" in server.log_tail(20000), timeout=60)
    yield server
    server.stop(grace=30)


def replica_nodes(cluster: RayCluster) -> list[str]:
    result = cluster.run([sys.executable, "-c", REPLICAS], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # Ray prints warnings of its own on stdout (a node lagging, a node gone).
    line = next(x for x in result.stdout.splitlines() if x.startswith("NODES "))
    return json.loads(line.removeprefix("NODES "))  # type: ignore[no-any-return]


class Load:
    """Closed-loop clients inside the namespace, until stopped."""

    def __init__(self, cluster: RayCluster, tmp_path: Path, name: str, clients: int = 8) -> None:
        self.log, self.stop_file = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.stop"
        url = f"{URL}/v2/models/{name}/infer"
        self.process = cluster.start(
            f"load-{name}",
            [
                sys.executable,
                "-m",
                "tests.fixtures.ray_cluster",
                "load",
                url,
                self.log,
                self.stop_file,
                "--clients",
                str(clients),
            ],
        )

    def records(self) -> list[dict[str, object]]:
        return read_load(self.log)

    def until(self, check: object, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check(self.records()):  # type: ignore[operator]
                return True
            time.sleep(0.5)
        return False

    def finish(self) -> list[dict[str, object]]:
        self.stop_file.touch()
        assert self.process.proc is not None
        self.process.proc.wait(timeout=60)
        return self.records()


def all_from(version: str, last: int = 16) -> object:
    return lambda records: (
        len(records) > last and all(r.get("version") == version for r in records[-last:])
    )


def test_two_replicas_land_one_per_node_and_follow_promote_and_rollback_without_errors(
    ray_cluster: RayCluster, published: Published, ray_server: ManagedProcess, tmp_path: Path
) -> None:
    nodes = replica_nodes(ray_cluster)
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    settings, store = published.backend.settings(), published.backend.store()
    first, second = published.versions
    hook = [
        sys.executable,
        "-c",
        WEBHOOK,
        f"{URL}/v2/webhooks/mlflow",
        SECRET,
        published.name,
        "production",
    ]
    load = Load(ray_cluster, tmp_path, published.name)
    assert load.until(all_from(first), timeout=120), load.records()[-5:]
    promote(
        published.name,
        second,
        evaluate=partial(evaluate_heldout, settings=settings),
        settings=settings,
        store=store,
    )
    assert ray_cluster.run(hook, timeout=60).returncode == 0
    # Polling every 600 s: only the webhook's fan-out can move both replicas this soon.
    assert load.until(all_from(second, last=64), timeout=60), load.records()[-5:]
    rollback(published.name, store=store, settings=settings)
    assert ray_cluster.run(hook, timeout=60).returncode == 0
    assert load.until(all_from(first, last=64), timeout=60), load.records()[-5:]
    records = load.finish()
    failed = [r for r in records if r["status"] != 200]
    assert not failed, failed[:5]
    versions = [r["version"] for r in records]
    assert set(versions) == {first, second}
    switched = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
    assert switched[0] == first and switched[-1] == first and second in switched


def eventually(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(2)
    return False


def test_a_node_failure_under_load_recovers_and_replicas_return_to_two(
    ray_cluster: RayCluster,
    published: Published,
    ray_server: ManagedProcess,
    tmp_path: Path,
    record_property: pytest.RecordProperty,
) -> None:
    dead = ray_cluster.worker_node
    assert dead in replica_nodes(ray_cluster)
    load = Load(ray_cluster, tmp_path, published.name)
    assert load.until(lambda records: len(records) > 20, timeout=60)
    killed_at = time.time()
    ray_cluster.kill_worker_node()
    # Ray has noticed once the node's replica is no longer alive.
    noticed = eventually(lambda: dead not in replica_nodes(ray_cluster), timeout=120)
    noticed_at = time.time()
    # Succeeding again: the last 30 requests, all sent after Ray noticed, answered 200.
    recovered = load.until(
        lambda rs: (
            len([r for r in rs if r["t"] > noticed_at]) > 30
            and all(r["status"] == 200 for r in rs[-30:])
        ),
        timeout=120,
    )
    ray_cluster.start_worker_node()
    nodes: list[str] = []

    def replaced() -> bool:
        nodes[:] = replica_nodes(ray_cluster)
        return len(set(nodes)) == 2 and dead not in nodes

    back = eventually(replaced, timeout=180)
    records = load.finish()
    after = [r for r in records if r["t"] >= killed_at]
    failed = [r for r in after if r["status"] != 200]
    seconds = max((r["t"] + r["seconds"] for r in failed), default=killed_at) - killed_at
    record_property("failed_requests", len(failed))
    record_property("seconds_to_recover", round(seconds, 1))
    print(
        f"node failure: {len(failed)} of {len(after)} requests failed; all succeed again "
        f"{seconds:.1f} s after the kill; Ray noticed after {noticed_at - killed_at:.1f} s"
    )
    assert noticed, "the killed node's replica still counted as alive after 120 s"
    assert recovered, records[-5:]
    assert back, f"replicas on {nodes} 180 s after the node came back"
