"""Step-level batching for generators: requests share every network evaluation.

A diffusion request is a sequence of steps, each one evaluation of the noise-prediction
network. :class:`StepBatcher` keeps a set of running jobs and, in a loop, evaluates the
next step of *all* of them in one ONNX Runtime run (in a worker thread), then hands each
job its slice of the outputs. A request that arrives while a step computes joins at the
next step boundary (when it fits within ``max_batch_size`` rows; otherwise it waits for
room). A job whose client went away (stream cancelled, deadline passed) is dropped at the
next boundary; the others carry on, and a job dropped at its deadline is counted
(``deepserve_deadline_exceeded``: ``queued`` if it never took a step, else ``computing``).
Requests may differ in step count, sampler, guidance and timestep: the network takes a
timestep per row.

Each job draws its noise from its own seeded generators, so its images depend on its
request only, not on the company it kept in the batch. With ``enabled: false`` one job
runs at a time (the baseline the benchmark compares against).

GAN requests are one-step jobs through the same loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import numpy as np

from deepserve import metrics
from deepserve.batching import DEADLINE_SLACK_S, BatchingConfig, Dropped, HealthProbe
from deepserve.errors import DeadlineExceeded, InvalidInput, Overloaded
from deepserve.statistics import Timing
from deepserve.runtime import (
    GenerationJob,
    GenerationProgress,
    GenerationRequest,
    GenerationResult,
    GenerativeRuntime,
)

log = logging.getLogger(__name__)

Event = GenerationProgress | GenerationResult


def generate_now(runtime: GenerativeRuntime, request: GenerationRequest) -> GenerationResult:
    """Run one request to the end in this thread (no batching): for builds and tests."""
    job = runtime.new_job(request)
    while not job.done:
        job.advance(runtime.run(job.feeds()))
    return job.result()


@dataclass
class _Entry:
    job: GenerationJob
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    closed: bool = False  # finished, failed, or its client went away
    arrived: float = field(default_factory=time.perf_counter)
    queue_s: float | None = None  # arrival to its first step
    compute_s: float = 0.0  # the steps it rode
    executions: float = 0.0  # its shares of those steps

    def stepped(self, started: float, seconds: float, share: float) -> None:
        if self.queue_s is None:
            self.queue_s = started - self.arrived
        self.compute_s += seconds
        self.executions += share

    def timing(self, rows: int) -> Timing:
        return Timing(self.queue_s or 0.0, self.compute_s, self.executions, rows)


class StepBatcher:
    """A backend for generative runtimes: ``generate`` streams progress, then the result."""

    def __init__(self, runtime: GenerativeRuntime, config: BatchingConfig | None = None):
        self.runtime = runtime
        self.config = config or BatchingConfig(max_batch_size=256)
        self.metrics = metrics.get()
        self._waiting: deque[_Entry] = deque()
        self._running: list[_Entry] = []
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"onnx-{runtime.name}")
        self.steps_run = 0  # session runs
        self.job_steps = 0  # request-steps they carried
        self.largest = 0  # most requests in one run
        self.dropped = Dropped(runtime)
        self.probe = HealthProbe(runtime, self._executor)  # one network evaluation, between two steps

    # ------------------------------------------------------------------ the Backend interface

    async def generate(self, request: GenerationRequest, timeout: float) -> AsyncIterator[Event]:
        """Progress per step, then the :class:`GenerationResult`; raises on deadline or failure."""
        if self.in_flight >= self.config.max_queued:
            raise Overloaded(
                f"model '{self.runtime.name}' is overloaded: {self.config.max_queued} requests in flight; "
                "retry with backoff"
            )
        if timeout <= 0:  # it spent its time on the way here (a remote replica's queue, say)
            self.dropped.expired("queued")
            raise DeadlineExceeded(f"model '{self.runtime.name}' did not finish within the deadline")
        entry = _Entry(self.runtime.new_job(request))
        self._waiting.append(entry)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(entry.events.get(), max(remaining, 0.0))
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(
                        f"model '{self.runtime.name}' did not finish within the deadline"
                    ) from None
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, GenerationResult):
                    return
        finally:
            # Left unfinished at its deadline (here, or a remote caller's cancel at its own copy
            # of the deadline): dropped, and counted by how far it got.
            if not entry.closed and time.monotonic() >= deadline - DEADLINE_SLACK_S:
                self.dropped.expired("queued" if entry.queue_s is None else "computing")
            entry.closed = True  # whatever ended the stream, the job stops at the next step

    @property
    def in_flight(self) -> int:
        """Requests running or waiting (a closed one may linger until the next step boundary)."""
        return sum(not e.closed for e in self._waiting) + sum(not e.closed for e in self._running)

    async def infer(self, inputs: dict[str, np.ndarray], timeout: float) -> dict[str, np.ndarray]:
        raise InvalidInput(f"model '{self.runtime.name}' is a generator: use Generate or the 'label' input")

    async def info(self, timeout: float = 0.0) -> dict[str, Any]:
        return {
            "provider": self.runtime.provider,
            "load_seconds": self.runtime.load_seconds,
            "batch_runs": self.steps_run,
            "batched_requests": self.job_steps,
            "largest_batch": self.largest,
            "in_flight": self.in_flight,
            "threaded": True,
            **self.dropped.figures(),
            **self.probe.figures(),
        }

    async def check(self, timeout: float) -> dict[str, Any]:
        """The health probe (one network evaluation, :class:`~deepserve.batching.HealthProbe`),
        then :meth:`info`."""
        await self.probe(timeout)
        return await self.info()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the step loop

    def _admit(self) -> None:
        """Move waiting jobs into the running set while they fit."""
        rows = sum(e.job.rows for e in self._running)
        while self._waiting:
            entry = self._waiting[0]
            if entry.closed:
                self._waiting.popleft()
                continue
            if self._running and (not self.config.enabled or rows + entry.job.rows > self.config.max_batch_size):
                break
            self._running.append(self._waiting.popleft())
            rows += entry.job.rows

    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._running = [e for e in self._running if not e.closed]
            self._admit()
            if not self._running:
                return
            batch = list(self._running)
            feeds = [e.job.feeds() for e in batch]
            merged = feeds[0] if len(feeds) == 1 else {
                name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]
            }
            started = time.perf_counter()
            try:
                outputs, seconds = await loop.run_in_executor(self._executor, self._timed_run, merged)
            except Exception:  # the session failed: every running job learns it
                log.exception("model %s: session run failed", self.runtime.name)
                for entry in batch:
                    entry.events.put_nowait(RuntimeError(f"model '{self.runtime.name}' failed to compute"))
                    entry.closed = True
                continue
            rows = [e.job.rows for e in batch]
            self._record(len(batch), sum(rows), seconds)
            finished = 0
            bounds = np.cumsum(rows)[:-1]
            parts = {name: np.split(array, bounds) for name, array in outputs.items()}
            for i, entry in enumerate(batch):
                if entry.closed:
                    continue
                entry.stepped(started, seconds, 1.0 / len(batch))
                try:
                    progress = entry.job.advance({name: parts[name][i] for name in outputs})
                    if entry.job.request.progress:
                        entry.events.put_nowait(progress)
                    if entry.job.done:
                        result = dataclasses.replace(entry.job.result(), timing=entry.timing(sum(rows)))
                        finished += len(result.images)
                        entry.events.put_nowait(result)
                        entry.closed = True  # finished: leaves the running set
                except Exception as exc:  # noqa: BLE001 - one job's failure is its own
                    log.exception("model %s: a job failed", self.runtime.name)
                    entry.events.put_nowait(RuntimeError(f"model '{self.runtime.name}' failed: {exc}"))
                    entry.closed = True
            self.metrics.generation(self.runtime.name, self.runtime.version, len(batch), finished)

    def _timed_run(self, inputs):
        started = time.perf_counter()
        outputs = self.runtime.run(inputs)
        return outputs, time.perf_counter() - started

    def _record(self, requests: int, rows: int, seconds: float) -> None:
        self.steps_run += 1
        self.job_steps += requests
        self.largest = max(self.largest, requests)
        self.metrics.batch(self.runtime.name, self.runtime.version, requests, rows, seconds, ())
