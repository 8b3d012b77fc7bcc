"""The registry commands' own output (the commands end to end are in test_cli.py)."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_cli import Home


def test_models_list_finding_nothing_says_which_store_it_looked_in(tmp_path: Path) -> None:
    """Issue 20, 5: "no registered models" alone did not say where it had looked."""
    result = Home(tmp_path, "heimdall-x").run("models", "list")

    assert result.exit_code == 0, result.output
    assert " ".join(result.stdout.split()) == (
        f"no registered models in sqlite:///{tmp_path / 'mlflow.db'}"
    )
