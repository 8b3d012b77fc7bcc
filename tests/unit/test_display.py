"""What people see: tables that keep identifiers whole at 80 columns (issue 20, 6)."""

from __future__ import annotations

import io

import pytest
import typer
from rich.console import Console

from heimdall import display

NAME = "heimdall-localization-onnx"


@pytest.fixture
def screen(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """An 80-column terminal that the display prints to."""
    text = io.StringIO()
    monkeypatch.setattr(display, "out", Console(file=text, width=80, color_system=None))
    return text


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


@pytest.mark.parametrize("as_json", [False, True])
def test_running_out_of_memory_anywhere_in_a_command_is_one_line_and_exit_1(
    as_json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(typer.Exit) as exited, display.errors(as_json):
        raise MemoryError()

    assert exited.value.exit_code == 1
    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip()
    assert "out of memory" in text and "Traceback" not in text
    assert len(text.splitlines()) == 1 or as_json


def test_an_error_that_is_not_about_memory_is_left_alone() -> None:
    with pytest.raises(KeyError), display.errors(False):
        raise KeyError("not ours")
