"""Session settings as data, the provider policy, and open_session's one error style."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from heimdall import runtime
from heimdall.errors import InputError
from heimdall.export import ExportResult
from heimdall.runtime import (
    CPU,
    METADATA_KEY_SESSION,
    RECOMMENDED_SESSION_SETTINGS,
    SessionSettings,
    open_session,
    preferred_providers,
    recorded_settings,
    select_providers,
    session_options,
)


def test_session_settings_round_trip_through_metadata() -> None:
    settings = SessionSettings(graph_optimization_level="extended", allow_spinning=False)
    assert SessionSettings.from_metadata(settings.to_metadata()) == settings
    assert SessionSettings.from_metadata({}) is None


def test_session_settings_reject_unknown_level_and_bad_metadata() -> None:
    with pytest.raises(InputError, match="optimization level"):
        SessionSettings(graph_optimization_level="max")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="not valid settings"):
        SessionSettings.from_metadata({METADATA_KEY_SESSION: '{"x": 1}'})


def test_session_options_apply_every_setting() -> None:
    settings = SessionSettings(
        graph_optimization_level="extended", allow_spinning=False, enable_mem_pattern=False
    )
    options = session_options(threads=3, settings=settings)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert options.intra_op_num_threads == 3
    assert options.enable_mem_pattern is False
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_recorded_settings_prefer_the_models_metadata_over_the_recommendation() -> None:
    parallel = SessionSettings(parallel_execution=True, inter_op_threads=2)

    assert recorded_settings(parallel.to_metadata()) == parallel
    assert recorded_settings({}) == RECOMMENDED_SESSION_SETTINGS


def test_mlflow_options_carry_what_mlflows_onnx_loader_applies() -> None:
    settings = SessionSettings(
        graph_optimization_level="extended", parallel_execution=True, inter_op_threads=2
    )

    options = settings.to_mlflow_options()

    assert options["graph_optimization_level"] == int(
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    )
    assert options["execution_mode"] == "parallel"
    assert options["inter_op_num_threads"] == 2
    applied = settings.to_session_options()
    assert options["extra_session_config"] == {
        key: applied.get_session_config_entry(key) for key in settings.config_entries()
    }


def test_preferred_providers_put_gpus_first_and_cpu_last() -> None:
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider"]
    assert preferred_providers(available) == ["CUDAExecutionProvider", CPU]
    assert preferred_providers([]) == [CPU]


def test_unavailable_providers_fall_back_to_cpu() -> None:
    assert select_providers(["NoSuchExecutionProvider"]) == [CPU]
    assert select_providers(None) == [CPU]
    assert select_providers(["CUDAExecutionProvider"])[-1] == CPU


def test_open_session_loads_serialized_bytes(atto_onnx: ExportResult) -> None:
    session = open_session(atto_onnx.path.read_bytes())

    x = np.zeros((1, 3, 128, 32), np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (1, 2)


@pytest.mark.parametrize("as_bytes", [False, True])
def test_an_unloadable_model_is_one_input_error_line_under_its_name(
    tmp_path: Path, as_bytes: bool
) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not an onnx file\n" * 4)

    with pytest.raises(InputError) as failure:
        open_session(path.read_bytes() if as_bytes else path, name="models:/loc@champion")

    message = str(failure.value)
    assert message.startswith("models:/loc@champion: ONNX Runtime cannot load the model: ")
    assert "\n" not in message
    assert isinstance(failure.value.__cause__, runtime.ORT_ERRORS)
