"""The gateway's Serve replica: it owns the worker processes that serve gRPC.

One per serving node (see :mod:`deepserve.autoscaling`). It starts ``gateway_processes``
workers (default: one per CPU core it may use), each serving the gRPC port with its own
sessions of the models placed ``gateway`` (:mod:`deepserve.gateway.worker`), and:

- checks first that no other process holds the port (the workers share it with
  SO_REUSEPORT, which would otherwise let a second server take half the clients);
- relays the workers' calls to the models placed ``deployment`` through their Serve handles
  (:class:`RayBackend`), which only a Ray process holds;
- restarts a worker that dies; fails Serve's health check while one stays down;
- collects each worker's metrics and load once a second (``record_autoscaling_stats``,
  Prometheus through Ray) and answers ``status`` for all of them;
- drains them when Serve stops it (SIGTERM: they stop taking calls and finish the ones in
  flight for ``drain_grace_s``).

Nothing on the request path runs in this process for models placed ``gateway``: its Ray
threads share no GIL with a worker's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve
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
from ray.serve.schema import LoggingConfig

from deepserve import metrics
from deepserve.errors import DeadlineExceeded, DeepServeError, InvalidInput, ModelNotReady, Overloaded
from deepserve.gateway.channel import CONTROL, MARGIN_S, RELAY, Client, server
from deepserve.gateway.front import Front, FrontConfig, find_binary
from deepserve.memory import tune_allocator
from deepserve.loading import pinned_digest
from deepserve.repository import ModelRepository
from deepserve.runtime import ASSIGNED_GPUS_ENV, GenerationRequest, GenerationResult
from deepserve.security import ServerSecurity
from deepserve.settings import Settings
from deepserve.statistics import Statistics, Timing

log = logging.getLogger("deepserve")

# A log line per request costs more than a fraud score: access logs are off by default.
QUIET = LoggingConfig(enable_access_log=False, log_level="WARNING")

# Serve's budget for stopping a replica, beyond the drain itself: its wait for requests
# routed by Serve (graceful_shutdown_wait_loop_s, 2 s) and the shutdown of its servers.
STOP_MARGIN_S = 5.0
WORKER_START_S = 600.0  # loading and warming up a worker's sessions
WORKER_DOWN_S = 10.0  # a worker down (and not restarted) this long fails the health check


def drain_seconds(settings: Settings) -> float:
    """How long a stopping replica lets requests in flight finish (``drain_grace_s``)."""
    return settings.default_timeout_s if settings.drain_grace_s is None else settings.drain_grace_s


# ---------------------------------------------------------------------------- models placed `deployment`


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

    async def generate(self, request: GenerationRequest, timeout: float, version: str = ""):
        """Streams the replica's events; closing this generator cancels the replica's.

        A request that wants no progress takes a plain call instead: Serve's streaming
        calls cost ~20 ms more per request here (docs/benchmarks.md).
        """
        if not request.progress:
            yield await self._call("generate_result", timeout, request, time.time() + timeout, version)
            return
        stream = self.handle.options(stream=True).generate.remote(request, time.time() + timeout, version)
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

    async def infer(self, inputs: dict[str, np.ndarray], timeout: float,
                    version: str = "") -> tuple[dict[str, np.ndarray], Timing]:
        # The deadline travels with the call, as wall-clock time: the replica drops the request
        # itself when it passes, however long Serve's queue held it.
        return await self._call("infer", timeout, inputs, time.time() + timeout, version)

    async def info(self, timeout: float, version: str = "") -> dict[str, Any]:
        return await self._call("info", timeout, version)

    async def check(self, timeout: float, version: str = "") -> dict[str, Any]:
        return await self._call("check", timeout, timeout, version)


async def _await(response):
    return await response


# ---------------------------------------------------------------------------- worker processes


def available_cores() -> int:
    """CPU cores this process may use: its affinity, capped by a cgroup v2 quota (a
    Kubernetes CPU limit), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    return max(cores, 1)


def claim_port(host: str, port: int, setting: str) -> int:
    """Check that no process holds ``host:port`` (port 0: choose a free one); the port.

    The workers bind it with SO_REUSEPORT, and so could anyone else of this user: a second
    server, such as another ``deepserve serve``, would silently take half the clients. A
    plain bind here fails while any socket listens there, with or without SO_REUSEPORT.
    """
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is free
        try:
            probe.bind((address, port))
        except OSError:
            raise RuntimeError(f"cannot listen on gRPC port {port} ({host}:{port}; {setting}, "
                               f"DEEPSERVE_{setting.upper()}): another process holds it, or the host is not an "
                               "address of this machine. Stop that process or choose another port.") from None
        return probe.getsockname()[1]


class WorkerProcess:
    """One worker: its process, its control channel, what it last reported."""

    def __init__(self, index: int, spec: dict[str, Any], workdir: str):
        self.index = index
        self.spec = {**spec, "index": index, "control": os.path.join(workdir, f"worker-{index}.sock")}
        if spec.get("behind_front"):  # the admission front forwards calls to these sockets
            self.spec["unix_socket"] = os.path.join(workdir, f"grpc-{index}.sock")
            if spec.get("front_health"):  # the front's health port: up while the worker drains
                self.spec["health_socket"] = os.path.join(workdir, f"health-{index}.sock")
        self.process: subprocess.Popen | None = None
        self.control: Client | None = None
        self.pid = 0
        self.restarts = 0
        self.down_since: float | None = None
        self.reported_total = 0  # requests_total in its last report
        self.in_flight = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def start(self, timeout: float = WORKER_START_S) -> None:
        """Start the process and wait until it serves; raises with its reason if it cannot."""
        env = {**os.environ, ASSIGNED_GPUS_ENV: ",".join(str(g) for g in ray.get_gpu_ids())}
        self.process = subprocess.Popen([sys.executable, "-m", "deepserve.gateway.worker"], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.process.stdin.write(json.dumps(self.spec) + "\n")
        self.process.stdin.close()
        loop = asyncio.get_running_loop()
        try:
            line = await asyncio.wait_for(loop.run_in_executor(None, self.process.stdout.readline), timeout)
        except asyncio.TimeoutError:
            self.kill()
            raise RuntimeError(f"gateway worker {self.index} did not start within {timeout:g} s") from None
        answer = json.loads(line) if line.strip() else {
            "error": f"it exited with code {self.process.wait()} (the replica's log has its output)"}
        if "error" in answer:
            self.kill()
            raise RuntimeError(f"gateway worker {self.index} failed to start: {answer['error']}")
        self.pid, self.down_since, self.reported_total = answer["pid"], None, 0
        if self.control is None:
            self.control = Client(self.spec["control"], CONTROL, f"gateway worker {self.index}")

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
            self.process.wait()

    async def stop(self, grace: float) -> None:
        """SIGTERM (it drains for ``grace``), then SIGKILL if it is still there."""
        if not self.alive:
            return
        self.process.terminate()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.process.wait, grace + 2.0)
        except subprocess.TimeoutExpired:
            log.warning("gateway worker %d did not stop within %g s: killing it", self.index, grace + 2.0)
            self.kill()


def combine(reports: list[dict[str, Any]], shared: bool) -> dict[str, Any]:
    """One model's report from its workers' reports. ``shared``: the workers report the same
    model replicas (placed ``deployment``): their figures are taken once, not added up."""
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in reports for k in r):
        values = [r[key] for r in reports if key in r]
        if key == "ready":
            merged[key] = all(values)
        elif key == "requests_in_flight":
            merged[key] = sum(values)
        elif shared or key in ("pid", "threaded", "plan"):
            merged[key] = values[0]
        elif all(isinstance(v, dict) for v in values):
            merged[key] = combine(values, shared)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            merged[key] = max(values) if key in ("largest_batch", "load_seconds", "last_probe_s") else sum(values)
        else:
            merged[key] = values[0]
    return merged


# ---------------------------------------------------------------------------- the Serve deployment


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=4, health_check_period_s=5,
                  logging_config=QUIET)
class Gateway:
    """The gRPC port of a serving node, served by this replica's worker processes."""

    async def __init__(self, repository: str, plan: dict[str, dict[str, Any]], handles: dict[str, Any],
                       options: dict[str, Any]):
        tune_allocator()
        settings = Settings(**options)
        ServerSecurity.from_settings(settings)  # a missing certificate or tokens file fails here, named
        repo = ModelRepository(repository)
        for name, entry in plan.items():  # a remote repository is fetched once, into the cache workers read
            if entry["placement"] == "gateway":
                for version in entry["plan"]["versions"]:
                    model, _ = repo.load(name, version, pinned=pinned_digest(name, version, entry))
                    model.read_files()  # its sidecar files too (a remote repository: fetched, verified)
        self.settings = settings
        self.plan = plan
        self.backends = {name: RayBackend(name, handles[name]) for name, e in plan.items()
                         if e["placement"] == "deployment"}
        self.node = settings.node_name or ray.util.get_node_ip_address()
        self.drain_s = drain_seconds(settings)
        self.port = claim_port(settings.grpc_host, settings.grpc_port, "grpc_port")
        health_port = None if settings.health_port is None else \
            claim_port(settings.grpc_host, settings.health_port, "health_port")
        self.workdir = tempfile.mkdtemp(prefix="deepserve-gateway-")  # mode 0700: this user's only
        relay_path = os.path.join(self.workdir, "relay.sock")
        self.relay = server(relay_path, RELAY, {"call": self._call, "counts": self._counts, "figures": self._figures},
                            {"generate": self._generate})
        await self.relay.start()
        worker_options = {**options, "health_port": health_port}
        if settings.admission_front:  # the front holds the ports and TLS; the workers check tokens
            worker_options.update(health_port=None, tls_cert_file="", tls_key_file="", tls_client_ca_file="",
                                  max_connection_age_s=1e6)  # the front ages client connections
        spec = {
            "parent_pid": os.getpid(), "repository": repository, "plan": plan,
            "options": worker_options, "port": self.port, "node": self.node,
            "relay": relay_path, "drain_s": self.drain_s, "behind_front": settings.admission_front,
            "front_health": health_port is not None,
            "index_of_repository": {name: repo.versions(name) for name in repo.model_names()},
        }
        count = settings.gateway_processes or available_cores()
        self.workers = [WorkerProcess(i, spec, self.workdir) for i in range(count)]
        self.front: Front | None = None
        try:
            if settings.admission_front:
                config = FrontConfig.from_settings(
                    settings, self.port, self.workdir, [w.spec["unix_socket"] for w in self.workers], health_port,
                    [w.spec["health_socket"] for w in self.workers if "health_socket" in w.spec])
                self.front = Front(config, find_binary(settings.front_binary))
                self.front.check()
            await asyncio.gather(*(w.start() for w in self.workers))
            if self.front is not None:
                await self.front.start()
        except Exception:
            for w in self.workers:
                w.kill()
            if self.front is not None:
                self.front.kill()
            await self.relay.stop(0)
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self.requests_total = 0
        self.stopping = False
        self._last_report = (time.monotonic(), 0)
        self.supervisor = asyncio.get_running_loop().create_task(self._supervise())
        log.warning("gateway listening on port %d with %d worker process(es)%s: %s", self.port, count,
                    " behind the admission front (nginx)" if self.front else "", [w.pid for w in self.workers])

    # ------------------------------------------------------------------ the relay (workers' calls)

    def _backend(self, name: str) -> RayBackend:
        backend = self.backends.get(name)
        if backend is None:
            raise InvalidInput(f"model '{name}' is not placed in a deployment")
        return backend

    def _timeout(self, remaining: float | None) -> float:
        return self.settings.default_timeout_s if remaining is None else max(remaining - MARGIN_S, 0.0)

    async def _call(self, method: str, name: str, version: str, *args):
        *args, remaining = args
        if method not in ("infer", "info", "check"):
            raise InvalidInput(f"no relay method '{method}'")
        return await getattr(self._backend(name), method)(*args, self._timeout(remaining), version=version)

    async def _generate(self, name: str, version: str, request: GenerationRequest, remaining: float | None):
        async for event in self._backend(name).generate(request, self._timeout(remaining), version=version):
            yield event

    async def _counts(self, remaining: float | None) -> dict[str, int]:
        """Running replicas per model, from Serve: the gateways for models placed in them."""
        status = await asyncio.get_running_loop().run_in_executor(None, serve.status)  # a controller call
        deployments = status.applications[serve.get_replica_context().app_name].deployments

        def running(deployment: str) -> int:
            found = deployments.get(deployment)
            return found.replica_states.get("RUNNING", 0) if found else 0

        return {name: running("Gateway" if entry["placement"] == "gateway" else name)
                for name, entry in self.plan.items()}

    async def _figures(self, remaining: float | None) -> tuple[Statistics, dict[str, dict[str, Any]]]:
        """Every worker's request statistics and model reports, added up (``ModelStatistics``
        and ``ListModels`` answer for the whole gateway, whichever worker a client reached)."""
        workers = [w for w in self.workers if w.alive]
        answers = await asyncio.gather(*(w.control.call("figures", timeout=self.settings.probe_timeout_s)
                                         for w in workers), return_exceptions=True)
        parts = [a for a in answers if isinstance(a, tuple)]
        keys = dict.fromkeys(key for p in parts for key in p[1])  # (model, version)
        reports = {key: combine([p[1][key] for p in parts if key in p[1]],
                                shared=self.plan[key[0]]["placement"] == "deployment") for key in keys}
        return Statistics.combined([p[0] for p in parts]), reports

    # ------------------------------------------------------------------ supervision

    async def _supervise(self) -> None:
        """Each second: restart dead workers (each in a task of its own: a slow start holds up
        nobody), collect every worker's metrics and load."""
        restarting: dict[int, asyncio.Task] = {}
        while True:
            await asyncio.sleep(1.0)
            try:
                for worker in self.workers:
                    task = restarting.get(worker.index)
                    if not worker.alive and (task is None or task.done()):
                        restarting[worker.index] = asyncio.get_running_loop().create_task(self._restart(worker))
                await asyncio.gather(*(self._collect(w) for w in self.workers if w.alive and w.down_since is None))
                if self.front is not None:
                    await self._tend_front()
                metrics.get().refresh("gateway")
            except Exception:  # keep supervising whatever happens
                log.exception("gateway supervision failed")

    async def _restart(self, worker: WorkerProcess) -> None:
        if self.stopping:  # Serve is stopping this replica: a worker that exits is not replaced
            return
        if worker.down_since is None:
            worker.down_since = time.monotonic()
            log.error("gateway worker %d (pid %d) exited with code %s: restarting it", worker.index, worker.pid,
                      worker.process.returncode if worker.process else None)
        metrics.get().forget(worker.index)
        worker.in_flight = 0
        try:
            await worker.start()
            worker.restarts += 1
        except Exception as exc:  # noqa: BLE001 - tried again next second; the health check says so meanwhile
            log.error("gateway worker %d did not restart: %s", worker.index, exc)

    async def _tend_front(self) -> None:
        """Count the front's refusals; restart it if it died (its port is then closed: clients
        reconnect once it is back)."""
        for method, count in self.front.refusals().items():
            metrics.get().front_refused(method, count)
        if self.front.alive or self.stopping:
            return
        if self.front.down_since is None:
            self.front.down_since = time.monotonic()
            log.error("admission front exited with code %s: restarting it", self.front.process.returncode)
        try:
            await self.front.start()
            self.front.restarts += 1
        except Exception as exc:  # noqa: BLE001 - tried again next second; the health check says so meanwhile
            log.error("admission front did not restart: %s", exc)

    async def _collect(self, worker: WorkerProcess) -> None:
        try:
            report = await worker.control.call("report", timeout=self.settings.probe_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a busy or stopping worker: next second
            log.info("gateway worker %d: no report (%s)", worker.index, exc)
            return
        metrics.get().absorb(worker.index, report["metrics"])
        total = report["requests_total"]
        self.requests_total += total - worker.reported_total if total >= worker.reported_total else total
        worker.reported_total, worker.in_flight = total, report["in_flight"]

    async def check_health(self) -> None:
        if self.supervisor.done():
            raise RuntimeError("the gateway's supervisor stopped")
        down = [w.index for w in self.workers if w.down_since is not None
                and time.monotonic() - w.down_since > WORKER_DOWN_S]
        if down:
            raise RuntimeError(f"gateway worker(s) {down} down for more than {WORKER_DOWN_S:g} s")
        if self.front is not None and self.front.down_since is not None \
                and time.monotonic() - self.front.down_since > WORKER_DOWN_S:
            raise RuntimeError(f"the admission front is down for more than {WORKER_DOWN_S:g} s")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """This replica's load for :class:`~deepserve.autoscaling.GatewayLoadPolicy`: its
        requests never pass Serve's router, so Serve cannot count them itself."""
        now, total = time.monotonic(), self.requests_total
        since, before = self._last_report
        self._last_report = (now, total)
        rate = (total - before) / (now - since) if now > since else 0.0
        return {"requests_per_s": rate, "in_flight": float(sum(w.in_flight for w in self.workers))}

    async def status(self) -> dict[str, Any]:
        """Readiness, each model's replica report (batch statistics, deadlines dropped and health
        probes included; added up over the workers for models computed in them), and the
        workers. ``requests_in_flight`` counts this gateway's calls to the model."""
        workers = [w for w in self.workers if w.alive]
        answers = await asyncio.gather(*(w.control.call("status", timeout=self.settings.probe_timeout_s)
                                         for w in workers), return_exceptions=True)
        reports = [a for a in answers if isinstance(a, dict)]
        models = {name: combine([r["models"][name] for r in reports if name in r["models"]],
                                shared=entry["placement"] == "deployment")
                  for name, entry in self.plan.items()}
        ready = len(reports) == len(self.workers) and all(r["ready"] for r in reports)
        return {"port": self.port, "node": self.node, "pid": os.getpid(), "ready": ready, "models": models,
                # The WorkerId label of this gateway's series on the node's metrics endpoint
                # (several gateways, or applications, export the same model's series).
                "worker_id": ray.get_runtime_context().get_worker_id(),
                "workers": [{"index": w.index, "pid": w.pid, "alive": w.alive, "restarts": w.restarts}
                            for w in self.workers],
                "front": None if self.front is None else {
                    "pid": self.front.process.pid if self.front.process else 0, "alive": self.front.alive,
                    "restarts": self.front.restarts, "in_flight_bound": self.front.config.in_flight},
                "worker_reports": reports}

    async def __del__(self):
        """Serve stops this replica (scale-down, a redeploy, shutdown): drain it.

        Each worker stops taking calls (new ones get UNAVAILABLE, and grpc.health.v1 says
        NOT_SERVING, on ``health_port`` too while the main port drains) and the calls in
        flight finish, for up to ``drain_grace_s``; what is left then is cancelled. Serve
        allows the replica that long (``graceful_shutdown_timeout_s``, see
        :func:`deepserve.app.build_app`). The relay stays up meanwhile: a draining call to a
        ``deployment`` model still crosses it.
        """
        workers = getattr(self, "workers", None)
        if not workers or not hasattr(self, "supervisor"):  # the constructor failed: nothing to drain
            return
        started = time.monotonic()
        self.stopping = True
        self.supervisor.cancel()
        log.warning("gateway stopping: draining %d inference call(s) for up to %g s",
                    sum(w.in_flight for w in workers), self.drain_s)
        await asyncio.gather(*(w.stop(self.drain_s) for w in workers))
        if self.front is not None:  # it carried the drained calls' answers: now the port closes
            self.front.stop()
        await self.relay.stop(0)
        shutil.rmtree(self.workdir, ignore_errors=True)
        log.warning("gateway drained in %.1f s", time.monotonic() - started)
