"""Quality gates: an alias or stage only moves to a model at least as good as what it replaces.

Every candidate is measured on one held-out set anyone can reproduce: synthetic samples named by
(generator version, seed, size), the same for every candidate. Two gates, in MLflow's own
vocabulary (``MetricThreshold`` checked by ``mlflow.validate_evaluation_results``):

- ``baseline``: the median localization error is at most ``baseline_fraction`` of the error of
  always predicting the region centre on the same set (``HEIMDALL_GATE_BASELINE_FRACTION``,
  default 0.5: the demo model sits near 0.2, a 2-epoch model trained on 128 samples near 1.0);
- ``champion``: not worse than the version that holds the target alias now by more than
  ``champion_tolerance`` (``HEIMDALL_GATE_CHAMPION_TOLERANCE``, default 2 %), the champion
  evaluated at decision time from its stored, sha256-checked bytes.

A candidate that fails keeps its version (the work is kept), tagged with the failed gate and its
numbers; nothing moves, and :class:`GateError` names the gate. ``force=True`` with a ``reason``
overrides, and the reason is recorded in the version's tags and the alias history.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from mlflow.models import MetricThreshold
from mlflow.models.evaluation import EvaluationResult
from mlflow.models.evaluation.validation import (
    ModelValidationFailedException,
    validate_evaluation_results,
)

from heimdall import registry
from heimdall.config import Settings, load_settings
from heimdall.errors import GateError, HeimdallError, InputError
from heimdall.heldout import HeldOut as HeldOut
from heimdall.heldout import HeldOutSet as HeldOutSet
from heimdall.registry import AliasChange, Gate
from heimdall.registry.names import check_alias, check_name, check_version
from heimdall.registry.names import check_override as check_override
from heimdall.storage import ObjectStore, open_store

log = structlog.get_logger(__name__)

GATE_TAG = "heimdall.gate."  # + alias: the failed gates of the last refused move, as JSON
FORCED_TAG = "heimdall.forced."  # + alias: why a move overrode failing gates
_METRIC = "median_error_km"
_ATTEMPTS = 3

# Measures a model, by URI, on the held-out set: ``heimdall.inference.evaluate_heldout`` with the
# caller's settings. Gates judge numbers; how a model is run to get them is the caller's.
Evaluator = Callable[[str], HeldOut]


@dataclass(frozen=True)
class GatePolicy:
    """The thresholds every alias or stage move is judged by."""

    baseline_fraction: float = 0.5
    champion_tolerance: float = 0.02

    def __post_init__(self) -> None:
        if self.baseline_fraction <= 0 or self.champion_tolerance < 0:
            raise InputError(
                "the baseline fraction must be positive and the champion tolerance at least 0"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> GatePolicy:
        return cls(settings.gate_baseline_fraction, settings.gate_champion_tolerance)


def judge(
    candidate: HeldOut,
    champion: HeldOut | None,
    policy: GatePolicy,
    *,
    altered: tuple[str, str] | None = None,
) -> tuple[Gate, ...]:
    """The baseline and champion gates of ``candidate``, each with its threshold and value.

    ``altered`` is ``(version, problem)`` of a holder whose stored bytes failed their check: it
    is no champion to beat, and the champion gate says so.
    """
    limit = policy.baseline_fraction * candidate.baseline_median_error_km
    gates = [
        Gate(
            "baseline",
            _passes(candidate.median_error_km, limit),
            f"median {candidate.median_error_km:.2f} km, limit {limit:.2f} km "
            f"({policy.baseline_fraction:g} × centre baseline "
            f"{candidate.baseline_median_error_km:.2f} km)",
        )
    ]
    if altered is not None:
        holder, problem = altered
        gates.append(
            Gate(
                "champion",
                True,
                f"skipped: version {holder}, which holds the alias, failed its integrity check "
                f"({problem}); judged on the baseline gate alone",
            )
        )
    elif champion is None:
        gates.append(Gate("champion", True, "no other version holds the alias"))
    else:
        ceiling = champion.median_error_km * (1 + policy.champion_tolerance)
        gates.append(
            Gate(
                "champion",
                _passes(candidate.median_error_km, ceiling),
                f"median {candidate.median_error_km:.2f} km, limit {ceiling:.2f} km (champion "
                f"version {champion.version} {champion.median_error_km:.2f} km "
                f"+ {policy.champion_tolerance:.0%})",
            )
        )
    return tuple(gates)


def _passes(value: float, ceiling: float) -> bool:
    """MLflow's own threshold check: ``value <= ceiling`` for a lower-is-better metric.

    MLflow logs its progress at INFO on a handler of its own; the verdict is reported by
    heimdall, so those lines are held back while it checks (a filter of this call's own, so
    concurrent checks never leave the logger changed).
    """
    chatty = logging.getLogger(validate_evaluation_results.__module__)
    quiet = logging.Filter()
    quiet.filter = lambda record: record.levelno >= logging.WARNING  # type: ignore[method-assign]
    chatty.addFilter(quiet)
    try:
        validate_evaluation_results(
            {_METRIC: MetricThreshold(threshold=ceiling, greater_is_better=False)},
            EvaluationResult(metrics={_METRIC: value}, artifacts={}),
        )
    except ModelValidationFailedException:
        return False
    finally:
        chatty.removeFilter(quiet)
    return True


def move_alias_gated(
    name: str,
    version: str,
    alias: str,
    *,
    evaluate: Evaluator,
    candidate: HeldOut | None = None,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
    policy: GatePolicy | None = None,
    force: bool = False,
    reason: str | None = None,
    action: str = "publish",
    read_bytes: bool = False,
) -> AliasChange:
    """Point ``alias`` at ``version`` only if it passes the baseline and champion gates.

    ``candidate`` is the version's evaluation when the caller has it (publish just made it from
    the same bytes); otherwise it is measured from the stored bytes. The champion is measured
    now; if another process moves the alias meanwhile, the decision is taken again.
    """
    check_name(name)  # every argument before the first tag is written, or a model evaluated
    version = check_version(version)
    check_alias(alias)
    check_override(force, reason)
    settings = settings or load_settings()
    store = store or open_store(settings)
    policy = policy or GatePolicy.from_settings(settings)
    mine = candidate or evaluate(f"models:/{name}/{version}")
    for _ in range(_ATTEMPTS):
        holder = registry.alias_holder(name, alias, settings=settings)
        champion, altered = _champion(name, version, holder, evaluate, store, settings)
        gates = judge(mine, champion, policy, altered=altered)
        failed = [g for g in gates if not g.passed]
        if failed and not force:
            _record_refusal(name, version, alias, failed, settings)
            raise GateError(
                f"{name} version {version} did not pass the {failed[0].name} gate for "
                f"{alias!r}: {failed[0].detail}. It stays registered (tag {GATE_TAG}{alias}); "
                "nothing moved. Override with --force --reason TEXT"
            )
        try:
            return registry.move_alias(
                name,
                version,
                alias,
                action=action,
                expected_previous=holder,
                gates=gates,
                reason=reason if force else None,
                previous_problem=altered[1] if altered else None,
                read_bytes=read_bytes,
                settings=settings,
                store=store,
            )
        except registry.AliasMovedError:
            log.info("gates.champion_changed", name=name, alias=alias)
    raise GateError(
        f"{name}@{alias} kept moving while version {version} was judged ({_ATTEMPTS} tries); "
        "run the command again"
    )


def _champion(
    name: str,
    version: str,
    holder: str | None,
    evaluate: Evaluator,
    store: ObjectStore,
    settings: Settings,
) -> tuple[HeldOut | None, tuple[str, str] | None]:
    """The holder of the alias measured now; or, when its stored bytes fail their check,
    ``(None, (holder, problem))``: an altered holder must not lock its alias."""
    if holder is None or holder == version:
        return None, None
    try:
        return evaluate(f"models:/{name}/{holder}"), None
    except HeimdallError as failed:
        # Whatever the evaluator made of it; only the registry's own check of the bytes decides,
        # and when that check cannot read them either, the evaluator's error says it first.
        try:
            problem = registry.bytes_problem(name, holder, store=store, settings=settings)
        except HeimdallError:
            raise failed from failed.__cause__
        if problem is None:
            raise
    log.warning("gates.champion_altered", name=name, version=holder, problem=problem)
    return None, (holder, problem)


def promote(
    name: str,
    version: str,
    *,
    evaluate: Evaluator,
    to: str = registry.PRODUCTION,
    force: bool = False,
    reason: str | None = None,
    settings: Settings | None = None,
    store: ObjectStore | None = None,
) -> AliasChange:
    """Point ``to`` at ``version`` behind every gate: READY, verified, bytes, baseline, champion."""
    return move_alias_gated(
        name,
        version,
        to,
        evaluate=evaluate,
        settings=settings,
        store=store,
        force=force,
        reason=reason,
        action="promote",
        read_bytes=True,
    )


def _record_refusal(
    name: str, version: str, alias: str, failed: list[Gate], settings: Settings
) -> None:
    detail = json.dumps([g.to_dict() for g in failed], separators=(",", ":"))
    registry.tag_version(name, version, {f"{GATE_TAG}{alias}": detail}, settings=settings)
    # The caller raises GateError with the same facts: an event for logs, not a second message.
    log.info("gates.refused", name=name, version=version, alias=alias, gate=failed[0].name)
