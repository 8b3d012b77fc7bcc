"""The MLflow model folder of a registration: written once, next to the upload, read back.

For an upload at ``<root>/models/localization/vX.onnx`` each registration gets a folder of its
own, ``<root>/models/localization/vX/<registration id>/``, which becomes the version's
``source``: ``model.onnx`` (a server-side copy of the upload, sha256 checked after the copy),
external-data files under the names the ONNX file refers to, and MLflow's small files
(``MLmodel`` last, so a folder without it is never mistaken for a model). Every object is
written with ``if_absent``: nothing in a registered version's folder is ever rewritten, and two
registrations of the same bytes (another model name, a concurrent publish) never share a folder.

The read-back ``model.onnx`` is checked by the caller's validator (``validate.validate_onnx_model``
in practice), passed in: the registry knows ONNX files only through the core ``heimdall.onnxfile``
types, and imports no other stage.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema
from mlflow.types import TensorSpec as MlflowTensorSpec

from heimdall.config import redact_uri
from heimdall.errors import HeimdallError, InputError, RegistryError
from heimdall.files import sha256_chunks
from heimdall.objects import ObjectInfo, ObjectStore, fetch
from heimdall.onnxfile import TensorSpec, ValidationResult

log = structlog.get_logger(__name__)

MODEL_FILE = "model.onnx"

# (local ONNX file) -> its validation, or a HeimdallError when it does not meet the contract.
Validator = Callable[[Path], ValidationResult]


@dataclass(frozen=True)
class Validated:
    """A validator that knows one file already: ``validation`` holds for the bytes ``sha256``.

    Registering exactly those bytes (a single-file model: no external data) reuses
    ``validation`` once the read-back copy hashes to ``sha256``, without a local copy or a
    second full validation; anything else goes to ``validator``.
    """

    sha256: str
    validation: ValidationResult
    validator: Validator

    def __call__(self, path: Path) -> ValidationResult:
        return self.validator(path)

    def holds_for(self, sha256: str, files: int) -> bool:
        """Whether ``validation`` covers a model of ``files`` stored files with this sha256."""
        return files == 1 and not self.validation.external_data_files and sha256 == self.sha256


@dataclass(frozen=True)
class StagedModel:
    """A registration's MLflow model folder and what its bytes say about them."""

    source: str
    sha256: str
    validation: ValidationResult
    keys: tuple[str, ...]  # every object written, for removal when registration is abandoned


def model_dir_uri(onnx_uri: str) -> str:
    """The folder under which an uploaded ``….onnx`` object's registrations live."""
    if not onnx_uri.endswith(".onnx") or onnx_uri.endswith("/.onnx"):
        raise InputError(
            f"expected the URI of an uploaded .onnx object, got {redact_uri(onnx_uri)!r}"
        )
    return onnx_uri.removesuffix(".onnx")


def stored_sha256(store: ObjectStore, uri: str) -> str | None:
    """The sha256 of the bytes stored at ``uri`` (streamed, never held whole), None if absent."""
    bucket, key = store.locate(uri)
    if store.head(bucket, key) is None:
        return None
    return sha256_chunks(store.iter_bytes(bucket, key))[0]


def version_bytes_problem(store: ObjectStore, source: str, sha256: str) -> str | None:
    """Why the ``model.onnx`` of a version's ``source`` is not ``sha256`` now, or None if it is."""
    try:
        return changed_bytes(store, source, sha256)
    except HeimdallError as exc:
        return f"cannot read {source}/{MODEL_FILE}: {exc}"


def changed_bytes(store: ObjectStore, source: str, sha256: str) -> str | None:
    """How the stored ``model.onnx`` of ``source`` differs from ``sha256`` (None: it does not).

    Raises when the bytes cannot be read (a failure says nothing about them), and InputError
    when ``source`` lies in another object store than ``store``.
    """
    uri = f"{source}/{MODEL_FILE}"
    digest = stored_sha256(store, uri)
    if digest is None:
        return f"{uri} is missing"
    if digest != sha256:
        return f"{uri} now has sha256 {digest}, registered {sha256}"
    return None


def external_data(metadata: Mapping[str, str]) -> dict[str, str]:
    """``{key suffix: file name the ONNX refers to}`` that storage records for external data."""
    names: dict[str, str] = json.loads(metadata.get("external-data", "{}"))
    for name in names.values():
        if Path(name).name != name or name in {"", ".", "..", MODEL_FILE}:
            raise RegistryError(f"unsafe external-data file name {name!r} in object metadata")
    return names


def check_upload(store: ObjectStore, onnx_uri: str, sha256: str | None) -> tuple[str, ObjectInfo]:
    """The sha256 to register ``onnx_uri`` under, and its object info; RegistryError if unfit.

    Cheap (one HEAD): run it before any MLflow call.
    """
    bucket, key = store.locate(onnx_uri)
    info = store.head(bucket, key)
    if info is None:
        raise RegistryError(f"{onnx_uri} does not exist; upload the model before registering it")
    recorded = info.metadata.get("sha256")
    sha256 = sha256 or recorded
    if sha256 is None:
        raise RegistryError(f"{onnx_uri} has no recorded sha256; pass the one of the file uploaded")
    if recorded is not None and recorded != sha256:
        raise RegistryError(
            f"{onnx_uri} was stored with sha256 {recorded}, not {sha256}: it holds other bytes"
        )
    return sha256, info


def stage_model_dir(
    store: ObjectStore,
    onnx_uri: str,
    sha256: str | None,
    validator: Validator,
    mlmodel_metadata: Callable[[ValidationResult, str], Mapping[str, str]],
) -> StagedModel:
    """Copy the upload into a new registration folder, read it back, write MLflow's files.

    ``validator`` checks the read-back ``model.onnx`` (a :class:`Validated` that holds for these
    bytes is not run: the read-back's sha256 shows they are the bytes it validated);
    ``mlmodel_metadata(validation, sha256)`` gives the ``heimdall`` block of MLmodel.
    """
    bucket, key = store.locate(onnx_uri)
    sha256, info = check_upload(store, onnx_uri, sha256)
    source = f"{model_dir_uri(onnx_uri)}/{uuid.uuid4().hex[:12]}"
    _, dir_key = store.locate(source)
    copies = {key: f"{dir_key}/{MODEL_FILE}"}
    for suffix, name in external_data(info.metadata).items():
        copies[key + suffix] = f"{dir_key}/{name}"
    known = (
        validator.validation
        if isinstance(validator, Validated) and validator.holds_for(sha256, len(copies))
        else None
    )
    written: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="heimdall-register-") as tmp:
            local = Path(tmp) / "read-back"
            local.mkdir()
            for src, dst in copies.items():
                expected = sha256 if src == key else _recorded_sha256(store, bucket, src)
                store.copy(bucket, src, dst, if_absent=True)
                written.append(dst)
                _check_copy(store, bucket, dst, expected, None if known else local)
            # Known bytes keep the validation they had: the read-back just proved them equal.
            checked = known or validator(local / MODEL_FILE)
            model_dir = Path(tmp) / "mlflow-model"
            _write_mlflow_model(model_dir, checked, mlmodel_metadata(checked, sha256))
            names = [*sorted(p.name for p in model_dir.iterdir() if p.name != "MLmodel"), "MLmodel"]
            for name in names:
                store.put_bytes(
                    bucket,
                    f"{dir_key}/{name}",
                    (model_dir / name).read_bytes(),
                    content_type="application/json" if name.endswith(".json") else "text/plain",
                    if_absent=True,
                )
                written.append(f"{dir_key}/{name}")
    except BaseException:
        remove_staged(store, source, tuple(written))
        raise
    log.info("registry.model_dir_written", source=source, sha256=sha256)
    return StagedModel(source=source, sha256=sha256, validation=checked, keys=tuple(written))


def remove_staged(store: ObjectStore, source: str, keys: tuple[str, ...]) -> None:
    """Remove a registration folder that no version points at (best effort, logged)."""
    bucket, _ = store.locate(source)
    for key in keys:
        try:
            store.delete(bucket, key)
        except HeimdallError as exc:
            log.warning("registry.model_dir.cleanup_failed", key=key, error=str(exc))


def _check_copy(
    store: ObjectStore, bucket: str, key: str, expected: str | None, local: Path | None
) -> None:
    """Read ``key`` back (into ``local`` when a validator will read it); raise unless its
    sha256 is ``expected``."""
    digest = (
        sha256_chunks(store.iter_bytes(bucket, key))[0]
        if local is None
        else fetch(store, bucket, key, local / key.rpartition("/")[2])
    )
    if digest != expected:
        raise RegistryError(
            f"{store.uri(bucket, key)} read back with sha256 {digest}, expected {expected}; "
            "the object store altered or lost the bytes. Nothing was registered."
        )


def _recorded_sha256(store: ObjectStore, bucket: str, key: str) -> str | None:
    info = store.head(bucket, key)
    return info.metadata.get("sha256") if info is not None else None


def _write_mlflow_model(path: Path, checked: ValidationResult, info: Mapping[str, Any]) -> None:
    """MLflow's own ONNX-flavor writer for everything but the payload, which is copied instead.

    ``mlflow.onnx.save_model`` gets an empty ModelProto, so it writes MLmodel (flavors,
    signature from the file's IO spec, input example), the environment files and a placeholder
    ``model.onnx`` that is dropped here: the real one is the server-side copy beside these files.
    The flavor carries the session settings serving uses, so ``mlflow.pyfunc`` users get them.
    """
    # Only a registration writes a model folder: reading the registry loads no onnx or ORT.
    import mlflow.onnx
    import onnx

    from heimdall.data import generate
    from heimdall.runtime import recorded_settings

    signature = ModelSignature(
        inputs=Schema([_mlflow_spec(s) for s in checked.inputs]),
        outputs=Schema([_mlflow_spec(s) for s in checked.outputs]),
    )
    example, _ = generate(1, seed=0)
    mlflow.onnx.save_model(
        onnx.ModelProto(),
        str(path),
        signature=signature,
        input_example=example,
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),
        onnx_session_options=recorded_settings(checked.metadata_props).to_mlflow_options(),
        metadata={"heimdall": dict(info)},
    )
    (path / MODEL_FILE).unlink()
    model = Model.load(str(path / "MLmodel"))
    small = sum(p.stat().st_size for p in path.iterdir())
    model.model_size_bytes = small + checked.total_size_bytes
    model.save(str(path / "MLmodel"))


def _mlflow_spec(spec: TensorSpec) -> MlflowTensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in spec.shape)
    return MlflowTensorSpec(np.dtype(spec.dtype), shape, spec.name)
