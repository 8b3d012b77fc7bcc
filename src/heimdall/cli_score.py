"""`heimdall score`: batch scoring of recording archives, in one process or on Ray."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.text import Text

from heimdall.display import JsonOpt, console, emit, errors, progress_bar, settings_of


def score(
    ctx: typer.Context,
    uri: str = typer.Argument(
        ..., help="models:/NAME@alias (resolved once), models:/NAME/VERSION, s3:// or a path."
    ),
    input: Path = typer.Argument(
        ..., help="A folder of .npy files (B, 3, 128, 32), or a Parquet file with 'features'."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="The Parquet file to write."),
    use_ray: bool = typer.Option(
        False, "--ray", help="Score on a Ray actor pool (RAY_ADDRESS when set, else local Ray)."
    ),
    batch_size: int = typer.Option(256, "--batch-size", help="Samples per model call."),
    actors: int | None = typer.Option(
        None, "--actors", help="Ray actors, each loads the model once [default: one per CPU]."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT."),
    as_json: bool = JsonOpt,
) -> None:
    """Score every sample of an archive with one model version; write one Parquet row each.

    Columns: source, row, lat, lon, sigma_x, sigma_y, model_version, sha256. OUTPUT appears
    only once every sample is scored; an existing OUTPUT is refused without --overwrite.
    """
    from heimdall.scoring import score as run_score

    with errors(as_json), _progress(as_json) as progress:
        result = run_score(
            uri,
            input,
            output,
            settings=settings_of(ctx),
            batch_size=batch_size,
            use_ray=use_ray,
            progress=progress,
            actors=actors,
            overwrite=overwrite,
        )
    emit(result, as_json, "score")


@contextmanager
def _progress(as_json: bool) -> Iterator[Callable[[int, int, str], None] | None]:
    """A bar on a terminal; off one, a line each time a file is done (none for --json)."""
    if as_json:
        yield None
        return
    if not console.is_terminal:
        last = {"source": "", "done": 0}

        def line(done: int, total: int, source: str) -> None:
            if source != last["source"] and last["source"]:
                console.print(Text(f"scored {last['source']}: {last['done']}/{total} samples"))
            last.update(source=source, done=done)
            if done == total:
                console.print(Text(f"scored {source}: {done}/{total} samples"))

        yield line
        return
    with progress_bar() as bar:
        task = bar.add_task("scoring", total=None, info="")

        def update(done: int, total: int, source: str) -> None:
            bar.update(task, completed=done, total=total, info=f"{done}/{total} {source}")

        yield update
