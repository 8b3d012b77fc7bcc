"""Parity between PyTorch and ONNX Runtime: the PyTorch side of ``heimdall.parity``.

``parity`` holds the gates, the result types and the comparison (torch-free, shared with
``optimize``); this module runs the PyTorch model as the reference. Its public names stay
importable from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from heimdall.contract import Progress
from heimdall.data import HELDOUT_SEED
from heimdall.machine import check_memory, memory_errors
from heimdall.model import BACKBONES, LocalizationNet, ModelConfig, torch_reference
from heimdall.parity import DEFAULT_BATCH_SIZES as DEFAULT_BATCH_SIZES
from heimdall.parity import HELDOUT_SAMPLES as HELDOUT_SAMPLES
from heimdall.parity import INPUT_KINDS as INPUT_KINDS
from heimdall.parity import LINEAGE_KEY as LINEAGE_KEY
from heimdall.parity import UNITS as UNITS
from heimdall.parity import Gates as Gates
from heimdall.parity import LineageWarning as LineageWarning
from heimdall.parity import OutputDiff as OutputDiff
from heimdall.parity import ParityResult as ParityResult
from heimdall.parity import Reference as Reference
from heimdall.parity import TaskCheck as TaskCheck
from heimdall.parity import check_lineage as check_lineage
from heimdall.parity import measure_parity, record_reference

# PyTorch's and ONNX Runtime's memory per sample of one batch, per channel of the first stage
# (whose activations are the largest): 0.63 + 0.74 MiB a sample measured on atto's 40.
_BYTES_PER_SAMPLE_AND_CHANNEL = 36 * 2**10
_SMALLER = "use smaller batch sizes (--batch-sizes), or free memory"


def check_batch_memory(
    config: ModelConfig, batch_sizes: Sequence[int], *, available: int | None = None
) -> None:
    """Refuse now a batch size whose activations would not fit in memory."""
    largest = max(batch_sizes, default=0)
    check_memory(
        f"verify at batch size {largest}",
        largest,
        _BYTES_PER_SAMPLE_AND_CHANNEL * BACKBONES[config.backbone][0][0],
        fix="use smaller batch sizes (--batch-sizes)",
        available=available,
    )


def record_torch_reference(
    model: LocalizationNet,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    task_samples: int = HELDOUT_SAMPLES,
    task_seed: int = HELDOUT_SEED,
    input_seed: int = 0,
    intra_op_threads: int = 0,
) -> Reference:
    """``model``'s outputs on every input ``verify_parity`` gives it with these arguments.

    Pass the result to ``verify_parity`` in place of the model, called with the same arguments:
    the numbers are the same, and the model can be freed first (a large model and an ONNX
    Runtime session of it need not share memory).
    """
    check_batch_memory(model.config, batch_sizes)
    with (
        memory_errors("verify", _SMALLER),
        torch_reference(model, intra_op_threads) as reference,
    ):
        return record_reference(
            reference,
            batch_sizes,
            task_samples=task_samples,
            task_seed=task_seed,
            input_seed=input_seed,
        )


def verify_parity(
    onnx_path: Path | str,
    model: LocalizationNet | Reference,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    gates: Gates | None = None,
    task_samples: int = HELDOUT_SAMPLES,
    task_seed: int = HELDOUT_SEED,
    input_seed: int = 0,
    intra_op_threads: int = 0,
    raise_on_failure: bool = True,
    checkpoint_sha256: str | None = None,
    progress: Progress | None = None,
) -> ParityResult:
    """Run the same inputs through ``model`` and ONNX Runtime (CPU) and gate the differences.

    With ``checkpoint_sha256`` the file's recorded lineage is checked first (``check_lineage``).
    Raises VerificationError listing every failed gate with its numbers, unless
    ``raise_on_failure`` is False; ``task_samples=0`` skips the task-level check.
    ``intra_op_threads`` (0: each library's default) applies to ONNX Runtime and the PyTorch
    reference alike; on a busy machine 1 costs a quarter of the CPU time of the defaults,
    whose idle workers spin (atto on 2 shared cores: 2.5 s instead of 12 s, same numbers).
    ``progress(done, total)`` follows each input kind at each batch size and each chunk of the
    held-out set (``parity.parity_steps``). ``model`` may also be its outputs recorded by
    ``record_torch_reference`` with the same arguments.
    """
    if not isinstance(model, Reference):  # a recorded reference was checked when recorded
        check_batch_memory(model.config, batch_sizes)
    reference_of: AbstractContextManager[Reference] = (
        nullcontext(model)
        if isinstance(model, Reference)
        else torch_reference(model, intra_op_threads)
    )
    with memory_errors("verify", _SMALLER), reference_of as reference:
        return measure_parity(
            onnx_path,
            reference,
            batch_sizes,
            gates=gates,
            task_samples=task_samples,
            task_seed=task_seed,
            input_seed=input_seed,
            intra_op_threads=intra_op_threads,
            raise_on_failure=raise_on_failure,
            checkpoint_sha256=checkpoint_sha256,
            progress=progress,
        )
