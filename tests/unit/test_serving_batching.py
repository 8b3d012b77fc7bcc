"""The batcher merges concurrent requests into one ONNX Runtime call on the model each request
arrived with, chunks big requests, splits results back in order and refuses when full."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from heimdall.data import generate
from heimdall.errors import ConfigError, InputError
from heimdall.export import ExportResult
from heimdall.inference import LocalizationModel
from heimdall.serving.backend import Limits, Outputs, Served
from heimdall.serving.batching import Batcher, Overloaded
from heimdall.serving.metrics import Metrics


@dataclass(frozen=True)
class CountingServed(Served):
    """A real served model that records the batch size of each ONNX Runtime call."""

    calls: list[int] = field(default_factory=list, compare=False)

    def run(self, features: np.ndarray) -> Outputs:
        self.calls.append(len(features))
        return super().run(features)


@pytest.fixture(scope="module")
def model(atto_onnx: ExportResult) -> LocalizationModel:
    return LocalizationModel.load(atto_onnx.path)


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return generate(10, seed=3)[0]


def _served(model: LocalizationModel, version: str) -> CountingServed:
    return CountingServed(model, "localization", version, model.sha256, None, "test")


def _batcher(**limits: float) -> Batcher:
    return Batcher(Limits(**limits), Metrics())  # type: ignore[arg-type]


async def _all(batcher: Batcher, requests: Sequence[tuple[Served, np.ndarray]]) -> list[Outputs]:
    try:
        return await asyncio.gather(*(batcher.run(s, f) for s, f in requests))
    finally:
        await batcher.aclose()


def test_concurrent_requests_share_one_call_and_get_their_own_rows(
    model: LocalizationModel, features: np.ndarray
) -> None:
    served = _served(model, "1")
    batcher = _batcher(max_batch=32, max_wait_ms=50)
    results = asyncio.run(_all(batcher, [(served, features[i : i + 1]) for i in range(8)]))
    assert served.calls == [8]
    expected = model.predict(features[:8])
    for i, (positions, uncertainties) in enumerate(results):
        np.testing.assert_array_equal(positions, expected.positions[i : i + 1])
        np.testing.assert_array_equal(uncertainties, expected.uncertainties[i : i + 1])
    registry = batcher.metrics.registry
    assert registry.get_sample_value("heimdall_batch_samples_count") == 1
    assert registry.get_sample_value("heimdall_batch_samples_sum") == 8


def test_a_request_bigger_than_max_batch_runs_in_chunks(
    model: LocalizationModel, features: np.ndarray
) -> None:
    served = _served(model, "1")
    ((positions, uncertainties),) = asyncio.run(
        _all(_batcher(max_batch=4, max_wait_ms=0), [(served, features)])
    )
    assert served.calls == [4, 4, 2]
    chunks = [model.predict(features[i : i + 4]) for i in (0, 4, 8)]
    np.testing.assert_array_equal(positions, np.concatenate([c.positions for c in chunks]))
    np.testing.assert_array_equal(uncertainties, np.concatenate([c.uncertainties for c in chunks]))


class _SessionCalls:
    """An ONNX Runtime session that records the batch size of every ``run``."""

    def __init__(self, session: object) -> None:
        self._session = session
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._session, name)

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> object:
        self.batches.extend(len(v) for v in feed.values())
        return self._session.run(outputs, feed)  # type: ignore[attr-defined]


def test_a_merged_batch_above_64_samples_is_one_onnx_runtime_call(
    model: LocalizationModel,
) -> None:
    session = _SessionCalls(model.session)
    counted = LocalizationModel(session, uri="m.onnx", sha256=model.sha256)  # type: ignore[arg-type]
    served = Served(counted, "localization", "1", model.sha256, None, "test")
    batch = generate(100, seed=4)[0]

    ((positions, _),) = asyncio.run(_all(_batcher(max_batch=128, max_wait_ms=0), [(served, batch)]))

    assert session.batches == [100]
    np.testing.assert_array_equal(positions, model.predict(batch).positions)


def test_a_batch_never_mixes_two_served_models(
    model: LocalizationModel, features: np.ndarray
) -> None:
    old, new = _served(model, "1"), _served(model, "2")
    pinned = [(old if i % 2 else new, features[i : i + 1]) for i in range(10)]
    results = asyncio.run(_all(_batcher(max_batch=32, max_wait_ms=50), pinned))
    assert old.calls == [5] and new.calls == [5]
    expected = model.predict(features[0::2]).positions  # the same rows, as one batch
    np.testing.assert_array_equal(np.concatenate([r[0] for r in results[0::2]]), expected)


def test_a_lone_request_does_not_wait_for_company(
    model: LocalizationModel, features: np.ndarray
) -> None:
    served = _served(model, "1")
    batcher = _batcher(max_batch=32, max_wait_ms=60_000)

    async def lone() -> list[Outputs]:
        return await asyncio.wait_for(_all(batcher, [(served, features[:1])]), timeout=30)

    asyncio.run(lone())
    assert served.calls == [1]


def test_after_a_merged_batch_it_waits_for_as_many_again(
    model: LocalizationModel, features: np.ndarray
) -> None:
    served = _served(model, "1")
    batcher = _batcher(max_batch=32, max_wait_ms=60_000)

    async def two_rounds() -> None:
        await asyncio.gather(*(batcher.run(served, features[i : i + 1]) for i in range(4)))
        first = asyncio.ensure_future(batcher.run(served, features[4:5]))
        await asyncio.sleep(0.05)  # the rest arrive later, as closed-loop clients do
        rest = [batcher.run(served, features[i : i + 1]) for i in range(5, 8)]
        await asyncio.wait_for(asyncio.gather(first, *rest), timeout=30)
        await batcher.aclose()

    asyncio.run(two_rounds())
    assert served.calls == [4, 4]


def test_a_full_queue_refuses_with_overloaded(
    model: LocalizationModel, features: np.ndarray
) -> None:
    served = _served(model, "1")
    batcher = _batcher(max_batch=2, max_wait_ms=0, max_queue_samples=4, max_request_samples=4)

    async def flood() -> list[object]:
        try:
            return await asyncio.gather(
                *(batcher.run(served, features[i : i + 2]) for i in (0, 2, 4)),
                return_exceptions=True,
            )
        finally:
            await batcher.aclose()

    outcomes = asyncio.run(flood())
    assert isinstance(outcomes[2], Overloaded)
    assert "4 samples queued" in str(outcomes[2])
    assert all(isinstance(o, tuple) for o in outcomes[:2])
    assert sum(served.calls) == 4


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on(
    model: LocalizationModel, features: np.ndarray
) -> None:
    served = _served(model, "1")
    batcher = _batcher(max_batch=32, max_wait_ms=0)

    async def bad_then_good() -> tuple[BaseException | None, Outputs]:
        wrong = np.zeros((1, 3, 128, 31), np.float32)  # past the protocol, the model refuses
        failure: BaseException | None = None
        try:
            await batcher.run(served, wrong)
        except InputError as exc:
            failure = exc
        good = await batcher.run(served, features[:1])
        await batcher.aclose()
        return failure, good

    failure, (positions, _) = asyncio.run(bad_then_good())
    assert failure is not None and "shape" in str(failure)
    np.testing.assert_array_equal(positions, model.predict(features[:1]).positions)


def test_limits_that_could_never_serve_a_request_are_refused() -> None:
    with pytest.raises(ConfigError, match="max_request_samples"):
        _batcher(max_request_samples=64, max_queue_samples=32)
    with pytest.raises(ConfigError, match="max_batch"):
        _batcher(max_batch=0)


def test_a_new_event_loop_gets_a_working_batcher(
    model: LocalizationModel, features: np.ndarray
) -> None:
    served = _served(model, "1")
    batcher = _batcher(max_batch=32, max_wait_ms=0)
    for _ in range(2):  # each asyncio.run is a fresh loop, as a test client may make
        asyncio.run(batcher.run(served, features[:1]))
    assert served.calls == [1, 1]
