"""DeepServe's Prometheus metrics, recorded locally and exported through Ray's metrics path.

Every serving process records into plain Python aggregates (a dict increment per
observation). Once a second :meth:`Metrics.refresh` hands what accumulated on:

- in a Ray process (a gateway replica, a model replica) to Ray's ``ray.util.metrics``; Ray's
  metrics agent on each node exposes every process's series on one scrape endpoint per node
  (``deepserve serve`` sets it to port 8080). Ray prefixes the names with ``ray_`` and adds
  process labels (``WorkerId``, ``NodeAddress``, ...): sum over them in queries.
- in a gateway worker process (:mod:`deepserve.gateway`), which never imports Ray, to its
  gateway replica: the replica takes the worker's :meth:`Metrics.snapshot` each second and
  :meth:`Metrics.absorb` adds it to its own before exporting. A request costs the same either way.

A call into ``ray.util.metrics`` costs microseconds and a request would make about ten of
them: done per request, they cost 9% of the fraud model's throughput (docs/benchmarks.md).
Histograms are exported as cumulative ``_bucket{le=...}``, ``_sum`` and ``_count`` series
(Ray gauges; the names and PromQL are a Prometheus histogram's, and ``_sum`` is exact, which
Ray's own histograms are not). Names and labels are documented in docs/metrics.md.

Outside Ray and outside a gateway worker (unit tests, tools) every method is a no-op.
"""

from __future__ import annotations

import bisect
import os
import resource
import sys
from typing import Any, Callable, Iterable

import numpy as np

from deepserve.drift import SIMILARITIES

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


# ---------------------------------------------------------------------------- local aggregates


class _Counter:
    """A counter whose increments add up locally until :meth:`take`."""

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]):
        self.name, self.description, self.tag_keys = name, description, tag_keys
        self.pending: dict[tuple, float] = {}

    def inc(self, value: float, key: tuple) -> None:
        """Add ``value`` to the series whose label values, in ``tag_keys`` order, are ``key``."""
        self.pending[key] = self.pending.get(key, 0) + value

    def take(self) -> dict[tuple, float]:
        """The increments since the last take."""
        pending, self.pending = self.pending, {}
        return pending

    def add(self, increments: dict[tuple, float]) -> None:
        for key, value in increments.items():
            self.inc(value, key)


class _Histogram:
    """Observations counted locally per bucket (plus their sum and count) until :meth:`take`."""

    def __init__(self, name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...]):
        self.name, self.description, self.tag_keys = name, description, tag_keys
        self.bounds = list(boundaries)
        self.pending: dict[tuple, list] = {}  # key -> [per-bucket counts..., sum, count]

    def observe(self, value: float, key: tuple) -> None:
        """Record ``value`` in the series whose label values, in ``tag_keys`` order, are ``key``."""
        state = self.pending.get(key)
        if state is None:
            state = self.pending[key] = [0] * (len(self.bounds) + 1) + [0.0, 0]
        state[bisect.bisect_left(self.bounds, value)] += 1  # le is inclusive
        state[-2] += value
        state[-1] += 1

    def take(self) -> dict[tuple, list]:
        """The observations since the last take, per series."""
        pending, self.pending = self.pending, {}
        return pending

    def add(self, observed: dict[tuple, list]) -> None:
        for key, delta in observed.items():
            state = self.pending.get(key)
            if state is None:
                self.pending[key] = list(delta)
            else:
                for i, v in enumerate(delta):
                    state[i] += v


class _Gauge:
    """A gauge's current values. Where several processes report the same series (a gateway's
    workers), ``combine`` makes one value of theirs."""

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...],
                 combine: Callable[[Iterable[float]], float] = max):
        self.name, self.description, self.tag_keys, self.combine = name, description, tag_keys, combine
        self.values: dict[tuple, float] = {}

    def set(self, value: float, key: tuple) -> None:
        self.values[key] = value

    def combined(self, key: tuple, values: list[float]) -> float:
        """One value of the ``values`` that several processes reported for the series ``key``."""
        return self.combine(values)


class _DivergenceGauge(_Gauge):
    """Shadow figures, whose last label is the measure: across a gateway's workers the worst
    value counts, the lowest of a similarity (agreement, overlap), the farthest from 0 of a
    distance (PSI, KS, the signed flagged-rate difference)."""

    def combined(self, key: tuple, values: list[float]) -> float:
        return min(values) if key[-1] in SIMILARITIES else max(values, key=abs)


# ---------------------------------------------------------------------------- export to Ray


class _RayExport:
    """The ``ray.util.metrics`` objects of a Ray process, and the cumulative histogram state
    they are set from."""

    def __init__(self, metrics: list):
        from ray.util.metrics import Counter, Gauge

        self.counters, self.histograms, self.gauges = {}, {}, {}
        self.cumulative: dict[str, dict[tuple, list]] = {}
        self.flushed: dict[str, dict[tuple, int]] = {}
        for m in metrics:
            if isinstance(m, _Counter):
                self.counters[m.name] = Counter(m.name, m.description, tag_keys=m.tag_keys)
            elif isinstance(m, _Histogram):
                self.histograms[m.name] = (
                    [_le(b) for b in m.bounds] + ["+Inf"],
                    Gauge(f"{m.name}_bucket", f"{m.description} (cumulative count per bucket)",
                          tag_keys=(*m.tag_keys, "le")),
                    Gauge(f"{m.name}_sum", f"{m.description} (sum of observations)", tag_keys=m.tag_keys),
                    Gauge(f"{m.name}_count", f"{m.description} (number of observations)", tag_keys=m.tag_keys),
                )
                self.cumulative[m.name], self.flushed[m.name] = {}, {}
            elif isinstance(m, _Gauge):
                self.gauges[m.name] = Gauge(m.name, m.description, tag_keys=m.tag_keys)

    def export(self, snapshot: dict[str, Any], tag_keys: dict[str, tuple], everything: bool) -> None:
        """Counters' increments, histograms' cumulative state (the series that changed; all of
        them when ``everything``: Ray forgets a gauge left unset for long), every gauge value."""
        for name, increments in snapshot["counters"].items():
            for key, value in increments.items():
                if value > 0:
                    self.counters[name].inc(value, tags=dict(zip(tag_keys[name], key)))
        for name, observed in snapshot["histograms"].items():
            states = self.cumulative[name]
            for key, delta in observed.items():
                state = states.setdefault(key, [0] * len(delta))
                for i, v in enumerate(delta):
                    state[i] += v
            les, buckets, sums, counts = self.histograms[name]
            flushed = self.flushed[name]
            for key, state in states.items():
                if not everything and flushed.get(key) == state[-1]:
                    continue
                flushed[key] = state[-1]
                tags = dict(zip(tag_keys[name], key))
                cumulative = 0
                for le, n in zip(les, state[:-2]):
                    cumulative += n
                    buckets.set(cumulative, tags={**tags, "le": le})
                sums.set(state[-2], tags=tags)
                counts.set(state[-1], tags=tags)
        for name, values in snapshot["gauges"].items():
            for key, value in values.items():
                self.gauges[name].set(value, tags=dict(zip(tag_keys[name], key)))


def _le(bound: float) -> str:
    return repr(float(bound)).rstrip("0").rstrip(".") if bound != int(bound) else f"{bound:g}"


def _total(values: Iterable[float]) -> float:
    return sum(values)


def _lowest(values: Iterable[float]) -> float:
    return min(values)


def _replace(gauge: _Gauge, prefix: tuple, values: dict[str, float]) -> None:
    """Set the series ``(*prefix, name)`` of ``gauge`` to ``values``, dropping the prefix's
    series not in it (Ray forgets a series left unset for a while)."""
    for key in [k for k in gauge.values if k[:-1] == prefix and k[-1] not in values]:
        del gauge.values[key]
    for name, value in values.items():
        gauge.set(float(value), (*prefix, name))


# ---------------------------------------------------------------------------- the metrics


class Metrics:
    """The serving metrics of one process. Create with :func:`get`.

    Args:
        enabled: record at all (recording methods are no-ops otherwise).
        export: hand what accumulated to Ray on :meth:`refresh` (a Ray process); without it,
            a gateway worker's replica collects :meth:`snapshot` instead.
    """

    def __init__(self, enabled: bool, export: bool = False):
        self.enabled = enabled
        self._ticks = 0
        self._absorbed: dict[Any, dict[str, dict[tuple, float]]] = {}  # worker -> its gauges
        self._export: _RayExport | None = None
        if not enabled:
            return
        Counter, Histogram, Gauge = _Counter, _Histogram, _Gauge  # noqa: N806 - read like Prometheus'

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
            "deepserve_requests_in_flight", "Inference requests being handled by this gateway.", tag_keys=_MODEL,
            combine=_total)  # over the gateway's worker processes
        self.replicas = Gauge(
            "deepserve_model_replicas", "1 per replica holding a session of the model: sum() counts replicas.",
            tag_keys=(*_MODEL, "placement"))  # a gateway's workers count once: it is one replica
        self.ready = Gauge(
            "deepserve_model_ready", "1 when the gateway sees a ready replica of the model, else 0.",
            tag_keys=_MODEL, combine=_lowest)  # ready in every worker process of the gateway
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
        self.route_requests = Counter(
            "deepserve_route_requests",
            "Inference requests by the version that served them and why: route default, canary, or "
            "named (the client named the version).", tag_keys=(*_MODEL, "route"))
        self.shadow_requests = Counter(
            "deepserve_shadow_requests",
            "Requests to the served version mirrored to the shadow version candidate, by outcome: "
            "compared, shed (dropped: the server was busy) or failed.", tag_keys=(*_MODEL, "candidate", "outcome"))
        self.shadow_divergence = _DivergenceGauge(
            "deepserve_shadow_divergence",
            "The shadow candidate's outputs against the served version's on the same requests, by measure: "
            "psi, ks, flagged_rate_diff (anomaly), agreement (classifier), overlap_at_k (recommender).",
            tag_keys=(*_MODEL, "candidate", "measure"))  # across workers: the worst value
        self.drift_psi = Gauge(
            "deepserve_drift_psi", "PSI of the recent served scores (confidences) against the training reference.",
            tag_keys=_MODEL)  # across workers: the highest
        self.front_refusals = Counter(
            "deepserve_front_refused",
            "Calls the admission front (nginx, admission_front) answered RESOURCE_EXHAUSTED before any "
            "gateway worker saw them, by gRPC method.", tag_keys=("method",))
        self.memory = Gauge(
            "deepserve_process_resident_memory_bytes", "Resident memory of this serving process.",
            tag_keys=("component",))
        self._all = [m for m in vars(self).values() if isinstance(m, (_Counter, _Histogram, _Gauge))]
        self._tag_keys = {m.name: m.tag_keys for m in self._all}
        if export:
            self._export = _RayExport(self._all)

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
            self.in_flight.set(value, (model, version))

    def set_ready(self, model: str, version: str, ready: bool) -> None:
        if self.enabled:
            self.ready.set(1.0 if ready else 0.0, (model, version))

    def loaded(self, model: str, version: str, kind: str, placement: str, provider: str, seconds: float) -> None:
        if self.enabled:
            self.replicas.set(1, (model, version, placement))
            self.load_seconds.set(seconds, (model, version))
            self.info.set(1, (model, version, kind, placement, provider))
            self.refresh()

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

    def front_refused(self, method: str, count: int) -> None:
        if self.enabled:
            self.front_refusals.inc(count, (method,))

    def routed(self, model: str, version: str, route: str) -> None:
        """A request went to ``version`` because of ``route``: ``default``, ``canary`` or
        ``named`` (the client asked for that version)."""
        if self.enabled:
            self.route_requests.inc(1, (model, version, route))

    def shadowed(self, model: str, version: str, candidate: str, outcome: str) -> None:
        """A request to ``version`` was mirrored to the shadow version ``candidate``, with
        ``outcome`` ``compared``, ``shed`` (dropped: the server was busy) or ``failed``."""
        if self.enabled:
            self.shadow_requests.inc(1, (model, version, candidate, outcome))

    def divergence(self, model: str, version: str, candidate: str, figures: dict[str, float]) -> None:
        """The shadow comparison's current figures (measure -> value, as a
        :class:`deepserve.drift.Shadow` gives them). They replace the pair's previous ones:
        ``{}`` (too few pairs yet, or the shadow ended) removes its series."""
        if self.enabled:
            _replace(self.shadow_divergence, (model, version, candidate), figures)

    def drift(self, model: str, version: str, psi: float | None) -> None:
        """PSI of the live scores against the training reference; None (too few scores yet,
        or the version unloaded) removes the series."""
        if self.enabled:
            if psi is None:
                self.drift_psi.values.pop((model, version), None)
            else:
                self.drift_psi.set(float(psi), (model, version))

    # ------------------------------------------------------------------ export

    def snapshot(self, component: str | None = None) -> dict[str, Any]:
        """What accumulated since the last snapshot (counters' increments, histograms'
        observations) and every gauge's value; given a component name, with its resident
        memory. What a gateway worker hands its replica each second."""
        if not self.enabled:
            return {"counters": {}, "histograms": {}, "gauges": {}}
        if component is not None:
            self.memory.set(_resident_bytes(), (component,))
        return {
            "counters": {m.name: m.take() for m in self._all if isinstance(m, _Counter)},
            "histograms": {m.name: m.take() for m in self._all if isinstance(m, _Histogram)},
            "gauges": {m.name: dict(m.values) for m in self._all if isinstance(m, _Gauge)},
        }

    def absorb(self, source: Any, snapshot: dict[str, Any]) -> None:
        """Add a worker process's :meth:`snapshot` to this process's metrics; its gauges
        replace the ones ``source`` gave before."""
        if not self.enabled:
            return
        by_name = {m.name: m for m in self._all}
        for name, increments in snapshot["counters"].items():
            by_name[name].add(increments)
        for name, observed in snapshot["histograms"].items():
            by_name[name].add(observed)
        self._absorbed[source] = snapshot["gauges"]

    def forget(self, source: Any) -> None:
        """``source`` is gone (a worker that exited): its gauges no longer count."""
        self._absorbed.pop(source, None)

    def refresh(self, component: str | None = None) -> None:
        """Hand what accumulated to Ray (a no-op in a gateway worker, whose replica takes
        :meth:`snapshot` instead); given a component name, also its resident memory. Gauges
        are re-set each time (Ray drops a gauge's series when it goes unset for a while), the
        values of absorbed workers combined per series. Call once a second."""
        if not self.enabled or self._export is None:
            return
        self._ticks += 1
        snapshot = self.snapshot(component)
        for name, own in snapshot["gauges"].items():
            reported: dict[tuple, list[float]] = {key: [value] for key, value in own.items()}
            for gauges in self._absorbed.values():
                for key, value in gauges.get(name, {}).items():
                    reported.setdefault(key, []).append(value)
            gauge = next(m for m in self._all if m.name == name)
            snapshot["gauges"][name] = {key: gauge.combined(key, values) for key, values in reported.items()}
        self._export.export(snapshot, self._tag_keys, everything=self._ticks % KEEPALIVE_TICKS == 1)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:  # Linux: current resident pages
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # elsewhere: the peak (bytes on macOS, KiB on the BSDs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


_instance: Metrics | None = None


def get() -> Metrics:
    """This process's metrics: exported to Ray inside a Ray worker, no-ops elsewhere (unless
    :func:`for_gateway_worker` said otherwise) or when ``DEEPSERVE_METRICS=0``."""
    global _instance
    if _instance is None:
        enabled = os.environ.get("DEEPSERVE_METRICS", "1") != "0"
        if enabled:
            import ray

            enabled = ray.is_initialized()
        _instance = Metrics(enabled, export=enabled)
    return _instance


def for_gateway_worker() -> Metrics:
    """A gateway worker process's metrics: recorded here, collected by its replica
    (:meth:`Metrics.snapshot`); Ray is never imported. Call before anything calls :func:`get`."""
    global _instance
    _instance = Metrics(os.environ.get("DEEPSERVE_METRICS", "1") != "0")
    return _instance
