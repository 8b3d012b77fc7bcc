"""The registry commands' own output (the commands end to end are in test_cli.py): alias
moves with their previous holder, versions with aliases and stages at 80 columns (issue 20, 6)."""

from __future__ import annotations

import io
from pathlib import Path

from heimdall import cli_registry, display
from heimdall.registry import AliasChange, Gate, StageMove
from tests.unit.test_cli import Home
from tests.unit.test_display import NAME
from tests.unit.test_display import screen as screen  # the 80-column terminal fixture


def test_models_list_finding_nothing_says_which_store_it_looked_in(tmp_path: Path) -> None:
    """Issue 20, 5: "no registered models" alone did not say where it had looked."""
    result = Home(tmp_path, "heimdall-x").run("models", "list")

    assert result.exit_code == 0, result.output
    assert " ".join(result.stdout.split()) == (
        f"no registered models in sqlite:///{tmp_path / 'mlflow.db'}"
    )


def version(number: str, aliases: list[str], stage: str | None) -> dict[str, object]:
    return {
        "version": number,
        "aliases": aliases,
        "stage": stage,
        "sha256": "ab" * 32,
        "status": "READY",
        "verification": "passed",
        "created_at": "2026-12-07T03:59:31+00:00",
    }


def test_models_show_keeps_names_aliases_and_stages_whole_at_80_columns(
    screen: io.StringIO,
) -> None:
    cli_registry.show_model(
        {
            "name": NAME,
            "description": "LocalizationNet (ConvNeXt backbone, two heads) as ONNX",
            "aliases": {"production": "1", "staging": "2", "staging-int8": "2"},
            "versions": [
                version("2", ["staging", "staging-int8"], "Staging"),
                version("1", ["production"], "Production"),
            ],
            "alias_history": {},
            "tags": {},
        },
        None,
    )

    shown = screen.getvalue()
    assert max(len(line) for line in shown.splitlines()) <= 80
    for word in (NAME, "staging-int8", "Production", "Staging", "production", "abababababab…"):
        assert word in shown, word


def test_an_alias_move_shows_the_previous_holder_and_the_stages_that_followed(
    screen: io.StringIO,
) -> None:
    change = AliasChange(
        name=NAME,
        alias="production",
        version="3",
        previous="2",
        action="promote",
        gates=(Gate("baseline", True, "median 1 km"),),
        stages=(StageMove("3", "Production", "Staging"), StageMove("2", "Archived", "Production")),
        previous_problem="model.onnx now has sha256 00…",
    )

    cli_registry.show_change(display.plain(change), "promote")

    shown = " ".join(screen.getvalue().split())
    assert "previous holder │ version 2" in shown
    assert f"model │ {NAME}" in shown and "alias │ production" in shown
    assert "│ baseline │ yes │ median 1 km │" in shown
    assert "altered, not judged against" in shown
    assert "│ 2 │ Archived │ Production │" in shown
    assert change.to_dict()["previous"] == "2"
    assert change.line() == f"{NAME}@production: version 2 → version 3"
