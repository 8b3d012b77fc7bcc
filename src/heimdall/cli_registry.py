"""The registry commands: promote and rollback an alias, list and show registered models."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import typer
from rich.text import Text

from heimdall.display import (
    ForceOpt,
    JsonOpt,
    ReasonOpt,
    emit,
    errors,
    out,
    plain,
    records_table,
    settings_of,
    show_change,
    show_model,
    when,
)


def promote(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Argument(..., help="Version number to promote."),
    to: str = typer.Option("production", "--to", help="Alias to move."),
    force: bool = ForceOpt,
    reason: str = ReasonOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Move an alias to a version if every gate passes.

    Gates: READY, verified, bytes unchanged, better than the centre baseline, not worse than
    the alias's current holder.
    """
    from heimdall.gates import promote as run_promote
    from heimdall.inference import evaluate_heldout

    with errors(as_json):
        settings = settings_of(ctx)
        change = run_promote(
            name,
            version,
            evaluate=partial(evaluate_heldout, settings=settings),
            to=to,
            force=force,
            reason=reason,
            settings=settings,
        )
        _show_change(change, as_json, "promote")


def rollback(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Registered model name."),
    alias: str = typer.Option("production", help="Alias to return to its previous holder."),
    as_json: bool = JsonOpt,
) -> None:
    """Return an alias to the version that held it before."""
    from heimdall.registry import rollback as run_rollback
    from heimdall.storage import open_store

    settings = settings_of(ctx)
    with errors(as_json):
        change = run_rollback(name, alias=alias, settings=settings, store=open_store(settings))
        _show_change(change, as_json, "rollback")


def _show_change(change: object, as_json: bool, title: str) -> None:
    if as_json:
        emit(change, True, title)
    else:
        show_change(plain(change), title)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Collect no cycles while a short read runs: importing MLflow would trigger full passes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # Re-enabled as is, the next allocation would scan every object made meanwhile as young;
        # freezing and unfreezing moves them to the oldest generation without a pass.
        gc.freeze()
        gc.unfreeze()
        if enabled:
            gc.enable()


models_app = typer.Typer(no_args_is_help=True, help="Inspect registered models.")


@models_app.command("list")
def models_list(ctx: typer.Context, as_json: bool = JsonOpt) -> None:
    """Registered models with their aliases and latest version."""
    with _gc_paused(), errors(as_json):
        from heimdall.registry import list_models

        models = [m.to_dict() for m in list_models(settings=settings_of(ctx))]
        if as_json:
            emit(models, True, "models")
            return
        if not models:
            from heimdall.registry.client import registry_where

            out.print(
                Text(f"no registered models in {registry_where(settings_of(ctx))}"), soft_wrap=True
            )
            return
        # The descriptions are long and alike: `models show` has them.
        rows = [
            {
                "name": m["name"],
                "latest version": m["latest_version"],
                "aliases": {a: f"version {n}" for a, n in m["aliases"].items()},
                "updated (UTC)": when(m["updated_at"]),
            }
            for m in models
        ]
        out.print(records_table("registered models", rows))


@models_app.command("show")
def models_show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Option(None, help="One version instead of the model."),
    as_json: bool = JsonOpt,
) -> None:
    """A model's versions, aliases and alias history (or one version's details)."""
    with _gc_paused(), errors(as_json):
        from heimdall.registry import show_model as details_of

        details = details_of(name, version=version, settings=settings_of(ctx))
        if as_json:
            emit(details, True, name)
        else:
            show_model(details.to_dict(), version)
