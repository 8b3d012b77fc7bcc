"""MLflow Model Registry for LocalizationNet ONNX exports: register, alias, promote, roll back.

- ``client``: one MLflow session per operation (deadline, retries, one-line errors) and the
  per-model registry lock;
- ``model_dir``: the write-once MLflow model folder of each registration;
- ``versions``: one version per sha256 and model name, found again by its stored bytes;
- ``aliases``: alias moves behind gates, their history, rollback.

Where the bytes live, for an upload at ``<root>/models/localization/vX.onnx``::

    <root>/models/localization/vX.onnx                 the upload (sha256 in its metadata)
    <root>/models/localization/vX/<registration id>/   a version's ``source``: model.onnx
                                                       (server-side copy), MLmodel, …

MLflow reads its HTTP retry policy and S3 credentials from ``os.environ`` only, so calls run
with those variables set from :class:`Settings` (see ``config.MLFLOW_ENVIRONMENT``).
"""

from heimdall.config import DEFAULT_ALIAS
from heimdall.registry.aliases import (
    HISTORY_TAG,
    AliasChange,
    AliasEvent,
    Gate,
    ModelDetails,
    promote,
    rollback,
    set_alias,
    show_model,
)
from heimdall.registry.model_dir import (
    MODEL_FILE,
    external_data,
    model_dir_uri,
    stored_sha256,
)
from heimdall.registry.versions import (
    INTEGRITY_TAG,
    PRODUCTION,
    STAGES,
    ModelSummary,
    RegisteredVersion,
    Registration,
    check_registration,
    find_version_by_sha256,
    list_models,
    log_run_files,
    register_model,
    resolve_model_uri,
    set_stage,
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
    "Gate",
    "ModelDetails",
    "ModelSummary",
    "RegisteredVersion",
    "Registration",
    "check_registration",
    "external_data",
    "find_version_by_sha256",
    "list_models",
    "log_run_files",
    "model_dir_uri",
    "promote",
    "register_model",
    "resolve_model_uri",
    "rollback",
    "set_alias",
    "set_stage",
    "show_model",
    "stored_sha256",
]
