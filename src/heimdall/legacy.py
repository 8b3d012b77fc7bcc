"""The original design's API, as the training service calls it: dicts in, dicts out.

Thin shells over the typed library; each keeps the seed's names, argument order and keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import structlog

from heimdall.config import DEFAULT_ALIAS, Settings
from heimdall.registry import register_model, set_alias
from heimdall.storage import ObjectStore

log = structlog.get_logger(__name__)


def register_with_mlflow(
    model_name: str,
    s3_uri: str,
    metadata: Mapping[str, Any],
    stage: str = "Staging",
    *,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
) -> dict[str, Any]:
    """Register ``s3_uri`` (expected sha256 from ``metadata``); the version as a dict.

    Sets the legacy ``stage`` as asked and, when parity verification passed, the ``staging``
    alias; ``production`` moves only through ``promote``.
    """
    registration = register_model(
        s3_uri,
        sha256=str(metadata["sha256"]) if metadata.get("sha256") else None,
        name=model_name,
        metadata=metadata,
        stage=stage,
        settings=settings,
        store=store,
    )
    version = registration.version
    if version.verification == "passed":
        set_alias(model_name, version.version, DEFAULT_ALIAS, settings=settings, store=store)
        version = replace(version, aliases=tuple(sorted({*version.aliases, DEFAULT_ALIAS})))
    else:
        log.warning("legacy.alias_not_moved", name=model_name, version=version.version)
    return {
        **version.to_dict(),
        "model_name": version.name,
        "model_version": version.version,
        "s3_uri": s3_uri,
        "reused": not registration.created,
    }
