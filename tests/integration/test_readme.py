"""The README's "Using it" section is executable: its blocks run, its other commands parse.

Every ```bash and ```python block runs in order in one scratch folder with the embedded store
(no servers), at small sizes: ``SMALLER`` rewrites the slow calls, and the baseline gate is
loosened for a model trained for one epoch. Commands named outside the blocks (the table and
the notes) are parsed by the CLI itself, so a renamed command or option fails here too.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from heimdall.cli import app

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = ("## Using it\n", "\n## Configuration\n")
# Slow call → the same call at a small size; each must occur in the section exactly once.
SMALLER = {
    "heimdall train -o model.safetensors\n": (
        "heimdall train -o model.safetensors --epochs 1 --samples 64\n"
    ),
    "heimdall publish model.safetensors\n": "heimdall publish model.safetensors --no-bench\n",
    'publish("model.safetensors")': (
        'publish("model.safetensors", bench=False, verify_batch_sizes=(1,))'
    ),
}
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
TIMEOUT_S = 300


def usage_section() -> str:
    text = README.read_text()
    start, end = text.index(SECTION[0]), text.index(SECTION[1])
    return text[start:end]


def blocks(section: str) -> list[tuple[str, str]]:
    found = [(lang, code) for lang, code in BLOCK.findall(section)]
    assert {lang for lang, _ in found} == {"bash", "python"}, "the section lost a block kind"
    return found


def scratch_env(tmp_path: Path) -> dict[str, str]:
    """No settings from the developer's shell; this interpreter's ``heimdall`` and ``python``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HEIMDALL_", "MLFLOW_", "AWS_")) or k == "AWS_CA_BUNDLE"
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HEIMDALL_DATA_DIR"] = str(tmp_path / ".heimdall")
    env["HEIMDALL_GATE_BASELINE_FRACTION"] = "100"  # one epoch on 64 samples learns little
    env["COLUMNS"] = "120"
    return env


def test_every_block_of_the_usage_section_runs_in_order(tmp_path: Path) -> None:
    section = usage_section()
    for slow, small in SMALLER.items():
        assert section.count(slow) == 1, f"README no longer has {slow!r}: update SMALLER"
        section = section.replace(slow, small)
    env = scratch_env(tmp_path)

    for lang, code in blocks(section):
        command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else ["python"]
        done = subprocess.run(
            command,
            input=code if lang == "python" else None,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"```{lang} block failed:\n{code}\n--- output ---\n{output}"
        assert "Traceback" not in output, output

    assert (tmp_path / "features.npy").is_file()


def _command(words: list[str]) -> tuple[Any, list[str]]:
    """The (sub)command that ``heimdall WORDS…`` names, and the words left for it."""
    command: Any = typer.main.get_command(app)
    words = list(words)
    while words and words[0] in getattr(command, "commands", {}):
        command, words = command.commands[words[0]], words[1:]
    assert not hasattr(command, "commands"), f"no such command: heimdall {' '.join(words)}"
    return command, words


def _options(command: Any) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def test_every_command_named_outside_the_blocks_parses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    section = BLOCK.sub("", usage_section())
    spans = re.findall(r"`([^`]+)`", section)
    full = [shlex.split(s) for s in spans if s.startswith("heimdall ")]
    assert len(full) >= 8, "the table of single steps is gone"
    for words in full:
        command, rest = _command(words[1:])
        # Parsing checks names, counts and types of options and arguments; nothing runs.
        command.make_context(command.name, rest)

    notes = re.findall(r"^- `([a-z]+)`(.*?)(?=^- |\n\n)", section, re.MULTILINE | re.DOTALL)
    assert {name for name, _ in notes} >= {"train", "publish", "promote"}
    for name, text in notes:
        command, _ = _command([name])
        spans = [s for s in re.findall(r"`([^`]+)`", text) if not s.startswith("heimdall ")]
        named = {w for span in spans for w in span.split()}
        unknown = {w for w in named if w.startswith("--")} - _options(command)
        assert not unknown, f"`heimdall {name}` has no {sorted(unknown)}"
