"""The Ray Serve application: the gRPC gateway, and a deployment per remotely placed model.

Each model has a placement (see docs/architecture.md):
- ``gateway``: its ONNX Runtime session lives in the ``Gateway`` replica, next to the gRPC
  server. No hop: the fast path for small, latency-critical models (fraud scoring).
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
import contextlib
import logging
import os
import time
from typing import Any

import numpy as np
import ray
from pydantic import ValidationError
from ray import serve
from ray.serve.schema import LoggingConfig
from ray.exceptions import (
    ActorPlacementGroupRemoved,
    ActorUnschedulableError,
    LocalRayletDiedError,
    NodeDiedError,
    ObjectLostError,
    ObjectStoreFullError,
    OutOfDiskError,
    OutOfMemoryError,
    RayActorError,
    RaySystemError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.exceptions import RpcError as RayRpcError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from deepserve import metrics
from deepserve.admission import Admission
from deepserve.batching import BatchingBackend, BatchingConfig
from deepserve.config import describe, model_options
from deepserve.dataplane import DataPlane, ServedModel
from deepserve.errors import DeadlineExceeded, DeepServeError, ModelNotReady, Overloaded
from deepserve.grpc_server import GrpcServer
from deepserve.repository import ModelRepository
from deepserve.generation import StepBatcher
from deepserve.runtime import GenerationRequest, GenerationResult, GenerativeRuntime, runtime_for
from deepserve.security import ServerSecurity
from deepserve.settings import Settings
from deepserve.statistics import Timing

log = logging.getLogger("deepserve")

# A log line per request costs more than a fraud score: access logs are off by default.
QUIET = LoggingConfig(enable_access_log=False, log_level="WARNING")


# ---------------------------------------------------------------------------- model replicas


def _backend_for(runtime, batching: dict[str, Any]):
    """Generators batch step by step (:class:`StepBatcher`); the others request by request."""
    config = BatchingConfig.from_dict(batching)
    if isinstance(runtime, GenerativeRuntime):
        return StepBatcher(runtime, config)
    return BatchingBackend(runtime, config)


def _load_runtime(repository: str, name: str, entry: dict[str, Any], max_rows: int, placement: str,
                  max_image_side: int = 0):
    model, data = ModelRepository(repository).load(name, entry["version"], pinned=entry["sha256"])  # verified bytes
    runtime = runtime_for(model.manifest, max_rows, max_image_side)
    runtime.load(data, entry["intra_op_threads"])  # session + warm-up: ready means ready
    metrics.get().loaded(name, entry["version"], runtime.kind, placement, runtime.provider, runtime.load_seconds)
    return runtime


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
                       probe_timeout_s: float = 10.0):
        self.runtime = _load_runtime(repository, name, entry, max_rows, "deployment")
        self.backend = _backend_for(self.runtime, entry["batching"])
        self.probe_timeout_s = probe_timeout_s
        self.pid = os.getpid()
        self.gauges = asyncio.get_running_loop().create_task(_refresh_gauges(f"replica:{name}"))

    async def infer(self, inputs: dict[str, np.ndarray], deadline: float) -> tuple[dict[str, np.ndarray], Timing]:
        return await self.backend.infer(inputs, timeout=deadline - time.time())

    async def generate(self, request: GenerationRequest, deadline: float):
        """Generators: streams progress, then the result (the gateway calls it with
        ``stream=True``; cancelling that call ends this generator, and the job with it)."""
        async for event in self.backend.generate(request, timeout=deadline - time.time()):
            yield event

    async def generate_result(self, request: GenerationRequest, deadline: float) -> GenerationResult:
        """Generators, without progress: only the result crosses back (one plain call)."""
        async for event in self.backend.generate(request, timeout=deadline - time.time()):
            result = event
        return result

    async def info(self) -> dict[str, Any]:
        return {**await self.backend.info(), "pid": self.pid}

    async def check(self, timeout: float) -> dict[str, Any]:
        """The gateway's readiness probe: a one-row inference, then :meth:`info`."""
        return {**await self.backend.check(timeout), "pid": self.pid}

    async def check_health(self) -> None:
        """Serve's health check (every ``health_check_period_s``): a one-row inference
        through the session's worker thread, so a session that cannot compute, or is stuck
        in a run, fails it and Serve replaces the replica."""
        await self.backend.check(self.probe_timeout_s)


async def _refresh_gauges(component: str, period_s: float = 1.0) -> None:
    """Hand this process's metrics to Ray once a second (see deepserve.metrics)."""
    while True:
        metrics.get().refresh(component)
        await asyncio.sleep(period_s)


# Ray's and Serve's errors that mean "the cluster could not carry the call out", not "the
# request is wrong": the replica, its worker, node or raylet went away, its objects were lost
# (their owner died, too), Ray's own RPCs or object store failed, or no replica can be placed.
# They are UNAVAILABLE (ModelNotReady): the caller may retry, here or elsewhere.
REPLICA_LOST = (
    RayActorError,  # ActorDiedError, ActorUnavailableError
    ObjectLostError,  # OwnerDiedError, ObjectFetchTimedOutError, ObjectFreedError, ObjectReconstructionFailedError
    NodeDiedError, WorkerCrashedError, LocalRayletDiedError,
    OutOfMemoryError,  # Ray's memory monitor killed the replica's worker
    RaySystemError, RayRpcError, ObjectStoreFullError, OutOfDiskError,
    ActorUnschedulableError, ActorPlacementGroupRemoved,
    DeploymentUnavailableError, ReplicaUnavailableError,
)


class RayBackend:
    """Calls a model deployment through its Serve handle; maps Ray's errors to ours.

    A call whose replica dies under it is sent again (Serve's router then picks a live
    replica) while the deadline allows, at most ``attempts`` times in all: inference has no
    side effects, and a lost node should cost clients as little as possible.
    """

    def __init__(self, name: str, handle, attempts: int = 3):
        self.name = name
        self.handle = handle
        self.attempts = attempts

    async def _call(self, method: str, timeout: float, *args):
        deadline = time.monotonic() + timeout
        for attempt in range(1, self.attempts + 1):
            try:
                return await self._call_once(method, deadline - time.monotonic(), *args)
            except ModelNotReady:
                if attempt == self.attempts or deadline - time.monotonic() <= 0:
                    raise
                log.warning("model %s: replica lost during %s; sending it again (%d/%d)",
                            self.name, method, attempt + 1, self.attempts)

    async def _call_once(self, method: str, timeout: float, *args):
        response = getattr(self.handle, method).remote(*args)
        with self._errors():
            try:
                return await asyncio.wait_for(_await(response), timeout)
            except asyncio.TimeoutError:
                response.cancel()
                raise DeadlineExceeded(f"model '{self.name}' did not answer within the deadline") from None
            except asyncio.CancelledError:  # the client went away: so does the replica's work
                response.cancel()
                raise

    @contextlib.contextmanager
    def _errors(self):
        """Ray's and Serve's exceptions as ours."""
        try:
            yield
        except BackPressureError:
            raise Overloaded(f"model '{self.name}' is overloaded: its request queue is full; retry with backoff") from None
        except RayTaskError as exc:
            if isinstance(exc.cause, DeepServeError):
                raise exc.cause from None
            if isinstance(exc.cause, REPLICA_LOST):
                raise ModelNotReady(f"model '{self.name}': the replica went away; retry shortly") from None
            log.error("model %s replica failed: %s", self.name, exc)
            raise RuntimeError(f"model '{self.name}' replica failed") from None
        except REPLICA_LOST as exc:
            log.warning("model %s: %s", self.name, type(exc).__name__)
            raise ModelNotReady(f"model '{self.name}': the replica went away; retry shortly") from None

    async def generate(self, request: GenerationRequest, timeout: float):
        """Streams the replica's events; closing this generator cancels the replica's.

        A request that wants no progress takes a plain call instead: Serve's streaming
        calls cost ~20 ms more per request here (docs/benchmarks.md).
        """
        if not request.progress:
            yield await self._call("generate_result", timeout, request, time.time() + timeout)
            return
        stream = self.handle.options(stream=True).generate.remote(request, time.time() + timeout)
        deadline = time.monotonic() + timeout
        finished = False
        try:
            with self._errors():
                while not finished:
                    try:
                        event = await asyncio.wait_for(stream.__anext__(), max(deadline - time.monotonic(), 0.0))
                    except StopAsyncIteration:
                        raise RuntimeError(f"model '{self.name}': the stream ended without a result") from None
                    except asyncio.TimeoutError:
                        raise DeadlineExceeded(f"model '{self.name}' did not finish within the deadline") from None
                    finished = isinstance(event, GenerationResult)
                    yield event
        finally:
            if not finished:
                stream.cancel()

    async def infer(self, inputs: dict[str, np.ndarray], timeout: float) -> tuple[dict[str, np.ndarray], Timing]:
        # The deadline travels with the call, as wall-clock time: the replica drops the request
        # itself when it passes, however long Serve's queue held it.
        return await self._call("infer", timeout, inputs, time.time() + timeout)

    async def info(self, timeout: float) -> dict[str, Any]:
        return await self._call("info", timeout)

    async def check(self, timeout: float) -> dict[str, Any]:
        return await self._call("check", timeout, timeout)


async def _await(response):
    return await response


# ---------------------------------------------------------------------------- gateway


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=4, health_check_period_s=5,
                  logging_config=QUIET)
class Gateway:
    """The gRPC server on ``grpc_port`` over the dataplane.

    Models placed ``gateway`` run in this replica's process (no hop: the fast path for
    small, latency-critical models); models placed ``deployment`` are reached through
    their Serve handles.
    """

    async def __init__(self, repository: str, plan: dict[str, dict[str, Any]], handles: dict[str, Any],
                     options: dict[str, Any]):
        from deepserve.memory import tune_allocator  # first: before the gRPC threads allocate
        tune_allocator()
        settings = Settings(**options)
        security = ServerSecurity.from_settings(settings)  # a missing certificate or tokens file fails now
        repo = ModelRepository(repository)
        served = []
        for name, entry in plan.items():
            if entry["placement"] == "gateway":
                runtime = _load_runtime(repository, name, entry, settings.max_rows_per_request, "gateway",
                                        settings.max_image_side)
                backend = _backend_for(runtime, entry["batching"])
            else:
                runtime = runtime_for(repo.get(name, entry["version"]).manifest, settings.max_rows_per_request,
                                      settings.max_image_side)
                backend = RayBackend(name, handles[name])
            served.append(ServedModel(runtime=runtime, backend=backend, placement=entry["placement"],
                                      batching=BatchingConfig.from_dict(entry["batching"])))
        self.plan = plan
        index = {name: repo.versions(name) for name in repo.model_names()}  # RepositoryIndex
        self.dataplane = DataPlane(served, settings.default_timeout_s, index, self._replica_counts,
                                   Admission(settings.max_rows_in_flight, settings.max_loop_lag_s))
        self.dataplane.admission.start()
        self._last_report = (time.monotonic(), 0)
        self.poll_s = settings.readiness_poll_s
        self.probe_timeout_s = settings.probe_timeout_s
        self.drain_s = drain_seconds(settings)
        # Replicas that are still starting are not waited for: the poll picks them up.
        await self.dataplane.refresh(min(self.probe_timeout_s, 2.0))
        self.node = settings.node_name or ray.util.get_node_ip_address()
        self.server = GrpcServer(self.dataplane, settings.grpc_host, settings.grpc_port, settings.max_message_bytes,
                                 self.node, settings.max_connection_age_s, settings.connection_age_grace_s,
                                 security=security, reflection=settings.reflection,
                                 health_port=settings.health_port,
                                 max_concurrent_rpcs=settings.max_concurrent_rpcs)
        await self.server.start()
        self.poller = asyncio.get_running_loop().create_task(self._poll())

    async def _replica_counts(self) -> dict[str, int]:
        """Running replicas per model, from Serve: the gateways for models placed in them."""
        status = await asyncio.get_running_loop().run_in_executor(None, serve.status)  # a controller call
        deployments = status.applications[serve.get_replica_context().app_name].deployments

        def running(deployment: str) -> int:
            found = deployments.get(deployment)
            return found.replica_states.get("RUNNING", 0) if found else 0

        return {name: running("Gateway" if entry["placement"] == "gateway" else name)
                for name, entry in self.plan.items()}

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.dataplane.refresh(self.probe_timeout_s)
                await self.server.publish_health()
                self.dataplane.publish_gauges()
                metrics.get().refresh("gateway")
            except Exception:  # keep polling whatever happens
                log.exception("readiness poll failed")

    async def check_health(self) -> None:
        if self.poller.done():
            raise RuntimeError("the readiness poller stopped")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """This replica's load for :class:`~deepserve.autoscaling.GatewayLoadPolicy`: its
        requests never pass Serve's router, so Serve cannot count them itself."""
        now, total = time.monotonic(), self.dataplane.requests_total
        since, before = self._last_report
        self._last_report = (now, total)
        rate = (total - before) / (now - since) if now > since else 0.0
        return {"requests_per_s": rate, "in_flight": float(self.dataplane.in_flight)}

    async def status(self) -> dict[str, Any]:
        """Readiness and each model's replica report (batch statistics, deadlines dropped and
        health probes included): live for models computed here, as of the last readiness poll
        for the others. ``requests_in_flight`` counts this gateway's calls to the model."""
        models = {}
        for name, m in self.dataplane.models.items():
            report = await m.backend.info(0.0) if m.placement == "gateway" else m.replica_info
            models[name] = {"ready": m.ready, "version": m.runtime.version, "kind": m.runtime.kind,
                            "requests_in_flight": m.in_flight, **report}
        return {"port": self.server.port, "node": self.node, "pid": os.getpid(), "ready": self.dataplane.ready(),
                "models": models}

    async def __del__(self):
        """Serve stops this replica (scale-down, a redeploy, shutdown): drain it.

        The gRPC server stops taking calls (new ones get UNAVAILABLE, and grpc.health.v1 says
        NOT_SERVING, on ``health_port`` too while the main port drains) and the calls in
        flight finish, for up to ``drain_grace_s``; what is left then is cancelled. Serve
        allows the replica that long (``graceful_shutdown_timeout_s``, see :func:`build_app`).
        """
        server = getattr(self, "server", None)
        if server is None:  # the constructor failed: nothing to drain
            return
        started = time.monotonic()
        log.warning("gateway stopping: draining %d inference call(s) for up to %g s",
                    self.dataplane.in_flight, self.drain_s)
        await server.stop(self.drain_s)
        self.poller.cancel()
        log.warning("gateway drained in %.1f s", time.monotonic() - started)


# ---------------------------------------------------------------------------- application builder


# Serve's budget for stopping a replica, beyond the drain itself: its wait for requests
# routed by Serve (graceful_shutdown_wait_loop_s, 2 s) and the shutdown of its servers.
STOP_MARGIN_S = 5.0


def drain_seconds(settings: Settings) -> float:
    """How long a stopping replica lets requests in flight finish (``drain_grace_s``)."""
    return settings.default_timeout_s if settings.drain_grace_s is None else settings.drain_grace_s


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
        version = repo.latest_version(name)
        repo.load(name, version, pinned=chosen.sha256)  # fail at deploy time, with the file named
        plan[name] = {"placement": chosen.placement, "version": version, "batching": chosen.batching.model_dump(),
                      "intra_op_threads": chosen.intra_op_threads, "sha256": chosen.sha256}

    remote = [n for n, e in plan.items() if e["placement"] == "deployment"]
    unknown = set(overrides) - set(remote) - {"Gateway"}
    if unknown:
        raise ValueError(f"the config names deployments {sorted(unknown)}; deployable: {['Gateway', *remote]}")
    # A replica that Serve stops (scale-down, redeploy, shutdown) gets as long as a request
    # may last, so that none in flight is cut short; the Serve config may say otherwise.
    stopping = {"graceful_shutdown_timeout_s": drain_seconds(options) + STOP_MARGIN_S}
    handles = {
        name: ModelReplica.options(name=name, **{**stopping, **overrides.get(name, {})}).bind(
            repository, name, plan[name], options.max_rows_per_request, options.probe_timeout_s)
        for name in remote
    }
    return Gateway.options(**{**stopping, **overrides.get("Gateway", {})}).bind(repository, plan, handles, args)
