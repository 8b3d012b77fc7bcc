"""What a person sees in a terminal: `publish` and `models show` print tables, not JSON (issue 13).

One checkpoint is published once, on the embedded store, by ``heimdall publish`` running in a
detached tmux pane 100 columns wide; the pane's text (progress bar gone, colours dropped) is
what the tests read, then ``models show`` runs in a pane of its own. The facts to find come
from ``--json``, the machine-readable side of the same commands.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from heimdall.checkpoint import LoadedCheckpoint
from tests.fixtures.process import unavailable
from tests.integration.test_pipeline import CLI_TIMEOUT_S, checkpoint  # noqa: F401
from tests.integration.test_readme import scratch_env
from tests.unit.test_cli import tables

pytestmark = pytest.mark.integration

WIDTH = 100
# Longer than a table's value column: folded onto two lines, never cut with "…".
NAME = (
    f"heimdall-cli-output-a-registered-model-name-that-does-not-fit-in-a-row-{os.urandom(3).hex()}"
)
# What a JSON blob in a table cell looks like; none of it belongs in a table for people.
JSON_TEXT = ('{"', "[{", '": ', "\\u00d7")


@dataclass(frozen=True)
class Terminal:
    """A tmux server of its own; each command runs in a fresh pane WIDTH columns wide."""

    socket: Path
    env: dict[str, str]
    cwd: Path

    def tmux(self, *args: str, timeout: float = 30) -> str:
        command = ["tmux", "-S", str(self.socket), "-f", "/dev/null", *args]
        done = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=timeout, check=True
        )
        return done.stdout

    def run(self, *words: str | Path) -> str:
        """The pane's whole text after ``heimdall WORDS…`` ended, then its exit status line."""
        heimdall = shlex.join([sys.executable, "-m", "heimdall.cli", *map(str, words)])
        signal = shlex.join(["tmux", "-S", str(self.socket), "wait-for", "-S", "ended"])
        # The pane stays open after the command (sleep) until it is captured and killed.
        script = f'cd {shlex.quote(str(self.cwd))}; {heimdall}; echo "exit $?"; {signal}; sleep 900'
        self.tmux("new-session", "-d", "-s", "cli", "-x", str(WIDTH), "-y", "50", script)
        try:
            self.tmux("wait-for", "ended", timeout=CLI_TIMEOUT_S)
            return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-E", "-", "-t", "cli")
        finally:
            self.tmux("kill-session", "-t", "cli")


@pytest.fixture(scope="module")
def terminal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Terminal]:
    if shutil.which("tmux") is None:
        unavailable("tmux is not installed")
    home = tmp_path_factory.mktemp("cli-output")
    env = scratch_env(home)
    env.pop("COLUMNS")  # the pane's own width decides, as in a person's terminal
    env["TERM"] = "xterm-256color"
    env["HEIMDALL_MODEL_NAME"] = NAME
    # A short path: tmux refuses a socket path over ~100 bytes.
    socket = Path(f"/tmp/heimdall-tmux-{os.getpid()}-{os.urandom(3).hex()}.sock")
    shell = Terminal(socket, env, home)
    try:
        yield shell
    finally:
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True, check=False)
        socket.unlink(missing_ok=True)


@dataclass(frozen=True)
class Published:
    pane: str
    version: dict[str, Any]


@pytest.fixture(scope="module")
def published(
    terminal: Terminal,
    checkpoint: LoadedCheckpoint,  # noqa: F811
) -> Published:
    """The one publish of this module, as the pane showed it, and its version as JSON."""
    pane = terminal.run("publish", checkpoint.path, "--no-bench")
    assert "exit 0" in pane, pane
    done = subprocess.run(
        [sys.executable, "-m", "heimdall.cli", "models", "show", NAME, "--version", "1", "--json"],
        env=terminal.env,
        cwd=terminal.cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=True,
    )
    return Published(pane, json.loads(done.stdout)["versions"][0])


def assert_no_json(pane: str) -> None:
    cells = "\n".join(line for line in pane.splitlines() if line.lstrip().startswith("│"))
    found = [text for text in JSON_TEXT if text in cells]
    assert not found, f"JSON text {found} in the tables:\n{pane}"


def test_the_publish_summary_is_tables_with_the_version_alias_sha256_and_gates(
    published: Published,
) -> None:
    shown = tables(published.pane)
    summary = {field: value.replace("\n", "") for field, value in shown["published"]}

    assert_no_json(published.pane)
    assert (summary["name"], summary["model URI"]) == (NAME, f"models:/{NAME}/1")
    assert summary["parity"] == "passed"
    (fp32,) = shown["versions"]
    assert fp32[:4] == ["fp32", "1", "staging", f"{published.version['sha256'][:12]}…"]
    assert {(variant, gate, result) for variant, gate, result, _ in shown["gates"]} == {
        ("fp32", gate, "passed") for gate in ("ready", "verification", "baseline", "champion")
    }
    assert {step for step, *_ in shown["steps"]} >= {"export", "verify", "upload", "register"}


def test_models_show_is_tables_with_each_version_its_aliases_and_the_alias_history(
    published: Published, terminal: Terminal
) -> None:
    pane = terminal.run("models", "show", NAME)
    shown = tables(pane)

    assert "exit 0" in pane, pane
    assert_no_json(pane)
    model = {field: value for field, value in shown["model"]}
    assert (model["name"].replace("\n", ""), model["aliases"]) == (NAME, "staging: version 1")
    (version,) = shown["versions"]
    assert (
        version[:5]
        == [
            "1",
            "staging",
            "Staging",  # the stage follows the alias
            f"{published.version['sha256'][:12]}…",
            "passed",
        ]
    )
    (move,) = shown["alias history"]
    assert [move[0], *move[2:5]] == ["staging", "publish", "1", "-"]
