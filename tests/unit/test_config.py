"""Tests for heimdall.config: settings from the environment, URI redaction, scrubbed logging."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import structlog
from pydantic import SecretStr

from heimdall import config
from heimdall.config import (
    EnvironmentOverlay,
    Settings,
    configure_logging,
    load_settings,
    redact_uri,
)
from heimdall.errors import ConfigError

ENV_NAMES = (
    "HEIMDALL_DATA_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_ARTIFACT_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_S3_ENDPOINT_URL",
    "HEIMDALL_S3_ENDPOINT_URL",
    "MLFLOW_S3_ACCESS_KEY_ID",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_S3_SECRET_ACCESS_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "HEIMDALL_S3_REGION",
    "AWS_REGION",
    "HEIMDALL_BUCKET",
    "HEIMDALL_MODEL_NAME",
    "HEIMDALL_LOG_LEVEL",
    "HEIMDALL_LOG_JSON",
    "HEIMDALL_GIT_COMMIT",
    "GIT_COMMIT",
    "OMP_WAIT_POLICY",
)

SECRET = "s3cr3t-Value-42"
URI_PASSWORD = "pw-in-uri-9f"
DB_URI = f"postgresql://mlflow:{URI_PASSWORD}@db.internal:5432/mlflow"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Start every test from an empty heimdall/MLflow/AWS environment in a scratch directory."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what configure_logging does to structlog and stdlib logging."""
    saved = structlog.get_config()
    factory = logging.getLogRecordFactory()
    handlers = list(logging.getLogger().handlers)
    mlflow_level = os.environ.get("MLFLOW_LOGGING_LEVEL")
    yield
    if mlflow_level is None:
        os.environ.pop("MLFLOW_LOGGING_LEVEL", None)
    else:
        os.environ["MLFLOW_LOGGING_LEVEL"] = mlflow_level
    structlog.configure(**saved)
    logging.setLogRecordFactory(factory)
    logging.getLogger().handlers = handlers


def uri_path(uri: str) -> Path:
    """Filesystem path of a ``file://`` or ``sqlite:///`` URI."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    return Path(url2pathname(urlparse(uri).path))


@pytest.mark.parametrize(
    ("env", "value", "attribute"),
    [
        ("MLFLOW_TRACKING_URI", "http://mlflow.example:5000", "tracking_uri"),
        ("MLFLOW_REGISTRY_URI", "http://registry.example:5000", "registry_uri"),
        ("MLFLOW_EXPERIMENT_NAME", "rf-experiment", "experiment_name"),
        ("MLFLOW_S3_ENDPOINT_URL", "http://seaweed.example:8333", "s3_endpoint_url"),
        ("HEIMDALL_S3_ENDPOINT_URL", "http://minio.example:9000", "s3_endpoint_url"),
        ("HEIMDALL_BUCKET", "other-bucket", "bucket"),
        ("HEIMDALL_MODEL_NAME", "other-model", "model_name"),
    ],
)
def test_setting_is_read_from_its_environment_name(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, attribute: str
) -> None:
    monkeypatch.setenv(env, value)
    assert getattr(Settings(), attribute) == value


def test_the_git_commit_is_read_from_heimdall_git_commit_or_ci_git_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().git_commit is None
    monkeypatch.setenv("GIT_COMMIT", "abc123")
    assert load_settings().git_commit == "abc123"
    monkeypatch.setenv("HEIMDALL_GIT_COMMIT", "def456")
    assert load_settings().git_commit == "def456"


def test_idle_pytorch_threads_sleep_unless_the_user_chose_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config.prefer_passive_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    config.prefer_passive_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_data_dir_is_read_from_heimdall_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HEIMDALL_DATA_DIR", str(tmp_path / "data"))
    assert Settings().resolved_data_dir == (tmp_path / "data").resolve()


@pytest.mark.parametrize(
    ("env", "attribute"),
    [
        ("MLFLOW_S3_ACCESS_KEY_ID", "s3_access_key_id"),
        ("AWS_ACCESS_KEY_ID", "s3_access_key_id"),
        ("MLFLOW_S3_SECRET_ACCESS_KEY", "s3_secret_access_key"),
        ("AWS_SECRET_ACCESS_KEY", "s3_secret_access_key"),
    ],
)
def test_s3_credentials_are_read_as_secrets(
    monkeypatch: pytest.MonkeyPatch, env: str, attribute: str
) -> None:
    monkeypatch.setenv(env, SECRET)
    value = getattr(Settings(), attribute)
    assert isinstance(value, SecretStr)
    assert value.get_secret_value() == SECRET


@pytest.mark.parametrize(
    ("mlflow_env", "aws_env", "attribute"),
    [
        ("MLFLOW_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID", "s3_access_key_id"),
        ("MLFLOW_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", "s3_secret_access_key"),
    ],
)
def test_mlflow_s3_credentials_win_over_aws_fallbacks(
    monkeypatch: pytest.MonkeyPatch, mlflow_env: str, aws_env: str, attribute: str
) -> None:
    monkeypatch.setenv(aws_env, "from-aws")
    monkeypatch.setenv(mlflow_env, "from-mlflow")
    assert getattr(Settings(), attribute).get_secret_value() == "from-mlflow"


def test_embedded_defaults_live_under_the_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HEIMDALL_DATA_DIR", str(tmp_path / "data"))
    settings = Settings()
    data_dir = (tmp_path / "data").resolve()
    assert settings.resolved_tracking_uri.startswith("sqlite:///")
    assert uri_path(settings.resolved_tracking_uri).is_relative_to(data_dir)
    assert settings.object_store_uri.startswith("file://")
    assert uri_path(settings.object_store_uri).is_relative_to(data_dir)
    assert uri_path(settings.resolved_artifact_uri).is_relative_to(data_dir)
    assert not settings.uses_s3


def test_default_data_dir_is_relative_to_the_working_directory(tmp_path: Path) -> None:
    assert Settings().resolved_data_dir.is_relative_to(tmp_path.resolve())


def test_explicit_tracking_uri_replaces_the_embedded_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert Settings().resolved_tracking_uri == "http://mlflow.example:5000"


@pytest.mark.parametrize(
    ("installed", "expected"),
    [
        pytest.param({"psycopg2"}, "postgresql+psycopg2://", id="psycopg2-only"),
        pytest.param({"psycopg", "psycopg2"}, "postgresql://", id="psycopg3-too"),
        pytest.param(set(), "postgresql://", id="no-driver"),
    ],
)
def test_a_bare_postgresql_tracking_uri_resolves_to_the_installed_driver(
    monkeypatch: pytest.MonkeyPatch, installed: set[str], expected: str
) -> None:
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which the dev extra lacks.
    monkeypatch.setattr(config, "find_spec", lambda name: object() if name in installed else None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DB_URI)
    resolved = Settings().resolved_tracking_uri
    assert resolved == expected + DB_URI.removeprefix("postgresql://")


@pytest.mark.parametrize(
    "uri",
    [
        "http://mlflow.example:5000",
        "sqlite:////tmp/mlflow.db",
        "postgresql+psycopg2://u:p@db/mlflow",
        "mysql://u:p@db/mlflow",
    ],
)
def test_other_tracking_uris_resolve_unchanged(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    monkeypatch.setattr(config, "find_spec", lambda name: object() if name == "psycopg2" else None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert Settings().resolved_tracking_uri == uri


def test_registry_uri_defaults_to_the_resolved_tracking_uri(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "find_spec", lambda name: object() if name == "psycopg2" else None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DB_URI)
    settings = Settings()
    assert settings.resolved_registry_uri == settings.resolved_tracking_uri
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "postgresql://reg:pw@db/registry")
    assert Settings().resolved_registry_uri == "postgresql+psycopg2://reg:pw@db/registry"


def test_an_s3_endpoint_switches_the_object_store_to_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://seaweed.example:8333")
    monkeypatch.setenv("HEIMDALL_BUCKET", "models")
    settings = Settings()
    assert settings.uses_s3
    assert settings.object_store_uri == "s3://models"


def test_mlflow_s3_env_hands_credentials_to_mlflows_s3_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://seaweed.example:8333")
    monkeypatch.setenv("MLFLOW_S3_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("MLFLOW_S3_SECRET_ACCESS_KEY", SECRET)
    env = Settings().mlflow_s3_env()
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://seaweed.example:8333"
    assert env["AWS_ACCESS_KEY_ID"] == "key-id"
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET


def test_load_settings_overrides_win_over_the_environment_and_none_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    settings = load_settings(tracking_uri="http://override:5000", experiment_name=None)
    assert settings.tracking_uri == "http://override:5000"
    assert settings.experiment_name == "from-env"


RENDERINGS: list[Callable[[Settings], str]] = [repr, str, lambda s: s.model_dump_json()]
RENDERING_IDS = ["repr", "str", "model_dump_json"]


@pytest.mark.parametrize("render", RENDERINGS, ids=RENDERING_IDS)
def test_settings_renderings_hide_s3_credentials(
    monkeypatch: pytest.MonkeyPatch, render: Callable[[Settings], str]
) -> None:
    monkeypatch.setenv("MLFLOW_S3_ACCESS_KEY_ID", "key-id-" + SECRET)
    monkeypatch.setenv("MLFLOW_S3_SECRET_ACCESS_KEY", SECRET)
    assert SECRET not in render(Settings())


@pytest.mark.parametrize("render", RENDERINGS, ids=RENDERING_IDS)
def test_settings_renderings_hide_the_tracking_uri_password(
    monkeypatch: pytest.MonkeyPatch, render: Callable[[Settings], str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DB_URI)
    assert URI_PASSWORD not in render(Settings())


def test_secret_values_lists_the_secret_key_and_uri_passwords(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_S3_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DB_URI)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "postgresql://reg:reg-pass-1@db/registry")
    assert set(Settings().secret_values()) == {SECRET, URI_PASSWORD, "reg-pass-1"}


@pytest.mark.parametrize(
    ("uri", "userinfo", "kept"),
    [
        (DB_URI, f"mlflow:{URI_PASSWORD}", "db.internal:5432/mlflow"),
        ("https://alice:tok3n@mlflow.example/api", "alice:tok3n", "mlflow.example/api"),
        ("http://:only-pass@host:5000", ":only-pass", "host:5000"),
    ],
)
def test_redact_uri_removes_user_and_password(uri: str, userinfo: str, kept: str) -> None:
    redacted = redact_uri(uri)
    assert userinfo not in redacted
    assert userinfo.split(":")[-1] not in redacted
    assert redacted.startswith(uri.split("://")[0] + "://")
    assert redacted.endswith(kept)


@pytest.mark.parametrize(
    "uri",
    ["http://localhost:5000", "sqlite:////tmp/mlflow.db", "s3://bucket/key", "file:///tmp/x"],
)
def test_redact_uri_leaves_uris_without_credentials_unchanged(uri: str) -> None:
    assert redact_uri(uri) == uri


@pytest.mark.usefixtures("restore_logging")
def test_debug_log_line_has_secret_and_uri_password_scrubbed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("DEBUG", secrets=[SECRET])
    structlog.get_logger("test").debug(
        "connecting",
        uri=DB_URI,
        note=f"using key {SECRET}",
        nested={"keys": [SECRET]},
    )
    err = capsys.readouterr().err
    assert "connecting" in err
    assert "db.internal:5432/mlflow" in err
    assert SECRET not in err
    assert URI_PASSWORD not in err


@pytest.mark.usefixtures("restore_logging")
def test_json_log_line_is_parseable_and_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG", json=True, secrets=[SECRET])
    structlog.get_logger("test").debug("connecting", uri=DB_URI, note=SECRET)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "connecting"
    assert line["level"] == "debug"
    assert URI_PASSWORD not in line["uri"]
    assert SECRET not in line["note"]


@pytest.mark.usefixtures("restore_logging")
def test_log_level_filters_lower_events(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    log = structlog.get_logger("test")
    log.debug("hidden-debug-event")
    log.info("shown-info-event")
    err = capsys.readouterr().err
    assert "hidden-debug-event" not in err
    assert "shown-info-event" in err


@pytest.mark.usefixtures("restore_logging")
def test_log_lines_follow_stderr_when_a_progress_bar_redirects_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Rich's live progress bar swaps sys.stderr for a proxy that prints above the bar; a logger
    # holding the original stream would write into the bar's line instead.
    configure_logging("INFO")
    redirected = io.StringIO()
    monkeypatch.setattr(sys, "stderr", redirected)
    structlog.get_logger("test").warning("above-the-bar")
    assert "above-the-bar" in redirected.getvalue()


def test_the_one_scrubber_hides_secrets_of_any_length_and_uri_passwords() -> None:
    text = f"server said: key ab12 rejected at {DB_URI}"
    scrubbed = config.scrub_secrets(text, ["ab12"])
    assert "ab12" not in scrubbed and URI_PASSWORD not in scrubbed
    assert scrubbed == "server said: key *** rejected at postgresql://***@db.internal:5432/mlflow"


def test_unknown_log_level_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="CHATTY"):
        configure_logging("CHATTY")


def test_unknown_log_level_in_the_environment_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HEIMDALL_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError, match="HEIMDALL_LOG_LEVEL: unknown log level 'LOUD'"):
        load_settings()


def test_log_level_from_the_environment_is_upper_cased(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEIMDALL_LOG_LEVEL", "info")
    assert load_settings().log_level == "INFO"


@pytest.mark.parametrize(
    "url",
    ["not-a-url", "ftp://s3.example", "http://", "http://host:99999", "http://host/bucket"],
)
def test_s3_endpoint_that_is_not_http_host_port_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("HEIMDALL_S3_ENDPOINT_URL", url)
    with pytest.raises(ConfigError, match=r"HEIMDALL_S3_ENDPOINT_URL: .*http\(s\)://host\[:port\]"):
        load_settings()


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_heimdall_used_as_a_library_prints_warnings_but_no_info_events() -> None:
    done = run_python(
        "import structlog, heimdall.checkpoint\n"
        "log = structlog.get_logger('heimdall.test')\n"
        "log.info('library-info-event'); log.warning('library-warning-event')"
    )
    assert done.returncode == 0, done.stderr
    assert "library-info-event" not in done.stdout + done.stderr
    # On stderr: a host program's stdout (JSON answers, say) stays its own.
    assert "library-warning-event" in done.stderr
    assert done.stdout == ""


def test_mlflow_info_lines_are_hidden_at_the_default_level(tmp_path: Path) -> None:
    done = run_python(
        "from heimdall.config import configure_logging, load_settings\n"
        f"settings = load_settings(data_dir={str(tmp_path)!r})\n"
        "configure_logging(settings.log_level)\n"
        "from heimdall.registry import list_models\n"
        "list_models(settings=settings)"
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mlflow.db").is_file()
    assert "Creating initial MLflow database tables" not in done.stderr
    assert " INFO " not in done.stderr


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("json_lines", [False, True], ids=["console", "json"])
def test_secret_inside_a_logged_exception_is_scrubbed(
    capsys: pytest.CaptureFixture[str], json_lines: bool
) -> None:
    configure_logging("DEBUG", json=json_lines, secrets=[SECRET])
    error = RuntimeError(f"cannot reach {DB_URI} with key {SECRET}")
    structlog.get_logger("test").error("upload failed", error=error)
    err = capsys.readouterr().err
    assert "upload failed" in err
    assert SECRET not in err
    assert URI_PASSWORD not in err


@pytest.mark.usefixtures("restore_logging")
def test_secret_inside_a_logged_traceback_is_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG", secrets=[SECRET])
    try:
        raise RuntimeError(f"cannot reach {DB_URI} with key {SECRET}")
    except RuntimeError:
        structlog.get_logger("test").exception("upload failed")
    err = capsys.readouterr().err
    assert "upload failed" in err
    assert SECRET not in err
    assert URI_PASSWORD not in err


@pytest.mark.usefixtures("restore_logging")
def test_secret_inside_a_json_logged_traceback_is_scrubbed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("DEBUG", json=True, secrets=[SECRET])
    try:
        raise RuntimeError(f"cannot reach {DB_URI} with key {SECRET}")
    except RuntimeError:
        structlog.get_logger("test").exception("upload failed")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert "RuntimeError: cannot reach" in line["exception"]
    assert SECRET not in line["exception"]
    assert URI_PASSWORD not in line["exception"]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("own_handler", [False, True], ids=["root-handler", "own-handler"])
def test_secret_inside_a_stdlib_logged_traceback_is_scrubbed(own_handler: bool) -> None:
    # MLflow gives its loggers their own handler, without propagation, when it is imported:
    # possibly after configure_logging, as this test's own-handler case does.
    configure_logging("DEBUG", secrets=[SECRET])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(f"heimdall-test.{'own' if own_handler else 'root'}")
    owner = logger if own_handler else logging.getLogger()
    owner.addHandler(handler)
    logger.propagate = not own_handler
    try:
        raise RuntimeError(f"cannot reach {DB_URI} with key {SECRET}")
    except RuntimeError:
        logger.exception("query failed for %s", DB_URI)
    finally:
        owner.removeHandler(handler)
    text = stream.getvalue()
    assert "query failed for postgresql://***@db.internal" in text
    assert "RuntimeError: cannot reach" in text
    assert SECRET not in text
    assert URI_PASSWORD not in text


def test_the_environment_overlay_is_restored_after_the_outermost_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HEIMDALL_TEST_KEEP", "before")
    monkeypatch.delenv("HEIMDALL_TEST_NEW", raising=False)
    overlay = EnvironmentOverlay()

    with overlay.applied({"HEIMDALL_TEST_KEEP": "during", "HEIMDALL_TEST_NEW": "x"}):
        with overlay.applied({"HEIMDALL_TEST_KEEP": "ignored"}):
            assert os.environ["HEIMDALL_TEST_KEEP"] == "during"
        assert os.environ["HEIMDALL_TEST_NEW"] == "x"

    assert os.environ["HEIMDALL_TEST_KEEP"] == "before"
    assert "HEIMDALL_TEST_NEW" not in os.environ


def test_a_password_given_as_a_query_parameter_is_redacted_and_counts_as_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = "postgresql://127.0.0.1:1/x?user=u&password=qu3ry-pw&sslmode=require"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    assert redact_uri(uri) == "postgresql://127.0.0.1:1/x?user=u&password=***&sslmode=require"
    assert "qu3ry-pw" in load_settings().secret_values()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("databricks://u:pw@workspace", "heimdall supports file, sqlite, postgresql"),
        ("http://u:pw@[::1", "cannot be parsed"),
    ],
)
def test_an_unsupported_or_unparsable_store_uri_is_a_config_error_without_its_password(
    uri: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    with pytest.raises(ConfigError, match=message) as failure:
        load_settings()
    assert ":pw@" not in str(failure.value)


@pytest.mark.usefixtures("restore_logging")
def test_urllib3_retry_warnings_show_only_at_debug() -> None:
    pool = logging.getLogger("urllib3.connectionpool")
    level = pool.level
    try:
        configure_logging("INFO")
        assert not pool.isEnabledFor(logging.WARNING)
        configure_logging("DEBUG")
        assert pool.isEnabledFor(logging.WARNING)
    finally:
        pool.setLevel(level)
