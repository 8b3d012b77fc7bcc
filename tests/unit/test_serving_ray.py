"""Ray Serve's deployment options bound the queue in samples; a webhook never blocks a replica."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from heimdall.serving import ray as serving_ray
from heimdall.serving.backend import Limits


def test_the_queue_bound_counts_requests_of_the_largest_size_not_samples() -> None:
    limits = Limits(max_request_samples=256, max_batch=32, max_queue_samples=65536)
    options = serving_ray.deployment_options(replicas=2, limits=limits)
    # Serve counts queued requests: 65536 samples are 256 requests of 256 samples.
    assert options["max_queued_requests"] == 256
    assert options["num_replicas"] == 2 and options["max_ongoing_requests"] == 64


def test_the_queue_holds_at_least_the_requests_a_replica_takes_at_once() -> None:
    # Requests count as queued while Serve picks a replica: a queue of 1 refuses concurrent ones.
    limits = Limits(max_request_samples=1024, max_batch=32, max_queue_samples=1024)
    options = serving_ray.deployment_options(replicas=1, limits=limits)
    assert options["max_queued_requests"] == options["max_ongoing_requests"] == 64


@dataclass
class Bumps:
    calls: list[str] = field(default_factory=list)

    @property
    def bump(self) -> Any:
        return self

    def remote(self) -> None:
        self.calls.append("bump")


@dataclass
class Following:
    name: str = "m"
    alias: str = "production"
    woken: int = 0

    def notify(self) -> None:
        self.woken += 1


def test_a_webhook_bumps_the_fanout_handle_held_without_looking_the_actor_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def lookup(name: str) -> Any:
        raise AssertionError("a GCS lookup on the replica's event loop")

    monkeypatch.setattr(serving_ray, "_notices", lookup)
    replica = SimpleNamespace(follower=Following(), _fanout=Bumps())
    notify = serving_ray.Replica.func_or_class.notify
    notify(replica, "m", "production")
    notify(replica, "other", "production")  # not the model this replica follows
    assert replica.follower.woken == 1 and replica._fanout.calls == ["bump"]
