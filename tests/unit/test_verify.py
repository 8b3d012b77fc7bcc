"""verify_parity: PyTorch vs ONNX Runtime numbers, gates and failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from heimdall.checkpoint import LoadedCheckpoint
from heimdall.errors import VerificationError
from heimdall.export import ExportResult
from heimdall.verify import Gates, ParityResult, verify_parity

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parity(atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint) -> ParityResult:
    return verify_parity(
        atto_onnx.path,
        atto_checkpoint.model,
        batch_sizes=(1, 64),
        task_samples=32,
        intra_op_threads=1,
    )


def _altered(source: Path, target: Path, value: float) -> Path:
    """Copy ``source`` with one element of the stem conv weight set to ``value``."""
    proto = onnx.load(str(source))
    stem = next(t for t in proto.graph.initializer if list(t.dims) == [40, 3, 4, 4])
    weights = numpy_helper.to_array(stem).copy()
    weights[0, 0, 0, 0] = np.float32(value)
    stem.CopyFrom(numpy_helper.from_array(weights, stem.name))
    onnx.save(proto, str(target))
    return target


def test_export_passes_fp32_gates_at_batch_1_and_64(parity: ParityResult) -> None:
    assert parity.passed
    assert sorted({d.batch_size for d in parity.diffs}) == [1, 64]
    assert all(d.finite and d.mae <= 1e-5 and d.max_abs <= 1e-4 for d in parity.diffs)


def test_task_check_measures_metres_between_positions(parity: ParityResult) -> None:
    assert parity.task is not None
    assert parity.task.samples == 32
    assert 0 <= parity.task.mean_distance_m <= 1.0
    assert parity.task.median_error_km_torch > 0


def test_result_serialises_to_json(parity: ParityResult) -> None:
    data = json.loads(json.dumps(parity.to_dict()))
    assert data["passed"] is True
    assert {d["output"] for d in data["diffs"]} == {"positions", "uncertainties"}


def test_one_altered_weight_fails_parity_with_the_numbers(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    path = _altered(atto_onnx.path, tmp_path / "m.onnx", 0.5)
    with pytest.raises(VerificationError, match=r"positions @ batch 2: MAE \d.*> 1e-05"):
        verify_parity(
            path, atto_checkpoint.model, batch_sizes=(2,), task_samples=8, intra_op_threads=1
        )


def test_looser_gates_accept_what_fp32_gates_refuse(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    path = _altered(atto_onnx.path, tmp_path / "m.onnx", 0.5)
    loose = Gates(mae=None, max_abs=None, mean_distance_m=None)
    result = verify_parity(
        path, atto_checkpoint.model, batch_sizes=(2,), task_samples=8, gates=loose
    )
    assert result.passed
    assert max(d.max_abs for d in result.diffs) > 1e-4


def test_nan_outputs_fail_whatever_the_gates(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    path = _altered(atto_onnx.path, tmp_path / "m.onnx", float("nan"))
    loose = Gates(mae=None, max_abs=None, mean_distance_m=None)
    result = verify_parity(
        path,
        atto_checkpoint.model,
        batch_sizes=(1,),
        task_samples=0,
        gates=loose,
        raise_on_failure=False,
    )
    assert not result.passed
    assert any("NaN or Inf" in f for f in result.failures)


def test_verify_restores_the_train_mode_it_found(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    model = atto_checkpoint.model
    model.train()
    try:
        verify_parity(atto_onnx.path, model, batch_sizes=(1,), task_samples=0, intra_op_threads=1)
        assert model.training
    finally:
        model.eval()
