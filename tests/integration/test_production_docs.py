"""The README's production blocks name exactly what each party needs: run them on test servers.

The section's three ```bash blocks (``mlflow server``, ``heimdall``, plain MLflow clients) are
read; their ``export`` lines, placeholders swapped for the test servers' values, are the whole
environment of the commands run here. The heimdall block lists the registry and passes the
publish preflight; the client block reads a registered version's files with MLflow alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from heimdall.files import sha256_file
from tests.fixtures.mlflow_server import MlflowBackend
from tests.integration.test_registry import Export, atto, register  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Production: MinIO, PostgreSQL and `mlflow server`\n"  # up to the next "## "
BLOCK = re.compile(r"^```bash\n(.*?)^```$", re.MULTILINE | re.DOTALL)
EXPORT = re.compile(r"^export (\w+)=(\S+)", re.MULTILINE)
WEBHOOK = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS",
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY",
}
CLIENT_READ = """
import sys, mlflow
from mlflow import MlflowClient
name, folder = sys.argv[1:]
version = MlflowClient().get_model_version_by_alias(name, "staging")
path = mlflow.artifacts.download_artifacts(f"models:/{name}@staging", dst_path=folder)
print(version.version, path)
"""
PREFLIGHT = (
    "from heimdall.config import load_settings; from heimdall.preflight import preflight; "
    "s = load_settings(); preflight(s, bucket=s.bucket)"
)


def production_blocks() -> dict[str, dict[str, str]]:
    """Each block's exports, by the party its command names: mlflow, heimdall, client."""
    text = README.read_text()
    start = text.index(SECTION)
    section = text[start : text.index("\n## ", start)]
    parties: dict[str, dict[str, str]] = {}
    for code in BLOCK.findall(section):
        party = (
            "mlflow" if "mlflow server" in code else "heimdall" if "heimdall " in code else "client"
        )
        parties[party] = dict(EXPORT.findall(code))
    assert set(parties) == {"mlflow", "heimdall", "client"}, "a party lost its block"
    return parties


def environment(exports: dict[str, str], backend: MlflowBackend) -> dict[str, str]:
    """The block's variables with the test servers' values; nothing else from this shell."""
    assert backend.seaweedfs is not None
    values = {
        "MLFLOW_TRACKING_URI": backend.tracking_uri,
        "MLFLOW_S3_ENDPOINT_URL": backend.seaweedfs.endpoint_url,
        "MLFLOW_S3_ACCESS_KEY_ID": backend.seaweedfs.access_key,
        "AWS_ACCESS_KEY_ID": backend.seaweedfs.access_key,
        "MLFLOW_S3_SECRET_ACCESS_KEY": backend.seaweedfs.secret_key,
        "AWS_SECRET_ACCESS_KEY": backend.seaweedfs.secret_key,
        "HEIMDALL_BUCKET": backend.bucket,
        "HEIMDALL_WEBHOOK_SECRET": "test-webhook-secret",
    }
    unknown = set(exports) - set(values)
    assert not unknown, f"the block exports {unknown}: give the test a value for each"
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        **{name: values[name] for name in exports},
    }


def run(command: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_mlflow_server_block_sets_its_s3_keys_and_the_webhook_settings() -> None:
    exports = production_blocks()["mlflow"]

    assert {"MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(exports)
    assert set(exports) >= WEBHOOK
    assert not {"MLFLOW_S3_ACCESS_KEY_ID", "MLFLOW_S3_SECRET_ACCESS_KEY"} & set(exports)


def test_the_heimdall_and_client_blocks_alone_reach_a_registered_model(
    mlflow_server: MlflowBackend,
    atto: Export,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
) -> None:
    name = f"heimdall-docs-{os.urandom(3).hex()}"
    register(mlflow_server, atto, name, f"docs/{name}.onnx")
    blocks = production_blocks()

    heimdall = environment(blocks["heimdall"], mlflow_server)
    listed = run(["heimdall", "models", "list", "--json"], heimdall, tmp_path)
    run([sys.executable, "-c", PREFLIGHT], heimdall, tmp_path)
    client = environment(blocks["client"], mlflow_server)
    read = run([sys.executable, "-c", CLIENT_READ, name, str(tmp_path / "got")], client, tmp_path)

    assert name in listed
    assert read.split()[0] == "1"
    assert sha256_file(tmp_path / "got" / "model.onnx") == atto.result.sha256
