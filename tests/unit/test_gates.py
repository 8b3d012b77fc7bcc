"""The gate arithmetic: thresholds, tolerance and the override rules (no registry needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from heimdall.config import Settings
from heimdall.errors import InputError, StorageError
from heimdall.gates import GatePolicy, HeldOut, HeldOutSet, check_override, judge, promote
from heimdall.storage import LocalStore


def held_out(median: float, baseline: float = 100.0, version: str | None = None) -> HeldOut:
    return HeldOut(
        samples=256,
        seed=1,
        identity="synthetic-v1/seed-1/n-256",
        version=version,
        sha256="0" * 64,
        median_error_km=median,
        p90_error_km=2 * median,
        baseline_median_error_km=baseline,
        true=[],
        predicted=[],
    )


@pytest.mark.parametrize(("median", "passed"), [(49.9, True), (50.0, True), (50.1, False)])
def test_the_baseline_gate_allows_at_most_the_fraction_of_the_centre_error(
    median: float, passed: bool
) -> None:
    (baseline, _) = judge(held_out(median), None, GatePolicy(baseline_fraction=0.5))
    assert (baseline.name, baseline.passed) == ("baseline", passed)
    assert "limit 50.00 km" in baseline.detail


@pytest.mark.parametrize(("median", "passed"), [(20.0, True), (20.4, True), (20.5, False)])
def test_the_champion_gate_allows_the_tolerance_and_no_more(median: float, passed: bool) -> None:
    champion = held_out(20.0, version="3")
    (_, gate) = judge(held_out(median), champion, GatePolicy(champion_tolerance=0.02))
    assert (gate.name, gate.passed) == ("champion", passed)
    assert "champion version 3" in gate.detail


def test_without_a_champion_the_champion_gate_passes_and_says_why() -> None:
    (_, gate) = judge(held_out(10.0), None, GatePolicy())
    assert gate.passed and "no other version" in gate.detail


def test_the_default_policy_comes_from_settings_and_is_documented_in_the_issue() -> None:
    assert GatePolicy.from_settings(Settings()) == GatePolicy(0.5, 0.02)
    assert HeldOutSet().identity == "synthetic-v1/seed-917401/n-256"


@pytest.mark.parametrize(("force", "reason"), [(True, None), (True, "  "), (False, "because")])
def test_force_and_reason_go_together(force: bool, reason: str | None) -> None:
    with pytest.raises(InputError):
        check_override(force, reason)


def test_a_policy_that_lets_everything_or_nothing_through_is_refused() -> None:
    with pytest.raises(InputError):
        GatePolicy(baseline_fraction=0)
    with pytest.raises(InputError):
        GatePolicy(champion_tolerance=-0.1)


def test_judging_prints_none_of_mlflows_info_lines(capfd: pytest.CaptureFixture[str]) -> None:
    """Used as a library, a gate check stays quiet; its verdict is heimdall's to report."""
    judge(held_out(20.0), held_out(20.0, version="3"), GatePolicy())

    out, err = capfd.readouterr()
    assert "validation" not in (out + err).lower()


@pytest.mark.parametrize(("version", "message"), [("latest", "not a version number"), ("1.0", "")])
def test_promote_refuses_a_version_that_is_no_number_before_evaluating(
    tmp_path: Path, version: str, message: str
) -> None:
    """``promote NAME latest`` used to evaluate for seconds before MLflow refused it."""

    def evaluate(uri: str) -> HeldOut:
        raise AssertionError(f"evaluated {uri} before checking the version")

    settings = Settings(data_dir=tmp_path, tracking_uri=None)
    with pytest.raises(InputError, match=message or "version number"):
        promote("heimdall-x", version, evaluate=evaluate, settings=settings)
    assert not (tmp_path / "mlflow.db").exists()  # nothing opened, nothing written


@pytest.mark.parametrize(
    ("check", "outcome"),
    [
        (lambda: "model.onnx now has sha256 0…", ("1", "model.onnx now has sha256 0…")),
        (lambda: None, "store down"),  # intact bytes: the evaluator's own failure stands
        (lambda: (_ for _ in ()).throw(StorageError("cannot read")), "store down"),
    ],
)
def test_a_champion_that_cannot_be_measured_is_skipped_only_when_its_bytes_are_altered(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, check: Any, outcome: object
) -> None:
    from heimdall import gates

    def evaluate(uri: str) -> HeldOut:
        raise StorageError("store down")

    monkeypatch.setattr(gates.registry, "bytes_problem", lambda *_, **__: check())
    settings = Settings(data_dir=tmp_path, tracking_uri=None)
    if isinstance(outcome, str):
        with pytest.raises(StorageError, match=outcome):
            gates._champion("m", "2", "1", evaluate, LocalStore(tmp_path), settings)
    else:
        assert gates._champion("m", "2", "1", evaluate, LocalStore(tmp_path), settings) == (
            None,
            outcome,
        )
