"""The Ray Serve application: the gateway, and a deployment per remotely placed model.

Each model has a placement (see docs/architecture.md):
- ``gateway``: its ONNX Runtime sessions live in the gateway's worker processes, next to the
  gRPC server (:mod:`deepserve.gateway`). No hop: the fast path for small, latency-critical
  models (fraud scoring).
- ``deployment``: its own Serve deployment (``ModelReplica``, named after the model),
  reached through a Serve handle: independent replicas, autoscaling and GPU fractions,
  for models whose compute dwarfs the ~4 ms the handle hop costs.

Either way Serve owns every replica: it starts them, health-checks them (a one-row
inference, not a look at the session object), restarts them and scales them; a replica it
stops drains first (``drain_grace_s``). Serve's own gRPC proxy is not used: clients talk to the gateway.
Replicas load the verified ONNX file and warm the session up before they report ready;
both placements batch concurrent requests with :class:`~deepserve.batching.BatchingBackend`,
or step by step with :class:`~deepserve.generation.StepBatcher` for generators.

``build_app`` is the application builder that ``serve run deploy/serve_config.yaml`` and
``deepserve serve`` both use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import numpy as np
from pydantic import ValidationError
import ray
from ray import serve

from deepserve import metrics
from deepserve.config import describe, model_options
from deepserve.gateway.replica import QUIET, STOP_MARGIN_S, Gateway, drain_seconds
from deepserve.lifecycle import LifecycleError
from deepserve.loading import backend_for, current_plan, load_runtime, pinned_digest, plan_now
from deepserve.repository import ModelRepository
from deepserve.runtime import GenerationRequest, GenerationResult
from deepserve.settings import Settings
from deepserve.statistics import Timing

__all__ = ["ModelReplica", "Gateway", "build_app", "STOP_MARGIN_S"]

log = logging.getLogger("deepserve")

# ---------------------------------------------------------------------------- model replicas


@serve.deployment(
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=256,
    max_queued_requests=1024,
    health_check_period_s=5,
    logging_config=QUIET,
)
class ModelReplica:
    """One model's ONNX Runtime session in its own deployment, behind Serve's router.

    For models placed ``deployment``: heavy or GPU models that need their own scaling.
    Concurrent calls are batched by the same :class:`BatchingBackend` the gateway uses.

    Every call carries the request's deadline (wall-clock seconds, ``time.time()``), and the
    replica keeps it itself: time spent in Serve's queue counts, and a request whose deadline
    passes here is dropped here, whether or not the gateway's cancel ever arrives.
    """

    async def __init__(self, repository: str, name: str, entry: dict[str, Any], max_rows: int,
                       probe_timeout_s: float = 10.0, poll_s: float = 5.0):
        self.repository, self.name, self.entry, self.max_rows = repository, name, entry, max_rows
        self.probe_timeout_s = probe_timeout_s
        self.pid = os.getpid()
        self.plan = plan_now(ModelRepository(repository), name, entry)  # a replacement replica: what is current
        self.versions: dict[str, Any] = {}  # version -> its backend
        self.in_flight: dict[str, int] = {}
        self.loading: dict[str, asyncio.Task] = {}
        for version in self.plan.versions:
            self.versions[version] = self._load(version)
        loop = asyncio.get_running_loop()
        self.gauges = loop.create_task(_refresh_gauges(f"replica:{name}"))
        self.poller = loop.create_task(self._poll(poll_s)) if poll_s > 0 else None

    def _load(self, version: str):
        runtime = load_runtime(self.repository, self.name, version, self.entry, self.max_rows, "deployment")
        return backend_for(runtime, self.entry["batching"])

    async def _backend(self, version: str):
        """The version's backend; a version the gateway routes to before this replica's own poll
        saw it is loaded now (once, however many calls wait for it)."""
        version = version or self.plan.default
        backend = self.versions.get(version)
        if backend is not None:
            return backend
        task = self.loading.get(version)
        if task is None:
            task = self.loading[version] = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._load, version))
            task.add_done_callback(lambda _: self.loading.pop(version, None))
        backend = self.versions[version] = await asyncio.shield(task)
        return backend

    async def _poll(self, period_s: float) -> None:
        """Follow the model's plan (docs/lifecycle.md): load what it adds before the gateway
        routes there, and close versions it dropped once nothing is in flight on them."""
        repo = ModelRepository(self.repository)
        while True:
            await asyncio.sleep(period_s)
            try:
                self.plan = await asyncio.to_thread(current_plan, repo, self.name, self.entry)
                for version in self.plan.versions:
                    await self._backend(version)
                for version in [v for v in self.versions if v not in self.plan.versions]:
                    if not self.in_flight.get(version):
                        self.versions.pop(version).close()
            except Exception as exc:  # noqa: BLE001 - keep serving what is loaded; try again next poll
                log.warning("model %s: cannot follow the repository (%s); serving %s", self.name, exc,
                            sorted(self.versions))

    async def infer(self, inputs: dict[str, np.ndarray], deadline: float, version: str = "") -> tuple[dict[str, np.ndarray], Timing]:
        version = version or self.plan.default
        backend = await self._backend(version)
        self.in_flight[version] = self.in_flight.get(version, 0) + 1
        try:
            return await backend.infer(inputs, timeout=deadline - time.time())
        finally:
            self.in_flight[version] -= 1

    async def generate(self, request: GenerationRequest, deadline: float, version: str = ""):
        """Generators: streams progress, then the result (the gateway calls it with
        ``stream=True``; cancelling that call ends this generator, and the job with it)."""
        backend = await self._backend(version)
        async for event in backend.generate(request, timeout=deadline - time.time()):
            yield event

    async def generate_result(self, request: GenerationRequest, deadline: float, version: str = "") -> GenerationResult:
        """Generators, without progress: only the result crosses back (one plain call)."""
        backend = await self._backend(version)
        async for event in backend.generate(request, timeout=deadline - time.time()):
            result = event
        return result

    async def info(self, version: str = "") -> dict[str, Any]:
        """The version's backend report, with this replica's pid and Ray ``WorkerId`` (the label
        of its series on the node's metrics endpoint)."""
        return {**await (await self._backend(version)).info(), "pid": self.pid,
                "worker_id": ray.get_runtime_context().get_worker_id()}

    async def check(self, timeout: float, version: str = "") -> dict[str, Any]:
        """The gateway's readiness probe of a version: a one-row inference, then :meth:`info`."""
        return {**await (await self._backend(version)).check(timeout), "pid": self.pid}

    async def check_health(self) -> None:
        """Serve's health check (every ``health_check_period_s``): a one-row inference of each
        loaded version through its session's worker thread, so a session that cannot compute,
        or is stuck in a run, fails it and Serve replaces the replica."""
        await asyncio.gather(*(b.check(self.probe_timeout_s) for b in list(self.versions.values())))


async def _refresh_gauges(component: str, period_s: float = 1.0) -> None:
    """Hand this process's metrics to Ray once a second (see deepserve.metrics)."""
    while True:
        metrics.get().refresh(component)
        await asyncio.sleep(period_s)


# ---------------------------------------------------------------------------- application builder


def build_app(args: dict[str, Any], deployments: list[dict[str, Any]] | None = None):
    """The Serve application: the gateway plus a deployment per model placed ``deployment``.

    Args:
        args: ``repository`` (default ``$DEEPSERVE_MODEL_REPOSITORY``); ``models``: a mapping
            from model name to ``{placement: gateway|deployment, batching: {...},
            intra_op_threads: N}`` (ONNX Runtime threads per session run, default 1) (default:
            every model in the repository, in the gateway); and any
            :class:`~deepserve.settings.Settings` field (``grpc_port``, ...).
        deployments: per-deployment options as in a Serve config's ``deployments`` section
            (``name`` plus ``num_replicas``, ``autoscaling_config``, ``ray_actor_options``, ...).
            ``serve run`` applies that section itself; ``deepserve serve`` passes it here.
    """
    args = dict(args or {})
    overrides = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in deployments or []}
    repo = ModelRepository(args.pop("repository", None) or Settings().model_repository)
    repository = repo.location  # what each replica opens: an absolute path, or a URI it fetches from
    models = args.pop("models", None) or {name: {} for name in repo.model_names()}
    if isinstance(models, list):
        models = {name: {} for name in models}
    if not models:
        raise ValueError(f"no models in {repository}: run `deepserve build` first")
    try:
        options = Settings(**args)
    except ValidationError as exc:
        raise ValueError("invalid Serve config: " + "; ".join(describe(e, "args") for e in exc.errors())) from None

    plan: dict[str, dict[str, Any]] = {}
    for name, chosen in model_options(models).items():
        entry = {"placement": chosen.placement, "batching": chosen.batching.model_dump(),
                 "intra_op_threads": chosen.intra_op_threads, "versions": chosen.versions.model_dump(),
                 "route": chosen.route.model_dump()}
        try:
            serving = current_plan(repo, name, entry)
        except LifecycleError as exc:
            raise ValueError(f"invalid Serve config: models.{name}: {exc}") from None
        # One digest pins the version served now; a mapping pins each version it names.
        pins = chosen.sha256 if isinstance(chosen.sha256, dict) else \
            {} if chosen.sha256 is None else {serving.default: chosen.sha256}
        entry.update(pins=pins, plan=serving.to_dict())
        for version in serving.versions:  # fail at deploy time, with the file named
            model, _ = repo.load(name, version, pinned=pinned_digest(name, version, entry))
            model.read_files()  # its sidecar files too (a remote repository: fetched, verified)
        plan[name] = entry

    remote = [n for n, e in plan.items() if e["placement"] == "deployment"]
    unknown = set(overrides) - set(remote) - {"Gateway"}
    if unknown:
        raise ValueError(f"the config names deployments {sorted(unknown)}; deployable: {['Gateway', *remote]}")
    # A replica that Serve stops (scale-down, redeploy, shutdown) gets as long as a request
    # may last, so that none in flight is cut short; the Serve config may say otherwise.
    stopping = {"graceful_shutdown_timeout_s": drain_seconds(options) + STOP_MARGIN_S}
    handles = {
        name: ModelReplica.options(name=name, **{**stopping, **overrides.get(name, {})}).bind(
            repository, name, plan[name], options.max_rows_per_request, options.probe_timeout_s,
            options.repository_poll_s)
        for name in remote
    }
    return Gateway.options(**{**stopping, **overrides.get("Gateway", {})}).bind(repository, plan, handles, args)
