"""Settings from the environment (the only module that reads it) and logging set-up.

Environment names follow the original design: ``MLFLOW_TRACKING_URI``,
``MLFLOW_S3_ENDPOINT_URL``, ``MLFLOW_S3_ACCESS_KEY_ID``, ``MLFLOW_S3_SECRET_ACCESS_KEY``,
``MLFLOW_EXPERIMENT_NAME``, the standard ``AWS_*`` names as fallbacks, and ``HEIMDALL_*``
for our own. With nothing set, everything lives under one local data directory:
a SQLite MLflow store and a directory-backed object store.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from pydantic import AliasChoices, Field, SecretStr, field_serializer, field_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from structlog.dev import plain_traceback

from heimdall.errors import ConfigError

DEFAULT_BUCKET = "heimdall-models"
DEFAULT_MODEL_NAME = "heimdall-localization-onnx"
DEFAULT_ALIAS = "staging"
DEFAULT_EXPERIMENT = "heimdall-localization"

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s]*@")
# A password given as a query parameter (libpq and SQLAlchemy accept ``?password=``).
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&](?:password|passwd|pwd|secret|token|[a-z_]*_key)=)(?P<value>[^&#\s]*)",
    re.IGNORECASE,
)
# Tracking and registry stores heimdall supports (SQLAlchemy URIs may name a driver: +psycopg2).
_STORE_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# What MLflow's own loggers get at import; read once, so a user's choice is kept.
_USER_MLFLOW_LOGGING_LEVEL = os.environ.get("MLFLOW_LOGGING_LEVEL")


# Where heimdall reads the S3 key pair; the first spelling of each wins.
S3_KEY_VARIABLES = (
    "MLFLOW_S3_ACCESS_KEY_ID (or AWS_ACCESS_KEY_ID) and MLFLOW_S3_SECRET_ACCESS_KEY "
    "(or AWS_SECRET_ACCESS_KEY)"
)

# Fields that may carry ``user:password@``; what Settings shows of them is redacted.
_URI_FIELDS = ("tracking_uri", "registry_uri", "artifact_uri", "s3_endpoint_url")


def redact_uri(uri: str) -> str:
    """Drop any ``user:password@`` part and secret query values of a URI so it can be shown."""
    return _SECRET_PARAM.sub(r"\g<key>***", _USERINFO.sub(r"\g<scheme>***@", uri))


def check_store_uri(uri: str) -> None:
    """Raise ValueError unless ``uri`` is a tracking/registry store URI heimdall supports."""
    try:
        scheme = urlsplit(uri).scheme.split("+")[0]
    except ValueError as exc:
        raise ValueError(f"store URI {redact_uri(uri)!r} cannot be parsed ({exc})") from None
    if scheme not in _STORE_SCHEMES and not re.fullmatch(r"/.*|[a-zA-Z]:.*|[^:]*", uri):
        raise ValueError(
            f"store URI {redact_uri(uri)!r}: heimdall supports {', '.join(_STORE_SCHEMES)} "
            "URIs (an http(s) mlflow server, or a database)"
        )


def check_endpoint_url(url: str) -> None:
    """Raise ValueError unless ``url`` is ``http(s)://host[:port]`` (an S3 endpoint)."""
    problem = f"S3 endpoint {redact_uri(url)!r} is not http(s)://host[:port]"
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when it is not a number in 0-65535
    except ValueError:
        raise ValueError(f"{problem}: the port is not a number from 1 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{problem}, e.g. http://127.0.0.1:8333")
    if parts.path not in ("", "/") or parts.query or parts.fragment or port == 0:
        raise ValueError(f"{problem}: leave out any path, query or port 0")


def _sqlalchemy_uri(uri: str) -> str:
    """``postgresql://`` as ``postgresql+psycopg2://`` when only psycopg2 is installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` (the original design's tracking URI) to the
    psycopg 3 driver; the dev extra installs psycopg2.
    """
    bare = uri.startswith("postgresql://")
    if bare and find_spec("psycopg") is None and find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + uri.removeprefix("postgresql://")
    return uri


class Settings(BaseSettings):
    """Everything heimdall reads from the environment, with embedded defaults."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    data_dir: Path = Field(
        default=Path(".heimdall"), validation_alias=AliasChoices("HEIMDALL_DATA_DIR")
    )
    tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI")
    )
    registry_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_REGISTRY_URI")
    )
    experiment_name: str = Field(
        default=DEFAULT_EXPERIMENT, validation_alias=AliasChoices("MLFLOW_EXPERIMENT_NAME")
    )
    artifact_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_ARTIFACT_URI")
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("HEIMDALL_S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"),
    )
    s3_access_key_id: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
    )
    s3_region: str = Field(
        default="us-east-1", validation_alias=AliasChoices("HEIMDALL_S3_REGION", "AWS_REGION")
    )
    bucket: str = Field(default=DEFAULT_BUCKET, validation_alias=AliasChoices("HEIMDALL_BUCKET"))
    model_name: str = Field(
        default=DEFAULT_MODEL_NAME, validation_alias=AliasChoices("HEIMDALL_MODEL_NAME")
    )
    # One overall deadline per remote operation (retries happen inside it), in seconds.
    s3_timeout_s: float = Field(
        default=30.0, gt=0, validation_alias=AliasChoices("HEIMDALL_S3_TIMEOUT_S")
    )
    mlflow_timeout_s: float = Field(
        default=30.0, gt=0, validation_alias=AliasChoices("HEIMDALL_MLFLOW_TIMEOUT_S")
    )
    # Quality gates before an alias or stage moves (see heimdall.gates).
    gate_baseline_fraction: float = Field(
        default=0.5, gt=0, validation_alias=AliasChoices("HEIMDALL_GATE_BASELINE_FRACTION")
    )
    gate_champion_tolerance: float = Field(
        default=0.02, ge=0, validation_alias=AliasChoices("HEIMDALL_GATE_CHAMPION_TOLERANCE")
    )
    # The commit the model's code came from, where the working directory is no git checkout
    # (a container image, say); otherwise publish reads it from the repository it runs in.
    git_commit: str | None = Field(
        default=None, validation_alias=AliasChoices("HEIMDALL_GIT_COMMIT", "GIT_COMMIT")
    )
    # Serving: the shared secret MLflow signs its registry webhooks with (X-MLflow-Signature).
    webhook_secret: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("HEIMDALL_WEBHOOK_SECRET")
    )
    # promote/rollback also move MLflow's Production/Staging stage, for stage-based loaders.
    sync_stages: bool = Field(default=True, validation_alias=AliasChoices("HEIMDALL_SYNC_STAGES"))
    log_level: str = Field(default="WARNING", validation_alias=AliasChoices("HEIMDALL_LOG_LEVEL"))
    log_json: bool = Field(default=False, validation_alias=AliasChoices("HEIMDALL_LOG_JSON"))

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"unknown log level {value!r}; use {', '.join(LOG_LEVELS)}")
        return value.upper()

    @field_validator("tracking_uri", "registry_uri")
    @classmethod
    def _supported_store(cls, value: str | None) -> str | None:
        if value:
            check_store_uri(value)
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _http_endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            check_endpoint_url(value)
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() and str() both come from here; SecretStr fields already hide themselves.
        for name, value in super().__repr_args__():
            if name in _URI_FIELDS and isinstance(value, str):
                value = redact_uri(value)
            yield name, value

    @field_serializer(*_URI_FIELDS, when_used="json")
    def _redact_in_json(self, value: str | None) -> str | None:
        return redact_uri(value) if value is not None else None

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_tracking_uri(self) -> str:
        """The tracking URI to hand MLflow: the embedded SQLite store unless one is set.

        A bare ``postgresql://`` database URI comes back with the SQLAlchemy driver that is
        installed, so every MLflow client in heimdall opens the same store the same way.
        """
        if self.tracking_uri:
            return _sqlalchemy_uri(self.tracking_uri)
        return f"sqlite:///{self.resolved_data_dir / 'mlflow.db'}"

    @property
    def resolved_registry_uri(self) -> str:
        """The model registry URI to hand MLflow: the tracking store unless one is set."""
        if self.registry_uri:
            return _sqlalchemy_uri(self.registry_uri)
        return self.resolved_tracking_uri

    @property
    def resolved_artifact_uri(self) -> str:
        if self.artifact_uri:
            return self.artifact_uri
        return (self.resolved_data_dir / "mlartifacts").as_uri()

    @property
    def experiment_artifact_location(self) -> str | None:
        """Where a new experiment keeps run artifacts: ``artifact_uri``, else the tracking
        server's own choice, else the data directory (never MLflow's ``./mlruns`` in the cwd)."""
        if self.artifact_uri:
            return self.artifact_uri
        if self.resolved_tracking_uri.startswith(("http://", "https://")):
            return None
        return self.resolved_artifact_uri

    @property
    def uses_s3(self) -> bool:
        return self.s3_endpoint_url is not None

    @property
    def object_store_uri(self) -> str:
        """Where model bytes go: ``s3://bucket`` with an endpoint, else a local directory."""
        if self.uses_s3:
            return f"s3://{self.bucket}"
        return (self.resolved_data_dir / "objects" / self.bucket).as_uri()

    def secret_values(self) -> list[str]:
        """Secret strings that must never appear in any output."""
        values = [
            s.get_secret_value()
            for s in (self.s3_secret_access_key, self.webhook_secret)
            if s is not None
        ]
        for uri in (getattr(self, name) for name in _URI_FIELDS):
            match = re.match(r"[a-zA-Z][a-zA-Z0-9+.\-]*://[^/@\s:]*:([^/@\s]+)@", uri or "")
            if match:
                values.append(match.group(1))
            values += [m["value"] for m in _SECRET_PARAM.finditer(uri or "")]
        return [v for v in values if v]

    def mlflow_s3_env(self) -> dict[str, str]:
        """Environment MLflow's own S3 client needs to read and write ``s3://`` artifacts."""
        env: dict[str, str] = {}
        if self.s3_endpoint_url:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        if self.s3_access_key_id is not None:
            env["AWS_ACCESS_KEY_ID"] = self.s3_access_key_id.get_secret_value()
        if self.s3_secret_access_key is not None:
            env["AWS_SECRET_ACCESS_KEY"] = self.s3_secret_access_key.get_secret_value()
        if self.uses_s3:
            env["AWS_DEFAULT_REGION"] = self.s3_region
        return env


class EnvironmentOverlay:
    """Set variables in ``os.environ`` while any MLflow call runs; restore them after the last.

    MLflow reads its HTTP retry policy, its S3 credentials and whether to print run URLs from
    the environment and offers no argument for them. Nested and concurrent calls share one
    overlay (the first one's values), so a process should use one Settings at a time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: dict[str, str | None] = {}

    @contextmanager
    def applied(self, values: Mapping[str, str]) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._saved = {k: os.environ.get(k) for k in values}
                os.environ.update(values)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    for key, old in self._saved.items():
                        if old is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = old


MLFLOW_ENVIRONMENT = EnvironmentOverlay()
# Ending a run on a tracking server prints its URL to stdout, user:password@ included.
QUIET_MLFLOW = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def heimdall_version() -> str:
    """This package's installed version (recorded in exports, tags and metadata)."""
    try:
        return version("heimdall")
    except PackageNotFoundError:
        return "0+unknown"


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment; keyword arguments win over it."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except PydanticValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: "
            # A validator's own message, without pydantic's "Value error, " in front.
            + (str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"])
            for e in exc.errors()
        )
        raise ConfigError(
            f"invalid settings ({problems}); check the environment and the options"
        ) from None


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***`` and URI passwords redacted: the one
    scrubber for messages, logs and reports (a secret of any length is replaced)."""
    return str(_scrubber(secrets)(text))


def _scrubber(secrets: Iterable[str]) -> Any:
    hidden = [s for s in secrets if s]

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            value = redact_uri(value)
            for secret in hidden:
                value = value.replace(secret, "***")
            return value
        if isinstance(value, Mapping):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(scrub(v) for v in value)
        return value

    return scrub


class _ScrubbingRecordFactory:
    """Scrub secrets from every stdlib log record (MLflow, boto and friends) as it is made.

    A filter on the root's handlers is not enough: importing MLflow gives its loggers their
    own handler and stops them propagating, and that can happen after configure_logging.
    """

    def __init__(self, make: Callable[..., logging.LogRecord], scrub: Any) -> None:
        self.make = make
        self.scrub = scrub

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.make(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit the format
            message = f"{record.msg} {record.args}"
        record.msg, record.args = self.scrub(message), None
        # Formatters reuse a cached exc_text, so filling it here scrubs the traceback too.
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return record


def prefer_passive_threads() -> None:
    """Let PyTorch's idle OpenMP threads sleep instead of spinning, unless the user chose.

    libgomp reads ``OMP_WAIT_POLICY`` once, when torch is first imported, so this only works
    before that; the CLI and the test session call it first thing. On cores other processes
    share, spinning workers made the demo 4-5x slower (362 s against 76 s at load 5); on an
    idle machine sleeping costs about 12 %.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _CurrentStderr:
    """``sys.stderr`` as it is at each write: a CLI progress bar redirects it while it runs,
    and log lines must then print above the bar, not into it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_STDERR = _CurrentStderr()


def configure_logging(level: str = "INFO", json: bool = False, secrets: Iterable[str] = ()) -> None:
    """Set up structlog: console or JSON lines on stderr, secrets and URI passwords scrubbed."""
    scrub = _scrubber(secrets)
    if level.upper() not in LOG_LEVELS:
        raise ConfigError(f"unknown log level {level!r}; use {', '.join(LOG_LEVELS)}")
    numeric = logging.getLevelName(level.upper())
    # MLflow and alembic log their own INFO chatter ("Creating initial MLflow database
    # tables...") through stdlib logging; keep it to warnings unless the user asked for DEBUG.
    # Importing mlflow resets its logger's level from MLFLOW_LOGGING_LEVEL, and heimdall
    # imports it late, so both are set.
    quiet = "DEBUG" if numeric <= logging.DEBUG else "WARNING"
    os.environ["MLFLOW_LOGGING_LEVEL"] = _USER_MLFLOW_LOGGING_LEVEL or quiet
    for name in ("mlflow", "alembic", "botocore", "urllib3"):
        logging.getLogger(name).setLevel(quiet)
    # urllib3 warns "Retrying ..." before each retry of a refused or failed request; the one
    # error line afterwards says what happened, so those lines only show with DEBUG.
    logging.getLogger("urllib3.connectionpool").setLevel("DEBUG" if quiet == "DEBUG" else "ERROR")
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(_STDERR))  # type: ignore[arg-type]
    make = logging.getLogRecordFactory()
    if isinstance(make, _ScrubbingRecordFactory):  # configured before: replace, don't stack
        make = make.make
    logging.setLogRecordFactory(_ScrubbingRecordFactory(make, scrub))
    # JSON lines carry the traceback as a field, formatted before the fields are scrubbed.
    formatting: list[Any] = [structlog.processors.format_exc_info] if json else []
    # Plain tracebacks: rich's show locals (secrets among them) and wrap lines, which would
    # split a secret past the scrubbing of the rendered line.
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=plain_traceback)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *formatting,
            lambda _, __, event_dict: {k: scrub(v) for k, v in event_dict.items()},
            renderer,
            # Exceptions and other objects only become text in the renderer: scrub that too.
            lambda _, __, line: scrub(line),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_STDERR),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def _quiet_by_default() -> None:
    """Used as a library, heimdall logs warnings and errors only until the host configures
    structlog (or calls configure_logging): structlog's own default prints every INFO event."""
    if not structlog.is_configured():
        # On stderr: structlog's default is stdout, which a host program's output owns.
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
            logger_factory=structlog.PrintLoggerFactory(file=_STDERR),  # type: ignore[arg-type]
        )


_quiet_by_default()
