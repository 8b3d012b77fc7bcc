"""The demo's own choices: where its checkpoint goes (running it end to end: test_pipeline)."""

from __future__ import annotations

from pathlib import Path

from heimdall.config import Settings
from heimdall.demo import demo_checkpoint


def test_two_demos_in_one_data_dir_write_two_checkpoint_files(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, tracking_uri=None, s3_endpoint_url=None)

    first, second = demo_checkpoint(settings, "atto"), demo_checkpoint(settings, "atto")

    assert first != second
    assert first.parent == second.parent == settings.resolved_data_dir / "checkpoints"
    assert first.name.startswith("demo-atto-") and first.suffix == ".safetensors"
