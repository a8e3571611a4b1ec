"""``deepserve rollout``, ``deepserve rollback`` and ``deepserve models --live``: the lifecycle
commands (docs/lifecycle.md).

A rollout or a rollback writes the model's ``routing.json`` in the repository, atomically;
every serving process picks it up at its next repository poll (``repository_poll_s``), loads
and warms up a version it does not serve yet, and only then routes to it. With ``--wait``
the command then asks the server until the new route is live.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deepserve.config import describe as describe_error
from deepserve.errors import DeepServeError
from deepserve.lifecycle import (
    Canary,
    LifecycleError,
    Plan,
    Route,
    Shadow,
    VersionPolicy,
    plan,
    rollback_route,
    routing_update,
)
from deepserve.loading import current_plan
from deepserve.repository import ModelRepository


def configured_entry(config: Path, name: str) -> dict[str, Any]:
    """The model's version policy and route in a Serve config, validated as a deployment would."""
    import yaml

    from deepserve.config import model_options

    app = yaml.safe_load(config.read_text())["applications"][0]
    models = (app.get("args") or {}).get("models") or {}
    options = model_options({name: models.get(name) or {}})[name]
    return {"versions": options.versions.model_dump(), "route": options.route.model_dump()}


def _plans(args: argparse.Namespace) -> tuple[ModelRepository, dict[str, Any] | None, Plan, dict[str, Any]]:
    from deepserve.cli import default_config

    repo = ModelRepository(args.repo)
    entry = configured_entry(args.config or default_config(), args.model)
    return repo, repo.routing(args.model), current_plan(repo, args.model, entry), entry


def rollout(args: argparse.Namespace) -> int:
    try:
        repo, routing, serving, entry = _plans(args)
        version = int(args.version)
        if (args.canary is not None or args.shadow is not None) and args.version == serving.default:
            raise LifecycleError(f"version {version} is the default already; a canary or shadow is another version")
        if args.canary is not None:
            route = Route(default=int(serving.default), canary=Canary(version=version, weight=args.canary))
        elif args.shadow is not None:
            route = Route(default=int(serving.default), shadow=Shadow(version=version, fraction=args.shadow))
        else:
            route = Route(default=version)
        return _apply(args, repo, routing, serving, entry, route)
    except (DeepServeError, ValueError) as exc:
        print(f"deepserve rollout: {_message(exc)}", file=sys.stderr)
        return 2


def rollback(args: argparse.Namespace) -> int:
    try:
        repo, routing, serving, entry = _plans(args)
        route = rollback_route(routing, serving, repo.versions(args.model))
        return _apply(args, repo, routing, serving, entry, route)
    except (DeepServeError, ValueError) as exc:
        print(f"deepserve rollback: {_message(exc)}", file=sys.stderr)
        return 2


def _message(exc: Exception) -> str:
    """One line: pydantic's errors without their links (a weight of 1.5, say)."""
    if isinstance(exc, ValidationError):  # Canary(weight=...) from --canary, Shadow(fraction=...) from --shadow
        options = {"weight": "--canary", "fraction": "--shadow"}
        return "; ".join(describe_error({**e, "loc": ()}, options.get(str(e["loc"][0]), "route")) +
                         f" (got {e['input']!r})" for e in exc.errors())
    return str(exc)


def _apply(args: argparse.Namespace, repo: ModelRepository, routing: dict[str, Any] | None, serving: Plan,
           entry: dict[str, Any], route: Route) -> int:
    # Refuses a version that is not in the repository, before anything is written.
    target = plan(repo.versions(args.model), VersionPolicy.model_validate(entry["versions"]), route)
    repo.write_routing(args.model, routing_update(routing, serving, route))
    print(f"{args.model}: {describe(target)} (written to {repo.location}/{args.model}/routing.json)")
    if not args.wait:
        return 0
    return wait_live(args, target)


def describe(target: Plan) -> str:
    parts = [f"default v{target.default}"]
    if target.canary:
        parts.append(f"canary v{target.canary} at {target.weight:.0%}")
    if target.shadow:
        parts.append(f"shadow v{target.shadow} at {target.fraction:.0%}")
    return ", ".join(parts) + f"; serving v{', v'.join(target.versions)}"


def live_roles(args: argparse.Namespace) -> dict[str, tuple[str, bool]]:
    """The server's view of the model: version -> (role, ready)."""
    from deepserve.cli import _client

    with _client(args) as client:
        return {m.version: (m.role, m.ready) for m in client.list_models().models if m.name == args.model}


def wait_live(args: argparse.Namespace, target: Plan) -> int:
    """Ask the server until it serves ``target`` (every version ready, each in its role)."""
    want = {v: target.role(v) for v in target.versions}
    deadline = time.monotonic() + args.timeout
    seen: dict[str, tuple[str, bool]] = {}
    while time.monotonic() < deadline:
        seen = live_roles(args)
        if {v: role for v, (role, _) in seen.items()} == want and all(ready for _, ready in seen.values()):
            print(f"{args.model}: live on {args.target or 'the server'}")
            return 0
        time.sleep(0.5)
    print(f"deepserve {args.command}: not live after {args.timeout:g} s; the server shows "
          f"{ {v: r for v, (r, _) in seen.items()} }", file=sys.stderr)
    return 1


def live(args: argparse.Namespace) -> int:
    """``deepserve models --live``: what the server serves, per version."""
    from deepserve.cli import _client

    with _client(args) as client:
        models = client.list_models().models
    for m in models:
        share = f"{m.share:.0%}" if m.role in ("default", "canary", "shadow") else ""
        print(f"{m.name:26s} v{m.version:4s} {m.kind:11s} {m.role:8s} {share:>5s} "
              f"{'ready' if m.ready else 'NOT READY':9s} {m.execution_provider}")
    return 0


def add_commands(sub, connection_options) -> None:
    """The ``rollout`` and ``rollback`` subcommands."""
    from deepserve.repository import default_location

    for name in ("rollout", "rollback"):
        c = sub.add_parser(name, help="make a version the default, or start a canary or shadow (docs/lifecycle.md)"
                           if name == "rollout" else "go back to the default before the last rollout, "
                           "or end a canary or shadow")
        c.add_argument("model", help="model name, e.g. fraud-autoencoder")
        if name == "rollout":
            c.add_argument("version", help="the version to roll out (it must be in the repository)")
            trial = c.add_mutually_exclusive_group()
            trial.add_argument("--canary", type=float, metavar="WEIGHT",
                               help="answer this share (0..1) of unversioned requests, sticky by x-request-key")
            trial.add_argument("--shadow", type=float, metavar="FRACTION",
                               help="mirror this share (0..1] of the default's requests to it, answers compared")
        c.add_argument("--repo", default=default_location(), help="model repository (directory or URI)")
        c.add_argument("--config", type=Path, help="the Serve config the server runs (default: the shipped one): "
                       "its version policy and route for the model")
        c.add_argument("--wait", action="store_true", help="wait until the server serves the new route")
        c.add_argument("--timeout", type=float, default=120.0, help="seconds --wait waits")
        c.add_argument("--target", help="server address for --wait (default 127.0.0.1:$DEEPSERVE_GRPC_PORT)")
        connection_options(c)
        c.set_defaults(func=rollout if name == "rollout" else rollback)
