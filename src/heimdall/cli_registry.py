"""The registry commands: promote and rollback an alias, list and show registered models."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import typer
from rich.text import Text

from heimdall.display import (
    ForceOpt,
    JsonOpt,
    ReasonOpt,
    emit,
    errors,
    fields_table,
    out,
    plain,
    records_table,
    settings_of,
    short_hash,
    show,
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


# --- how registry results are shown -------------------------------------------------------


def show_model(data: Mapping[str, Any], version: str | None) -> None:
    """A model: its aliases, one row per version, the alias history (and one version's details)."""
    versions = data["versions"]
    details = None
    if version is not None and versions:
        one = versions[0]
        details = fields_table(
            f"version {one['version']}",
            [
                ("model URI", one["uri"]),
                *((k, one[k]) for k in ("aliases", "status", "stage", "verification", "sha256")),
                *((k, one[k]) for k in ("source", "onnx_uri", "run_id", "created_at")),
                ("description", one["description"]),
                ("tags", one["tags"]),
            ],
        )
    history = _alias_timeline(data["alias_history"])
    # Nearly every version is READY: a column only when one is not, so the table fits 80 columns.
    pending = any(v["status"] != "READY" for v in versions)
    show(
        fields_table(
            "model",
            [
                ("name", data["name"]),
                ("description", data["description"]),
                ("aliases", {a: f"version {n}" for a, n in data["aliases"].items()}),
                ("tags", data["tags"]),
            ],
        ),
        records_table(
            "versions",
            [
                {
                    "version": v["version"],
                    "aliases": "\n".join(v["aliases"]) or "-",  # narrower than a, b
                    "stage": v["stage"],  # MLflow's, for loaders that read stages
                    "sha256": short_hash(v["sha256"]),
                    "parity": v["verification"],
                    "created (UTC)": when(v["created_at"]),
                }
                | ({"status": v["status"]} if pending else {})
                for v in versions
            ],
        )
        if versions
        else Text("no versions"),
        details,
        records_table("alias history", history) if history else None,
    )


def show_change(data: Mapping[str, Any], title: str) -> None:
    """An alias move: from which holder to which, the gates it passed, the stages that followed."""
    previous = data["previous"]
    unchanged = data["action"] == "unchanged"
    rows: list[tuple[str, Any]] = [
        ("model", data["name"]),
        ("alias", data["alias"]),
        ("version", f"{data['version']} (unchanged)" if unchanged else data["version"]),
        ("previous holder", "none" if previous is None else f"version {previous}"),
        ("action", data["action"]),
    ]
    if data.get("previous_problem"):
        rows.append(
            ("previous holder's bytes", f"altered, not judged against: {data['previous_problem']}")
        )
    if data.get("skipped"):
        rows.append(("passed over", {f"version {v}": why for v, why in data["skipped"].items()}))
    stages = [
        {"version": m["version"], "stage": m["stage"], "was": m["previous"]}
        for m in data.get("stages", ())
    ]
    show(
        fields_table(title, rows),
        records_table("gates", data["gates"]) if data.get("gates") else None,
        records_table("MLflow stages moved", stages) if stages else None,
    )


def _alias_timeline(
    alias_history: Mapping[str, Sequence[Mapping[str, Any]]],
) -> list[dict[str, Any]]:
    """Every alias's moves as one timeline, oldest first."""
    moves = [(alias, e) for alias, events in alias_history.items() for e in events]
    return [
        {
            "alias": alias,
            "at (UTC)": when(e["at"]),
            "action": e["action"],
            "version": e["version"],
            "previous": e.get("previous"),
            "reason": e.get("reason"),
        }
        for alias, e in sorted(moves, key=lambda move: str(move[1]["at"]))
    ]
