"""Load a published LocalizationNet by URI and predict positions with onnxruntime.

``LocalizationModel.load`` accepts ``models:/NAME@alias`` or ``models:/NAME/VERSION`` (resolved
through the MLflow registry), an ``s3://`` or ``file://`` URI, or a local path; each may name an
``.onnx`` file or an MLflow model directory (the one holding ``MLmodel`` and ``model.onnx``).
Registered bytes are checked against the version's ``sha256`` tag before a session is built.
Sessions run with the settings the model records (variants do) or else the recommended ones
(``heimdall.runtime``), on the requested providers with CPU as the fallback.

Inputs must be ``(B, 3, 128, 32)``, finite and floating point. float32 is used as is; other
floating dtypes (float64 is what numpy and JSON give by default) are converted to float32, the
same cast MLflow's ONNX flavor applies. Integer, boolean or object arrays are refused.

Serving is a composition, like publishing: the registry resolves the URI, storage opens the
store that settings name and downloads with sha256 checks, the runtime opens the session. So
this module sits with the orchestration modules (``gates``, ``pipeline``), above every stage;
no stage imports it, and it imports no torch.
"""

from __future__ import annotations

import math
import mmap
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import numpy as np
import numpy.lib.format as npy
import onnxruntime as ort
import structlog

from heimdall import registry
from heimdall.config import Settings, load_settings, redact_uri
from heimdall.contract import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAMES
from heimdall.data import HELDOUT_SEED, generate
from heimdall.errors import InputError, RegistryError
from heimdall.files import sha256_file
from heimdall.heldout import HELDOUT_SAMPLES, HeldOut, HeldOutSet, score
from heimdall.machine import memory_errors
from heimdall.objects import download_model_hashed, fetch
from heimdall.registry.names import parse_models_uri
from heimdall.runtime import RECOMMENDED_SESSION_SETTINGS, open_session, recorded_settings
from heimdall.storage import download_verified, open_store

log = structlog.get_logger(__name__)

# Samples per ONNX Runtime call: an atto model's activations cost about 0.7 MiB a sample, so a
# chunk stays under 50 MiB however large the batch is; throughput is that of larger calls
# (atto on 2 busy cores, interleaved: 493 samples/s at 64, 492 at 256, 455 at 1024).
PREDICT_CHUNK = 64


@dataclass(frozen=True)
class Prediction:
    """Positions ``(B, 2)`` as [lat, lon] in degrees and uncertainties ``(B, 2)`` as [σx, σy]."""

    positions: np.ndarray
    uncertainties: np.ndarray

    def to_dict(self) -> dict[str, object]:
        return {
            "positions": self.positions.tolist(),
            "uncertainties": self.uncertainties.tolist(),
        }


def check_features(features: object, *, first: int = 0) -> np.ndarray:
    """Return ``features`` as a float32 ``(B, 3, 128, 32)`` array or raise InputError.

    ``first`` is the place of ``features[0]`` in a larger batch: non-finite samples are named
    by their place in it.
    """
    array = _checked_layout(features)
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
        array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        bad = np.unique(np.argwhere(~np.isfinite(array))[:, 0]) + first
        raise InputError(
            f"features hold NaN or infinite values (or values beyond float32's range) in "
            f"sample(s) {bad[:10].tolist()}{' …' if len(bad) > 10 else ''}"
        )
    return array


def _checked_layout(features: object) -> np.ndarray:
    """``features`` if its type, shape and dtype are those of a batch (its values unread)."""
    expected = f"expected a float array of shape (B, {', '.join(map(str, INPUT_SHAPE))})"
    if not isinstance(features, np.ndarray):
        raise InputError(f"{expected}, got {type(features).__name__}")
    if features.ndim != 4 or tuple(features.shape[1:]) != INPUT_SHAPE:
        hint = "; add a batch axis with x[None]" if tuple(features.shape) == INPUT_SHAPE else ""
        raise InputError(f"{expected}, got shape {tuple(features.shape)}{hint}")
    if features.shape[0] == 0:
        raise InputError(f"{expected}, got an empty batch")
    if not np.issubdtype(features.dtype, np.floating):
        raise InputError(f"{expected}, got dtype {features.dtype}")
    return features


class LocalizationModel:
    """An onnxruntime session over a published LocalizationNet, with input checks."""

    def __init__(
        self, session: ort.InferenceSession, *, uri: str, sha256: str, version: str | None = None
    ) -> None:
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if names != ([INPUT_NAME], list(OUTPUT_NAMES)):
            raise InputError(
                f"{redact_uri(uri)} is not a LocalizationNet export: its IO is "
                f"{names[0]} → {names[1]}, expected [{INPUT_NAME!r}] → {list(OUTPUT_NAMES)}"
            )
        self.session = session
        self.uri = uri
        self.sha256 = sha256
        self.version = version

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @classmethod
    def load(
        cls,
        uri: str | Path,
        *,
        providers: Sequence[str] | None = None,
        settings: Settings | None = None,
    ) -> LocalizationModel:
        """Fetch the ONNX bytes ``uri`` names, check them, and open a session (CPU by default).

        ``providers=["CUDAExecutionProvider"]`` uses CUDA where this onnxruntime build has it
        and falls back to CPU (with a warning) where it does not.
        """
        settings = settings or load_settings()
        text = str(uri)
        with tempfile.TemporaryDirectory(prefix="heimdall-load-") as tmp:
            local, expected, version, arrived = _fetch(text, Path(tmp), settings)
            sha256 = arrived or sha256_file(local)  # a download hashed its bytes as they came
            if expected is not None and sha256 != expected:
                raise altered_bytes_error(text, sha256, expected)
            session = _open(local, providers, redact_uri(text))
        model = cls(session, uri=text, sha256=sha256, version=version)
        log.info(
            "inference.model_loaded",
            uri=redact_uri(text),
            sha256=sha256,
            version=version,
            providers=model.providers,
        )
        return model

    def predict(self, features: np.ndarray, *, chunk_size: int = PREDICT_CHUNK) -> Prediction:
        """Positions and uncertainties for a ``(B, 3, 128, 32)`` batch.

        ONNX Runtime sees at most ``chunk_size`` samples a call, so memory stays bounded
        whatever ``B`` is (a memory-mapped ``features`` is read one chunk at a time).
        """
        if chunk_size < 1:
            raise InputError(f"chunk_size must be at least 1, got {chunk_size}")
        _checked_layout(features)
        parts = []
        for i in range(0, len(features), chunk_size):
            parts.append(self._run(check_features(features[i : i + chunk_size], first=i)))
            _release_pages(features)
        return Prediction(
            positions=np.concatenate([p for p, _ in parts]),
            uncertainties=np.concatenate([u for _, u in parts]),
        )

    def _run(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fix = "predict with a smaller chunk_size, or free memory"
        with memory_errors(f"ONNX Runtime on {len(array)} samples", fix):
            positions, uncertainties = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array})
        return np.asarray(positions), np.asarray(uncertainties)


def _release_pages(features: np.ndarray) -> None:
    """Drop the pages of a memory-mapped batch read so far from this process's memory.

    They stay in the page cache, but while mapped they count in the process's resident size:
    a 16,384-sample file would add its 805 MB to the peak as predict reads it.
    """
    mapping = features.base if isinstance(features, np.memmap) else None
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def altered_bytes_error(uri: str, sha256: str, expected: str) -> RegistryError:
    """The bytes ``uri`` names are not those registered: say so, and what gets out of it.

    Registering the same model again finds the same altered bytes; a rollback serves the
    previous version, and a publish of the checkpoint uploads fresh bytes as a new version.
    """
    name, alias = _registry_name(uri)
    rollback = f"heimdall rollback {name or 'NAME'} --alias {alias or 'ALIAS'}"
    return RegistryError(
        f"{redact_uri(uri)}: the stored model has sha256 {sha256} but {expected} was recorded "
        "for it; the bytes were altered after registration or upload. Do not serve it: move "
        f"the alias back to the previous version ({rollback}), or publish the checkpoint "
        "again to upload fresh bytes as a new version"
    )


def _registry_name(uri: str) -> tuple[str | None, str | None]:
    """The model name and alias a ``models:/`` URI names (None where it names none)."""
    try:
        name, alias, _ = parse_models_uri(uri)
    except InputError:
        return None, None
    return name, alias


def load_features(path: Path | str) -> np.ndarray:
    """Map a ``.npy`` file of features into memory (read as used, never unpickled).

    Its header is checked against the file's size first: a header may claim any shape, and
    numpy would allocate what it claims before finding out the bytes are not there.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"features file not found: {path}")
    expected = f"expected a .npy array of shape (B, {', '.join(map(str, INPUT_SHAPE))}) float32"
    with path.open("rb") as fh:
        _check_npy_header(path, fh, expected)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(
            f"{path}: not a readable .npy array ({exc}); save features with numpy.save"
        ) from exc
    try:
        return _checked_layout(array)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def _check_npy_header(path: Path, fh: BinaryIO, expected: str) -> None:
    """Refuse a file that is not ``.npy``, holds objects, or declares more bytes than it has."""
    start = fh.read(9)
    fh.seek(0)
    try:
        version = npy.read_magic(fh)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version} is not supported")
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = read(fh)
    except ValueError as exc:
        raise InputError(
            f"{path}: {_not_npy(start, str(exc))}; {expected}: save features with "
            "numpy.save(path, array)"
        ) from None
    if dtype.hasobject:
        raise InputError(
            f"{path}: not a readable .npy array: it holds Python objects, which are never "
            f"unpickled; {expected}"
        )
    header, size = fh.tell(), path.stat().st_size
    declared = math.prod(shape) * dtype.itemsize
    if declared != size - header:
        raise InputError(
            f"{path}: its header declares shape {tuple(shape)} {dtype} ({declared:,} bytes) but "
            f"the file holds {size - header:,} bytes after its {header}-byte header; the file "
            "is truncated or was not written by numpy.save"
        )


def _not_npy(start: bytes, reason: str) -> str:
    """What a file that is not ``.npy`` seems to be, from its first bytes."""
    if start.startswith(b"PK"):
        return "a zip archive (an .npz?), not a .npy array"
    if len(start) == 9 and start[8:9] == b"{":  # a little-endian header length, then JSON
        return "a safetensors file, not a .npy array"
    return f"not a .npy file ({reason})"


def predict_file(
    model_uri: str,
    features_path: Path | str,
    *,
    providers: Sequence[str] | None = None,
    settings: Settings | None = None,
) -> Prediction:
    """Load ``model_uri`` and predict on the features saved in ``features_path`` (``.npy``)."""
    features = load_features(features_path)
    return LocalizationModel.load(model_uri, providers=providers, settings=settings).predict(
        features
    )


def _open(local: Path, providers: Sequence[str] | None, name: str) -> ort.InferenceSession:
    """A session with the settings ``local`` records, else with the recommended ones.

    ONNX Runtime reads the metadata while it loads the file (reading it first with onnx would
    parse a large model twice), so a model that records other settings is opened again.
    """
    session = open_session(local, providers=providers, name=name)
    recorded = recorded_settings(session.get_modelmeta().custom_metadata_map)
    if recorded == RECOMMENDED_SESSION_SETTINGS:
        return session
    return open_session(local, recorded, providers=providers, name=name)


def _fetch(
    uri: str, tmp: Path, settings: Settings
) -> tuple[Path, str | None, str | None, str | None]:
    """A local ``.onnx`` for ``uri``, the sha256 its bytes must have (if known), its version,
    and the sha256 of the bytes as they arrived (None for a file already on this machine)."""
    if uri.startswith("models:/"):
        version = registry.resolve_model_uri(uri, settings=settings)
        if version.sha256 is None:  # nothing to check its bytes against: never served unchecked
            raise RegistryError(
                f"version {version.version} of {version.name} has no sha256 tag: it was not "
                "registered by heimdall; publish it with heimdall publish"
            )
        local, _, arrived = _local_model(version.source, tmp, settings)
        return local, version.sha256, version.version, arrived
    local, recorded, arrived = _local_model(uri, tmp, settings)
    return local, recorded, None, arrived


def _local_model(uri: str, tmp: Path, settings: Settings) -> tuple[Path, str | None, str | None]:
    """A local ``.onnx`` for a path, ``file://`` or ``s3://`` URI of a file or an MLflow model
    directory, the sha256 the store recorded for it, and the sha256 of what was downloaded."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)
        path = path / registry.MODEL_FILE if path.is_dir() else path
        if not path.is_file():
            hint = f"; did you mean models:/{uri}?" if _looks_registered(uri) else ""
            raise InputError(f"no ONNX model at {uri}{hint}")
        return path, None, None
    if parsed.scheme != "s3":
        raise InputError(
            f"cannot load {redact_uri(uri)!r}: use models:/NAME@alias, models:/NAME/VERSION, "
            "an s3:// or file:// URI, or a local path"
        )
    store = open_store(settings)
    bucket, key = store.locate(uri)
    if store.head(bucket, key) is not None:  # every file checked against its recorded sha256
        local, arrived = download_model_hashed(store, uri, tmp)
        return local, arrived, arrived
    key = f"{key.rstrip('/')}/{registry.MODEL_FILE}"
    info = store.head(bucket, key)
    if info is None:
        raise InputError(
            f"no ONNX model at {redact_uri(uri)} (neither an object nor a model directory)"
        )
    folder = key.rpartition("/")[0]
    for name in registry.external_data(info.metadata).values():
        recorded = store.head(bucket, f"{folder}/{name}")
        expected = recorded.metadata.get("sha256") if recorded is not None else None
        download_verified(store, bucket, f"{folder}/{name}", tmp / name, expected)
    local = tmp / registry.MODEL_FILE
    return local, info.metadata.get("sha256"), fetch(store, bucket, key, local)


def _looks_registered(uri: str) -> bool:
    """``NAME@alias`` or ``NAME/VERSION``: a registry URI without its ``models:/`` prefix."""
    return _registry_name(f"models:/{uri}") != (None, None)


def evaluate_heldout(
    model: Path | str,
    *,
    samples: int = HELDOUT_SAMPLES,
    seed: int = HELDOUT_SEED,
    settings: Settings | None = None,
    chunk: int = 32,
) -> HeldOut:
    """Localization error of a model (path or URI, sha256-checked when registered) via ORT."""
    heldout = HeldOutSet(seed=seed, size=samples)
    served = LocalizationModel.load(model, settings=settings)
    features, labels = generate(heldout.size, seed=heldout.seed)
    # In chunks: a large model's activations for many samples at once cost more memory than the
    # model itself (ConvNeXt-Large: +2.2 GB at 256 per call, +1.3 GB at 32).
    positions = np.concatenate(
        [served.predict(features[i : i + chunk]).positions for i in range(0, len(features), chunk)]
    )
    return score(positions, labels, heldout, version=served.version, sha256=served.sha256)
