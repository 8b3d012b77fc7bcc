"""The one retry policy: bounded attempts inside one deadline, jittered exponential back-off.

Every hand-made loop that tries again (a read-back dropped by the store, a SQLite write that
found the database locked, a lock held by another process, a registry version not yet READY)
goes through :func:`retry` or :func:`wait_for`, so each has the same two bounds: a number of
attempts and a deadline that includes the sleeps. Remote calls get their own per-request
deadline from their client (botocore, MLflow's HTTP policy, socket timeouts); this module only
decides whether and when to call again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

_T = TypeVar("_T")


@dataclass(frozen=True)
class Backoff:
    """Sleep ``first_s · 2^(n-1)`` after the n-th failure, at most ``max_s``, times a jitter.

    The jitter (uniform in ``[1 - jitter, 1]``) keeps processes that failed together from
    trying again together.
    """

    first_s: float = 0.1
    max_s: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.first_s <= self.max_s) or not 0 <= self.jitter < 1:
            raise ValueError(f"invalid back-off {self}")

    def delay(self, failures: int) -> float:
        base = min(self.first_s * 2 ** max(failures - 1, 0), self.max_s)
        return base * (1 - self.jitter * random.random())


def retry(
    fn: Callable[[], _T],
    *,
    retryable: Callable[[Exception], bool],
    attempts: int,
    deadline_s: float | None = None,
    backoff: Backoff = Backoff(),
    on_retry: Callable[[int, Exception], None] | None = None,
) -> _T:
    """``fn()``, called again after an exception ``retryable`` accepts.

    Stops after ``attempts`` calls, or when the next sleep would end past ``deadline_s``
    (seconds from now), and then raises the last exception unchanged. The deadline bounds when
    the last call starts: each call's own duration is bounded by its client's timeout.
    ``on_retry(n, exc)`` is told before each sleep (for a log line).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    end = None if deadline_s is None else time.monotonic() + deadline_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            pause = backoff.delay(attempt)
            late = end is not None and time.monotonic() + pause > end
            if attempt == attempts or late or not retryable(exc):
                raise
            if on_retry is not None:
                on_retry(attempt, exc)
            time.sleep(pause)
    raise AssertionError("unreachable")


def wait_for(
    check: Callable[[], _T | None],
    *,
    deadline_s: float,
    timeout: Callable[[], Exception],
    backoff: Backoff = Backoff(first_s=0.05, max_s=0.5),
) -> _T:
    """The first result of ``check()`` that is not None; ``raise timeout()`` past the deadline.

    ``check`` runs at least once, and once more at the deadline when a sleep would pass it.
    """
    end = time.monotonic() + deadline_s
    polls = 0
    while True:
        found = check()
        if found is not None:
            return found
        now = time.monotonic()
        if now >= end:
            raise timeout()
        polls += 1
        time.sleep(min(backoff.delay(polls), end - now))
