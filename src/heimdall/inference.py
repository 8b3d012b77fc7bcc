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

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import onnxruntime as ort
import structlog

from heimdall import registry
from heimdall.config import Settings, load_settings, redact_uri
from heimdall.contract import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAMES
from heimdall.data import HELDOUT_SEED, generate
from heimdall.errors import InputError, RegistryError
from heimdall.files import sha256_file
from heimdall.heldout import HELDOUT_SAMPLES, HeldOut, HeldOutSet, score
from heimdall.objects import download_model_hashed, fetch
from heimdall.runtime import RECOMMENDED_SESSION_SETTINGS, open_session, recorded_settings
from heimdall.storage import download_verified, open_store

log = structlog.get_logger(__name__)


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


def check_features(features: object) -> np.ndarray:
    """Return ``features`` as a float32 ``(B, 3, 128, 32)`` array or raise InputError."""
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
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
        array = np.ascontiguousarray(features, dtype=np.float32)
    if not np.isfinite(array).all():
        bad = np.unique(np.argwhere(~np.isfinite(array))[:, 0])
        raise InputError(
            f"features hold NaN or infinite values (or values beyond float32's range) in "
            f"sample(s) {bad[:10].tolist()}{' …' if len(bad) > 10 else ''}"
        )
    return array


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
                raise RegistryError(
                    f"{redact_uri(text)}: the stored model has sha256 {sha256} but {expected} "
                    "was recorded for it; the bytes were altered after registration or upload. "
                    "Do not serve it; register the model again."
                )
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

    def predict(self, features: np.ndarray) -> Prediction:
        """Positions and uncertainties for a ``(B, 3, 128, 32)`` batch."""
        array = check_features(features)
        positions, uncertainties = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array})
        return Prediction(positions=np.asarray(positions), uncertainties=np.asarray(uncertainties))


def load_features(path: Path | str) -> np.ndarray:
    """Read a ``.npy`` file of features without executing pickled objects; check its shape."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"features file not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(
            f"{path}: not a readable .npy array ({exc}); save features with numpy.save"
        ) from exc
    try:
        return check_features(array)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


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
            raise InputError(f"no ONNX model at {uri}")
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
