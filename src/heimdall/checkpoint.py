"""Safe checkpoint save/load: safetensors, or ``torch.load(weights_only=True)`` and nothing else.

The native format is one ``.safetensors`` file. Its header metadata holds
``heimdall_config`` (the ModelConfig as JSON), ``training_run_id`` and ``heimdall_version``.
Foreign ``.pt``/``.pth``/``.ckpt`` files are read with ``weights_only=True``; a pickle that
needs code to unpickle is refused and never executed. Tensors are never cast silently:
float16/bfloat16/float64 weights load with a DtypeWarning and their dtype recorded, and a
non-float tensor where the model holds floats is refused.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from heimdall.config import heimdall_version
from heimdall.errors import CheckpointError, InputError
from heimdall.files import sha256_file
from heimdall.machine import is_out_of_memory, memory_errors
from heimdall.model import BACKBONES, ConvNeXt, LocalizationNet, ModelConfig, load_exact

log = structlog.get_logger(__name__)

TORCH_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin"}


class DtypeWarning(UserWarning):
    """A checkpoint's floating-point tensors were converted to the model's dtype."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint, with where it came from."""

    model: LocalizationNet
    config: ModelConfig
    path: Path
    sha256: str
    training_run_id: str | None
    # The dtypes of the file's floating-point tensors, e.g. ("float16",); the model is float32.
    source_dtypes: tuple[str, ...] = ("float32",)


def save_checkpoint(model: LocalizationNet, path: Path, training_run_id: str | None = None) -> str:
    """Write ``model`` as one safetensors file (atomic rename); return its sha256."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint path must end in .safetensors, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "heimdall.localizationnet",
        "heimdall_config": json.dumps(model.config.to_dict(), sort_keys=True),
        "heimdall_version": heimdall_version(),
        "training_run_id": training_run_id or "",
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return sha256_file(path)


def _unwrap(payload: Any, source: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Find the state dict inside a torch payload; accept the seed's and Lightning's layouts."""
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(payload).__name__}")
    extra: dict[str, Any] = {}
    if "model_state_dict" in payload:
        state = payload["model_state_dict"]
        extra = {k: v for k, v in payload.items() if k != "model_state_dict"}
    elif "state_dict" in payload and isinstance(payload["state_dict"], Mapping):
        state = payload["state_dict"]
        extra = {k: v for k, v in payload.items() if k != "state_dict"}
        if any(k.startswith("model.") for k in state):
            state = {
                k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")
            }
    else:
        state = payload
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: the state dict holds values that are not tensors")
    return dict(state), extra


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read tensors from a safetensors or torch file, safely."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    with memory_errors(f"loading {path}", "free memory, or load it on a larger machine"):
        return _read_file(path)


def _read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            # pread: tensors own their bytes. mmap'd ones would keep reading the file, so a
            # file rewritten in place later would change (or crash) a loaded model.
            with safe_open(str(path), framework="pt", backend="pread") as fh:
                meta = dict(fh.metadata() or {})
                return {k: fh.get_tensor(k) for k in fh.keys()}, meta  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({exc}); the file may be truncated"
            ) from exc
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {path.suffix!r}; use .safetensors or one of "
            f"{', '.join(sorted(TORCH_SUFFIXES))}"
        )
    check_archive_sizes(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _NEEDS_CODE.search(str(exc)):
            raise CheckpointError(
                f"{path}: refused to load: the file needs arbitrary code to unpickle, which "
                "heimdall never runs. Re-save the weights as a plain state dict or as safetensors."
            ) from exc
        raise CheckpointError(_not_a_checkpoint(path)) from exc
    # The unpickler meets arbitrary bytes in a foreign file: random data ends in IndexError,
    # KeyError, UnicodeDecodeError and friends as often as in an UnpicklingError.
    except Exception as exc:
        if is_out_of_memory(exc):  # a real checkpoint too large for this machine now
            raise
        raise CheckpointError(_not_a_checkpoint(path)) from exc
    return _unwrap(payload, path)


def check_archive_sizes(path: Path, *, limit: int | None = None) -> None:
    """Refuse a zip-format torch file whose entries would inflate beyond what it can hold.

    torch.save stores entries uncompressed, so a checkpoint inflates to about its own size; a
    deflated entry (a zip bomb: 2 MB of zeros become 2 GiB) would be unpacked whole by
    torch.load before any check could see it. The zip directory declares every entry's size,
    so both bounds are checked from it alone. ``limit`` (default: the largest
    LocalizationNet's float64 weights and two optimizer moments) bounds any archive.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # the legacy (non-zip) format or no archive: torch.load says what it is
    size = path.stat().st_size
    limit = _largest_checkpoint_bytes() if limit is None else limit
    if declared > limit:
        raise CheckpointError(
            f"{path}: its zip entries declare {_mib(declared)}, more than the largest "
            f"LocalizationNet checkpoint holds ({_mib(limit)}); refused before unpacking"
        )
    if declared > _INFLATION * size + _ARCHIVE_SLACK:
        raise CheckpointError(
            f"{path}: its zip entries inflate to {_mib(declared)} from a {_mib(size)} file, "
            "which torch.save never writes (it stores entries uncompressed); refused before "
            "unpacking. Use the file torch.save wrote, or a .safetensors file"
        )


# A deflated copy of real weights inflates to about 1.1x; zeros inflate up to 1000x.
_INFLATION = 4
_ARCHIVE_SLACK = 64 * 2**20


@functools.cache
def _largest_checkpoint_bytes() -> int:
    """float64 weights of the largest backbone with two optimizer moments, plus slack."""
    largest = max(BACKBONES, key=lambda name: sum(BACKBONES[name][0]) * sum(BACKBONES[name][1]))
    with torch.device("meta"):
        model = LocalizationNet(ModelConfig(backbone=largest))
    return 3 * 8 * sum(t.numel() for t in model.state_dict().values()) + _ARCHIVE_SLACK


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


# torch's weights-only unpickler says so when a pickle names code (a global, a reduce call);
# every other UnpicklingError is a file that is not a pickle torch wrote.
_NEEDS_CODE = re.compile(
    r"not an allowed global|is blocked|call reduce for unrecognized function|"
    r"Can only create new object"
)


def _not_a_checkpoint(path: Path) -> str:
    return (
        f"{path}: not a PyTorch checkpoint, or it is corrupt or truncated; use a file saved "
        "with torch.save or a .safetensors file"
    )


def load_torchvision_weights(backbone: ConvNeXt, path: Path) -> None:
    """Load a torchvision ``convnext_*`` ImageNet state-dict file into ``backbone``.

    The ImageNet classifier (``classifier.2``) is dropped; every other key must match.
    """
    state = read_state_dict(Path(path))
    state = {k: v for k, v in state.items() if not k.startswith("classifier.2.")}
    check_dtypes(state, backbone, Path(path))
    load_exact(backbone, state, source=str(path))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _conversion(stored: Tensor, wanted: torch.dtype) -> str:
    """``same``, ``integer`` (another integer width), ``convert`` (warned) or ``refuse``."""
    if stored.dtype == wanted:
        return "same"
    if wanted.is_floating_point:
        return "convert" if stored.dtype.is_floating_point else "refuse"
    if torch.bool in (stored.dtype, wanted) or stored.dtype.is_complex or wanted.is_complex:
        return "refuse"
    if stored.dtype.is_floating_point:
        # A counter such as num_batches_tracked, saved as float by a blanket ``.half()``.
        whole = bool(torch.isfinite(stored).all() and torch.equal(stored, stored.round()))
        return "convert" if whole else "refuse"
    return "integer"


def check_dtypes(
    state: Mapping[str, Tensor], module: torch.nn.Module, path: Path
) -> tuple[str, ...]:
    """Return the dtypes of ``state``'s float tensors; refuse those that cannot fit ``module``.

    A float tensor of another width (float16, bfloat16, float64) is accepted with a
    DtypeWarning: loading converts it to the module's dtype. An integer, bool or complex tensor
    where the module holds floats is a CheckpointError, and so is a non-whole float where it
    holds integers (BatchNorm's ``num_batches_tracked``).
    """
    own = module.state_dict()
    verdicts = {k: _conversion(state[k], own[k].dtype) for k in state if k in own}
    refused = sorted(
        f"{k} ({_name(state[k].dtype)} in the file, {_name(own[k].dtype)} in the model)"
        for k, verdict in verdicts.items()
        if verdict == "refuse"
    )
    if refused:
        raise CheckpointError(
            f"{path}: {len(refused)} tensor(s) cannot be loaded without changing their meaning: "
            + "; ".join(refused[:10])
            + ". Re-save the checkpoint with the model's dtypes."
        )
    converted = [k for k, verdict in verdicts.items() if verdict == "convert"]
    if converted:
        sources = sorted({_name(state[k].dtype) for k in converted})
        targets = sorted({_name(own[k].dtype) for k in converted})
        log.warning(
            "checkpoint_dtype_converted",
            path=str(path),
            source_dtypes=sources,
            to=targets,
            tensors=len(converted),
        )
        warnings.warn(
            f"{path}: {len(converted)} tensor(s) stored as {', '.join(sources)} were converted "
            f"to the model's {', '.join(targets)}",
            DtypeWarning,
            stacklevel=3,
        )
    return _source_dtypes(state)


def infer_backbone(state: Mapping[str, Tensor]) -> str:
    """Name the ConvNeXt size whose widths and depths match the state dict."""
    stem = state.get("backbone.features.0.0.weight")
    if stem is None:
        raise CheckpointError("cannot tell the backbone: backbone.features.0.0.weight is missing")
    depths = tuple(
        len({k.split(".")[3] for k in state if k.startswith(f"backbone.features.{2 * i + 1}.")})
        for i in range(4)
    )
    for name, (widths, sizes) in BACKBONES.items():
        if widths[0] == stem.shape[0] and sizes == depths:
            return name
    raise CheckpointError(f"no ConvNeXt size has stem width {stem.shape[0]} and depths {depths}")


def _config_from(meta: Mapping[str, Any], state: Mapping[str, Tensor], path: Path) -> ModelConfig:
    raw = meta.get("heimdall_config") or meta.get("config")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: model config is not valid JSON ({exc})") from exc
    if isinstance(raw, Mapping):
        try:
            return ModelConfig.from_dict(dict(raw))
        except (CheckpointError, InputError) as exc:
            raise CheckpointError(f"{path}: the model config it records is invalid: {exc}") from exc
    # The region normalization lives in the state dict too; the defaults would silently move
    # every prediction to another region.
    defaults = ModelConfig(backbone=infer_backbone(state))
    return replace(
        defaults,
        center=_stored_pair(state, "coord_center", defaults.center),
        scale=_stored_pair(state, "coord_scale", defaults.scale),
    )


def _stored_pair(
    state: Mapping[str, Tensor], key: str, default: tuple[float, float]
) -> tuple[float, float]:
    """The state dict's ``key`` buffer, or ``default`` for load_exact to report its absence."""
    buffer = state.get(key)
    if buffer is None or tuple(buffer.shape) != (2,):
        return default
    return _as_floats(buffer)


def _as_floats(buffer: Tensor) -> tuple[float, float]:
    """A float32 pair as the shortest decimals that give it back (45.07, not 45.0699996948)."""
    first, second = (
        float(np.format_float_positional(np.float32(v))) for v in buffer.detach().cpu().tolist()
    )
    return first, second


def _check_normalization(model: LocalizationNet, path: Path) -> None:
    """Refuse a config whose region normalization is not the one stored in the weights."""
    for field, buffer in (("center", model.coord_center), ("scale", model.coord_scale)):
        configured = getattr(model.config, field)
        if not torch.equal(buffer, torch.tensor(configured, dtype=buffer.dtype)):
            stored = _as_floats(buffer)
            raise CheckpointError(
                f"{path}: the config's {field} {configured} differs from the checkpoint's "
                f"coord_{field} {stored}; pass a config with {field}={stored}, or none"
            )


def _assign(model: LocalizationNet, state: dict[str, Tensor], path: Path) -> None:
    """Make ``state``'s tensors the weights of meta-device ``model``, checked as load_exact does."""
    load_exact(model, state, source=str(path), assign=True)  # refuses mismatched keys first
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # a tensor the state dict does not hold (a non-persistent buffer) has no value
        raise CheckpointError(f"{path}: no value for {', '.join(left[:5])} after loading")


def _source_dtypes(state: Mapping[str, Tensor]) -> tuple[str, ...]:
    return tuple(sorted({_name(t.dtype) for t in state.values() if t.dtype.is_floating_point}))


def load_checkpoint(path: Path, config: ModelConfig | None = None) -> LoadedCheckpoint:
    """Rebuild a LocalizationNet (eval mode) from a checkpoint file.

    ``config`` overrides the config the file records, but its region normalization must match
    the ``coord_center`` and ``coord_scale`` buffers in the weights. Without either, the
    backbone size is inferred from tensor shapes, the normalization is read from those
    buffers, and the defaults apply to the rest.
    """
    path = Path(path)
    state, meta = _read(path)
    config = config or _config_from(meta, state, path)
    # Built on the meta device, then given the checkpoint's own tensors: no random
    # initialisation to overwrite and no second copy of the weights (1x a large model's RAM).
    with torch.device("meta"):
        model = LocalizationNet(config)
    source_dtypes = check_dtypes(state, model, path)
    _assign(model, state, path)
    _check_normalization(model, path)
    model.eval()
    run_id = meta.get("training_run_id") or meta.get("run_id") or None
    return LoadedCheckpoint(
        model=model,
        config=config,
        path=path,
        sha256=sha256_file(path),
        training_run_id=str(run_id) if run_id else None,
        source_dtypes=source_dtypes,
    )
