"""DeepServe's Prometheus metrics, recorded through Ray's metrics path.

Every process that serves (gateway replicas, model replicas) records into Ray's
``ray.util.metrics``; Ray's metrics agent on each node exposes every process's series on
one scrape endpoint per node (``deepserve serve`` sets it to port 8080). Ray prefixes the
names with ``ray_`` and adds process labels (``WorkerId``, ``NodeAddress``, ...): sum over
them in queries. Names and labels are documented in docs/metrics.md.

Recording is local and cheap: counters and histograms accumulate in plain Python and are
handed to Ray once a second by :meth:`Metrics.refresh` (the gateway's readiness poll and
each model replica's refresher call it). A call into ``ray.util.metrics`` costs microseconds
and a request would make about ten of them: done per request, they cost 9% of the fraud
model's throughput (docs/benchmarks.md). Histograms are exported as cumulative
``_bucket{le=...}``, ``_sum`` and ``_count`` series (Ray gauges; the names and PromQL are a
Prometheus histogram's, and ``_sum`` is exact, which Ray's own histograms are not).

Outside a Ray worker (unit tests, tools) every method is a no-op.
"""

from __future__ import annotations

import bisect
import os
import resource
import sys
from typing import Iterable

import numpy as np

# Millisecond calls: fine buckets from 100 µs to 1 s, then coarse ones up to 30 s.
LATENCY_BUCKETS_S = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
UNIT_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
SCORE_BUCKETS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
# Output-health histograms observe at most this many rows of a request: a 256-row batch
# must not pay 256 observations. Counters (rows, flagged) stay exact.
SAMPLED_ROWS = 16
KEEPALIVE_TICKS = 5  # refreshes between re-sending unchanged histogram series

_MODEL = ("model", "version")


class _Counter:
    """A counter that adds up locally; :meth:`flush` hands the increments to Ray."""

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]):
        from ray.util.metrics import Counter

        self.tag_keys = tag_keys
        self.ray = Counter(name, description, tag_keys=tag_keys)
        self.pending: dict[tuple, float] = {}

    def inc(self, value: float, key: tuple) -> None:
        """Add ``value`` to the series whose label values, in ``tag_keys`` order, are ``key``."""
        self.pending[key] = self.pending.get(key, 0) + value

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for key, value in pending.items():
            if value > 0:
                self.ray.inc(value, tags=dict(zip(self.tag_keys, key)))


class _Histogram:
    """A histogram kept locally (cumulative bucket counts, sum, count) and exported as the
    ``_bucket``/``_sum``/``_count`` series of a Prometheus histogram."""

    def __init__(self, name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...]):
        from ray.util.metrics import Gauge

        self.tag_keys = tag_keys
        self.bounds = list(boundaries)
        self.les = [_le(b) for b in self.bounds] + ["+Inf"]
        self.buckets = Gauge(f"{name}_bucket", f"{description} (cumulative count per bucket)",
                             tag_keys=(*tag_keys, "le"))
        self.sums = Gauge(f"{name}_sum", f"{description} (sum of observations)", tag_keys=tag_keys)
        self.counts = Gauge(f"{name}_count", f"{description} (number of observations)", tag_keys=tag_keys)
        self.series: dict[tuple, list] = {}  # key -> [per-bucket counts..., sum, count]
        self.flushed: dict[tuple, int] = {}  # key -> count at the last flush

    def observe(self, value: float, key: tuple) -> None:
        """Record ``value`` in the series whose label values, in ``tag_keys`` order, are ``key``."""
        state = self.series.get(key)
        if state is None:
            state = self.series[key] = [0] * (len(self.bounds) + 1) + [0.0, 0]
        state[bisect.bisect_left(self.bounds, value)] += 1  # le is inclusive
        state[-2] += value
        state[-1] += 1

    def flush(self, everything: bool) -> None:
        """Export the series that changed since the last flush (all of them when ``everything``:
        Ray forgets a gauge left unset for long, so unchanged series are re-sent now and then)."""
        for key, state in self.series.items():
            if not everything and self.flushed.get(key) == state[-1]:
                continue
            self.flushed[key] = state[-1]
            tags = dict(zip(self.tag_keys, key))
            cumulative = 0
            for le, n in zip(self.les, state[:-2]):
                cumulative += n
                self.buckets.set(cumulative, tags={**tags, "le": le})
            self.sums.set(state[-2], tags=tags)
            self.counts.set(state[-1], tags=tags)


def _le(bound: float) -> str:
    return repr(float(bound)).rstrip("0").rstrip(".") if bound != int(bound) else f"{bound:g}"


class Metrics:
    """The serving metrics of one process. Create with :func:`get`."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._static: list[tuple] = []  # (gauge, value, tags) set once, re-set by refresh()
        self._ticks = 0
        if not enabled:
            return
        from ray.util.metrics import Gauge

        Counter, Histogram = _Counter, _Histogram  # noqa: N806 - local aggregation, same interface

        self.requests = Counter(
            "deepserve_requests", "gRPC requests by model, method and status code.",
            tag_keys=(*_MODEL, "method", "code"))
        self.request_seconds = Histogram(
            "deepserve_request_duration_seconds", "End-to-end handling time of a gRPC request in the gateway.",
            boundaries=LATENCY_BUCKETS_S, tag_keys=(*_MODEL, "method"))
        self.compute_seconds = Histogram(
            "deepserve_model_compute_duration_seconds", "ONNX Runtime time of one session run (one batch).",
            boundaries=LATENCY_BUCKETS_S, tag_keys=_MODEL)
        self.queue_seconds = Histogram(
            "deepserve_queue_wait_duration_seconds", "Time a request waited for its batch to start.",
            boundaries=LATENCY_BUCKETS_S, tag_keys=_MODEL)
        self.batch_requests = Histogram(
            "deepserve_batch_size_requests", "Requests merged into one session run.",
            boundaries=BATCH_BUCKETS, tag_keys=_MODEL)
        self.batch_runs = Counter("deepserve_batch_runs", "Session runs (batches).", tag_keys=_MODEL)
        self.batched_requests = Counter(
            "deepserve_batched_requests", "Requests computed, counted per run: / batch_runs = mean batch size.",
            tag_keys=_MODEL)
        self.rows = Counter("deepserve_model_rows", "Rows (transactions, images) computed.", tag_keys=_MODEL)
        self.in_flight = Gauge(
            "deepserve_requests_in_flight", "Inference requests being handled by this gateway.", tag_keys=_MODEL)
        self.replicas = Gauge(
            "deepserve_model_replicas", "1 per process holding a session of the model: sum() counts replicas.",
            tag_keys=(*_MODEL, "placement"))
        self.ready = Gauge(
            "deepserve_model_ready", "1 when the gateway sees a ready replica of the model, else 0.",
            tag_keys=_MODEL)
        self.load_seconds = Gauge(
            "deepserve_model_load_duration_seconds", "Time to create and warm up the model's ONNX Runtime session.",
            tag_keys=_MODEL)
        self.info = Gauge(
            "deepserve_model_info", "1, with the model's kind, placement and active ONNX Runtime provider.",
            tag_keys=(*_MODEL, "kind", "placement", "provider"))
        self.fraud_score = Histogram(
            "deepserve_fraud_score", f"Anomaly scores served (at most {SAMPLED_ROWS} rows per request).",
            boundaries=SCORE_BUCKETS, tag_keys=_MODEL)
        self.scored_rows = Counter("deepserve_fraud_scored_rows", "Transactions scored.", tag_keys=_MODEL)
        self.flagged_rows = Counter(
            "deepserve_fraud_flagged_rows",
            "Transactions above the model's calibrated threshold (whatever a request's override): "
            "the model-output health signal.", tag_keys=_MODEL)
        self.confidence = Histogram(
            "deepserve_classifier_confidence_ratio",
            f"Top-1 probability of served classifications (at most {SAMPLED_ROWS} per request).",
            boundaries=UNIT_BUCKETS, tag_keys=_MODEL)
        self.generation_steps = Counter(
            "deepserve_generation_steps",
            "Sampling steps taken by generation requests (a step batched with others counts once per request).",
            tag_keys=_MODEL)
        self.generated_images = Counter(
            "deepserve_generated_images", "Images whose generation finished.", tag_keys=_MODEL)
        self.deadline_exceeded = Counter(
            "deepserve_deadline_exceeded",
            "Requests the server dropped because their deadline passed, by where they were then: "
            "queued (never computed) or computing (its run stopped, or its generation's steps).",
            tag_keys=(*_MODEL, "stage"))
        self.terminated_runs = Counter(
            "deepserve_terminated_runs",
            "Session runs stopped midway because every request in them had left (deadline or cancel).",
            tag_keys=_MODEL)
        self.memory = Gauge(
            "deepserve_process_resident_memory_bytes", "Resident memory of this serving process.",
            tag_keys=("component",))

    # ------------------------------------------------------------------ recording

    def request(self, model: str, version: str, method: str, code: str, seconds: float) -> None:
        if self.enabled:
            self.request_seconds.observe(seconds, (model, version, method))
            self.requests.inc(1, (model, version, method, code))

    def batch(self, model: str, version: str, requests: int, rows: int, seconds: float,
              waits: Iterable[float] = ()) -> None:
        if self.enabled:
            key = (model, version)
            self.compute_seconds.observe(seconds, key)
            self.batch_requests.observe(requests, key)
            self.batch_runs.inc(1, key)
            self.batched_requests.inc(requests, key)
            self.rows.inc(rows, key)
            for wait in waits:
                self.queue_seconds.observe(wait, key)

    def set_in_flight(self, model: str, version: str, value: int) -> None:
        if self.enabled:
            self.in_flight.set(value, tags={"model": model, "version": version})

    def set_ready(self, model: str, version: str, ready: bool) -> None:
        if self.enabled:
            self.ready.set(1.0 if ready else 0.0, tags={"model": model, "version": version})

    def loaded(self, model: str, version: str, kind: str, placement: str, provider: str, seconds: float) -> None:
        if self.enabled:
            tags = {"model": model, "version": version}
            self._static += [
                (self.replicas, 1, {**tags, "placement": placement}),
                (self.load_seconds, seconds, tags),
                (self.info, 1, {**tags, "kind": kind, "placement": placement, "provider": provider}),
            ]
            self.refresh()

    def refresh(self, component: str | None = None) -> None:
        """Hand what accumulated to Ray: counters' increments, histograms' current state, and
        the gauges that describe this process (Ray drops a gauge's series when it goes unset
        for a while); given a component name, also its resident memory. Call once a second."""
        if self.enabled:
            self._ticks += 1
            everything = self._ticks % KEEPALIVE_TICKS == 1
            for metric in vars(self).values():
                if isinstance(metric, _Counter):
                    metric.flush()
                elif isinstance(metric, _Histogram):
                    metric.flush(everything)
            for gauge, value, tags in self._static:
                gauge.set(value, tags=tags)
            if component is not None:
                self.memory.set(_resident_bytes(), tags={"component": component})

    def fraud(self, model: str, version: str, scores: np.ndarray, threshold: float) -> None:
        """Rows scored, rows above the model's own ``threshold``, a sample of scores."""
        if self.enabled:
            key = (model, version)
            self.scored_rows.inc(len(scores), key)
            sample = scores[:SAMPLED_ROWS].tolist()
            flagged = sum(s > threshold for s in sample) if len(scores) <= SAMPLED_ROWS else \
                int(np.count_nonzero(scores > threshold))
            if flagged:
                self.flagged_rows.inc(flagged, key)
            for s in sample:
                self.fraud_score.observe(s, key)

    def generation(self, model: str, version: str, steps: int, images: int) -> None:
        """Request-steps a generator's session run carried, and images that finished with it."""
        if self.enabled:
            key = (model, version)
            self.generation_steps.inc(steps, key)
            if images:
                self.generated_images.inc(images, key)

    def dropped(self, model: str, version: str, stage: str) -> None:
        """A request's deadline passed while it was ``queued`` or ``computing``: the server
        dropped it (a queued one is never computed; a computing one frees its share)."""
        if self.enabled:
            self.deadline_exceeded.inc(1, (model, version, stage))

    def terminated(self, model: str, version: str) -> None:
        """A session run was stopped because none of its requests was waiting for it any more."""
        if self.enabled:
            self.terminated_runs.inc(1, (model, version))

    def classified(self, model: str, version: str, probabilities: np.ndarray) -> None:
        if self.enabled:
            key = (model, version)
            for p in probabilities[:SAMPLED_ROWS].max(axis=1).tolist():
                self.confidence.observe(p, key)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:  # Linux: current resident pages
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # elsewhere: the peak (bytes on macOS, KiB on the BSDs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


_instance: Metrics | None = None


def get() -> Metrics:
    """This process's metrics: live inside a Ray worker, no-ops elsewhere or when
    ``DEEPSERVE_METRICS=0``."""
    global _instance
    if _instance is None:
        enabled = os.environ.get("DEEPSERVE_METRICS", "1") != "0"
        if enabled:
            import ray

            enabled = ray.is_initialized()
        _instance = Metrics(enabled)
    return _instance
