"""`heimdall score`: batch scoring of recording archives (placeholder)."""

from __future__ import annotations

import typer


def score(ctx: typer.Context) -> None:
    """Score an archive of features (being built)."""
    raise typer.Exit(2)
