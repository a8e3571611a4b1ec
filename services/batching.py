"""Dynamic batching in front of one ONNX Runtime session.

Requests queue; one worker thread runs the session. While it runs, new requests
gather, and the next run takes all of them (up to ``max_batch_size``) as one batch:
under load, batches grow by themselves; an idle model answers a lone request at once.
``max_wait_s`` > 0 additionally holds a non-full batch back that long, trading latency
for larger batches.

The session runs in a thread (ONNX Runtime releases the GIL) so that the event loop
keeps reading requests while the model computes: that is what lets a batch form.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepserve.errors import DeadlineExceeded, Overloaded
from deepserve.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class BatchingConfig:
    max_batch_size: int = 64  # requests per session run
    max_wait_s: float = 0.0  # extra wait for a fuller batch; 0 = none
    max_queued: int = 1024  # requests waiting beyond this are refused (RESOURCE_EXHAUSTED)
    enabled: bool = True  # False: one request per session run (for comparisons)

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
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # requests per run -> how many runs

    def record(self, requests: int, rows: int) -> None:
        self.runs += 1
        self.requests += requests
        self.rows += rows
        self.largest = max(self.largest, requests)
        self.sizes[requests] = self.sizes.get(requests, 0) + 1


class BatchingBackend:
    """A :class:`~deepserve.dataplane.Backend` that computes in this process, batching requests."""

    def __init__(self, runtime: Runtime, config: BatchingConfig | None = None):
        self.runtime = runtime
        self.config = config or BatchingConfig()
        self.stats = BatchStats()
        self._pending: list[tuple[dict[str, np.ndarray], asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"onnx-{runtime.name}")

    async def infer(self, inputs: dict[str, np.ndarray], timeout: float) -> dict[str, np.ndarray]:
        if len(self._pending) >= self.config.max_queued:
            raise Overloaded(
                f"model '{self.runtime.name}' is overloaded: {len(self._pending)} requests queued; retry with backoff"
            )
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((inputs, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            future.cancel()  # a queued request is dropped before it runs
            raise DeadlineExceeded(
                f"model '{self.runtime.name}' did not answer within the deadline ({timeout:.3g} s)"
            ) from None
        except asyncio.CancelledError:
            future.cancel()  # the client went away
            raise

    async def info(self, timeout: float = 0.0) -> dict[str, Any]:
        return {
            "provider": self.runtime.provider,
            "load_seconds": self.runtime.load_seconds,
            "batch_runs": self.stats.runs,
            "batched_requests": self.stats.requests,
            "largest_batch": self.stats.largest,
            "queued": len(self._pending),
        }

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        limit = self.config.max_batch_size if self.config.enabled else 1
        while self._pending:
            if self.config.max_wait_s > 0 and len(self._pending) < limit:
                await asyncio.sleep(self.config.max_wait_s)
            batch = [(x, f) for x, f in self._pending[:limit] if not f.done()]
            del self._pending[:limit]
            if not batch:
                continue
            for group in _by_shape(batch):
                await self._run(loop, group)

    async def _run(self, loop, group) -> None:
        counts = [len(next(iter(x.values()))) for x, _ in group]
        merged = group[0][0] if len(group) == 1 else {
            name: np.concatenate([x[name] for x, _ in group]) for name in group[0][0]
        }
        try:
            outputs = await loop.run_in_executor(self._executor, self.runtime.run, merged)
        except Exception as exc:  # the session failed: every request in the batch learns it
            log.exception("model %s: session run failed", self.runtime.name)
            for _, future in group:
                if not future.done():
                    future.set_exception(RuntimeError(f"model '{self.runtime.name}' failed to compute"))
            return
        self.stats.record(len(group), sum(counts))
        if len(group) == 1:
            parts = [outputs]
        else:
            bounds = np.cumsum(counts)[:-1]
            split = {name: np.split(array, bounds) for name, array in outputs.items()}
            parts = [{name: split[name][i] for name in outputs} for i in range(len(group))]
        for (_, future), part in zip(group, parts):
            if not future.done():
                future.set_result(part)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _by_shape(batch):
    """Requests whose tensors agree on every non-batch dimension can share a run."""
    groups: dict[tuple, list] = {}
    for item in batch:
        key = tuple((name, a.shape[1:]) for name, a in item[0].items())
        groups.setdefault(key, []).append(item)
    return list(groups.values())
