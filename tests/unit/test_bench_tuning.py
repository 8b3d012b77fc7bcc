"""benchmarks/tune_sessions.py: session candidates timed against each other, ORT op profiles."""

from __future__ import annotations

import json

import pytest

from benchmarks.tune_sessions import profile_ops, tune_session
from heimdall.export import ExportResult
from heimdall.runtime import SessionSettings


def test_tune_session_times_every_candidate_and_picks_the_lowest_p50(
    atto_onnx: ExportResult,
) -> None:
    candidates = {
        "all": SessionSettings(),
        "no-spinning": SessionSettings(allow_spinning=False),
    }
    tuning = tune_session(atto_onnx.path, candidates, threads=1, budget_s=0.01)
    assert {t.engine for t in tuning.timings} == set(candidates)
    assert tuning.best == min(tuning.timings, key=lambda t: t.p50_ms).engine
    assert set(tuning.load_seconds) == set(candidates)
    assert len(tuning.to_markdown().splitlines()) == 2 + len(candidates)
    json.dumps(tuning.to_dict())


def test_profile_ops_splits_depthwise_convs_and_shares_sum_to_one(atto_onnx: ExportResult) -> None:
    ops = profile_ops(atto_onnx.path, runs=1, threads=1)
    labels = {op.op for op in ops}
    assert "Conv depthwise 7x7" in labels and "MatMul" in labels
    assert sum(op.share for op in ops) == pytest.approx(1.0)
    assert [op.ms_per_run for op in ops] == sorted((op.ms_per_run for op in ops), reverse=True)
