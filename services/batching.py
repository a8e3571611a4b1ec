"""Dynamic batching in front of one ONNX Runtime session.

Requests queue; a drain task runs the session in a worker thread over everything
queued (up to ``max_batch_size`` requests) as one batch. While one batch computes (ONNX
Runtime releases the GIL), the event loop keeps reading requests and the next batch
gathers: under load, batches grow by themselves; an idle model answers a lone request at
once. ``max_wait_s`` > 0 additionally holds a non-full batch back that long, trading
latency for larger batches.

Models that run a full batch in microseconds (``INLINE_BELOW_S``) skip all of that and
compute each request on the event loop as it arrives: a queue, a future and a thread
handoff would cost more than the model, and batching cannot pay for itself there.
``threaded: null`` (the default) times a full batch once at start-up and picks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepserve import metrics
from deepserve.errors import DeadlineExceeded, Overloaded
from deepserve.runtime import Runtime
from deepserve.statistics import Timing

log = logging.getLogger(__name__)

INLINE_BELOW_S = 0.0005  # models that run a full batch faster than this run on the event loop


@dataclass
class BatchingConfig:
    max_batch_size: int = 64  # requests per session run
    max_wait_s: float = 0.0  # extra wait for a fuller batch; 0 = none
    max_queued: int = 1024  # requests queued or computing; beyond it RESOURCE_EXHAUSTED
    enabled: bool = True  # False: one request per session run (for comparisons)
    threaded: bool | None = None  # run the session in a worker thread; None = decide by warm-up latency

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "BatchingConfig":
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown batching option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**values)


@dataclass
class BatchStats:
    runs: int = 0
    requests: int = 0
    rows: int = 0
    largest: int = 0  # the distribution is in the batch-size histogram (deepserve.metrics)

    def record(self, requests: int, rows: int) -> None:
        self.runs += 1
        self.requests += requests
        self.rows += rows
        self.largest = max(self.largest, requests)


class BatchingBackend:
    """A :class:`~deepserve.dataplane.Backend` that computes in this process, batching requests."""

    def __init__(self, runtime: Runtime, config: BatchingConfig | None = None):
        self.runtime = runtime
        self.config = config or BatchingConfig()
        self.stats = BatchStats()
        self.metrics = metrics.get()
        self._pending: list[tuple[dict[str, np.ndarray], asyncio.Future, float]] = []  # (inputs, answer, queued at)
        self._draining = False
        self._in_flight = 0  # requests queued or computing
        threaded = self.config.threaded
        if threaded is None:  # a full batch of one-row requests: does it outlast a thread handoff?
            threaded = runtime.time_run(self.config.max_batch_size) >= INLINE_BELOW_S
        self.threaded = threaded
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"onnx-{runtime.name}")

    async def infer(self, inputs: dict[str, np.ndarray], timeout: float) -> tuple[dict[str, np.ndarray], Timing]:
        """The graph's outputs for ``inputs``, and what computing them cost (:class:`Timing`)."""
        if self._in_flight >= self.config.max_queued:
            raise Overloaded(
                f"model '{self.runtime.name}' is overloaded: {self._in_flight} requests in flight; "
                "retry with backoff"
            )
        if not self.threaded:
            # Microsecond models: computing now costs less than queueing (a future, a task,
            # a timer); the loop is busy for those microseconds either way.
            started = time.perf_counter()
            outputs = self.runtime.run(inputs)
            seconds, rows = time.perf_counter() - started, len(next(iter(inputs.values())))
            self._record(1, rows, seconds, (0.0,))
            return outputs, Timing(0.0, seconds, 1.0, rows)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((inputs, future, time.perf_counter()))
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        # A timer, not asyncio.wait_for: no extra task per request on the hot path.
        timer = loop.call_later(timeout, self._expire, future)
        self._in_flight += 1
        try:
            return await future  # if the caller is cancelled, so is the future: the drain skips it
        finally:
            self._in_flight -= 1
            timer.cancel()

    def _expire(self, future: asyncio.Future) -> None:
        if not future.done():  # still queued or computing: the caller gets its answer now
            future.set_exception(DeadlineExceeded(f"model '{self.runtime.name}' did not answer within the deadline"))

    async def info(self, timeout: float = 0.0) -> dict[str, Any]:
        return {
            "provider": self.runtime.provider,
            "load_seconds": self.runtime.load_seconds,
            "batch_runs": self.stats.runs,
            "batched_requests": self.stats.requests,
            "largest_batch": self.stats.largest,
            "in_flight": self._in_flight,
            "threaded": self.threaded,
        }

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        limit = self.config.max_batch_size if self.config.enabled else 1
        try:
            while self._pending:
                if self.config.max_wait_s > 0 and len(self._pending) < limit:
                    await asyncio.sleep(self.config.max_wait_s)
                batch = [item for item in self._pending[:limit] if not item[1].done()]
                del self._pending[:limit]
                for group in _by_shape(batch):
                    await self._run(loop, group)
        finally:
            self._draining = False

    async def _run(self, loop, group) -> None:
        counts = [len(next(iter(x.values()))) for x, _, _ in group]
        merged = group[0][0] if len(group) == 1 else {
            name: np.concatenate([x[name] for x, _, _ in group]) for name in group[0][0]
        }
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._timed_run, merged)
        except Exception:  # the session failed: every request in the batch learns it
            log.exception("model %s: session run failed", self.runtime.name)
            for _, future, _ in group:
                if not future.done():
                    future.set_exception(RuntimeError(f"model '{self.runtime.name}' failed to compute"))
            return
        outputs, seconds = outputs
        waits = [started - queued for _, _, queued in group]
        self._record(len(group), sum(counts), seconds, waits)
        if len(group) == 1:
            parts = [outputs]
        else:
            bounds = np.cumsum(counts)[:-1]
            split = {name: np.split(array, bounds) for name, array in outputs.items()}
            parts = [{name: split[name][i] for name in outputs} for i in range(len(group))]
        share, rows = 1.0 / len(group), sum(counts)
        for (_, future, _), part, wait in zip(group, parts, waits):
            if not future.done():
                future.set_result((part, Timing(wait, seconds, share, rows)))

    def _timed_run(self, inputs):
        started = time.perf_counter()
        outputs = self.runtime.run(inputs)
        return outputs, time.perf_counter() - started

    def _record(self, requests: int, rows: int, seconds: float, waits) -> None:
        self.stats.record(requests, rows)
        self.metrics.batch(self.runtime.name, self.runtime.version, requests, rows, seconds, waits)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _by_shape(batch):
    """Requests whose tensors agree on every non-batch dimension can share a run."""
    groups: dict[tuple, list] = {}
    for item in batch:  # (inputs, future, queued at)
        key = tuple((name, a.shape[1:]) for name, a in item[0].items())
        groups.setdefault(key, []).append(item)
    return list(groups.values())
