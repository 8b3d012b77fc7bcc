"""MLflow Model Registry for LocalizationNet ONNX exports: register, alias, promote, roll back.

- ``client``: one MLflow session per operation (deadline, retries, one-line errors) and the
  per-model registry lock;
- ``model_dir``: the write-once MLflow model folder of each registration;
- ``versions``: one version per sha256 and model name, found again by its stored bytes;
- ``records``: what heimdall makes of MLflow's entities (versions, registrations, models),
  and finding them (``models:/`` URIs, every model in the store);
- ``lineage``: the facts a version's tags carry and the run its metadata goes to;
- ``names``: model names, aliases, stages and ``models:/`` URIs the registry accepts;
- ``integrity``: whether a version's stored bytes are still the registered ones, and the
  integrity gates built on that;
- ``history``: each alias's moves, kept in a registered-model tag;
- ``stages``: MLflow's ``Production``/``Staging`` stages following the aliases of those names;
- ``aliases``: alias moves behind the integrity gates, rollback, showing a model (the quality
  gates sit above the registry, in ``heimdall.gates``).

Where the bytes live, for an upload at ``<root>/models/localization/vX.onnx``::

    <root>/models/localization/vX.onnx                 the upload (sha256 in its metadata)
    <root>/models/localization/vX/<registration id>/   a version's ``source``: model.onnx
                                                       (server-side copy), MLmodel, …

The registry builds on the core only: functions that read or copy stored bytes take the object
store from their caller (``store=heimdall.storage.open_store(settings)``), and registration takes
the validator of the read-back file (``validator=heimdall.validate.validate_onnx_model``; a
``Validated(sha256, validation, validator)`` skips validating again the bytes it validated).

MLflow reads its HTTP retry policy and S3 credentials from ``os.environ`` only, so calls run
with those variables set from :class:`Settings` (see ``config.MLFLOW_ENVIRONMENT``).
"""

from heimdall.config import DEFAULT_ALIAS
from heimdall.registry.aliases import (
    AliasChange,
    AliasMovedError,
    ModelDetails,
    alias_holder,
    move_alias,
    promote,
    rollback,
    set_alias,
    show_model,
)
from heimdall.registry.history import HISTORY_TAG, AliasEvent
from heimdall.registry.integrity import INTEGRITY_TAG, Gate, bytes_problem
from heimdall.registry.lineage import log_run_files, log_run_metrics
from heimdall.registry.model_dir import (
    MODEL_FILE,
    Validated,
    external_data,
    model_dir_uri,
    stored_sha256,
)
from heimdall.registry.names import PRODUCTION, STAGES, check_registration, check_version
from heimdall.registry.records import (
    ModelSummary,
    RegisteredVersion,
    Registration,
    list_models,
    resolve_model_uri,
)
from heimdall.registry.stages import StageMove
from heimdall.registry.versions import (
    find_version_by_sha256,
    register_model,
    set_stage,
    tag_version,
)

__all__ = [
    "DEFAULT_ALIAS",
    "HISTORY_TAG",
    "INTEGRITY_TAG",
    "MODEL_FILE",
    "PRODUCTION",
    "STAGES",
    "AliasChange",
    "AliasEvent",
    "AliasMovedError",
    "Gate",
    "ModelDetails",
    "ModelSummary",
    "RegisteredVersion",
    "Registration",
    "StageMove",
    "Validated",
    "alias_holder",
    "bytes_problem",
    "check_registration",
    "check_version",
    "external_data",
    "find_version_by_sha256",
    "list_models",
    "log_run_files",
    "log_run_metrics",
    "model_dir_uri",
    "move_alias",
    "promote",
    "register_model",
    "resolve_model_uri",
    "rollback",
    "set_alias",
    "set_stage",
    "show_model",
    "stored_sha256",
    "tag_version",
]
