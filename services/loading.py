"""From a plan entry to a backend that computes: shared by every process that holds a session
(a gateway worker, a model replica). Ray-free: gateway workers import it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from deepserve import metrics
from deepserve.batching import BatchingBackend, BatchingConfig
from deepserve.errors import ModelIntegrityError
from deepserve.generation import StepBatcher
from deepserve.lifecycle import Plan, Route, VersionPolicy, plan, route_of
from deepserve.repository import ModelRepository
from deepserve.runtime import GenerativeRuntime, runtime_for

log = logging.getLogger("deepserve")


def backend_for(runtime, batching: dict[str, Any]):
    """Generators batch step by step (:class:`StepBatcher`); the others request by request."""
    config = BatchingConfig.from_dict(batching)
    if isinstance(runtime, GenerativeRuntime):
        return StepBatcher(runtime, config)
    return BatchingBackend(runtime, config)


def pinned_digest(name: str, version: str, entry: dict[str, Any]) -> str | None:
    """The sha256 the Serve config pins for this version (``entry["pins"]``), None when it pins
    none.

    Raises:
        ModelIntegrityError: the config pins digests, but not this version's.
    """
    pins = entry.get("pins") or {}
    if pins and version not in pins:
        raise ModelIntegrityError(f"model '{name}' version {version} is not pinned in the Serve config "
                                  f"(pinned: {sorted(pins, key=int)}); refusing it")
    return pins.get(version)


def load_runtime(repository: str, name: str, version: str, entry: dict[str, Any], max_rows: int, placement: str,
                 max_image_side: int = 0):
    """The model version's runtime with its session created from verified bytes and warmed up:
    ready means ready."""
    model, data = ModelRepository(repository).load(name, version, pinned=pinned_digest(name, version, entry))
    runtime = runtime_for(model.manifest, max_rows, max_image_side)
    runtime.files = model.read_files()  # sidecar files beside the ONNX file, verified like it
    runtime.load(data, entry["intra_op_threads"])
    metrics.get().loaded(name, version, runtime.kind, placement, runtime.provider, runtime.load_seconds)
    return runtime


def current_plan(repository: ModelRepository, name: str, entry: dict[str, Any]) -> Plan:
    """What the model should serve now: its policy and route (``routing.json`` first) applied
    to the repository's versions.

    Raises:
        LifecycleError, ModelNotFound, RepositoryUnavailable: keep serving what is served.
    """
    configured = Route.model_validate(entry["route"])
    return plan(repository.versions(name), VersionPolicy.model_validate(entry["versions"]),
                route_of(repository.routing(name), configured))


def plan_now(repository: ModelRepository, name: str, entry: dict[str, Any]) -> Plan:
    """The plan to start serving with: the repository's current one, or the deploy-time plan
    in ``entry`` when that cannot be read now (a replica or worker that restarts later)."""
    try:
        return current_plan(repository, name, entry)
    except Exception as exc:  # noqa: BLE001 - the deploy-time plan was verified; the poll retries
        log.warning("model %s: starting with the deploy-time versions (%s)", name, exc)
        return Plan.from_dict(entry["plan"])


class Follower:
    """Keeps a dataplane's models in line with their plans (docs/lifecycle.md), one poll at a
    time: a version the plan adds is loaded and warmed up (placed ``gateway``) or probed
    through its replica (placed ``deployment``) *before* the routing switches to the new plan;
    a version it drops leaves the routing at once and is closed when its last request ends.
    A plan that cannot be served (a version that fails to load or to verify) leaves the
    current one in force, and is logged once.
    """

    def __init__(self, dataplane, repository: ModelRepository, entries: dict[str, dict[str, Any]],
                 make: Callable[[str, str], Any], probe_timeout_s: float):
        self.dataplane, self.repository, self.entries = dataplane, repository, entries
        self.make = make  # (name, version) -> a ServedModel; blocking: runs in a thread
        self.probe_timeout_s = probe_timeout_s
        self.problems: dict[str, str] = {}  # model -> the last problem logged

    async def follow(self) -> None:
        for name, entry in self.entries.items():
            try:
                await self._follow(name, entry)
                self.problems.pop(name, None)
            except Exception as exc:  # noqa: BLE001 - the current plan stays in force
                problem = f"{type(exc).__name__}: {exc}"
                if self.problems.get(name) != problem:
                    log.error("model %s: keeping versions %s: %s", name,
                              list(self.dataplane.plans[name].versions), problem)
                    self.problems[name] = problem

    async def _follow(self, name: str, entry: dict[str, Any]) -> None:
        plan = await asyncio.to_thread(current_plan, self.repository, name, entry)
        self.dataplane.repository[name] = await asyncio.to_thread(self.repository.versions, name)
        current = self.dataplane.plans[name]
        if plan == current:
            return
        added = []
        for version in plan.versions:
            if version not in self.dataplane.versions[name]:
                model = await asyncio.to_thread(self.make, name, version)
                if not model.ready:  # computed by a replica: it answers a probe first
                    model.replica_info = await model.backend.check(self.probe_timeout_s)
                    model.ready = True
                added.append(model)
        for model in self.dataplane.update(name, plan, added):
            asyncio.get_running_loop().create_task(self._retire(model))
        log.warning("model %s: serving versions %s, default %s%s%s", name, list(plan.versions), plan.default,
                    f", canary {plan.canary} at {plan.weight:g}" if plan.canary else "",
                    f", shadow {plan.shadow} at {plan.fraction:g}" if plan.shadow else "")

    @staticmethod
    async def _retire(model) -> None:
        while model.in_flight:
            await asyncio.sleep(0.05)
        model.backend.close()
