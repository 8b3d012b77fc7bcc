"""verify_parity: PyTorch vs ONNX Runtime numbers, gates and failures."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from heimdall.checkpoint import LoadedCheckpoint
from heimdall.contract import Progress
from heimdall.errors import InputError, VerificationError
from heimdall.export import ExportResult, export_to_onnx
from heimdall.model import ModelConfig
from heimdall.parity import parity_steps
from heimdall.verify import (
    Gates,
    LineageWarning,
    ParityResult,
    check_batch_memory,
    check_lineage,
    record_torch_reference,
    verify_parity,
)

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


def assert_progress_counts_to_its_total(calls: list[tuple[int, int]]) -> None:
    """The (done, total) calls a progress callback recorded: one total, done rising to it."""
    assert calls, "progress was never called"
    assert len({total for _, total in calls}) == 1, calls
    done = [d for d, _ in calls]
    assert done[0] > 0 and done == sorted(set(done)) and done[-1] == calls[0][1], calls


def _edited(source: Path, target: Path, edit: Callable[[onnx.ModelProto], None]) -> Path:
    proto = onnx.load(str(source))
    edit(proto)
    onnx.save(proto, str(target))
    return target


def _set_first(
    proto: onnx.ModelProto, match: Callable[[onnx.TensorProto], bool], value: float
) -> None:
    tensor = next(t for t in proto.graph.initializer if match(t))
    values = numpy_helper.to_array(tensor).copy()
    values.flat[0] = np.float32(value)
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def _altered(source: Path, target: Path, value: float) -> Path:
    """Copy ``source`` with one element of the stem conv weight set to ``value``."""
    return _edited(
        source, target, lambda p: _set_first(p, lambda t: list(t.dims) == [40, 3, 4, 4], value)
    )


def test_export_passes_fp32_gates_at_batch_1_and_64(parity: ParityResult) -> None:
    assert parity.passed
    assert sorted({d.batch_size for d in parity.diffs}) == [1, 64]
    assert all(d.finite and d.mae <= 1e-5 and d.max_abs <= 1e-4 for d in parity.diffs)


def test_task_check_measures_metres_between_positions(parity: ParityResult) -> None:
    assert parity.task is not None
    assert parity.task.samples == 32
    assert 0 <= parity.task.mean_distance_m <= 1.0
    assert parity.task.median_error_km_torch > 0


def test_recorded_reference_outputs_give_the_same_result_as_the_model(
    parity: ParityResult, atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    options = {"batch_sizes": (1, 64), "task_samples": 32, "intra_op_threads": 1}
    recorded = record_torch_reference(atto_checkpoint.model, **options)  # type: ignore[arg-type]

    assert verify_parity(atto_onnx.path, recorded, **options) == parity  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no recorded reference output"):
        verify_parity(atto_onnx.path, recorded, batch_sizes=(2,), task_samples=0)


def test_result_serialises_to_json(parity: ParityResult) -> None:
    data = json.loads(json.dumps(parity.to_dict()))
    assert data["passed"] is True
    assert {d["output"] for d in data["diffs"]} == {"positions", "uncertainties"}


def test_positions_are_compared_before_the_region_denormalisation(parity: ParityResult) -> None:
    # In degrees around 45° float32's own step (3.8e-6) would hide anything smaller.
    positions = [d for d in parity.diffs if d.output == "positions"]
    assert max(d.max_abs for d in positions) < np.spacing(np.float32(45.0)) / 4
    assert parity.to_dict()["units"] == "normalized region units"


def test_result_records_its_gates_and_a_verdict_per_row(parity: ParityResult) -> None:
    data = json.loads(json.dumps(parity.to_dict()))
    assert data["gates"] == Gates().to_dict()
    assert [d["passed"] for d in data["diffs"]] == [True] * 4
    assert data["task"]["passed"] is True


def test_rows_over_a_gate_are_marked_failed(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    path = _altered(atto_onnx.path, tmp_path / "m.onnx", 0.5)
    result = verify_parity(
        path, atto_checkpoint.model, batch_sizes=(2,), task_samples=8, raise_on_failure=False
    )
    assert [d.passed for d in result.diffs] == [False, False]
    assert result.task is not None and not result.task.passed


def test_denormalisation_centre_one_float32_step_off_fails(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    # 3.8e-6 degrees (0.4 m): under any tolerance in degrees, but not the model's centre.
    shifted = float(np.nextafter(np.float32(45.0), np.float32(90.0)))
    path = _edited(
        atto_onnx.path,
        tmp_path / "m.onnx",
        lambda p: _set_first(p, lambda t: t.name == "coord_center", shifted),
    )
    with pytest.raises(VerificationError, match=r"de-normalisation uses coord_center \[45\.0000"):
        verify_parity(
            path, atto_checkpoint.model, batch_sizes=(1,), task_samples=8, intra_op_threads=1
        )


def test_graph_that_does_not_end_in_the_denormalisation_is_refused_in_one_line(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    def subtract_centre(proto: onnx.ModelProto) -> None:
        next(n for n in proto.graph.node if "positions" in n.output).op_type = "Sub"

    path = _edited(atto_onnx.path, tmp_path / "m.onnx", subtract_centre)
    with pytest.raises(VerificationError) as failure:
        verify_parity(path, atto_checkpoint.model, batch_sizes=(1,), task_samples=0)
    assert "not computed as normalized × coord_scale + coord_center" in str(failure.value)
    assert "\n" not in str(failure.value)


def test_external_data_export_verifies_from_its_own_folder(
    atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    # The comparison graph reaches ONNX Runtime as bytes; its data file must still be found.
    exported = export_to_onnx(atto_checkpoint.model, tmp_path / "m.onnx", external_data=True)
    result = verify_parity(
        exported.path, atto_checkpoint.model, batch_sizes=(2,), task_samples=0, intra_op_threads=1
    )
    assert exported.data_files and result.passed


def test_lineage_mismatch_is_one_line_naming_both_sha256_before_any_inference(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_inference(*args: object, **kwargs: object) -> None:
        raise AssertionError("an ONNX Runtime session was opened")

    monkeypatch.setattr(ort, "InferenceSession", no_inference)
    other = "ab" * 32
    with pytest.raises(VerificationError) as failure:
        verify_parity(atto_onnx.path, atto_checkpoint.model, (1,), checkpoint_sha256=other)
    message = str(failure.value)
    assert "\n" not in message
    assert atto_checkpoint.sha256[:12] in message and other[:12] in message
    assert "export this checkpoint again" in message


def test_matching_lineage_is_recorded_in_the_result(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    result = verify_parity(
        atto_onnx.path,
        atto_checkpoint.model,
        (1,),
        task_samples=0,
        intra_op_threads=1,
        checkpoint_sha256=atto_checkpoint.sha256,
    )
    assert result.lineage == "matched" and result.to_dict()["lineage"] == "matched"


def test_file_without_recorded_lineage_warns_and_still_verifies(
    atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    exported = export_to_onnx(atto_checkpoint.model, tmp_path / "m.onnx")
    with pytest.warns(LineageWarning, match=r"records no heimdall\.checkpoint_sha256"):
        result = verify_parity(
            exported.path,
            atto_checkpoint.model,
            (1,),
            task_samples=0,
            intra_op_threads=1,
            checkpoint_sha256=atto_checkpoint.sha256,
        )
    assert result.passed and result.lineage == "unrecorded"


def test_check_lineage_compares_without_running_the_model(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    assert check_lineage(atto_onnx.path, atto_checkpoint.sha256) == "matched"
    with pytest.raises(VerificationError, match="was exported from checkpoint sha256"):
        check_lineage(atto_onnx.path, "0" * 64)


def test_one_altered_weight_fails_parity_with_the_numbers(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint, tmp_path: Path
) -> None:
    path = _altered(atto_onnx.path, tmp_path / "m.onnx", 0.5)
    with pytest.raises(
        VerificationError, match=r"positions @ batch 2: MAE \S+ > 1e-06 normalized region units"
    ):
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


def test_progress_follows_each_input_kind_and_task_chunk_without_changing_the_result(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    calls: list[tuple[int, int]] = []

    def verify(progress: Progress | None) -> ParityResult:
        return verify_parity(
            atto_onnx.path,
            atto_checkpoint.model,
            batch_sizes=(1, 3),
            task_samples=70,
            intra_op_threads=1,
            progress=progress,
        )

    silent = verify(None)
    shown = verify(lambda done, total: calls.append((done, total)))
    total = parity_steps((1, 3), 70)
    assert total == 2 * 4 + 2  # four input kinds per batch size, 64-sample task chunks
    assert calls == [(done, total) for done in range(1, total + 1)]
    assert_progress_counts_to_its_total(calls)
    assert shown.to_dict() == silent.to_dict()


def test_intra_op_threads_sets_pytorch_threads_for_the_reference_and_restores_them(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    verify_parity(
        atto_onnx.path,
        atto_checkpoint.model,
        batch_sizes=(1,),
        task_samples=0,
        intra_op_threads=before + 1,
        progress=lambda done, total: seen.append(torch.get_num_threads()),
    )
    assert seen == [before + 1] * 4
    assert torch.get_num_threads() == before


def test_a_batch_size_beyond_memory_is_refused_before_running_either_side(
    atto_onnx: ExportResult, atto_checkpoint: LoadedCheckpoint
) -> None:
    with pytest.raises(InputError, match=r"^verify at batch size 100000000 needs about"):
        verify_parity(atto_onnx.path, atto_checkpoint.model, [1, 100_000_000])
    with pytest.raises(InputError, match=r"^verify at batch size 100000000 needs about"):
        record_torch_reference(atto_checkpoint.model, [100_000_000])


def test_the_verify_memory_estimate_grows_with_the_backbone_width() -> None:
    atto, large = ModelConfig(backbone="atto"), ModelConfig(backbone="large")

    with pytest.raises(InputError, match=r"\(1\.4 MiB a sample, estimated\)"):
        check_batch_memory(atto, [64], available=80 * 2**20)
    check_batch_memory(atto, [64], available=100 * 2**20)
    with pytest.raises(InputError, match=r"\(6\.8 MiB a sample, estimated\)"):
        check_batch_memory(large, [64], available=100 * 2**20)
