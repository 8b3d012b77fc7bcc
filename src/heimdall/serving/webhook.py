"""Verify MLflow registry webhook deliveries (MLflow >= 3.3) and read alias moves from them.

MLflow signs ``f"{delivery_id}.{timestamp}.{body}"`` with HMAC-SHA256 under the webhook's
secret and sends ``X-MLflow-Signature: v1,<base64 digest>`` with ``X-MLflow-Delivery-Id`` and
``X-MLflow-Timestamp`` (Unix seconds), following the Standard Webhooks conventions
(``mlflow/webhooks/delivery.py``). The body is ``{"entity", "action", "timestamp", "data"}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

from heimdall.errors import HeimdallError

SIGNATURE_HEADER = "X-MLflow-Signature"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
SIGNATURE_VERSION = "v1"
ALIAS_ENTITY = "model_version_alias"
ALIAS_ACTIONS = ("created", "deleted")
MAX_BODY_BYTES = 64 * 1024  # alias payloads are a few hundred bytes


class WebhookRefused(HeimdallError):
    """A delivery that is not authentic, fresh and well formed; ``reason`` labels the metric."""

    def __init__(self, message: str, reason: str, status: int = 401) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


def sign(body: bytes, secret: str, delivery_id: str, timestamp: str) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for ``body`` (the sender's side)."""
    digest = _digest(body, secret.encode(), delivery_id, timestamp)
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def _digest(body: bytes, key: bytes, delivery_id: str, timestamp: str) -> bytes:
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return hmac.new(key, signed, hashlib.sha256).digest()


def verify_delivery(
    body: bytes,
    headers: Mapping[str, str],
    secret: SecretStr,
    *,
    now: float,
    max_age_s: float = 300,
) -> dict[str, Any]:
    """The payload of an authentic, fresh delivery; raise WebhookRefused otherwise."""
    lowered = {key.lower(): value for key, value in headers.items()}
    signature = lowered.get(SIGNATURE_HEADER.lower())
    delivery_id = lowered.get(DELIVERY_ID_HEADER.lower())
    timestamp = lowered.get(TIMESTAMP_HEADER.lower())
    if not signature:
        raise WebhookRefused(
            f"unsigned delivery (no {SIGNATURE_HEADER}): give the webhook the secret this "
            "server has in HEIMDALL_WEBHOOK_SECRET",
            reason="unsigned",
        )
    if not delivery_id or not timestamp:
        raise WebhookRefused(
            f"delivery lacks {DELIVERY_ID_HEADER} or {TIMESTAMP_HEADER}", reason="unsigned"
        )
    # The one place the secret is read: everywhere else it stays masked (reprs, logs).
    secret_key = secret.get_secret_value().encode()
    if not _signed_by(signature, _digest(body, secret_key, delivery_id, timestamp)):
        raise WebhookRefused(
            f"wrong {SIGNATURE_HEADER}: the webhook's secret is not this server's "
            "HEIMDALL_WEBHOOK_SECRET, or the delivery was altered",
            reason="bad_signature",
        )
    try:
        sent = int(timestamp)
    except ValueError:
        raise WebhookRefused(f"{TIMESTAMP_HEADER} is not Unix seconds", reason="stale") from None
    if abs(now - sent) > max_age_s:
        raise WebhookRefused(
            f"delivery timestamped {sent} is more than {max_age_s:g} s from this server's clock "
            f"({int(now)}): a replay, or clocks out of sync",
            reason="stale",
        )
    try:
        payload = json.loads(body)
    except ValueError:
        raise WebhookRefused(
            "delivery body is not JSON", reason="bad_payload", status=400
        ) from None
    if not isinstance(payload, dict):
        raise WebhookRefused("delivery body is not a JSON object", reason="bad_payload", status=400)
    return payload


def alias_moved(payload: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(name, alias)`` of a model version alias created or deleted; None for other events."""
    if payload.get("entity") != ALIAS_ENTITY or payload.get("action") not in ALIAS_ACTIONS:
        return None
    data = payload.get("data")
    if not isinstance(data, dict):
        return None
    name, alias = data.get("name"), data.get("alias")
    if not isinstance(name, str) or not isinstance(alias, str):
        return None
    return name, alias


def _signed_by(header: str, wanted: bytes) -> bool:
    """Whether any ``v1,<base64>`` signature in ``header`` is ``wanted`` (constant time)."""
    matched = False
    for candidate in header.split():
        version, _, encoded = candidate.partition(",")
        try:
            digest = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        matched |= version == SIGNATURE_VERSION and hmac.compare_digest(digest, wanted)
    return matched
