"""What people see: tables that keep identifiers whole at 80 columns, alias moves with their
previous holder (issue 20, 6)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from heimdall import display
from heimdall.registry import AliasChange, Gate, StageMove

NAME = "heimdall-localization-onnx"


@pytest.fixture
def screen(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """An 80-column terminal that the display prints to."""
    text = io.StringIO()
    monkeypatch.setattr(display, "out", Console(file=text, width=80, color_system=None))
    return text


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
    display.show_model(
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


def test_a_records_table_folds_only_words_too_long_for_the_terminal(
    screen: io.StringIO,
) -> None:
    long_uri = "s3://heimdall-models/models/localization/" + "x" * 80
    display.out.print(
        display.records_table("models", [{"name": NAME, "uri": long_uri, "note": "a b c " * 20}])
    )

    shown = screen.getvalue()
    assert NAME in shown
    assert max(len(line) for line in shown.splitlines()) <= 80
    assert "x" * 20 in shown  # folded, never cut with an ellipsis
    assert "…" not in shown


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

    display.show_change(display.plain(change), "promote")

    shown = " ".join(screen.getvalue().split())
    assert "previous holder │ version 2" in shown
    assert f"model │ {NAME}" in shown and "alias │ production" in shown
    assert "│ baseline │ yes │ median 1 km │" in shown
    assert "altered, not judged against" in shown
    assert "│ 2 │ Archived │ Production │" in shown
    assert change.to_dict()["previous"] == "2"
    assert change.line() == f"{NAME}@production: version 2 → version 3"
