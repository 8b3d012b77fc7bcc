"""MLflow webhook deliveries: signed the way MLflow signs them they are accepted; unsigned,
wrongly signed, altered, stale or malformed ones are refused in one line without the secret."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature
from pydantic import SecretStr

from heimdall.serving.webhook import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookRefused,
    alias_moved,
    sign,
    verify_delivery,
)

SECRET = "s3cr3t-webhook-key"
KEY = SecretStr(SECRET)
NOW = 1_800_000_000


def delivery(
    entity: str = "model_version_alias",
    action: str = "created",
    data: dict[str, str] | None = None,
    *,
    secret: str = SECRET,
    sent: int = NOW,
) -> tuple[bytes, dict[str, str]]:
    """A body and headers built as ``mlflow.webhooks.delivery._send_webhook_request`` does."""
    payload = json.dumps(
        {
            "entity": entity,
            "action": action,
            "timestamp": datetime.now(UTC).isoformat(),
            "data": data if data is not None else {"name": "loc", "alias": "prod", "version": "3"},
        }
    )
    delivery_id = "7f0c1e2a-delivery"
    headers = {
        "Content-Type": "application/json",
        DELIVERY_ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(sent),
        SIGNATURE_HEADER: _generate_hmac_signature(secret, delivery_id, str(sent), payload),
    }
    return payload.encode("utf-8"), headers


def refused(body: bytes, headers: dict[str, str], now: float = NOW) -> WebhookRefused:
    with pytest.raises(WebhookRefused) as caught:
        verify_delivery(body, headers, KEY, now=now)
    message = str(caught.value)
    assert "\n" not in message and SECRET not in message
    return caught.value


def test_a_delivery_signed_by_mlflow_is_accepted_and_names_the_alias() -> None:
    body, headers = delivery()
    payload = verify_delivery(body, headers, KEY, now=NOW + 5)
    assert alias_moved(payload) == ("loc", "prod")
    lowered = {k.lower(): v for k, v in headers.items()}  # as an HTTP server hands them over
    assert verify_delivery(body, lowered, KEY, now=NOW) == payload


def test_our_signature_is_mlflows() -> None:
    body, headers = delivery()
    ours = sign(body, SECRET, headers[DELIVERY_ID_HEADER], headers[TIMESTAMP_HEADER])
    assert ours == headers[SIGNATURE_HEADER]


def test_a_wrong_secret_or_an_altered_body_is_refused() -> None:
    body, headers = delivery(secret="another-secret")
    assert refused(body, headers).reason == "bad_signature"
    body, headers = delivery()
    assert refused(body.replace(b'"prod"', b'"dev!"'), headers).reason == "bad_signature"
    assert refused(body, {**headers, DELIVERY_ID_HEADER: "other"}).reason == "bad_signature"


@pytest.mark.parametrize("header", [SIGNATURE_HEADER, DELIVERY_ID_HEADER, TIMESTAMP_HEADER])
def test_a_delivery_missing_a_header_is_refused(header: str) -> None:
    body, headers = delivery()
    del headers[header]
    assert refused(body, headers).reason == "unsigned"


@pytest.mark.parametrize("signature", ["v2,AAAA", "v1,not base64!", "", "v1,"])
def test_malformed_signatures_are_refused(signature: str) -> None:
    body, headers = delivery()
    assert refused(body, {**headers, SIGNATURE_HEADER: signature}).status == 401


def test_stale_and_future_deliveries_are_refused() -> None:
    body, headers = delivery(sent=NOW - 301)
    assert refused(body, headers).reason == "stale"
    body, headers = delivery(sent=NOW + 301)
    assert refused(body, headers).reason == "stale"
    body, headers = delivery(sent=NOW - 299)
    assert verify_delivery(body, headers, KEY, now=NOW)["action"] == "created"


def test_a_signed_body_that_is_not_a_json_object_is_refused_as_bad_payload() -> None:
    for body in (b"not json", b"[1, 2]"):
        headers = {
            DELIVERY_ID_HEADER: "d",
            TIMESTAMP_HEADER: str(NOW),
            SIGNATURE_HEADER: sign(body, SECRET, "d", str(NOW)),
        }
        error = refused(body, headers)
        assert (error.reason, error.status) == ("bad_payload", 400)


def test_only_alias_events_with_a_name_and_alias_move_anything() -> None:
    assert alias_moved(json.loads(delivery(action="deleted")[0])) == ("loc", "prod")
    assert alias_moved(json.loads(delivery("model_version", "created")[0])) is None
    assert alias_moved(json.loads(delivery("prompt_alias", "created")[0])) is None
    assert alias_moved(json.loads(delivery(data={"name": "loc"})[0])) is None
    assert alias_moved({"entity": "model_version_alias", "action": "created"}) is None
