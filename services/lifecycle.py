"""Model lifecycle: which versions of a model are served, and which one answers a request.

Three things decide it (docs/lifecycle.md):

- the **version policy** of the Serve config (``models.<name>.versions``), as Triton's
  ``version_policy``: the latest N versions in the repository, a specific list, or all;
- the **route**: the *default* version that unversioned requests get (the newest served one
  unless set), an optional *canary* that takes a share of them, sticky by request key, and an
  optional *shadow* that gets a copy of a share of them off the response path. The Serve
  config gives the starting route; ``deepserve rollout`` and ``deepserve rollback`` write the
  model's ``routing.json`` in the repository, which then wins;
- the repository itself, which every serving process polls (``repository_poll_s``): a new
  version that the policy selects is loaded, warmed up and only then routed to.

A version named by the route is served whatever the policy says (a rollback to a version the
policy has dropped loads it again). Nothing here imports Ray: gateway workers use it.
"""

from __future__ import annotations

import contextvars
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deepserve.client import REQUEST_KEY_HEADER

ROUTING_FILE = "routing.json"  # <repository>/<model>/routing.json, written by `deepserve rollout`
HISTORY = 20  # earlier routes kept in routing.json, for `deepserve rollback`

# Per call (each gRPC call is a task with a context of its own): how to read the call's
# metadata, set by the transport and read only when a canary needs the key; and the version
# that answered, for the call's metrics and statistics.
call_metadata: contextvars.ContextVar[Callable[[], Any] | None] = contextvars.ContextVar(
    "deepserve_call_metadata", default=None)
answered_by: contextvars.ContextVar[str | None] = contextvars.ContextVar("deepserve_answered_by", default=None)


def key() -> str | None:
    """The call's request key (metadata ``x-request-key``), None without one."""
    metadata = call_metadata.get()
    for name, value in (metadata() or ()) if metadata is not None else ():
        if name == REQUEST_KEY_HEADER:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


class LifecycleError(ValueError):
    """A policy or route that cannot be served (a version that is not in the repository, ...)."""


class VersionPolicy(BaseModel):
    """Which versions of the repository are served: exactly one of ``latest``, ``specific``, ``all``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latest: int | None = Field(default=None, ge=1)
    """The newest N versions."""

    specific: list[int] | None = Field(default=None, min_length=1)
    """These versions (each must exist)."""

    all: bool | None = None
    """Every version (``all: true``)."""

    @model_validator(mode="after")
    def _one(self) -> "VersionPolicy":
        chosen = [k for k in ("latest", "specific", "all") if getattr(self, k) not in (None, False)]
        if len(chosen) > 1:
            raise ValueError(f"choose one of latest, specific, all; got {chosen}")
        if self.specific is not None and any(v < 1 for v in self.specific):
            raise ValueError(f"versions are integers >= 1, got {self.specific}")
        return self

    def select(self, available: list[str]) -> list[str]:
        """The policy's versions among ``available`` (oldest first).

        Raises:
            LifecycleError: a ``specific`` version is missing.
        """
        if self.all:
            return list(available)
        if self.specific is not None:
            missing = [v for v in self.specific if str(v) not in available]
            if missing:
                raise LifecycleError(f"versions {missing} are not in the repository (versions: {available})")
            return sorted({str(v) for v in self.specific}, key=int)
        return list(available[-(self.latest or 1):])


class Canary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1)
    weight: float = Field(gt=0, lt=1)
    """The share of unversioned requests (by request key) that it answers."""


class Shadow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1)
    fraction: float = Field(default=1.0, gt=0, le=1)
    """The share of the default version's requests mirrored to it."""


class Route(BaseModel):
    """Where unversioned requests go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: int | None = Field(default=None, ge=1)
    """The version that answers; None: the newest served version."""

    canary: Canary | None = None
    shadow: Shadow | None = None

    @model_validator(mode="after")
    def _distinct(self) -> "Route":
        if self.canary and self.default == self.canary.version:
            raise ValueError(f"the canary is the default version ({self.default})")
        if self.shadow and self.default == self.shadow.version:
            raise ValueError(f"the shadow is the default version ({self.default})")
        return self

    def named(self) -> list[str]:
        return [str(v) for v in (self.default, self.canary and self.canary.version,
                                 self.shadow and self.shadow.version) if v]


@dataclass(frozen=True)
class Plan:
    """What one model serves now: its versions (oldest first) and how requests are routed."""

    versions: tuple[str, ...]
    default: str
    canary: str | None = None
    weight: float = 0.0
    shadow: str | None = None
    fraction: float = 0.0

    def role(self, version: str) -> str:
        """``default``, ``canary``, ``shadow`` or ``standby`` (served, but only when named)."""
        return ("default" if version == self.default else "canary" if version == self.canary
                else "shadow" if version == self.shadow else "standby")

    def route(self) -> Route:
        """The route this plan serves, its default spelled out."""
        return Route(default=int(self.default),
                     canary=Canary(version=int(self.canary), weight=self.weight) if self.canary else None,
                     shadow=Shadow(version=int(self.shadow), fraction=self.fraction) if self.shadow else None)

    def to_dict(self) -> dict[str, Any]:
        return {"versions": list(self.versions), "default": self.default, "canary": self.canary,
                "weight": self.weight, "shadow": self.shadow, "fraction": self.fraction}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        return cls(**{**data, "versions": tuple(data["versions"])})


def plan(available: list[str], policy: VersionPolicy, route: Route) -> Plan:
    """The versions to serve and the routing, from the repository's versions.

    Raises:
        LifecycleError: no version, or the policy or route names one that is not there.
    """
    if not available:
        raise LifecycleError("no version in the repository")
    missing = [v for v in route.named() if v not in available]
    if missing:
        raise LifecycleError(f"the route names version(s) {missing}, which are not in the repository "
                             f"(versions: {available})")
    chosen = policy.select(available)
    default = str(route.default) if route.default else chosen[-1]
    served = sorted(set(chosen) | set(route.named()) | {default}, key=int)
    return Plan(tuple(served), default,
                canary=str(route.canary.version) if route.canary else None,
                weight=route.canary.weight if route.canary else 0.0,
                shadow=str(route.shadow.version) if route.shadow else None,
                fraction=route.shadow.fraction if route.shadow else 0.0)


def bucket(key: str) -> float:
    """A request key's place in [0, 1): the same key, the same place, in every process."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0 ** 64


def pick(current: Plan, key: str | None) -> tuple[str, str]:
    """The version that answers an unversioned request, and why (``default`` or ``canary``).

    With a key, the split is sticky: a key below the canary's weight goes to the canary,
    always. Without one, each request is drawn at random.
    """
    if current.canary is None:
        return current.default, "default"
    place = bucket(key) if key else random.random()
    return (current.canary, "canary") if place < current.weight else (current.default, "default")


def mirrored(current: Plan) -> str | None:
    """The shadow version when this request should be mirrored to it, else None."""
    if current.shadow is None or random.random() >= current.fraction:
        return None
    return current.shadow


def routing_update(previous: dict[str, Any] | None, serving: Plan, route: Route) -> dict[str, Any]:
    """The new content of a model's ``routing.json``: the route, and the earlier ones (newest
    first, starting with the one ``serving`` now) for :func:`rollback_route`."""
    history = [serving.route().model_dump(exclude_none=True), *(previous or {}).get("history", [])]
    return {"route": route.model_dump(exclude_none=True), "history": history[:HISTORY]}


def rollback_route(routing: dict[str, Any] | None, current: Plan, available: list[str]) -> Route:
    """The route a rollback sets: with a canary or shadow running, the default alone (the
    trial ends); otherwise the last earlier default in ``routing.json``'s history that differs
    from the one serving now, or, without one (the current default came by itself: a new
    build under a ``latest`` policy), the newest version before it.

    Raises:
        LifecycleError: nothing to roll back to.
    """
    if current.canary or current.shadow:
        return Route(default=int(current.default))
    for earlier in (routing or {}).get("history", []):
        default = earlier.get("default")
        if default is not None and str(default) != current.default and str(default) in available:
            return Route(default=default)
    older = [v for v in available if int(v) < int(current.default)]
    if older:
        return Route(default=int(older[-1]))
    raise LifecycleError(f"no version before {current.default} to roll back to")


def route_of(routing: dict[str, Any] | None, configured: Route) -> Route:
    """The route in force: the repository's ``routing.json`` when there is one, else the config's.

    Raises:
        LifecycleError: ``routing.json`` is not a valid route.
    """
    if not routing or "route" not in routing:
        return configured
    try:
        return Route.model_validate(routing["route"])
    except ValueError as exc:
        raise LifecycleError(f"{ROUTING_FILE}: {exc}") from None
