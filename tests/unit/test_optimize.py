"""Session settings, int8 / fp16 variants and their gates."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from heimdall import optimize
from heimdall.checkpoint import LoadedCheckpoint
from heimdall.data import generate
from heimdall.errors import InputError, ValidationError
from heimdall.export import ExportResult
from heimdall.files import sha256_file
from heimdall.model import INPUT_NAME, LocalizationNet
from heimdall.parity import parity_steps
from heimdall.runtime import RECOMMENDED_SESSION_SETTINGS, SessionSettings
from heimdall.validate import validate_onnx_model
from tests.unit.test_verify import assert_progress_counts_to_its_total

TASK_SAMPLES = 32


@pytest.fixture(scope="module")
def model(atto_checkpoint: LoadedCheckpoint) -> LocalizationNet:
    return atto_checkpoint.model.eval()


@pytest.fixture(scope="module")
def onnx_path(atto_onnx: ExportResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy: tests here write variants next to it."""
    path = tmp_path_factory.mktemp("optimize") / "atto.onnx"
    shutil.copyfile(atto_onnx.path, path)
    return path


@pytest.fixture(scope="module")
def int8_progress() -> list[tuple[int, int]]:
    """The progress calls the ``int8`` fixture's build made."""
    return []


@pytest.fixture(scope="module")
def int8(
    model: LocalizationNet, onnx_path: Path, int8_progress: list[tuple[int, int]]
) -> optimize.VariantResult:
    return optimize.build_variant(
        "int8",
        onnx_path,
        onnx_path.with_name("atto.int8.onnx"),
        model,
        calibration=16,
        task_samples=TASK_SAMPLES,
        progress=lambda done, total: int8_progress.append((done, total)),
    )


@pytest.fixture(scope="module")
def fp16(model: LocalizationNet, onnx_path: Path) -> optimize.VariantResult:
    return optimize.build_variant(
        "fp16", onnx_path, onnx_path.with_name("atto.fp16.onnx"), model, task_samples=TASK_SAMPLES
    )


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_session_candidates_differ_from_the_recommendation_in_one_way() -> None:
    recommended = RECOMMENDED_SESSION_SETTINGS.to_dict()
    for name, candidate in optimize.SESSION_CANDIDATES.items():
        changed = {k for k, v in candidate.to_dict().items() if recommended[k] != v}
        assert (name == "recommended") == (not changed)


def test_int8_variant_passes_its_gate_and_keeps_the_contract(
    int8: optimize.VariantResult,
) -> None:
    assert int8.passed, int8.reason
    assert int8.parity is not None and int8.parity.task is not None
    assert int8.parity.task.samples == TASK_SAMPLES
    validate_onnx_model(int8.path)
    json.dumps(int8.to_dict())


def test_int8_variant_is_static_qdq_and_smaller(
    int8: optimize.VariantResult, onnx_path: Path
) -> None:
    ops = {n.op_type for n in onnx.load(str(int8.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "DynamicQuantizeLinear" not in ops
    assert int8.size_bytes < onnx_path.stat().st_size / 2
    assert int8.recipe["calibration_samples"] == 16


def test_variants_record_what_they_are_and_their_source(
    int8: optimize.VariantResult, fp16: optimize.VariantResult, onnx_path: Path
) -> None:
    source = _props(onnx_path)
    for variant in (int8, fp16):
        props = _props(variant.path)
        assert props[optimize.METADATA_KEY_VARIANT] == variant.variant
        assert props[optimize.METADATA_KEY_SOURCE] == sha256_file(onnx_path)
        assert SessionSettings.from_metadata(props) == RECOMMENDED_SESSION_SETTINGS
        assert all(props[k] == v for k, v in source.items())


def test_fp16_variant_keeps_float32_io_and_output_tail(
    fp16: optimize.VariantResult, onnx_path: Path
) -> None:
    assert fp16.passed, fp16.reason
    validate_onnx_model(fp16.path)
    graph = onnx.load(str(fp16.path)).graph
    halves = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert halves, "weights should be float16"
    assert fp16.recipe["float32_nodes"], "the ops computing the outputs should stay float32"
    x, _ = generate(2, seed=1)
    out32 = ort.InferenceSession(str(onnx_path)).run(None, {INPUT_NAME: x})
    out16 = ort.InferenceSession(str(fp16.path)).run(None, {INPUT_NAME: x})
    assert all(o.dtype == np.float32 for o in out16)
    np.testing.assert_allclose(out16[0], out32[0], atol=0.05)


def test_variant_failing_its_gate_comes_back_not_passed(
    int8: optimize.VariantResult, model: LocalizationNet
) -> None:
    impossible = dataclasses.replace(optimize.VARIANT_GATES, max_abs=0.0)
    result = optimize.verify_variant(
        int8.path,
        model,
        variant="int8",
        source=int8.source,
        gates=impossible,
        batch_sizes=(1,),
        task_samples=0,
    )
    assert not result.passed
    assert "max abs diff" in result.reason


def test_build_variant_rejects_unknown_variant(model: LocalizationNet, onnx_path: Path) -> None:
    with pytest.raises(InputError, match="unknown variant"):
        optimize.build_variant("int4", onnx_path, onnx_path.with_name("x.onnx"), model)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["atto.onnx", "atto.int8.bin"])
def test_quantize_refuses_bad_output_paths(onnx_path: Path, name: str) -> None:
    with pytest.raises(InputError):
        optimize.quantize_int8(onnx_path, onnx_path.with_name(name))


def test_quantize_refuses_zero_calibration_samples(onnx_path: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="calibration"):
        optimize.quantize_int8(onnx_path, tmp_path / "q.onnx", calibration=0)


def test_save_optimized_of_a_file_that_is_not_onnx_is_a_validation_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")

    with pytest.raises(ValidationError, match=r"broken\.onnx is not an ONNX model"):
        optimize.save_optimized(broken, tmp_path / "opt.onnx")


def test_save_optimized_basic_passes_the_checker_and_agrees(
    onnx_path: Path, tmp_path: Path
) -> None:
    path = optimize.save_optimized(onnx_path, tmp_path / "opt.onnx", level="basic")
    validate_onnx_model(path)
    assert _props(path)[optimize.METADATA_KEY_VARIANT] == "optimized-basic"
    x, _ = generate(2, seed=2)
    ref = ort.InferenceSession(str(onnx_path)).run(None, {INPUT_NAME: x})
    got = ort.InferenceSession(str(path)).run(None, {INPUT_NAME: x})
    np.testing.assert_allclose(got[0], ref[0], atol=1e-4)


def test_build_variant_progress_counts_calibration_then_parity(
    int8: optimize.VariantResult, int8_progress: list[tuple[int, int]]
) -> None:
    total = optimize.calibration_batches(16) + parity_steps((1, 8), TASK_SAMPLES)
    assert int8.passed and total == 1 + 9
    assert int8_progress == [(done, total) for done in range(1, total + 1)]


def test_quantize_progress_follows_each_calibration_batch_and_changes_no_byte(
    onnx_path: Path, tmp_path: Path
) -> None:
    calls: list[tuple[int, int]] = []
    shown = optimize.quantize_int8(
        onnx_path,
        tmp_path / "shown.onnx",
        calibration=33,
        progress=lambda done, total: calls.append((done, total)),
    )
    silent = optimize.quantize_int8(onnx_path, tmp_path / "silent.onnx", calibration=33)
    assert calls == [(1, 3), (2, 3), (3, 3)]  # batches of 16, 16 and 1 samples
    assert shown.read_bytes() == silent.read_bytes()


def test_fp16_progress_counts_the_conversion_then_parity_and_changes_no_result(
    fp16: optimize.VariantResult, model: LocalizationNet, onnx_path: Path
) -> None:
    calls: list[tuple[int, int]] = []
    shown = optimize.build_variant(
        "fp16",
        onnx_path,
        onnx_path.with_name("atto.fp16-progress.onnx"),
        model,
        task_samples=TASK_SAMPLES,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert_progress_counts_to_its_total(calls)
    assert calls[0] == (1, 1 + parity_steps((1, 8), TASK_SAMPLES))
    ignored = {"path", "seconds", "parity"}
    assert {k: v for k, v in shown.to_dict().items() if k not in ignored} == {
        k: v for k, v in fp16.to_dict().items() if k not in ignored
    }
    assert shown.parity is not None and fp16.parity is not None
    assert dataclasses.replace(shown.parity, onnx_path=fp16.path) == fp16.parity


def test_more_calibration_samples_than_memory_holds_are_refused_before_quantizing(
    model: LocalizationNet, onnx_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match=r"^--calibration 100000000 needs about"):
        optimize.build_variant("int8", onnx_path, tmp_path / "never.onnx", model, calibration=10**8)
    assert not (tmp_path / "never.onnx").exists()


def test_the_calibration_memory_estimate_counts_features_and_collected_activations(
    model: LocalizationNet,
) -> None:
    with pytest.raises(InputError, match=r"\(256 KiB a sample, estimated\)"):
        optimize.check_calibration_memory(model.config, 1024, available=255 * 2**20)
    optimize.check_calibration_memory(model.config, 1024, available=257 * 2**20)
