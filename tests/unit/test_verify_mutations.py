"""Mutation tests for verify_parity: small, plausible export bugs fail; clean exports pass.

Each mutant is an ONNX file that differs from the PyTorch reference the way a real export bug
would: one large weight off by 10 %, one layer scaled by 0.2 %, a normalisation epsilon
changed, GELU approximated with tanh. Random weights use layer scales like a trained
ConvNeXt's (the 1e-6 init makes every block a no-op, so block mutants would be invisible).
``benchmarks/verify_margins.py`` prints the margins these tests rely on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from heimdall.data import generate
from heimdall.export import export_to_onnx
from heimdall.model import LocalizationNet, ModelConfig
from heimdall.verify import INPUT_KINDS, ParityResult, verify_parity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLEAN_BATCH_SIZES = (1, 2, 3, 8, 64)
MUTANT_BATCH_SIZES = (8,)
TASK_SAMPLES = 32
TRAINED = -1  # the seed that names the briefly trained model


def random_model(backbone: str, seed: int) -> LocalizationNet:
    """Random weights with trained-like layer scales and BatchNorm statistics (eval mode)."""
    torch.manual_seed(seed)
    model = LocalizationNet(ModelConfig(backbone=backbone))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-1.0, 1.0, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        for name, param in model.named_parameters():
            if name.endswith("layer_scale"):
                param.uniform_(0.1, 1.0, generator=generator)
    return model.eval()


def trained_model(backbone: str, steps: int = 4, batch: int = 16) -> LocalizationNet:
    """A random model after a few AdamW steps on synthetic data (BatchNorm stats updated)."""
    model = random_model(backbone, seed=7)
    x, y = generate(steps * batch, seed=5)
    center, scale = np.asarray(model.config.center), np.asarray(model.config.scale)
    targets = torch.from_numpy(((y - center) / scale).astype(np.float32))
    inputs = torch.from_numpy(x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.GaussianNLLLoss()
    model.train()
    for i in range(0, steps * batch, batch):
        positions, sigma = model.forward_normalized(inputs[i : i + batch])
        loss = loss_fn(positions, targets[i : i + batch], sigma**2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def make_model(backbone: str, seed: int) -> LocalizationNet:
    return trained_model(backbone) if seed == TRAINED else random_model(backbone, seed)


def _largest_matrix(proto: onnx.ModelProto) -> onnx.TensorProto:
    return max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))


def _rewrite(tensor: onnx.TensorProto, change: Callable[[np.ndarray], None]) -> None:
    values = numpy_helper.to_array(tensor).copy()
    change(values)
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def one_weight_up_10_percent(proto: onnx.ModelProto) -> None:
    def change(w: np.ndarray) -> None:
        w.flat[np.abs(w).argmax()] *= np.float32(1.1)

    _rewrite(_largest_matrix(proto), change)


def one_layer_times_1_002(proto: onnx.ModelProto) -> None:
    def change(w: np.ndarray) -> None:
        w *= np.float32(1.002)

    _rewrite(_largest_matrix(proto), change)


def _set_epsilon(proto: onnx.ModelProto, op_type: str, epsilon: float) -> None:
    nodes = [n for n in proto.graph.node if n.op_type == op_type]
    assert nodes, f"no {op_type} node to mutate"
    for node in nodes:
        attribute = next(a for a in node.attribute if a.name == "epsilon")
        assert attribute.f != np.float32(epsilon)
        attribute.f = epsilon


def layernorm_epsilon_1e_5(proto: onnx.ModelProto) -> None:
    _set_epsilon(proto, "LayerNormalization", 1e-5)  # the model's is 1e-6


def batchnorm_epsilon_1e_3(proto: onnx.ModelProto) -> None:
    _set_epsilon(proto, "BatchNormalization", 1e-3)  # the model's is 1e-5


def gelu_tanh(model: LocalizationNet, target: Path) -> None:
    """Export a copy whose GELUs use the tanh approximation (an exporter's shortcut)."""
    approximated = copy.deepcopy(model)
    gelus = [m for m in approximated.modules() if isinstance(m, nn.GELU)]
    assert gelus
    for module in gelus:
        module.approximate = "tanh"
    export_to_onnx(approximated, target)


GraphMutant = Callable[[onnx.ModelProto], None]
GRAPH_MUTANTS: dict[str, GraphMutant] = {
    "one weight +10%": one_weight_up_10_percent,
    "one layer x1.002": one_layer_times_1_002,
    "LayerNorm eps 1e-5": layernorm_epsilon_1e_5,
    "BatchNorm eps 1e-3": batchnorm_epsilon_1e_3,
}
MUTANTS = (*GRAPH_MUTANTS, "GELU tanh")


def build_mutant(name: str, model: LocalizationNet, clean: Path, target: Path) -> Path:
    """Write mutant ``name`` of ``clean`` (the export of ``model``) to ``target``."""
    if name in GRAPH_MUTANTS:
        proto = onnx.load(str(clean))
        GRAPH_MUTANTS[name](proto)
        onnx.save(proto, str(target))
    else:
        gelu_tanh(model, target)
    assert target.read_bytes() != clean.read_bytes()
    return target


@dataclass(frozen=True)
class Clean:
    model: LocalizationNet
    path: Path


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], Clean]:
    """Build (once) and export the model for a backbone and seed."""
    folder = tmp_path_factory.mktemp("mutations")
    built: dict[tuple[str, int], Clean] = {}

    def get(backbone: str, seed: int) -> Clean:
        if (backbone, seed) not in built:
            model = make_model(backbone, seed)
            path = export_to_onnx(model, folder / f"{backbone}-{seed}.onnx").path
            built[backbone, seed] = Clean(model, path)
        return built[backbone, seed]

    return get


def verify(path: Path, model: LocalizationNet, batch_sizes: tuple[int, ...]) -> ParityResult:
    return verify_parity(
        path,
        model,
        batch_sizes,
        task_samples=TASK_SAMPLES,
        intra_op_threads=1,
        raise_on_failure=False,
    )


slow = pytest.mark.slow


@pytest.mark.parametrize(
    ("backbone", "seed"),
    [
        ("atto", 0),
        ("atto", 1),
        ("atto", 2),
        pytest.param("atto", TRAINED, id="atto-trained"),
        pytest.param("tiny", 0, marks=slow),
        pytest.param("tiny", 1, marks=slow),
    ],
)
def test_clean_export_passes_at_every_batch_size_and_input_kind(
    clean: Callable[[str, int], Clean], backbone: str, seed: int
) -> None:
    case = clean(backbone, seed)

    result = verify(case.path, case.model, CLEAN_BATCH_SIZES)

    assert result.passed, result.failures
    assert sorted({d.batch_size for d in result.diffs}) == list(CLEAN_BATCH_SIZES)
    assert len(INPUT_KINDS) == 4 and all(d.worst_input in INPUT_KINDS for d in result.diffs)


@pytest.mark.parametrize("mutant", MUTANTS)
@pytest.mark.parametrize("backbone", ["atto", pytest.param("tiny", marks=slow)])
def test_mutant_fails_verify(
    clean: Callable[[str, int], Clean], backbone: str, mutant: str, tmp_path: Path
) -> None:
    case = clean(backbone, 0)
    path = build_mutant(mutant, case.model, case.path, tmp_path / "mutant.onnx")

    result = verify(path, case.model, MUTANT_BATCH_SIZES)

    assert not result.passed
    assert any("normalized region units" in f for f in result.failures), result.failures
