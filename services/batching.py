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

Deadlines are kept here, where the work is: a request whose deadline passes is dropped,
whether it waits for its batch or its batch computes (see :class:`BatchingBackend`), and
counted (``deepserve_deadline_exceeded``). The health probe (:class:`HealthProbe`) runs one
row through the same worker thread as the batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deepserve import metrics
from deepserve.errors import DeadlineExceeded, Overloaded
from deepserve.runtime import Runtime, run_options
from deepserve.statistics import Timing

log = logging.getLogger(__name__)

INLINE_BELOW_S = 0.0005  # models that run a full batch faster than this run on the event loop
# A caller that cancels this close to a request's deadline cancels because of it: a gRPC client
# gives up at its own copy of the deadline, which can come a moment before the server's.
DEADLINE_SLACK_S = 0.05


class BatchingConfig(BaseModel):
    """A model's batching, as its Serve config's ``batching`` mapping gives it (validated:
    zero or negative sizes and unknown keys are refused, naming the field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(default=64, ge=1, le=65536)
    """Requests per session run (generators: network rows per step)."""

    max_wait_s: float = Field(default=0.0, ge=0.0, le=10.0)
    """Extra wait for a fuller batch; 0 = none."""

    max_queued: int = Field(default=1024, ge=1, le=1_000_000)
    """Requests queued or computing; beyond it RESOURCE_EXHAUSTED."""

    enabled: bool = True
    """False: one request per session run (for comparisons)."""

    threaded: bool | None = None
    """Run the session in a worker thread; None = decide by warm-up latency."""

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "BatchingConfig":
        return cls.model_validate(values or {})


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


class Dropped:
    """Requests dropped at their deadline, by stage (``queued``: never computed;
    ``computing``: its run or generation was under way), and session runs stopped midway:
    the figures a backend reports in ``info()`` and records as metrics."""

    STAGES = ("queued", "computing")

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.metrics = metrics.get()
        self.deadline_exceeded = dict.fromkeys(self.STAGES, 0)
        self.terminated_runs = 0

    def expired(self, stage: str) -> None:
        self.deadline_exceeded[stage] += 1
        self.metrics.dropped(self.runtime.name, self.runtime.version, stage)

    def terminated(self) -> None:
        self.terminated_runs += 1
        self.metrics.terminated(self.runtime.name, self.runtime.version)

    def figures(self) -> dict[str, Any]:
        return {"deadline_exceeded": dict(self.deadline_exceeded), "terminated_runs": self.terminated_runs}


class HealthProbe:
    """A backend's health check: one row of the runtime's example inputs through its session
    (:meth:`Runtime.probe`), in the session's own worker thread.

    Sharing that thread is the point: the probe waits for the run computing now (one batch,
    or one generation step) and no more, so a session stuck in a run fails it, where a check
    that the session object exists would pass. A replica's probe timeout must therefore
    exceed its longest batch (``probe_timeout_s``).
    """

    # ONNX Runtime's CPU arena keeps what its largest batch needed (a 1,024-row recommender
    # batch: ~200 MiB) for the session's lifetime. A probe this often also hands the arena's
    # free regions back (its run option "memory.enable_memory_arena_shrinkage"): shrinking
    # after every run would cost large batches 55-190% more time, once in a while costs nothing.
    SHRINK_EVERY_S = 10.0

    def __init__(self, runtime: Runtime, executor: ThreadPoolExecutor):
        self.runtime = runtime
        self.executor = executor
        self.passed = 0
        self.failed = 0
        self.last_s = 0.0  # how long the last probe that passed took, waiting included
        self._next_shrink = time.monotonic() + self.SHRINK_EVERY_S

    async def __call__(self, timeout: float) -> None:
        """Raises:
            RuntimeError: the run failed or gave NaN, or did not finish within ``timeout``."""
        loop = asyncio.get_running_loop()
        options = run_options()
        if time.monotonic() >= self._next_shrink:
            self._next_shrink = time.monotonic() + self.SHRINK_EVERY_S
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        started = time.perf_counter()
        try:
            await asyncio.wait_for(loop.run_in_executor(self.executor, self.runtime.probe, options), timeout)
        except asyncio.TimeoutError:
            options.terminate = True  # not started yet (the thread is stuck): it stops at once if it ever does
            self.failed += 1
            raise RuntimeError(f"model '{self.runtime.name}': the health probe (one row) did not finish within "
                               f"{timeout:g} s; its session is stuck or overloaded") from None
        except Exception:
            self.failed += 1
            raise
        self.passed += 1
        self.last_s = time.perf_counter() - started

    def figures(self) -> dict[str, Any]:
        return {"probes": self.passed, "probe_failures": self.failed, "last_probe_s": self.last_s}


@dataclass(eq=False)
class _Request:
    inputs: dict[str, np.ndarray]
    future: asyncio.Future
    queued_at: float  # perf_counter
    deadline: float  # the event loop's clock
    run: "_Run | None" = None  # the session run computing it, once its batch started
    left: bool = False  # its caller stopped waiting (deadline, cancel) before its answer


@dataclass(eq=False)
class _Run:
    requests: list[_Request]
    options: Any  # its onnxruntime.RunOptions: terminate=True stops it
    finished: bool = False


class BatchingBackend:
    """A :class:`~deepserve.dataplane.Backend` that computes in this process, batching requests.

    A request whose deadline passes is answered DEADLINE_EXCEEDED at once and dropped: while
    queued it is skipped (never computed); while its batch computes, the batch's other
    requests still get their rows, and once no request of a run is waiting for it any more
    (deadlines passed, callers cancelled) the run itself is stopped (ONNX Runtime's
    ``terminate``), freeing the session for the requests queued behind it.
    """

    def __init__(self, runtime: Runtime, config: BatchingConfig | None = None):
        self.runtime = runtime
        self.config = config or BatchingConfig()
        self.stats = BatchStats()
        self.metrics = metrics.get()
        self.dropped = Dropped(runtime)
        self._pending: list[_Request] = []
        self._draining = False
        self._in_flight = 0  # requests queued or computing
        threaded = self.config.threaded
        if threaded is None:  # a full batch of one-row requests: does it outlast a thread handoff?
            threaded = runtime.time_run(self.config.max_batch_size) >= INLINE_BELOW_S
        self.threaded = threaded
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"onnx-{runtime.name}")
        self.probe = HealthProbe(runtime, self._executor)

    async def infer(self, inputs: dict[str, np.ndarray], timeout: float) -> tuple[dict[str, np.ndarray], Timing]:
        """The graph's outputs for ``inputs``, and what computing them cost (:class:`Timing`).

        Raises:
            DeadlineExceeded: ``timeout`` seconds passed first (the request is dropped).
            Overloaded: ``max_queued`` requests are in flight already.
        """
        if self._in_flight >= self.config.max_queued:
            raise Overloaded(
                f"model '{self.runtime.name}' is overloaded: {self._in_flight} requests in flight; "
                "retry with backoff"
            )
        if timeout <= 0:  # it spent its time on the way here (a remote replica's queue, say)
            self.dropped.expired("queued")
            raise self._late()
        if not self.threaded:
            # Microsecond models: computing now costs less than queueing (a future, a task,
            # a timer); the loop is busy for those microseconds either way.
            started = time.perf_counter()
            outputs = self.runtime.run(inputs)
            seconds, rows = time.perf_counter() - started, len(next(iter(inputs.values())))
            self._record(1, rows, seconds, (0.0,))
            return outputs, Timing(0.0, seconds, 1.0, rows)
        loop = asyncio.get_running_loop()
        request = _Request(inputs, loop.create_future(), time.perf_counter(), loop.time() + timeout)
        self._pending.append(request)
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        # A timer, not asyncio.wait_for: no extra task per request on the hot path.
        timer = loop.call_later(timeout, self._expire, request)
        self._in_flight += 1
        try:
            return await request.future  # if the caller is cancelled, so is the future: the drain skips it
        except asyncio.CancelledError:
            # A cancel that comes at the deadline is the deadline: the client, or a remote caller
            # (the gateway), cancels when its own copy of the deadline passes.
            self._left(request, expired=loop.time() >= request.deadline - DEADLINE_SLACK_S)
            raise
        finally:
            self._in_flight -= 1
            timer.cancel()

    def _late(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"model '{self.runtime.name}' did not answer within the deadline")

    def _expire(self, request: _Request) -> None:
        if not request.future.done():  # still queued or computing: the caller gets its answer now
            request.future.set_exception(self._late())
            self._left(request, expired=True)

    def _left(self, request: _Request, expired: bool) -> None:
        """``request``'s caller stopped waiting: count a deadline, and stop its run if nobody
        else waits for that run."""
        if request.left:  # a cancel that lands just after the deadline's answer: counted once
            return
        request.left = True
        run = request.run
        if expired:
            self.dropped.expired("queued" if run is None else "computing")
        if run is not None and not run.finished and all(r.future.done() for r in run.requests):
            run.options.terminate = True

    async def info(self, timeout: float = 0.0) -> dict[str, Any]:
        return {
            "provider": self.runtime.provider,
            "load_seconds": self.runtime.load_seconds,
            "batch_runs": self.stats.runs,
            "batched_requests": self.stats.requests,
            "largest_batch": self.stats.largest,
            "in_flight": self._in_flight,
            "threaded": self.threaded,
            **self.dropped.figures(),
            **self.probe.figures(),
        }

    async def check(self, timeout: float) -> dict[str, Any]:
        """The health probe (:class:`HealthProbe`), then :meth:`info`: the readiness probe's answer."""
        await self.probe(timeout)
        return await self.info()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        limit = self.config.max_batch_size if self.config.enabled else 1
        try:
            while self._pending:
                if self.config.max_wait_s > 0 and len(self._pending) < limit:
                    await asyncio.sleep(self.config.max_wait_s)
                batch = [r for r in self._pending[:limit] if not r.future.done()]
                del self._pending[:limit]
                for group in _by_shape(batch):
                    await self._run(loop, group)
        finally:
            self._draining = False

    async def _run(self, loop, group: list[_Request]) -> None:
        group = [r for r in group if not r.future.done()]  # some left while an earlier group computed
        if not group:
            return
        run = _Run(group, run_options())
        for request in group:
            request.run = run
        counts = [len(next(iter(r.inputs.values()))) for r in group]
        merged = group[0].inputs if len(group) == 1 else {
            name: np.concatenate([r.inputs[name] for r in group]) for name in group[0].inputs
        }
        started = time.perf_counter()
        try:
            outputs, seconds = await loop.run_in_executor(self._executor, self._timed_run, merged, run.options)
        except Exception:
            if run.options.terminate:  # stopped on purpose: every request of it had left
                self.dropped.terminated()
                log.info("model %s: stopped a run of %d request(s) that none waited for", self.runtime.name,
                         len(group))
                return
            log.exception("model %s: session run failed", self.runtime.name)  # every request learns it
            for request in group:
                if not request.future.done():
                    request.future.set_exception(RuntimeError(f"model '{self.runtime.name}' failed to compute"))
            return
        finally:
            run.finished = True
        waits = [started - r.queued_at for r in group]
        self._record(len(group), sum(counts), seconds, waits)
        if len(group) == 1:
            parts = [outputs]
        else:
            bounds = np.cumsum(counts)[:-1]
            split = {name: np.split(array, bounds) for name, array in outputs.items()}
            parts = [{name: split[name][i] for name in outputs} for i in range(len(group))]
        share, rows = 1.0 / len(group), sum(counts)
        for request, part, wait in zip(group, parts, waits):
            if not request.future.done():
                request.future.set_result((part, Timing(wait, seconds, share, rows)))

    def _timed_run(self, inputs, options=None):
        started = time.perf_counter()
        outputs = self.runtime.run(inputs, options)
        return outputs, time.perf_counter() - started

    def _record(self, requests: int, rows: int, seconds: float, waits) -> None:
        self.stats.record(requests, rows)
        self.metrics.batch(self.runtime.name, self.runtime.version, requests, rows, seconds, waits)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _by_shape(batch: list[_Request]) -> list[list[_Request]]:
    """Requests whose tensors agree on every non-batch dimension can share a run."""
    groups: dict[tuple, list[_Request]] = {}
    for request in batch:
        key = tuple((name, a.shape[1:]) for name, a in request.inputs.items())
        groups.setdefault(key, []).append(request)
    return list(groups.values())
