"""Alias history: one registered-model tag per alias, ``heimdall.alias_history.<alias>``.

The tag holds the alias's last moves as a JSON list, read, appended and written under the
model's registry lock; :func:`holders_of` replays it into the stack of holders that rollback
walks back through.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from heimdall.errors import RegistryError
from heimdall.registry.client import call
from heimdall.registry.records import aliases_of

if TYPE_CHECKING:
    from mlflow import MlflowClient

HISTORY_TAG = "heimdall.alias_history."
_HISTORY_CHARS = 4500  # MLflow caps a tag value at 5000 characters; the oldest events go first


@dataclass(frozen=True)
class AliasEvent:
    """One move of an alias, as kept in the registered model's history tag.

    ``reason`` says why a move went past a gate: the reason given with ``--force``, or that
    the previous holder failed its integrity check (so it was not judged against).
    """

    version: str
    action: str  # register | set | publish | promote | rollback
    at: str
    previous: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "previous"}


def record_move(
    client: MlflowClient,
    name: str,
    alias: str,
    version: str,
    action: str,
    reason: str | None = None,
) -> None:
    """Point ``alias`` at ``version`` and append the move to its history (lock held)."""
    model = call(client.get_registered_model, name)
    previous = aliases_of(model).get(alias)
    call(client.set_registered_model_alias, name, alias, version)
    event = AliasEvent(
        version=str(version),
        action=action,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        previous=previous,
        reason=reason,
    )
    events = [e.to_dict() for e in parse_history(model.tags).get(alias, ())] + [event.to_dict()]
    text = json.dumps(events, separators=(",", ":"))
    while len(text) > _HISTORY_CHARS and len(events) > 1:
        events = events[1:]
        text = json.dumps(events, separators=(",", ":"))
    call(client.set_registered_model_tag, name, f"{HISTORY_TAG}{alias}", text)


def parse_history(tags: Mapping[str, str]) -> dict[str, tuple[AliasEvent, ...]]:
    """Events per alias, oldest first, from the ``heimdall.alias_history.<alias>`` tags."""
    history: dict[str, tuple[AliasEvent, ...]] = {}
    for key, value in sorted(tags.items()):
        if not key.startswith(HISTORY_TAG):
            continue
        alias = key.removeprefix(HISTORY_TAG)
        try:
            history[alias] = tuple(AliasEvent(**event) for event in json.loads(value))
        except (ValueError, TypeError) as exc:
            raise RegistryError(
                f"registered-model tag {key!r} is not an alias history: {exc}"
            ) from exc
    return history


def holders_of(events: tuple[AliasEvent, ...]) -> list[str]:
    """Replay the history as a stack: moves push the new holder, a rollback pops back to its
    version (past holders it skipped, whose bytes had failed their check)."""
    stack: list[str] = []
    for event in events:
        if event.action == "rollback" and event.version in stack[:-1]:
            while stack[-1] != event.version:
                stack.pop()
        elif event.action == "rollback":  # not below the top: history cut or edited by hand
            if stack:
                stack.pop()
            if not stack or stack[-1] != event.version:
                stack.append(event.version)
        else:
            stack.append(event.version)
    return stack
