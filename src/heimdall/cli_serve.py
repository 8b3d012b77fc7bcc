"""`heimdall serve`: serve a model by URI over the Open Inference Protocol (placeholder)."""

from __future__ import annotations

import typer


def serve(ctx: typer.Context) -> None:
    """Serve a model over HTTP (being built)."""
    raise typer.Exit(2)
