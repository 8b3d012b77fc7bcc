"""Merge concurrent requests into one ONNX Runtime call, each batch on one served model.

Requests queue with the ``Served`` they arrived with. One worker task takes the oldest
request's model, waits up to ``max_wait_ms`` for more requests on that same model (never
another, so a response never mixes versions), runs them as one batch in a single worker
thread (ONNX Runtime releases the GIL and already uses every core for one batch) and splits
the results back in order. A request larger than ``max_batch`` is queued as chunks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import structlog

from heimdall.errors import ConfigError, HeimdallError
from heimdall.serving.backend import Limits, Outputs, Served
from heimdall.serving.metrics import Metrics

log = structlog.get_logger(__name__)


class Overloaded(HeimdallError):
    """The queue is full: the client should retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Item:
    served: Served
    features: np.ndarray
    future: asyncio.Future[Outputs] = field(repr=False)

    @property
    def samples(self) -> int:
        return int(self.features.shape[0])


class Batcher:
    """Runs checked feature batches on their pinned ``Served``, merged under load."""

    def __init__(self, limits: Limits, metrics: Metrics) -> None:
        if limits.max_batch < 1 or limits.max_wait_ms < 0:
            raise ConfigError("max_batch must be at least 1 and max_wait_ms at least 0")
        if limits.max_request_samples > limits.max_queue_samples:
            raise ConfigError(
                f"max_request_samples ({limits.max_request_samples}) exceeds max_queue_samples "
                f"({limits.max_queue_samples}): the biggest request could never be queued"
            )
        self.limits = limits
        self.metrics = metrics
        self._queue: deque[_Item] = deque()
        self._queued = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heimdall-batch")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._last_batch = 1

    async def run(self, served: Served, features: np.ndarray) -> Outputs:
        """Positions and uncertainties of ``features`` (checked float32), all from ``served``."""
        loop = self._started()
        samples = int(features.shape[0])
        if self._queued + samples > self.limits.max_queue_samples:
            raise Overloaded(
                f"the server is busy ({self._queued} samples queued, at most "
                f"{self.limits.max_queue_samples}); retry shortly"
            )
        step = self.limits.max_batch
        items = [
            _Item(served, features[start : start + step], loop.create_future())
            for start in range(0, samples, step)
        ]
        self._queue.extend(items)
        self._queued += samples
        self.metrics.queue_depth.set(self._queued)
        self._arrived.set()
        try:
            results = [await item.future for item in items]
        finally:
            for item in items:
                item.future.cancel()  # a no-op once done; drops chunks of an abandoned request
        if len(results) == 1:
            return results[0]
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    async def aclose(self) -> None:
        """Stop for good: queued requests fail, a running batch finishes in its thread."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        self._fail_queued(HeimdallError("the server is shutting down; retry on another replica"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _started(self) -> asyncio.AbstractEventLoop:
        """The running loop, with a worker on it (started on first use, or anew on a new loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Futures and the event belong to the loop they were made on; a test client may run
            # each request on a fresh loop, and the old loop's callers are gone with it.
            self._queue.clear()
            self._queued = 0
            self._loop = loop
            self._arrived = asyncio.Event()
            self._worker = None
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name="heimdall-batcher")
        return loop

    def _fail_queued(self, error: HeimdallError) -> None:
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(error)
        self._queued = 0
        self.metrics.queue_depth.set(0)

    async def _work(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._queue:
                batch = await self._gather()
                if batch:
                    await self._run(batch)

    async def _gather(self) -> list[_Item]:
        """The next batch: the oldest request's model, and more requests on it.

        Waiting up to ``max_wait_ms`` ends early once the batch is full or holds as many samples
        as the last one: a lone client pays no wait, and concurrent clients, whose requests
        arrive a moment apart after their previous answers, are merged again.
        """
        served = self._queue[0].served
        enough = min(self.limits.max_batch, self._last_batch)
        deadline = asyncio.get_running_loop().time() + self.limits.max_wait_ms / 1000
        while self._samples_of(served) < enough:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return self._take(served)

    def _samples_of(self, served: Served) -> int:
        return sum(i.samples for i in self._queue if i.served is served and not i.future.done())

    def _take(self, served: Served) -> list[_Item]:
        batch: list[_Item] = []
        total = 0
        kept: deque[_Item] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():  # abandoned by its caller
                self._queued -= item.samples
            elif item.served is served and total + item.samples <= self.limits.max_batch:
                batch.append(item)
                total += item.samples
                self._queued -= item.samples
            else:
                kept.append(item)
        self._queue = kept
        self.metrics.queue_depth.set(self._queued)
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        served = batch[0].served
        features = (
            batch[0].features
            if len(batch) == 1
            else np.concatenate([item.features for item in batch])
        )
        self._last_batch = int(features.shape[0])
        self.metrics.batch_size.observe(self._last_batch)
        loop = asyncio.get_running_loop()
        try:
            positions, uncertainties = await loop.run_in_executor(
                self._executor, served.run, features
            )
        except Exception as exc:  # every request of the batch gets the failure, the worker lives
            log.warning("serving.batch_failed", samples=len(features), error=type(exc).__name__)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        offset = 0
        for item in batch:
            end = offset + item.samples
            if not item.future.done():
                item.future.set_result((positions[offset:end], uncertainties[offset:end]))
            offset = end
