"""The one retry policy: attempts, deadline, back-off, and that nothing else loops on sleep."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from heimdall.errors import LockTimeoutError
from heimdall.retry import Backoff, retry, wait_for

SRC = Path(__file__).resolve().parents[2] / "src" / "heimdall"
FAST = Backoff(first_s=0.001, max_s=0.004)


class Flaky:
    """Fails with ``errors`` in turn, then returns ``"done"``; counts its calls."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def test_retry_returns_after_transient_failures_and_reports_each_retry() -> None:
    flaky = Flaky(TimeoutError("1"), TimeoutError("2"))
    told: list[tuple[int, str]] = []

    result = retry(
        flaky,
        retryable=lambda exc: isinstance(exc, TimeoutError),
        attempts=3,
        backoff=FAST,
        on_retry=lambda n, exc: told.append((n, str(exc))),
    )

    assert result == "done"
    assert flaky.calls == 3
    assert told == [(1, "1"), (2, "2")]


def test_retry_raises_the_last_error_after_its_attempts() -> None:
    flaky = Flaky(*(TimeoutError(str(i)) for i in range(5)))

    with pytest.raises(TimeoutError, match=r"^2$"):
        retry(flaky, retryable=lambda exc: True, attempts=3, backoff=FAST)

    assert flaky.calls == 3


def test_retry_raises_a_permanent_error_at_once() -> None:
    flaky = Flaky(ValueError("bad request"))

    with pytest.raises(ValueError, match="bad request"):
        retry(flaky, retryable=lambda exc: isinstance(exc, TimeoutError), attempts=5)

    assert flaky.calls == 1


def test_retry_stops_before_a_sleep_that_would_pass_its_deadline() -> None:
    flaky = Flaky(*(TimeoutError(str(i)) for i in range(50)))
    started = time.monotonic()

    with pytest.raises(TimeoutError):
        retry(
            flaky,
            retryable=lambda exc: True,
            attempts=50,
            deadline_s=0.5,
            backoff=Backoff(first_s=0.1, max_s=0.1, jitter=0),
        )

    assert time.monotonic() - started < 0.5
    assert 3 <= flaky.calls <= 5


def test_retry_refuses_zero_attempts() -> None:
    with pytest.raises(ValueError, match="attempts"):
        retry(lambda: 1, retryable=lambda exc: True, attempts=0)


def test_backoff_doubles_up_to_its_cap_with_jitter_below_the_base() -> None:
    backoff = Backoff(first_s=0.1, max_s=0.5, jitter=0.5)

    delays = [[backoff.delay(n) for _ in range(200)] for n in (1, 2, 3, 4, 10)]

    for bound, seen in zip((0.1, 0.2, 0.4, 0.5, 0.5), delays, strict=True):
        assert all(bound * 0.5 <= d <= bound for d in seen)
        assert max(seen) - min(seen) > bound * 0.2  # jittered, not constant
    with pytest.raises(ValueError):
        Backoff(first_s=1.0, max_s=0.5)


def test_wait_for_returns_the_first_answer() -> None:
    answers = iter([None, None, "ready"])

    assert wait_for(lambda: next(answers), deadline_s=5, timeout=AssertionError) == "ready"


def test_wait_for_raises_its_timeout_error_at_the_deadline() -> None:
    checks = 0

    def never() -> None:
        nonlocal checks
        checks += 1

    started = time.monotonic()
    with pytest.raises(LockTimeoutError, match="waited"):
        wait_for(
            never,
            deadline_s=0.3,
            timeout=lambda: LockTimeoutError("waited 0.3 s"),
            backoff=Backoff(first_s=0.05, max_s=0.1),
        )

    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 0.6
    assert checks >= 3


def _sleeps_in_a_loop(tree: ast.AST) -> list[int]:
    lines = []
    for loop in ast.walk(tree):
        if isinstance(loop, ast.For | ast.While):
            for node in ast.walk(loop):
                if isinstance(node, ast.Call) and "sleep" in (
                    getattr(node.func, "attr", None),
                    getattr(node.func, "id", None),
                ):
                    lines.append(node.lineno)
    return lines


def test_only_the_retry_module_sleeps_in_a_loop() -> None:
    """A hand-written retry loop (sleep inside for/while) anywhere else is a second policy.

    The benchmark's pacing between timed calls is not a retry and is the one exception.
    """
    allowed = {"retry.py", "timing.py"}
    found = {
        f"{path.relative_to(SRC)}:{line}"
        for path in SRC.rglob("*.py")
        if path.name not in allowed
        for line in _sleeps_in_a_loop(ast.parse(path.read_text()))
    }

    assert found == set()
    assert _sleeps_in_a_loop(ast.parse((SRC / "retry.py").read_text()))
