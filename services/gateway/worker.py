"""A gateway worker process: the gRPC server on the shared port, over its own dataplane.

Started by its gateway replica (:mod:`deepserve.gateway.replica`) as
``python -m deepserve.gateway.worker``, with its spec as one JSON line on stdin. It answers
on stdout with one JSON line: ``{"ready": true, ...}`` once it serves, or ``{"error": ...}``
before it exits. After that it logs to stderr (Ray's log of the replica) and:

- serves both APIs on ``grpc_port`` (SO_REUSEPORT: the kernel spreads connections over the
  replica's workers; the replica has checked that no one else holds the port), or, behind the
  admission front (:mod:`deepserve.gateway.front`), on a unix socket of its own that the front
  forwards calls to;
- computes the models placed ``gateway`` in sessions of its own, and reaches the others
  through the replica (:class:`~deepserve.gateway.channel.RelayBackend`);
- probes every model each ``readiness_poll_s`` and publishes health;
- answers its replica's ``Control`` calls: its status, its metrics snapshot;
- dies with its replica (``PR_SET_PDEATHSIG``, and a check of its parent each poll), and
  drains on SIGTERM: it stops taking calls and lets the ones in flight finish for
  ``drain_grace_s``.

It never imports Ray (a status field says so, and a test checks it).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from deepserve import metrics


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent (the replica) dies, however it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


_answers = sys.stdout  # the replica reads one line here (see main: nothing else writes to it)


def _answer(message: dict[str, Any]) -> None:
    _answers.write(json.dumps(message) + "\n")
    _answers.flush()


async def serve(spec: dict[str, Any]) -> None:
    from deepserve.admission import Admission
    from deepserve.batching import BatchingConfig
    from deepserve.dataplane import DataPlane, ServedModel
    from deepserve.gateway.channel import CONTROL, RELAY, Client, RelayBackend, server
    from deepserve.grpc_server import GrpcServer
    from deepserve.loading import Follower, backend_for, load_runtime, plan_now
    from deepserve.repository import ModelRepository
    from deepserve.runtime import runtime_for
    from deepserve.security import ServerSecurity
    from deepserve.settings import Settings

    settings = Settings(**spec["options"])
    index, parent = spec["index"], spec["parent_pid"]
    security = ServerSecurity.from_settings(settings)
    relay = Client(spec["relay"], RELAY, "the gateway replica")
    repository = spec["repository"]
    repo = ModelRepository(repository)

    def served_version(name: str, version: str) -> ServedModel:
        """One model version, ready to compute: loaded and warmed up here (placed
        ``gateway``), or reached through the replica (placed ``deployment``)."""
        entry = spec["plan"][name]
        if entry["placement"] == "gateway":
            runtime = load_runtime(repository, name, version, entry, settings.max_rows_per_request, "gateway",
                                   settings.max_image_side)
            backend = backend_for(runtime, entry["batching"])
        else:
            runtime = runtime_for(repo.get(name, version).manifest, settings.max_rows_per_request,
                                  settings.max_image_side)
            backend = RelayBackend(name, version, relay)
        return ServedModel(runtime=runtime, backend=backend, placement=entry["placement"],
                           batching=BatchingConfig.from_dict(entry["batching"]), ready=entry["placement"] == "gateway")

    # A worker started later (a restart) serves what the repository says now.
    plans = {name: plan_now(repo, name, entry) for name, entry in spec["plan"].items()}
    served = [served_version(name, version) for name, plan in plans.items() for version in plan.versions]

    async def replica_counts() -> dict[str, int]:
        return await relay.call("counts", timeout=settings.probe_timeout_s)

    async def gateway_report():
        return await relay.call("figures", timeout=settings.probe_timeout_s)

    dataplane = DataPlane(served, settings.default_timeout_s, spec["index_of_repository"], replica_counts,
                          Admission(settings.max_rows_in_flight, settings.max_loop_lag_s), gateway_report,
                          plans=plans, shadow_in_flight=settings.shadow_in_flight)
    dataplane.admission.start()
    await dataplane.refresh(min(settings.probe_timeout_s, 2.0))  # replicas still starting: the poll picks them up
    lifecycle = Follower(dataplane, repo, spec["plan"], served_version, settings.probe_timeout_s)
    grpc_server = GrpcServer(dataplane, settings.grpc_host, spec["port"], settings.max_message_bytes, spec["node"],
                             settings.max_connection_age_s, settings.connection_age_grace_s, security=security,
                             reflection=settings.reflection, health_port=settings.health_port,
                             max_concurrent_rpcs=settings.max_concurrent_rpcs, reuse_port=True,
                             unix_socket=spec.get("unix_socket"), health_unix_socket=spec.get("health_socket"))
    component = f"gateway-worker-{index}"

    async def model_reports() -> dict[tuple[str, str], dict[str, Any]]:
        """Each model version's replica report: live for the sessions here, from the last
        probe for the others."""
        return {(m.runtime.name, m.runtime.version): await m.backend.info(0.0) if m.placement == "gateway"
                else m.replica_info for m in dataplane.served()}

    async def figures(remaining):
        return dataplane.statistics, await model_reports()

    async def status(remaining) -> dict[str, Any]:
        reports = await model_reports()
        models = {name: {"ready": m.ready, "version": m.runtime.version, "kind": m.runtime.kind,
                         "requests_in_flight": m.in_flight, **reports[(name, m.runtime.version)],
                         "plan": dataplane.plans[name].to_dict(),
                         "versions": {v: {"ready": vm.ready, "requests_in_flight": vm.in_flight}
                                      for v, vm in dataplane.versions[name].items()}}
                  for name, m in dataplane.models.items()}
        return {"pid": os.getpid(), "ready": dataplane.ready(), "models": models,
                "requests_total": dataplane.requests_total, "refused": dataplane.admission.refused,
                "ray_imported": "ray" in sys.modules}

    async def report(remaining) -> dict[str, Any]:
        return {"metrics": metrics.get().snapshot(component), "requests_total": dataplane.requests_total,
                "in_flight": dataplane.in_flight}

    control = server(spec["control"], CONTROL, {"status": status, "report": report, "figures": figures})
    await control.start()
    await grpc_server.start()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)

    async def follow_repository() -> None:
        while True:
            await asyncio.sleep(settings.repository_poll_s)
            await lifecycle.follow()

    async def poll() -> None:
        while True:
            await asyncio.sleep(settings.readiness_poll_s)
            if os.getppid() != parent:  # the replica is gone: so is this process's reason to be
                logging.getLogger("deepserve").error("gateway worker %d: the replica died; exiting", index)
                os._exit(1)
            try:
                await dataplane.refresh(settings.probe_timeout_s)
                await grpc_server.publish_health()
                dataplane.publish_gauges()
            except Exception:  # keep polling whatever happens
                logging.getLogger("deepserve").exception("readiness poll failed")

    poller = loop.create_task(poll())
    follower = loop.create_task(follow_repository()) if settings.repository_poll_s > 0 else None
    _answer({"ready": True, "pid": os.getpid(), "port": grpc_server.port})
    await stopping.wait()
    started = time.monotonic()
    logging.getLogger("deepserve").warning("gateway worker %d stopping: draining %d inference call(s) for up to %g s",
                                           index, dataplane.in_flight, spec["drain_s"])
    await grpc_server.stop(spec["drain_s"])
    poller.cancel()
    if follower is not None:
        follower.cancel()
    await control.stop(0)
    await relay.close()
    logging.getLogger("deepserve").warning("gateway worker %d drained in %.1f s", index, time.monotonic() - started)


def main() -> None:
    global _answers
    spec = json.loads(sys.stdin.readline())
    # The answer gets a descriptor of its own; whatever else writes to stdout (a library's
    # print, a C extension) goes to stderr, so that it cannot be read as the answer.
    _answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _die_with(spec["parent_pid"])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s gateway-worker-{spec['index']} %(levelname)s %(name)s: %(message)s")
    metrics.for_gateway_worker()  # before anything records: collected by the replica, Ray never imported
    from deepserve.memory import tune_allocator

    tune_allocator()  # before the gRPC threads allocate
    try:
        import uvloop  # the loop Serve runs replicas on: grpc.aio is ~1.5x faster on it here
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(spec))
    except Exception as exc:  # noqa: BLE001 - the replica reports it, with the reason
        logging.getLogger("deepserve").exception("gateway worker %d failed", spec["index"])
        _answer({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)


if __name__ == "__main__":
    main()
