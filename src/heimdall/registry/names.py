"""Names the registry accepts: model names, aliases, stages, sha256 and ``models:/`` URIs."""

from __future__ import annotations

import re

from heimdall.errors import InputError
from heimdall.registry.client import LOCK_PREFIX, is_lock

PRODUCTION = "production"
STAGES = {"staging": "Staging", "production": "Production", "archived": "Archived", "none": "None"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ALIAS = re.compile(r"[A-Za-z0-9_\-]+")


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    body = uri.removeprefix("models:/") if uri.startswith("models:/") else None
    if body and "@" in body and "/" not in body:
        name, alias = body.split("@", 1)
        if name and alias:
            return name, alias, None
    if body and body.count("/") == 1:
        name, number = body.split("/")
        if name and (number.isdigit() or number == "latest"):
            return name, None, number
    raise InputError(
        f"not a registry URI: {uri!r}; use models:/NAME@alias, models:/NAME/VERSION or "
        "models:/NAME/latest"
    )


def check_sha256(sha256: str) -> None:
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise InputError(f"sha256 must be 64 lowercase hex characters, got {sha256!r}")


def check_name(name: str) -> None:
    if not name or "'" in name or "/" in name or "@" in name or is_lock(name):
        raise InputError(
            f"invalid registered model name {name!r}: no quotes, '/' or '@', and not starting "
            f"with {LOCK_PREFIX!r}"
        )


def check_alias(alias: str) -> None:
    if not _ALIAS.fullmatch(alias) or alias.lower() == "latest" or re.fullmatch(r"v\d+", alias):
        raise InputError(
            f"invalid alias {alias!r}: use letters, digits, '_' and '-' (not 'latest' or 'v<N>')"
        )


def canonical_stage(stage: str) -> str:
    canonical = STAGES.get(stage.lower())
    if canonical is None:
        raise InputError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES.values())}")
    return canonical


def check_registration(name: str, alias: str | None = None, stage: str | None = None) -> None:
    """Raise InputError now for a name, alias or stage that registering would refuse later.

    ``production`` is refused too: only ``promote`` moves it, behind its gates.
    """
    check_name(name)
    if alias is not None:
        check_alias(alias)
        if alias == PRODUCTION:
            raise InputError(
                f"alias {PRODUCTION!r} is moved only by promote, which checks the gates first; "
                f"publish to 'staging', then run: heimdall promote {name} VERSION"
            )
    if stage is not None:
        canonical_stage(stage)


def check_override(force: bool, reason: str | None) -> None:
    """``force`` needs a reason (it is recorded); a reason without ``force`` is a mistake."""
    if force and not (reason and reason.strip()):
        raise InputError("--force needs --reason TEXT: the reason is recorded with the move")
    if reason and not force:
        raise InputError("--reason is only used with --force")
