"""Registry behaviour that needs no MLflow server: argument checks, byte checks, history replay."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from heimdall import registry
from heimdall.config import DEFAULT_MODEL_NAME, Settings
from heimdall.errors import InputError, RegistryError, ValidationError
from heimdall.export import ExportResult
from heimdall.files import sha256_file
from heimdall.legacy import register_with_mlflow
from heimdall.onnxfile import ValidationResult
from heimdall.registry import AliasEvent, client
from heimdall.registry.client import call, explain
from heimdall.registry.history import holders_of
from heimdall.registry.lineage import verification_of
from heimdall.storage import LocalStore, upload_model
from heimdall.validate import validate_onnx_model
from tests.fixtures.process import free_port

SHA = "ab" * 32


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, tracking_uri=None, s3_endpoint_url=None)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "objects")


def mlflow_untouched(settings: Settings) -> bool:
    return not (settings.resolved_data_dir / "mlflow.db").exists()


def test_the_model_directory_sits_next_to_the_upload() -> None:
    assert registry.model_dir_uri("s3://b/models/localization/v1.onnx") == (
        "s3://b/models/localization/v1"
    )
    with pytest.raises(InputError, match=r"uploaded \.onnx object"):
        registry.model_dir_uri("s3://b/models/localization/v1")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sha256": "xyz"}, "sha256 must be 64 lowercase hex"),
        ({"sha256": SHA, "stage": "Shipping"}, "unknown stage"),
        ({"sha256": SHA, "name": "a/b"}, "invalid registered model name"),
        ({"sha256": SHA, "name": "it's"}, "invalid registered model name"),
    ],
)
def test_bad_arguments_are_refused_before_any_io(
    options: dict[str, str], message: str, settings: Settings, store: LocalStore
) -> None:
    with pytest.raises(InputError, match=message):
        registry.register_model(
            "file:///nowhere/v1.onnx",
            settings=settings,
            store=store,
            validator=validate_onnx_model,
            **options,
        )
    assert mlflow_untouched(settings)


def test_a_missing_upload_is_never_registered(settings: Settings, store: LocalStore) -> None:
    store.create_bucket("heimdall-models")
    uri = store.uri("heimdall-models", "models/localization/v1.onnx")

    with pytest.raises(RegistryError, match="does not exist; upload the model"):
        registry.register_model(
            uri, sha256=SHA, settings=settings, store=store, validator=validate_onnx_model
        )
    assert mlflow_untouched(settings)


def test_an_upload_without_any_sha256_to_check_against_is_never_registered(
    settings: Settings, store: LocalStore
) -> None:
    store.create_bucket("heimdall-models")
    store.put_bytes("heimdall-models", "models/localization/v1.onnx", b"bytes of unknown origin")
    uri = store.uri("heimdall-models", "models/localization/v1.onnx")

    with pytest.raises(RegistryError, match="has no recorded sha256"):
        register_with_mlflow("m", uri, {}, settings=settings, store=store)
    assert mlflow_untouched(settings)


def test_bytes_other_than_the_expected_sha256_are_never_registered(
    atto_onnx: ExportResult, settings: Settings, store: LocalStore
) -> None:
    uri = upload_model(atto_onnx.path, store, create_bucket=True).uri

    with pytest.raises(RegistryError, match="holds other bytes"):
        registry.register_model(
            uri, sha256=SHA, settings=settings, store=store, validator=validate_onnx_model
        )
    assert mlflow_untouched(settings)
    bucket, key = store.locate(registry.model_dir_uri(uri))
    assert store.list_objects(bucket, key + "/") == []


def test_the_callers_validator_checks_the_read_back_copy_and_its_refusal_registers_nothing(
    atto_onnx: ExportResult, settings: Settings, store: LocalStore
) -> None:
    uri = upload_model(atto_onnx.path, store, create_bucket=True).uri
    checked: list[tuple[Path, str]] = []

    def refuse(path: Path) -> ValidationResult:
        checked.append((path, sha256_file(path)))
        raise ValidationError(f"{path}: refused by the caller's validator")

    with pytest.raises(ValidationError, match="refused by the caller's validator"):
        registry.register_model(uri, settings=settings, store=store, validator=refuse)

    ((path, digest),) = checked
    assert path != atto_onnx.path and digest == atto_onnx.sha256
    bucket, key = store.locate(registry.model_dir_uri(uri))
    assert store.list_objects(bucket, key + "/") == []
    found = registry.find_version_by_sha256(
        DEFAULT_MODEL_NAME, atto_onnx.sha256, settings=settings, store=store
    )
    assert found is None


class AlteringCopyStore(LocalStore):
    """Copies objects inside the store with one byte altered."""

    def copy(self, bucket: str, src_key: str, dst_key: str, *, if_absent: bool = True) -> None:
        super().copy(bucket, src_key, dst_key, if_absent=if_absent)
        stored = self.root / bucket / dst_key
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))


def test_bytes_validated_before_are_registered_without_validating_them_again(
    atto_onnx: ExportResult, settings: Settings, store: LocalStore
) -> None:
    uri = upload_model(atto_onnx.path, store, create_bucket=True).uri
    validation = validate_onnx_model(atto_onnx.path)
    validated: list[Path] = []

    def counting(path: Path) -> ValidationResult:
        validated.append(path)
        return validate_onnx_model(path)

    known = registry.Validated(atto_onnx.sha256, validation, counting)
    registration = registry.register_model(uri, settings=settings, store=store, validator=known)

    assert registration.created and validated == []
    assert registration.version.sha256 == atto_onnx.sha256
    assert registration.version.tags["opset"] == str(validation.opset_version)


def test_a_validation_of_other_bytes_leaves_the_read_back_copy_to_the_validator(
    atto_onnx: ExportResult, settings: Settings, store: LocalStore
) -> None:
    uri = upload_model(atto_onnx.path, store, create_bucket=True).uri
    checked: list[str] = []

    def refuse(path: Path) -> ValidationResult:
        checked.append(sha256_file(path))
        raise ValidationError(f"{path}: refused by the caller's validator")

    other = registry.Validated(SHA, validate_onnx_model(atto_onnx.path), refuse)
    with pytest.raises(ValidationError, match="refused by the caller's validator"):
        registry.register_model(uri, settings=settings, store=store, validator=other)

    assert checked == [atto_onnx.sha256]


def test_bytes_validated_before_are_still_read_back_and_refused_when_altered(
    atto_onnx: ExportResult, settings: Settings, tmp_path: Path
) -> None:
    store = AlteringCopyStore(tmp_path / "altering")
    uri = upload_model(atto_onnx.path, store, create_bucket=True).uri
    known = registry.Validated(
        atto_onnx.sha256, validate_onnx_model(atto_onnx.path), validate_onnx_model
    )

    with pytest.raises(RegistryError, match=r"read back with sha256 .* altered or lost the bytes"):
        registry.register_model(uri, settings=settings, store=store, validator=known)

    bucket, key = store.locate(registry.model_dir_uri(uri))
    assert store.list_objects(bucket, key + "/") == []


def test_an_alias_move_that_reads_the_bytes_needs_the_store_before_any_io(
    settings: Settings,
) -> None:
    with pytest.raises(InputError, match="pass store="):
        registry.move_alias(
            "heimdall-x", "1", "staging", action="set", read_bytes=True, settings=settings
        )
    assert mlflow_untouched(settings)


def test_stored_sha256_streams_the_object_or_says_none(
    atto_onnx: ExportResult, store: LocalStore
) -> None:
    uri = upload_model(atto_onnx.path, store, create_bucket=True).uri

    assert registry.stored_sha256(store, uri) == atto_onnx.sha256
    assert registry.stored_sha256(store, uri.replace(".onnx", "-absent.onnx")) is None


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("runs:/abc/model", "not a registry URI"),
        ("models:/name", "not a registry URI"),
        ("models:/name/two", "not a registry URI"),
        ("models:/@staging", "not a registry URI"),
    ],
)
def test_resolve_refuses_uris_that_name_no_version(uri: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        registry.resolve_model_uri(uri)


def event(action: str, version: str) -> AliasEvent:
    return AliasEvent(version=version, action=action, at="2026-01-01T00:00:00+00:00")


def test_alias_history_replays_as_a_stack_of_holders() -> None:
    history = (
        event("promote", "1"),
        event("promote", "2"),
        event("promote", "3"),
        event("rollback", "2"),
        event("promote", "4"),
    )

    assert holders_of(history) == ["1", "2", "4"]
    assert holders_of((*history, event("rollback", "2"), event("rollback", "1"))) == ["1"]


def test_a_rollback_to_a_version_not_on_the_stack_still_ends_on_it() -> None:
    """History edited by hand or cut at its limit must not leave a stack that lies."""
    assert holders_of((event("promote", "5"), event("rollback", "2"))) == ["2"]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"parity": {"passed": True}}, "passed"),
        ({"parity": {"passed": False}}, "failed"),
        ({"parity": None}, "missing"),
        ({}, "missing"),
    ],
)
def test_verification_is_read_from_the_parity_record(
    metadata: dict[str, object], expected: str
) -> None:
    assert verification_of(metadata) == expected


def test_a_locked_sqlite_database_is_retried_and_other_errors_are_not() -> None:
    calls = []

    def locked_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return "done"

    def broken() -> None:
        calls.append(1)
        raise MlflowException("something else")

    assert call(locked_twice) == "done"
    calls.clear()
    with pytest.raises(MlflowException, match="something else"):
        call(broken)
    assert len(calls) == 1


def test_failures_never_show_the_tracking_password() -> None:
    settings = Settings(
        tracking_uri="http://user:hunter2@mlflow.example:5000",
        s3_secret_access_key="s3-secret",
    )
    error = MlflowException(
        "API request to http://user:hunter2@mlflow.example:5000/api failed: Max retries exceeded"
        " (s3-secret)"
    )

    text = explain(settings, "register", error)

    assert "hunter2" not in text and "s3-secret" not in text
    assert "did not answer" in text


def test_an_unreachable_database_fails_in_seconds_without_its_password(
    tmp_path: Path,
) -> None:
    settings = Settings(
        data_dir=tmp_path, tracking_uri=f"postgresql://u:pg-pw@127.0.0.1:{free_port()}/mlflow"
    )
    started = time.monotonic()

    with pytest.raises(RegistryError, match="refuses connections") as failure:
        registry.list_models(settings=settings)

    assert time.monotonic() - started < 10
    assert "pg-pw" not in str(failure.value)


@pytest.mark.parametrize(
    ("alias", "message"),
    [("latest", "invalid alias"), ("v3", "invalid alias"), ("production", "only by promote")],
)
def test_check_registration_refuses_aliases_publish_must_not_move(alias: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        registry.check_registration("heimdall-x", alias)


def test_set_alias_leaves_production_to_promote(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, tracking_uri=None)

    with pytest.raises(InputError, match="with promote"):
        registry.set_alias("heimdall-x", "1", "production", settings=settings)


def test_caller_tags_cannot_override_the_verified_ones(tmp_path: Path, store: LocalStore) -> None:
    settings = Settings(data_dir=tmp_path, tracking_uri=None)

    with pytest.raises(InputError, match=r"tags \['sha256', 'verification'\]"):
        registry.register_model(
            (tmp_path / "m.onnx").as_uri(),
            tags={"verification": "passed", "sha256": "0" * 64, "variant": "fp32"},
            settings=settings,
            store=store,
            validator=validate_onnx_model,
        )


def test_the_registry_lock_exists_only_while_held_and_never_frees_another_holders(
    tmp_path: Path,
) -> None:
    from heimdall.registry.client import LOCK_PREFIX, model_lock
    from heimdall.tracking import open_client

    client = open_client(f"sqlite:///{tmp_path / 'mlflow.db'}", None, timeout_s=30)
    lock = f"{LOCK_PREFIX}m"

    with model_lock(client, "m", wait_s=5):
        assert client.get_registered_model(lock).name == lock
    with pytest.raises(MlflowException, match="not found"):
        client.get_registered_model(lock)

    with model_lock(client, "m", wait_s=5):
        # As if this lock had expired and another process had broken and taken it.
        client.set_registered_model_tag(lock, "heimdall.lock", '{"token": "someone-else"}')
    assert client.get_registered_model(lock).tags["heimdall.lock"] == '{"token": "someone-else"}'


def test_importing_the_registry_loads_neither_onnx_nor_onnxruntime() -> None:
    """`models list` and `models show` only read the registry: the two would cost them 0.05 s."""
    code = (
        "import sys, heimdall.registry, heimdall.cli; "
        "print(sorted({'onnx', 'onnxruntime'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_a_missing_database_socket_fails_in_seconds_without_its_password(tmp_path: Path) -> None:
    """libpq's ``?host=/folder`` (a Unix socket): MLflow alone would retry for about 100 s."""
    uri = f"postgresql://u:sock-pw@/mlflow?host={tmp_path / 'no-server'}"
    settings = Settings(data_dir=tmp_path, tracking_uri=uri, mlflow_timeout_s=5)
    started = time.monotonic()

    with pytest.raises(RegistryError, match=r"socket .*\.s\.PGSQL\.5432 does not exist"):
        registry.list_models(settings=settings)

    assert time.monotonic() - started < 10


def test_the_running_servers_socket_is_not_refused(tmp_path: Path) -> None:
    folder = next(
        (d for d in ("/var/run/postgresql", "/tmp") if Path(d, ".s.PGSQL.5432").exists()), None
    )
    if folder is None:
        pytest.skip("no local PostgreSQL socket")
    settings = Settings(
        data_dir=tmp_path, tracking_uri=f"postgresql://postgres@/postgres?host={folder}"
    )

    assert client._unreachable_database(settings) is None


def test_a_missing_alias_lists_the_aliases_the_model_has(tmp_path: Path) -> None:
    """Issue 20, 5: ``models:/NAME@prod`` used to say only that ``prod`` was not found."""
    from heimdall.tracking import open_client

    settings = Settings(data_dir=tmp_path, tracking_uri=None)
    mlflow_client = open_client(settings.resolved_tracking_uri, None, timeout_s=30)
    mlflow_client.create_registered_model("m")
    for _ in range(2):
        mlflow_client.create_model_version("m", (tmp_path / "model").as_uri())
    mlflow_client.set_registered_model_alias("m", "staging", "2")
    mlflow_client.set_registered_model_alias("m", "production", "1")

    with pytest.raises(RegistryError) as missing:
        registry.resolve_model_uri("models:/m@prod", settings=settings)
    assert str(missing.value) == (
        "models:/m@prod: m has no alias 'prod'; its aliases: production (version 1), "
        "staging (version 2) (heimdall models show m)"
    )
    with pytest.raises(
        RegistryError, match=r"no registered model 'other' in sqlite:///.*models list"
    ):
        registry.resolve_model_uri("models:/other@prod", settings=settings)
    assert registry.resolve_model_uri("models:/m@latest", settings=settings).version == "2"


def test_moving_to_altered_bytes_advises_a_publish_not_a_registration(store: LocalStore) -> None:
    """Registering again finds the same altered bytes; publishing stores fresh ones."""
    from heimdall.registry.integrity import passed_gates

    store.create_bucket("models")
    store.put_bytes("models", "m/1/model.onnx", b"altered", if_absent=False)
    version = registry.RegisteredVersion(
        name="m",
        version="1",
        status="READY",
        source=store.uri("models", "m/1"),
        onnx_uri=None,
        sha256=SHA,
        run_id=None,
        aliases=(),
        stage=None,
        verification="passed",
        created_at="",
        description=None,
    )

    with pytest.raises(RegistryError) as refused:
        passed_gates(version, "move 'production' of m to version 1", store)

    message = str(refused.value)
    assert "now has sha256" in message and "publish the checkpoint again" in message
    assert "register again" not in message and "register the model again" not in message


def test_a_registry_server_answering_500_is_reported_with_its_status_not_as_silent(
    failing_server: str, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, tracking_uri=failing_server, mlflow_timeout_s=6)

    with pytest.raises(RegistryError) as caught:
        registry.list_models(settings=settings)

    message = str(caught.value)
    assert f"the MLflow server at {failing_server} answered HTTP 500" in message
    assert "did not answer" not in message and "\n" not in message


def test_a_refused_registry_connection_says_nothing_listens_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    settings = Settings(data_dir=tmp_path, tracking_uri=url, mlflow_timeout_s=4)

    with pytest.raises(RegistryError) as caught:
        registry.list_models(settings=settings)

    assert f"nothing listens at {url}" in str(caught.value)
    assert "Retrying" not in capsys.readouterr().err
