"""Admission control: what a gateway refuses, at once, instead of queueing without bound.

Three bounds, each answered with ``RESOURCE_EXHAUSTED`` and a retry hint (the
``grpc-retry-pushback-ms`` trailer that gRPC retry policies obey):

- **Concurrent RPCs per gateway** (``max_concurrent_rpcs``): grpc.aio takes no new call
  from gRPC's queue while this many run (``grpc.aio.server(maximum_concurrent_rpcs=...)``);
  it does not refuse them, so this bounds the gateway's memory, not its clients' wait.
- **Rows in flight per gateway** (``max_rows_in_flight``) and **requests in flight per
  model** (its ``batching.max_queued``): counted by the dataplane around every inference
  (:meth:`Admission.admit`).
- **Event-loop delay** (``max_loop_lag_s``): a model computed inline on the event loop (the
  fraud model takes 40 µs) never has a request "in flight" for long; what queues when it is
  overloaded is the calls gRPC has accepted and that wait for the loop. Their wait is the
  loop's lag, which :class:`LagMonitor` measures; while it exceeds the bound, new inference
  calls are refused (cheaply) until the backlog has drained.

docs/reliability.md lists every bound and queue with the test that checks it.
"""

from __future__ import annotations

import asyncio

from deepserve.errors import Overloaded


class LagMonitor:
    """How late the event loop runs a callback due now: the time a call that gRPC has just
    handed to the loop waits before its handler starts.

    The lag reported is the *smallest* of the last ``window`` measurements (CoDel's idea): one
    long step of the loop (a garbage collection, a large batch computed inline) delays one
    measurement, whereas a backlog of calls delays every one of them.

    Args:
        period_s: how often to measure (each measurement is one timer callback).
        window: measurements the lag is the minimum of (``window * period_s`` at least).
    """

    def __init__(self, period_s: float = 0.002, window: int = 25):
        self.period_s = period_s
        self.samples = [0.0] * window
        self._i = 0
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    @property
    def lag_s(self) -> float:
        return min(self.samples)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self.period_s
        self._handle = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.samples[self._i] = max(now - self._due, 0.0)
        self._i = (self._i + 1) % len(self.samples)
        self._due = now + self.period_s
        self._handle = loop.call_at(self._due, self._tick)


class Admission:
    """The dataplane's bounds: rows in flight per gateway, requests in flight per model,
    and the event loop's lag.

    Args:
        max_rows_in_flight: rows of all models' requests this gateway holds at once.
        max_loop_lag_s: refuse new inference calls while the loop runs this late (0: never).
    """

    def __init__(self, max_rows_in_flight: int = 65536, max_loop_lag_s: float = 0.02):
        self.max_rows_in_flight = max_rows_in_flight
        self.max_loop_lag_s = max_loop_lag_s
        self.rows_in_flight = 0
        self.lag = LagMonitor()
        self.refused = 0  # calls refused since start (for tests and the docs' figures)

    def start(self) -> None:
        if self.max_loop_lag_s > 0:
            self.lag.start()

    def check_loop(self) -> None:
        """Before anything else of an inference call: refuse it while the loop is late."""
        if self.max_loop_lag_s and self.lag.lag_s > self.max_loop_lag_s:
            self.refused += 1
            raise Overloaded(
                f"the gateway is overloaded (its calls wait {self.lag.lag_s * 1000:.0f} ms to start); "
                "retry with backoff", retry_after_s=self.retry_after_s())

    def busy(self) -> bool:
        """Half way to a bound (loop lag, or rows in flight): optional work (shadow requests)
        is shed before any request has to be refused."""
        return (bool(self.max_loop_lag_s) and self.lag.lag_s > self.max_loop_lag_s / 2
                or self.rows_in_flight > self.max_rows_in_flight // 2)

    def admit(self, name: str, in_flight: int, max_in_flight: int, rows: int) -> None:
        """Refuse a request for model ``name`` that would exceed its in-flight bound or the
        gateway's rows; on success the caller must :meth:`release` ``rows``."""
        if in_flight >= max_in_flight:
            self.refused += 1
            raise Overloaded(f"model '{name}' is overloaded: {in_flight} requests in flight; retry with backoff",
                             retry_after_s=self.retry_after_s())
        if self.rows_in_flight + rows > self.max_rows_in_flight:
            self.refused += 1
            raise Overloaded(
                f"the gateway is overloaded: {self.rows_in_flight} rows in flight, {rows} more would exceed "
                f"{self.max_rows_in_flight}; retry with backoff", retry_after_s=self.retry_after_s())
        self.rows_in_flight += rows

    def release(self, rows: int) -> None:
        self.rows_in_flight -= rows

    def retry_after_s(self) -> float:
        """A retry hint: long enough for the backlog behind the loop's lag to drain."""
        return min(max(2 * self.lag.lag_s, 0.05), 1.0)
