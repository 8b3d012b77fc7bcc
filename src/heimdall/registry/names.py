"""Names the registry accepts: model names, aliases, stages, versions, sha256 and ``models:/`` URIs.

Every rule is one that some party downstream would otherwise enforce only after bytes were
written: MLflow (``/`` and ``:`` in names, names that are not their own normalized path, 256
characters for a name, ``latest`` and ``v<N>`` as aliases in any case), file systems (a name is
one path component of the publish report, ``reports/<name>/v<N>/``: at most 255 bytes, no
separators, no control characters), S3 keys (the report's run artifacts) and our own
``models:/NAME@alias`` URIs and quoted search filters (``@``, ``#``, ``?``, ``%``, quotes).
"""

from __future__ import annotations

import re
import unicodedata

from heimdall.errors import InputError
from heimdall.registry.client import LOCK_PREFIX, is_lock

PRODUCTION = "production"
STAGING = "staging"
STAGES = {"staging": "Staging", "production": "Production", "archived": "Archived", "none": "None"}
# Room for the lock model ``heimdall-lock.<name>`` in MLflow's 256-character name column and for
# the name as one path component anywhere (255 bytes), with margin for what surrounds it.
MAX_NAME_BYTES = 128
# Room for ``heimdall.alias_history.<alias>`` in MLflow's 250-character tag keys and for the
# variant aliases ``<alias>-int8``.
MAX_ALIAS_CHARS = 64
MAX_VERSION_DIGITS = 9  # MLflow's SQL stores keep versions in a 32-bit integer column
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ALIAS = re.compile(r"[A-Za-z0-9_\-]+")
_VERSION = re.compile(r"[1-9][0-9]*")
_NAME_PUNCTUATION = "._- "
_NAME_RULE = (
    f"use letters, digits, '.', '_', '-' and inner spaces, at most {MAX_NAME_BYTES} bytes in "
    "UTF-8, starting with a letter or digit"
)
_ALIAS_RULE = (
    f"use 1 to {MAX_ALIAS_CHARS} ASCII letters, digits, '_' and '-', not 'latest' or 'v<N>' in "
    "any case"
)


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``(name, alias, version)`` of ``models:/NAME@alias``, ``models:/NAME/N`` or ``…/latest``."""
    body = uri.removeprefix("models:/") if uri.startswith("models:/") else None
    if body and "@" in body and "/" not in body:
        name, alias = body.split("@", 1)
        if name and alias:
            check_name(name)
            if alias.lower() == "latest":  # MLflow's own name for the newest version
                return name, None, "latest"
            check_alias(alias)
            return name, alias, None
    if body and body.count("/") == 1:
        name, number = body.split("/")
        if name and (number == "latest" or (number.isascii() and number.isdigit())):
            check_name(name)
            return name, None, number if number == "latest" else check_version(number)
    raise InputError(
        f"not a registry URI: {uri!r}; use models:/NAME@alias, models:/NAME/VERSION or "
        "models:/NAME/latest"
    )


def check_sha256(sha256: str) -> None:
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise InputError(f"sha256 must be 64 lowercase hex characters, got {sha256!r}")


def _utf8_size(text: str, what: str, rule: str) -> int:
    """Bytes of ``text`` in UTF-8; a str holding undecodable argv bytes is refused."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InputError(
            f"invalid {what} {text!r}: not valid UTF-8 (a byte the terminal's encoding could not "
            f"decode); {rule}"
        ) from None


def check_name(name: str) -> None:
    """Refuse a model name that MLflow, S3 keys, file names or ``models:/`` URIs would not take."""
    what = "registered model name"
    if not name:
        raise InputError(f"invalid {what}: it is empty; {_NAME_RULE}")
    size = _utf8_size(name, what, _NAME_RULE)
    shown = name if len(name) <= 80 else f"{name[:40]}…{name[-20:]}"
    bad = next((c for c in name if not (c.isalnum() or c in _NAME_PUNCTUATION)), None)
    if size > MAX_NAME_BYTES:
        why = f"{size} bytes long"
    elif bad is not None:
        why = f"holds {bad!r} ({unicodedata.category(bad)}: MLflow, file systems or URIs refuse it)"
    elif not name[0].isalnum():
        why = "does not start with a letter or digit"
    elif name.endswith(" "):
        why = "must not end with a space"
    elif is_lock(name):
        why = f"{LOCK_PREFIX!r} names heimdall's registry locks"
    else:
        return
    raise InputError(f"invalid {what} {shown!r}: {why}; {_NAME_RULE}")


def check_alias(alias: str) -> None:
    """Refuse an alias MLflow would refuse or reserve, or one that shadows ours by case."""
    if not alias:
        raise InputError(f"invalid alias: it is empty; {_ALIAS_RULE}")
    _utf8_size(alias, "alias", _ALIAS_RULE)
    shown = alias if len(alias) <= MAX_ALIAS_CHARS else f"{alias[:MAX_ALIAS_CHARS]}…"
    if len(alias) > MAX_ALIAS_CHARS:
        why = f"{len(alias)} characters long"
    elif not _ALIAS.fullmatch(alias):
        why = "holds other characters"
    elif alias.lower() == "latest" or re.fullmatch(r"[vV][0-9]+", alias):
        why = "reserved by MLflow ('latest' and 'v<N>' name versions)"
    elif alias.lower() in (PRODUCTION, STAGING) and alias != alias.lower():
        raise InputError(
            f"invalid alias {alias!r}: it differs from {alias.lower()!r} only in case, and "
            f"loaders would mistake one for the other; use {alias.lower()!r}"
        )
    else:
        return
    raise InputError(f"invalid alias {shown!r}: {why}; {_ALIAS_RULE}")


def check_version(version: str | int) -> str:
    """A version number as MLflow stores it; anything else (``latest`` too) refused at once."""
    text = str(version)
    if text.lower() == "latest":
        raise InputError(
            "'latest' is not a version number: give the number (heimdall models show NAME lists "
            "them), so what moves is what was judged"
        )
    if not (_VERSION.fullmatch(text) and len(text) <= MAX_VERSION_DIGITS):
        raise InputError(
            f"{text!r} is not a version number: use digits such as 3 (at most "
            f"{MAX_VERSION_DIGITS}, no sign or leading zero)"
        )
    return text


def canonical_stage(stage: str) -> str:
    canonical = STAGES.get(stage.lower())
    if canonical is None:
        raise InputError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES.values())}")
    return canonical


def check_registration(name: str, alias: str | None = None, stage: str | None = None) -> None:
    """Raise InputError now for a name, alias or stage that registering would refuse later.

    ``production`` (alias, in any case, and MLflow's ``Production`` stage, which follows it) is
    refused too: only ``promote`` moves it, behind its gates.
    """
    check_name(name)
    if alias is not None:
        if alias.lower() == PRODUCTION:
            raise InputError(
                f"alias {PRODUCTION!r} is moved only by promote, which checks the gates first; "
                f"publish to 'staging', then run: heimdall promote {name} VERSION"
            )
        check_alias(alias)
    if stage is not None and canonical_stage(stage) == STAGES[PRODUCTION]:
        raise InputError(
            f"the Production stage follows the {PRODUCTION!r} alias, which only promote moves; "
            f"publish to 'staging', then run: heimdall promote {name} VERSION"
        )


def check_override(force: bool, reason: str | None) -> None:
    """``force`` needs a reason (it is recorded); a reason without ``force`` is a mistake."""
    if force and not (reason and reason.strip()):
        raise InputError("--force needs --reason TEXT: the reason is recorded with the move")
    if reason and not force:
        raise InputError("--reason is only used with --force")
