"""The dataplane: what every transport calls. It knows models, not protocols.

It resolves model names and versions, validates requests against the runtime's
signature, sends tensors to a :class:`Backend` (the Ray Serve replicas in production,
see :mod:`deepserve.app`) under the request's deadline, and applies the kind's
post-processing. Errors are :mod:`deepserve.errors` types; transports map them to
status codes with the one table there.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import numpy as np

from deepserve import __version__, metrics
from deepserve import lifecycle
from deepserve.admission import Admission
from deepserve.batching import BatchingConfig
from deepserve.drift import DriftMonitor, Reference
from deepserve.errors import DeadlineExceeded, InvalidInput, ModelNotFound, ModelNotReady, Overloaded
from deepserve.images import Offloaded
from deepserve.lifecycle import Plan, mirrored, pick
from deepserve.runtime import (
    AnomalyResult,
    AnomalyRuntime,
    ClassifierRuntime,
    GenerationProgress,
    GenerationResult,
    GenerativeRuntime,
    Recommendation,
    RecommenderRuntime,
    Runtime,
)
from deepserve.statistics import Statistics, Timing

log = logging.getLogger(__name__)

SERVER_NAME = "deepserve"
PLATFORM = "onnxruntime_onnx"


class Backend(Protocol):
    """Where a model's tensors are computed."""

    async def infer(self, inputs: dict[str, np.ndarray], timeout: float) -> tuple[dict[str, np.ndarray], Timing]:
        """The graph's outputs and what they cost; raises a DeepServeError (DeadlineExceeded, ...)."""

    async def info(self, timeout: float) -> dict[str, Any]:
        """A replica's report: at least ``provider`` and ``load_seconds``."""

    async def check(self, timeout: float) -> dict[str, Any]:
        """A replica's health probe (a one-row inference), then its report; raises if the
        probe fails or takes longer than ``timeout``."""

    def generate(self, request, timeout: float) -> AsyncIterator[GenerationProgress | GenerationResult]:
        """Generators only: progress per step, then the result."""


@dataclass
class ServedModel:
    runtime: Runtime  # signature and kind logic; no session on the gateway
    backend: Backend
    placement: str = "gateway"  # or "deployment" (docs/architecture.md)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    ready: bool = False
    replica_info: dict[str, Any] = field(default_factory=dict)
    in_flight: int = 0
    failed_probes: int = 0  # readiness probes failed in a row
    drift: DriftMonitor | None = None  # live outputs against the training distribution

    @property
    def provider(self) -> str:
        return self.replica_info.get("provider", "")


class DataPlane:
    """Model lookup, validation, inference and the typed APIs' post-processing."""

    def __init__(self, models: list[ServedModel], default_timeout_s: float = 30.0,
                 repository: dict[str, list[str]] | None = None,
                 replica_counts: Callable[[], Awaitable[dict[str, int]]] | None = None,
                 admission: Admission | None = None,
                 gateway_report: Callable[[], Awaitable[tuple[Statistics, dict[tuple[str, str], dict]]]] | None = None,
                 plans: dict[str, Plan] | None = None, shadow_in_flight: int = 16):
        """
        Args:
            models: the served models.
            default_timeout_s: the deadline of a request that comes without one.
            repository: every model and version the repository held at start
                (``RepositoryIndex``); default: the served ones.
            replica_counts: how many replicas compute each model now (``ModelConfig``'s
                instance groups); default: one each.
            admission: the bounds on what is in flight (:mod:`deepserve.admission`).
            gateway_report: the statistics and model reports of the whole gateway, when this
                dataplane is one of its worker processes (default: this dataplane's own).
            plans: each model's versions and routing (:mod:`deepserve.lifecycle`); default:
                the versions given, the newest the default.
            shadow_in_flight: the most shadow requests in flight (mirroring is shed beyond it).
        """
        self.versions: dict[str, dict[str, ServedModel]] = {}  # model -> version -> served
        for m in models:
            self.versions.setdefault(m.runtime.name, {})[m.runtime.version] = m
            self._adopt(m)
        self.plans = plans or {name: Plan(tuple(sorted(vs, key=int)), max(vs, key=int))
                               for name, vs in self.versions.items()}
        self.default_timeout_s = default_timeout_s
        self.repository = repository or {n: sorted(vs, key=int) for n, vs in self.versions.items()}
        self._replica_counts = replica_counts
        self.requests_total = 0  # inference requests that reached a model (for autoscaling)
        self.metrics = metrics.get()
        self.statistics = Statistics()
        self.offload = Offloaded()  # PNG decoding and encoding, off the event loop
        self.admission = admission or Admission()
        self._gateway_report = gateway_report
        self.shadow_in_flight = shadow_in_flight
        self.shadows: set[asyncio.Task] = set()  # mirrored requests in flight
        self.comparisons: dict[tuple[str, str, str], Any] = {}  # (model, live, candidate) -> comparator

    # ------------------------------------------------------------------ versions (docs/lifecycle.md)

    @property
    def models(self) -> dict[str, ServedModel]:
        """Each model's default version."""
        return {name: self.versions[name][p.default] for name, p in self.plans.items()}

    def served(self) -> list[ServedModel]:
        """Every served version of every model."""
        return [m for versions in self.versions.values() for m in versions.values()]

    def _adopt(self, model: ServedModel) -> None:
        reference = Reference.from_extra(model.runtime.manifest.extra)
        if reference is not None and model.drift is None:
            model.drift = DriftMonitor(reference)

    def update(self, name: str, plan: Plan, added: list[ServedModel]) -> list[ServedModel]:
        """Serve ``name`` by its new ``plan``: ``added`` (new versions, ready to compute) join,
        the routing switches at once, and versions the plan no longer names leave.

        Returns:
            the versions that left: requests already on them finish; the caller closes their
            backends once ``in_flight`` is 0.
        """
        versions = dict(self.versions[name])
        for model in added:
            versions[model.runtime.version] = model
            self._adopt(model)
        missing = [v for v in plan.versions if v not in versions]
        if missing:
            raise ValueError(f"model '{name}': versions {missing} of the plan are not loaded")
        retired = [versions.pop(v) for v in list(versions) if v not in plan.versions]
        self.versions[name], self.plans[name] = versions, plan  # one step: no request sees half
        for key in [k for k in self.comparisons if k[0] == name and (k[1], k[2]) != (plan.default, plan.shadow)]:
            del self.comparisons[key]
            self.metrics.divergence(*key, {})  # the comparison ended: its series go
        for model in retired:
            self.metrics.drift(name, model.runtime.version, None)
        return retired

    # ------------------------------------------------------------------ health

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Every model's default version is ready."""
        return bool(self.plans) and all(m.ready for m in self.models.values())

    def get(self, name: str, version: str = "") -> ServedModel:
        """The served model ``name`` at ``version``; empty: its default version.

        Raises:
            ModelNotFound: unknown name, or a version that is not served.
        """
        versions = self._versions(name)
        model = versions.get(version or self.plans[name].default)
        if model is None:
            raise ModelNotFound(f"model '{name}' version '{version}' is not served; served versions: "
                                f"{', '.join(sorted(versions, key=int))}")
        return model

    def _versions(self, name: str) -> dict[str, ServedModel]:
        versions = self.versions.get(name)
        if versions is None:
            raise ModelNotFound(f"model '{name}' is not served; served models: {sorted(self.versions)}")
        return versions

    def route(self, name: str, version: str = "") -> ServedModel:
        """The version that answers an inference request: the one it names, or the plan's
        default or canary (sticky by the request's ``x-request-key``). Counted per route."""
        if version:
            model, why = self.get(name, version), "named"
        else:
            versions, plan = self._versions(name), self.plans[name]
            chosen, why = (plan.default, "default") if plan.canary is None else pick(plan, lifecycle.key())
            model = versions[chosen]
        lifecycle.answered_by.set(model.runtime.version)
        self.metrics.routed(name, model.runtime.version, why)
        return model

    @property
    def in_flight(self) -> int:
        """Inference requests inside this dataplane now, over all models."""
        return sum(m.in_flight for m in self.served())

    def labels(self, name: str | None) -> tuple[str, str]:
        """Metric labels (model, version) for a request: ``None`` for server-level calls, a
        served name as it is, anything else (typos, empty) as "unknown", so that clients
        cannot create series."""
        if name is None:
            return "", ""
        plan = self.plans.get(name)
        if plan is None:
            return "unknown", ""
        return name, lifecycle.answered_by.get() or plan.default

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.get(name, version).ready

    # A ready model turns unready after this many probes in a row fail: one failure may be a
    # probe that Serve routed to a replica on a node just lost, while the others still serve.
    UNREADY_AFTER = 2

    async def refresh(self, timeout: float = 10.0) -> None:
        """Probe one replica of every model: a one-row inference (:meth:`Backend.check`), not a
        question whether it has a session. A model whose replica computes it within
        ``timeout`` is ready, and its report is kept.

        A model in its own deployment of which Serve runs no replica (every one lost, or
        none started yet) is not ready at once, unprobed: a probe would only wait for a
        replica, and the model's health would say SERVING while its calls wait too.
        """
        running: dict[str, int] = {}
        if any(m.placement == "deployment" for m in self.served()):
            try:
                running = await asyncio.wait_for(self.replica_counts(), timeout)
            except asyncio.TimeoutError:  # Serve's controller is slow: the probes alone decide
                log.warning("replica counts: no answer from Serve within %g s", timeout)

        async def probe(model: ServedModel) -> None:
            if model.placement == "deployment" and running.get(model.runtime.name, 1) == 0:
                if model.ready:
                    log.warning("model %s is not ready: Serve runs no replica of it", model.runtime.name)
                model.ready, model.failed_probes = False, model.failed_probes + 1
                return
            try:
                model.replica_info = await model.backend.check(timeout)
                model.ready, model.failed_probes = True, 0
            except Overloaded:  # its queue is full: busy serving, which is not broken
                pass
            except Exception as exc:  # any other failure means "not ready now"
                model.failed_probes += 1
                if model.ready and model.failed_probes >= self.UNREADY_AFTER:
                    log.warning("model %s is not ready: %s", model.runtime.name, exc)
                    model.ready = False

        await asyncio.gather(*(probe(m) for m in self.served()))

    # ------------------------------------------------------------------ metadata

    def server_metadata(self) -> dict[str, Any]:
        # Triton's extension names, for the ones implemented whole (docs/triton-compatibility.md).
        return {"name": SERVER_NAME, "version": __version__,
                "extensions": ["model_configuration", "statistics", "parameters"]}

    # ------------------------------------------------------------------ inference

    def _timeout(self, remaining: float | None) -> float:
        timeout = self.default_timeout_s if remaining is None else min(remaining, self.default_timeout_s)
        if timeout <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was scheduled")
        return timeout

    async def _run(self, model: ServedModel, inputs: dict[str, np.ndarray], remaining: float | None):
        if not model.ready:
            raise ModelNotReady(f"model '{model.runtime.name}' has no ready replica yet; retry shortly")
        rows = model.runtime.validate(inputs)
        self.admission.admit(model.runtime.name, model.in_flight, model.batching.max_queued, rows)
        self.requests_total += 1
        model.in_flight += 1
        try:
            outputs, timing = await model.backend.infer(inputs, self._timeout(remaining))
        finally:
            model.in_flight -= 1
            self.admission.release(rows)
        self.statistics.of(model.runtime.name, model.runtime.version).computed(rows, timing)
        if model.drift is not None:
            model.drift.observe(model.runtime.monitored_values(outputs))
        plan = self.plans[model.runtime.name]
        if plan.shadow is not None and model.runtime.version == plan.default:
            self._mirror(model, plan, inputs, outputs)
        return outputs

    # ------------------------------------------------------------------ shadow (docs/lifecycle.md)

    def _mirror(self, live: ServedModel, plan: Plan, inputs: dict[str, np.ndarray],
                outputs: dict[str, np.ndarray]) -> None:
        """Send a copy of an answered request to the plan's shadow version, off the response
        path (a task of its own), unless the server is busy: then it is shed first."""
        candidate_version = mirrored(plan)
        if candidate_version is None:
            return
        name = live.runtime.name
        candidate = self.versions[name].get(candidate_version)
        busy = (len(self.shadows) >= self.shadow_in_flight or candidate is None or not candidate.ready
                or candidate.in_flight >= candidate.batching.max_queued // 2 or self.admission.busy())
        if busy:
            self.metrics.shadowed(name, live.runtime.version, candidate_version, "shed")
            return
        key = (name, live.runtime.version, candidate_version)
        if key not in self.comparisons:  # None: the two cannot be compared (kept: decided once)
            self.comparisons[key] = live.runtime.shadow_comparison(candidate.runtime)
        comparison = self.comparisons[key]
        task = asyncio.get_running_loop().create_task(self._shadow(live, candidate, comparison, inputs, outputs))
        self.shadows.add(task)
        task.add_done_callback(self.shadows.discard)

    async def _shadow(self, live: ServedModel, candidate: ServedModel, comparison, inputs, outputs) -> None:
        outcome = "compared"
        candidate.in_flight += 1
        try:
            if comparison is None:  # signatures differ: nothing meaningful to compare
                outcome = "failed"
                return
            shadow_outputs, _ = await candidate.backend.infer(inputs, self.default_timeout_s)
            comparison.add(live.runtime.shadow_values(outputs), candidate.runtime.shadow_values(shadow_outputs))
            if candidate.drift is not None:
                candidate.drift.observe(candidate.runtime.monitored_values(shadow_outputs))
        except Overloaded:
            outcome = "shed"
        except Exception as exc:  # noqa: BLE001 - a shadow's failure is counted, never answered
            outcome = "failed"
            log.info("shadow of %s version %s failed: %s", live.runtime.name, candidate.runtime.version, exc)
        finally:
            candidate.in_flight -= 1
            self.metrics.shadowed(live.runtime.name, live.runtime.version, candidate.runtime.version, outcome)

    # ------------------------------------------------------------------ statistics and the cluster

    def answered(self, name: str, version: str, ok: bool, seconds: float) -> None:
        """An inference request to a served model ended (OK or not) after ``seconds``."""
        if name in self.plans:
            self.statistics.of(name, version).answered(ok, seconds)

    async def replica_counts(self) -> dict[str, int]:
        """Replicas computing each model now (one each when nobody can say)."""
        if self._replica_counts is not None:
            try:
                return await self._replica_counts()
            except Exception:  # noqa: BLE001 - a description, not worth failing a call for
                log.warning("replica counts unavailable", exc_info=True)
        return {name: 1 for name in self.plans}

    async def gateway_report(self) -> tuple[Statistics, dict[str, dict]]:
        """The statistics of every request the gateway served, whichever of its worker
        processes served it, and each model's replica report, added up likewise (for
        ``ModelStatistics`` and ``ListModels``); this dataplane's own when nobody can say."""
        if self._gateway_report is not None:
            try:
                return await self._gateway_report()
            except Exception:  # noqa: BLE001 - this worker's own figures beat no answer
                log.warning("the gateway's report is unavailable: this worker's own figures", exc_info=True)
        return self.statistics, {(m.runtime.name, m.runtime.version): m.replica_info for m in self.served()}

    def publish_gauges(self) -> None:
        """Readiness, in-flight, drift and shadow gauges, sampled (the readiness poll calls
        this each second)."""
        for model in self.served():
            name, version = model.runtime.name, model.runtime.version
            self.metrics.set_ready(name, version, model.ready)
            self.metrics.set_in_flight(name, version, model.in_flight)
            psi = model.drift.psi() if model.drift is not None else None
            if psi is not None:
                self.metrics.drift(name, version, psi)
        for (name, live, candidate), comparison in self.comparisons.items():
            figures = comparison.figures() if comparison is not None else None
            if figures:
                self.metrics.divergence(name, live, candidate, figures)

    async def infer(
        self,
        name: str,
        version: str,
        inputs: dict[str, np.ndarray],
        parameters: dict[str, Any] | None = None,
        requested_outputs: list[str] | None = None,
        remaining: float | None = None,
        model: ServedModel | None = None,
    ) -> tuple[ServedModel, dict[str, np.ndarray]]:
        """Open Inference Protocol inference: tensors in, the model's tensors out.

        ``model``: the version already chosen by :meth:`route` (the transport checks the
        tensors against its signature first)."""
        model = model or self.route(name, version)
        if requested_outputs:
            served = {t.name for t in model.runtime.output_specs()}
            unknown = [n for n in requested_outputs if n not in served]
            if unknown:
                raise InvalidInput(f"model '{name}' has no output(s) {unknown}; outputs: {sorted(served)}")
        if isinstance(model.runtime, GenerativeRuntime):
            request = model.runtime.request_from_tensors(inputs, parameters or {})
            events = [e async for e in self._stream(model, request, remaining)]
            outputs = await self.offload.run(model.runtime.encode, events[-1])  # PNG encoding: off the loop
        else:
            graph_inputs = model.runtime.preprocess(inputs, parameters or {})
            outputs = model.runtime.postprocess(await self._run(model, graph_inputs, remaining), parameters or {})
        self._observe_outputs(model, outputs)
        if requested_outputs:
            outputs = {n: outputs[n] for n in requested_outputs}
        return model, outputs

    async def score(
        self,
        name: str,
        version: str,
        rows: list[list[float]] | None,
        named: list[dict[str, float]] | None,
        threshold: float | None,
        remaining: float | None = None,
        top_features: int | None = None,
    ) -> tuple[ServedModel, list[AnomalyResult]]:
        """Fraud scoring: transactions (as rows, or by column name) -> score, decision and the
        ``top_features`` features that explain it (None: the runtime's default; 0: none)."""
        model = self.route(name or "fraud-autoencoder", version)
        runtime = model.runtime
        if not isinstance(runtime, AnomalyRuntime):
            raise InvalidInput(f"model '{runtime.name}' is a {runtime.kind} model, not an anomaly detector")
        cutoff = runtime.resolve_threshold(threshold)
        top = runtime.resolve_top_features(top_features)
        if named is not None:
            matrix = runtime.rows_from_named(named)
        else:
            width = len(runtime.feature_names)
            bad = next((i for i, r in enumerate(rows or []) if len(r) != width), None)
            if bad is not None:
                raise InvalidInput(
                    f"transaction {bad}: expected {width} features ({runtime.feature_names[0]}.."
                    f"{runtime.feature_names[-1]}), got {len(rows[bad])}"
                )
            matrix = np.asarray(rows, dtype=np.float32).reshape(-1, width)
        outputs = await self._run(model, {runtime.manifest.inputs[0].name: matrix}, remaining)
        self.metrics.fraud(runtime.name, runtime.version, outputs["score"], runtime.threshold)
        return model, runtime.explain(outputs, cutoff, top)

    async def classify(
        self,
        name: str,
        version: str,
        images: list[tuple[str, Any]],
        top_k: int,
        remaining: float | None = None,
    ) -> tuple[ServedModel, list[list[tuple[int, float]]]]:
        """Image classification: images as ``("pixels", array)`` or ``("png", bytes)`` -> top-k."""
        model = self.route(name or "digit-classifier", version)
        runtime = model.runtime
        if not isinstance(runtime, ClassifierRuntime):
            raise InvalidInput(f"model '{runtime.name}' is a {runtime.kind} model, not a classifier")
        k = runtime.resolve_top_k(top_k)
        if not images:
            raise InvalidInput("images: empty batch; send at least one image")
        if any(form == "png" for form, _ in images):  # PNG decoding: off the event loop
            batch = await self.offload.run(runtime.images_batch, images)  # (B, 1, H, W)
        else:
            batch = runtime.images_batch(images)
        outputs = await self._run(model, {runtime.manifest.inputs[0].name: batch}, remaining)
        self.metrics.classified(runtime.name, runtime.version, outputs["probabilities"])
        return model, runtime.top_k(outputs["probabilities"], k)

    async def recommend(
        self,
        name: str,
        version: str,
        user: int | None,
        neighbors: list[int],
        k: int,
        exclude_known: bool,
        remaining: float | None = None,
    ) -> tuple[ServedModel, Recommendation]:
        """Top-k users for ``user`` (an id in the graph), or for a new user from ``neighbors``."""
        model = self.route(name or "graph-recommender", version)
        runtime = model.runtime
        if not isinstance(runtime, RecommenderRuntime):
            raise InvalidInput(f"model '{runtime.name}' is a {runtime.kind} model, not a recommender")
        k = runtime.resolve_k(k or None)  # 0: the proto's unset
        unique = list(dict.fromkeys(neighbors))
        if any(n < 0 for n in unique):
            raise InvalidInput(f"neighbors: ids are >= 0, got {min(unique)}")
        # Pad to a power of two: requests of similar size share a batch (same shape).
        width = 1 << max(len(unique) - 1, 0).bit_length()
        padded = np.full((1, width), -1, dtype=np.int64)
        padded[0, : len(unique)] = unique
        users = np.array([-1 if user is None else user], dtype=np.int64)
        graph_inputs = runtime.graph_inputs(users, padded, np.array([exclude_known]))
        outputs = await self._run(model, graph_inputs, remaining)
        return model, runtime.recommendations(graph_inputs, outputs, k)[0]

    def generate(
        self,
        name: str,
        version: str,
        labels: np.ndarray,
        seed: int | None,
        steps: int | None,
        guidance: float | None,
        sampler: str | None,
        preview_every: int = 0,
        progress: bool = True,
        remaining: float | None = None,
    ) -> tuple[ServedModel, AsyncIterator[GenerationProgress | GenerationResult]]:
        """Image generation: the validated request's events (progress per step when asked
        for, then the result).

        Validation errors raise here, before the stream starts.
        """
        model = self.route(name or "digit-diffusion", version)
        runtime = model.runtime
        if not isinstance(runtime, GenerativeRuntime):
            raise InvalidInput(f"model '{runtime.name}' is a {runtime.kind} model, not a generator")
        request = runtime.request(labels, seed, steps, guidance, sampler, preview_every, progress)
        if not model.ready:
            raise ModelNotReady(f"model '{runtime.name}' has no ready replica yet; retry shortly")
        return model, self._stream(model, request, remaining)

    async def _stream(self, model: ServedModel, request, remaining: float | None):
        if not model.ready:
            raise ModelNotReady(f"model '{model.runtime.name}' has no ready replica yet; retry shortly")
        rows = len(request.labels)
        self.admission.admit(model.runtime.name, model.in_flight, model.batching.max_queued, rows)
        self.requests_total += 1
        model.in_flight += 1
        try:
            async for event in model.backend.generate(request, self._timeout(remaining)):
                if isinstance(event, GenerationResult):
                    stats = self.statistics.of(model.runtime.name, model.runtime.version)
                    stats.computed(len(event.images), event.timing)
                yield event
        finally:
            model.in_flight -= 1
            self.admission.release(rows)

    def _observe_outputs(self, model: ServedModel, outputs: dict[str, np.ndarray]) -> None:
        """Model-output health for Open Inference Protocol calls, as for the typed APIs."""
        runtime = model.runtime
        if isinstance(runtime, AnomalyRuntime):
            self.metrics.fraud(runtime.name, runtime.version, outputs["score"], runtime.threshold)
        elif isinstance(runtime, ClassifierRuntime) and "probabilities" in outputs:
            self.metrics.classified(runtime.name, runtime.version, outputs["probabilities"])
