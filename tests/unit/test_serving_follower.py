"""The follower: verified loads, alias moves swapped in, refused versions never served."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from mlflow import MlflowClient
from onnx import numpy_helper
from structlog.testing import capture_logs

from heimdall.config import Settings
from heimdall.data import generate
from heimdall.errors import HeimdallError
from heimdall.export import ExportResult
from heimdall.inference import LocalizationModel
from heimdall.objects import ObjectStore
from heimdall.registry import set_alias
from heimdall.serving import follower as follower_module
from heimdall.serving.backend import Served
from heimdall.serving.follower import Follower
from heimdall.storage import open_store
from tests.fixtures.registered import publish

ALIAS = "live"


def variant(source: Path, target: Path, seed: int) -> Path:
    """A copy of an export with every weight nudged: a valid model with its own numbers."""
    model = onnx.load(source)
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            weights = numpy_helper.to_array(init)
            nudged = weights * (1 + 0.2 * rng.standard_normal(weights.shape))
            init.CopyFrom(numpy_helper.from_array(nudged.astype(np.float32), init.name))
    onnx.save(model, target)
    return target


def tamper(version: str, name: str, settings: Settings, store: ObjectStore, other: Path) -> None:
    """Replace a version's stored model.onnx with other bytes, metadata and all (an attacker
    with write access to the bucket): only the registry's sha256 tag still tells."""
    source = MlflowClient(settings.resolved_tracking_uri).get_model_version(name, version).source
    bucket, key = store.locate(f"{source}/model.onnx")
    data = other.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    metadata = {**(store.head(bucket, key).metadata), "sha256": digest}  # type: ignore[union-attr]
    store.put_bytes(bucket, key, data, metadata=metadata, if_absent=False)


def register_without_sha256(settings: Settings, name: str, version: str) -> str:
    """Register ``version``'s source again as a plain MLflow client would: no sha256 tag."""
    client = MlflowClient(settings.resolved_tracking_uri)
    source = client.get_model_version(name, version).source
    return str(client.create_model_version(name, source).version)


@dataclass(frozen=True)
class Registry:
    settings: Settings
    store: ObjectStore
    name: str
    versions: tuple[str, ...]  # three good versions; the third's bytes get tampered with
    files: tuple[Path, ...]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{ALIAS}"

    def point(self, version: str) -> None:
        set_alias(self.name, version, ALIAS, settings=self.settings, store=self.store)


@pytest.fixture(scope="module")
def registry(atto_onnx: ExportResult, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("follower")
    settings = Settings(data_dir=root, tracking_uri=None, s3_endpoint_url=None)
    store = open_store(settings)
    files = tuple(variant(atto_onnx.path, root / f"v{i}.onnx", seed=i) for i in range(3))
    versions = tuple(publish(f, "follow-me", settings, store) for f in files)
    return Registry(settings, store, "follow-me", versions, files)


@pytest.fixture
def swaps() -> list[Served]:
    return []


@pytest.fixture
def refusals() -> list[str]:
    return []


@pytest.fixture
def follower(registry: Registry, swaps: list[Served], refusals: list[str]) -> Iterator[Follower]:
    registry.point(registry.versions[0])
    following = Follower(
        registry.uri,
        settings=registry.settings,
        poll_interval_s=60,
        warm_batch=4,
        on_swap=swaps.append,
        on_refused=refusals.append,
    )
    yield following
    following.stop()


def test_the_first_load_serves_the_alias_holder_verified_and_named(
    follower: Follower, registry: Registry, swaps: list[Served]
) -> None:
    served = follower.load()

    assert follower.current is served
    assert (served.name, served.version, served.alias) == (registry.name, "1", ALIAS)
    assert served.sha256 == LocalizationModel.load(registry.files[0]).sha256
    assert swaps == [served]


def test_an_alias_move_is_loaded_and_swapped_in_while_old_references_keep_working(
    follower: Follower, registry: Registry, swaps: list[Served]
) -> None:
    old = follower.load()
    features, _ = generate(2, seed=1)
    registry.point(registry.versions[1])

    assert follower.refresh() is True
    assert follower.refresh() is False  # nothing moved: nothing downloaded again

    new = follower.current
    assert new is not None and new.version == "2"
    assert [s.version for s in swaps] == ["1", "2"]
    expected = LocalizationModel.load(registry.files[1]).predict(features).positions
    np.testing.assert_allclose(new.run(features)[0], expected, rtol=1e-5)
    assert not np.allclose(old.run(features)[0], expected)  # the old session still answers


def test_tampered_bytes_are_refused_once_and_not_downloaded_again(
    follower: Follower,
    registry: Registry,
    refusals: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tamper(
        registry.versions[2], registry.name, registry.settings, registry.store, registry.files[0]
    )
    follower.load()
    loads = []
    real_load = LocalizationModel.load

    def counted(*args: object, **kwargs: object) -> LocalizationModel:
        loads.append(args)
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(follower_module.LocalizationModel, "load", counted)
    registry.point(registry.versions[2])

    with capture_logs() as logs:
        assert follower.refresh() is False
        assert follower.refresh() is False

    assert follower.current is not None and follower.current.version == "1"
    assert refusals == ["sha256"]
    assert len(loads) == 1
    refused = [e for e in logs if e["event"] == "serving.version_refused"]
    assert len(refused) == 1 and refused[0]["version"] == "3"
    assert follower.refused is not None and follower.refused.version == "3"
    # Moving away and back tries the version again (and refuses it again).
    registry.point(registry.versions[0])
    assert follower.refresh() is False
    registry.point(registry.versions[2])
    assert follower.refresh() is False
    assert (len(loads), refusals) == (2, ["sha256", "sha256"])


def test_a_refused_version_is_tried_again_after_its_back_off(
    follower: Follower, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    follower.load()
    registry.point(registry.versions[2])  # tampered by the test above or now
    tamper(
        registry.versions[2], registry.name, registry.settings, registry.store, registry.files[0]
    )
    assert follower.refresh() is False
    refused = follower.refused
    assert refused is not None
    later = refused.retry_at + 1
    monkeypatch.setattr(follower_module.time, "monotonic", lambda: later)

    with capture_logs() as logs:
        assert follower.refresh() is False

    again = follower.refused
    assert again is not None and again.failures == 2 and again.retry_at > later
    assert not [e for e in logs if e["event"] == "serving.version_refused"]  # said once


def test_a_short_poll_interval_still_backs_off_at_least_ten_seconds_from_a_refused_version(
    registry: Registry,
) -> None:
    registry.point(registry.versions[0])
    quick = Follower(registry.uri, settings=registry.settings, poll_interval_s=1, warm_batch=4)
    quick.load()
    registry.point(registry.versions[2])
    tamper(
        registry.versions[2], registry.name, registry.settings, registry.store, registry.files[0]
    )

    assert quick.refresh() is False

    refused = quick.refused
    assert refused is not None and refused.retry_at - time.monotonic() >= 10 * 0.8 - 1


def test_a_tampered_version_behind_the_alias_fails_the_first_load_in_one_line(
    registry: Registry,
) -> None:
    tamper(
        registry.versions[2], registry.name, registry.settings, registry.store, registry.files[0]
    )
    registry.point(registry.versions[2])
    following = Follower(registry.uri, settings=registry.settings, warm_batch=2)

    with pytest.raises(HeimdallError, match="sha256") as raised:
        following.load()

    assert "\n" not in str(raised.value)
    assert following.current is None


def test_a_deleted_alias_keeps_the_model_served_and_is_logged_once(
    follower: Follower, registry: Registry
) -> None:
    follower.load()
    client = MlflowClient(registry.settings.resolved_tracking_uri)
    client.delete_registered_model_alias(registry.name, ALIAS)

    with capture_logs() as logs:
        assert follower.refresh() is False
        assert follower.refresh() is False

    assert follower.current is not None and follower.current.version == "1"
    assert [e["event"] for e in logs] == ["serving.alias_missing"]


def test_notify_wakes_the_poll_thread_long_before_its_interval(
    follower: Follower, registry: Registry
) -> None:
    follower.load()
    swapped = threading.Event()
    follower.on_swap = lambda served: swapped.set()
    follower.start()
    registry.point(registry.versions[1])
    started = time.monotonic()

    follower.notify()

    assert swapped.wait(30), "no swap after notify"
    assert time.monotonic() - started < 30 < follower.poll_interval_s
    follower.stop()
    assert follower.current is not None and follower.current.version == "2"


def test_a_burst_of_notifications_during_a_check_becomes_one_more_check(
    follower: Follower, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    checks: list[float] = []

    def slow_refresh() -> bool:
        checks.append(time.monotonic())
        release.wait(10)
        return False

    monkeypatch.setattr(follower, "refresh", slow_refresh)
    follower.start()
    follower.notify()
    while not checks:  # the first check is running
        release.wait(0.01)
    for _ in range(50):
        follower.notify()
    release.set()
    deadline = time.monotonic() + 5
    while len(checks) < 2 and time.monotonic() < deadline:
        release.wait(0.01)
    release.wait(0.3)  # room for any further, wrongly queued checks

    follower.stop()
    assert len(checks) == 2


def test_a_fixed_version_or_a_file_is_served_as_is_and_never_followed(
    registry: Registry, atto_onnx: ExportResult
) -> None:
    by_version = Follower(f"models:/{registry.name}/2", settings=registry.settings, warm_batch=1)
    by_path = Follower(str(atto_onnx.path), settings=registry.settings, warm_batch=1)

    pinned, local = by_version.load(), by_path.load()

    assert (pinned.name, pinned.version, pinned.alias) == (registry.name, "2", None)
    assert (local.name, local.version, local.alias) == (atto_onnx.path.stem, "", None)
    assert not by_version.follows and by_version.refresh() is False
    by_path.start()
    assert by_path._thread is None  # nothing to poll


def test_a_model_directory_is_named_after_its_folder(
    tmp_path: Path, atto_onnx: ExportResult
) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(atto_onnx.path.read_bytes())

    served = Follower(str(folder), settings=Settings(data_dir=tmp_path), warm_batch=1).load()

    assert served.name == "my-model"


def test_bad_arguments_are_refused_before_any_load(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(HeimdallError, match="poll interval"):
        Follower("models:/m@live", settings=settings, poll_interval_s=0)
    with pytest.raises(HeimdallError, match="not a registry URI"):
        Follower("models:/m@", settings=settings)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_version_without_a_sha256_tag_is_never_served(
    follower: Follower, registry: Registry, refusals: list[str]
) -> None:
    follower.load()
    bare = register_without_sha256(registry.settings, registry.name, registry.versions[1])
    client = MlflowClient(registry.settings.resolved_tracking_uri)
    client.set_registered_model_alias(registry.name, ALIAS, bare)

    assert follower.refresh() is False

    assert follower.current is not None and follower.current.version == "1"
    assert refusals == ["sha256"]
    assert follower.refused is not None and "no sha256 tag" in follower.refused.detail
