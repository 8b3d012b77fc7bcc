"""benchmark(): structure and sanity of the numbers, never their speed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from heimdall import bench, timing
from heimdall.checkpoint import LoadedCheckpoint
from heimdall.errors import InputError
from heimdall.export import ExportResult
from heimdall.model import LocalizationNet
from heimdall.runtime import SessionSettings
from tests.unit.test_verify import assert_progress_counts_to_its_total

ROUNDS = 5  # odd, so a median of per-round ratios is exactly the reciprocal of the reverse one


@pytest.fixture(scope="module")
def model(atto_checkpoint: LoadedCheckpoint) -> LocalizationNet:
    return atto_checkpoint.model.eval()


@pytest.fixture(scope="module")
def onnx_path(atto_onnx: ExportResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy: tests here write variants next to it."""
    path = tmp_path_factory.mktemp("bench") / "atto.onnx"
    shutil.copyfile(atto_onnx.path, path)
    return path


@pytest.fixture(scope="module")
def result(model: LocalizationNet, onnx_path: Path) -> bench.BenchmarkResult:
    return bench.benchmark(
        model,
        {"fp32": onnx_path, "fp32-extended": onnx_path},
        batch_sizes=(1, 2),
        threads=1,
        budget_s=0.01,
        settings={
            "fp32": SessionSettings(),
            "fp32-extended": SessionSettings(graph_optimization_level="extended"),
        },
        min_iterations=ROUNDS,
        max_iterations=ROUNDS,
        peak=False,
    )


def test_benchmark_times_every_engine_at_every_batch_size(result: bench.BenchmarkResult) -> None:
    pairs = {(t.engine, t.batch_size) for t in result.timings}
    assert pairs == {(e, b) for e in ("pytorch", "fp32", "fp32-extended") for b in (1, 2)}
    assert all(t.iterations == ROUNDS for t in result.timings)
    assert [e.name for e in result.engines] == ["pytorch", "fp32", "fp32-extended"]
    assert result.engines[1].settings == SessionSettings().to_dict()


def test_benchmark_percentiles_are_positive_and_ordered(result: bench.BenchmarkResult) -> None:
    for t in result.timings:
        assert 0 < t.min_ms <= t.p50_ms <= t.p90_ms <= t.p99_ms
        assert t.min_ms <= t.mean_ms and t.stdev_ms >= 0


def test_benchmark_throughput_and_gflops_follow_from_latency(
    result: bench.BenchmarkResult,
) -> None:
    for t in result.timings:
        assert t.throughput == pytest.approx(t.batch_size / (t.mean_ms / 1e3))
        expected = result.flops_per_sample * t.batch_size / (t.p50_ms / 1e3) / 1e9
        assert t.gflops == pytest.approx(expected)


def test_benchmark_pairwise_ratios_are_reciprocal(result: bench.BenchmarkResult) -> None:
    for batch in (1, 2):
        torch_t = result.timing("pytorch", batch)
        onnx_t = result.timing("fp32", batch)
        assert onnx_t.ratios["pytorch"] == pytest.approx(1 / torch_t.ratios["fp32"])
        assert onnx_t.speedup_vs_pytorch == pytest.approx(1 / onnx_t.ratios["pytorch"])
        assert torch_t.speedup_vs_pytorch is None
        assert set(onnx_t.ratios) == {"pytorch", "fp32-extended"}


def test_benchmark_uses_one_thread_count_and_restores_torch(
    model: LocalizationNet, onnx_path: Path
) -> None:
    before = torch.get_num_threads()
    result = bench.benchmark(
        model, onnx_path, batch_sizes=(1,), threads=1, budget_s=0.01, peak=False
    )
    assert result.threads == 1 and result.environment.threads == 1
    assert result.engines[1].settings is not None
    assert torch.get_num_threads() == before
    assert result.engines[1].name == "onnx"


def test_benchmark_result_is_json_serialisable(result: bench.BenchmarkResult) -> None:
    data = json.loads(json.dumps(result.to_dict()))
    assert data["backbone"] == "atto"
    assert data["timings"][1]["speedup_vs_pytorch"] > 0
    assert data["environment"]["versions"]["onnxruntime"]


def test_markdown_table_has_one_row_per_timing(result: bench.BenchmarkResult) -> None:
    lines = result.to_markdown().splitlines()
    assert len(lines) == 2 + len(result.timings)
    assert len({line.count("|") for line in lines}) == 1


def test_table_rows_name_every_engine_and_batch_with_the_same_columns(
    result: bench.BenchmarkResult,
) -> None:
    rows = result.rows()

    assert [(r["engine"], int(r["batch"])) for r in rows] == sorted(
        ((t.engine, t.batch_size) for t in result.timings),
        key=lambda eb: (eb[1], eb[0] != "pytorch"),
    )
    assert len({tuple(r) for r in rows}) == 1
    fp32 = next(r for r in rows if r["engine"] != "pytorch")
    assert float(fp32["p50 ms"]) == pytest.approx(
        result.timing(fp32["engine"], int(fp32["batch"])).p50_ms, abs=0.005
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_sizes": ()}, "batch sizes"),
        ({"batch_sizes": (0,)}, "batch sizes"),
        ({"budget_s": 0}, "budget_s"),
        ({"budget_s": float("inf")}, "budget_s"),
        ({"budget_s": float("nan")}, "budget_s"),
        ({"threads": -1}, "threads must be positive"),
        ({"min_iterations": 3, "max_iterations": 2}, "min_iterations"),
    ],
)
def test_benchmark_rejects_bad_arguments(
    model: LocalizationNet, onnx_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        bench.benchmark(model, onnx_path, peak=False, **kwargs)  # type: ignore[arg-type]


def test_benchmark_rejects_missing_file_and_reserved_name(
    model: LocalizationNet, onnx_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match="not found"):
        bench.benchmark(model, tmp_path / "missing.onnx", peak=False)
    with pytest.raises(InputError, match="PyTorch engine"):
        bench.benchmark(model, {"pytorch": onnx_path}, peak=False)


def test_benchmark_refuses_different_thread_counts(model: LocalizationNet, onnx_path: Path) -> None:
    settings = {"a": SessionSettings(intra_op_threads=1), "b": SessionSettings(intra_op_threads=2)}
    with pytest.raises(InputError, match="same count"):
        bench.benchmark(model, {"a": onnx_path, "b": onnx_path}, settings=settings, peak=False)


def test_benchmark_progress_follows_each_tenth_of_the_rounds_of_each_batch_size(
    model: LocalizationNet, onnx_path: Path
) -> None:
    calls: list[tuple[int, int]] = []
    result = bench.benchmark(
        model,
        onnx_path,
        batch_sizes=(1, 2),
        threads=1,
        budget_s=0.01,
        min_iterations=ROUNDS,
        max_iterations=ROUNDS,
        peak=False,
        progress=lambda done, total: calls.append((done, total)),
    )
    # With min = max rounds the share is rounds / ROUNDS: tenths 2, 4, 6, 8, then the end.
    steps = timing.MEASURE_STEPS
    assert calls == [(d, 2 * steps) for d in (2, 4, 6, 8, 9, 10, 12, 14, 16, 18, 19, 20)]
    assert_progress_counts_to_its_total(calls)
    assert all(t.iterations == ROUNDS for t in result.timings)
