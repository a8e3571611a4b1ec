"""The ``deepserve`` command line.

``deepserve build`` trains and exports models into a model repository (needs the
``train`` extra); ``deepserve models`` lists what a repository holds (``--live``: what a
server serves); ``deepserve serve`` serves it on Ray Serve; ``deepserve rollout`` and
``deepserve rollback`` change which version answers (:mod:`deepserve.rollout`);
``deepserve score``, ``classify``, ``generate`` and ``recommend`` call a server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from deepserve import rollout
from deepserve.errors import DeepServeError
from deepserve.repository import ModelRepository, default_location, default_root

# Model name -> the family that builds it. One family may build several models.
BUILDABLE = {
    "fraud-autoencoder": "fraud",
    "digit-classifier": "digits",
    "digit-classifier-robust": "digits",
    "digit-dcgan": "dcgan",  # the generators are judged by digit-classifier: built after it
    "digit-diffusion": "diffusion",
    "graph-recommender": "graph",
}


def _build(args: argparse.Namespace) -> int:
    names = args.only or list(BUILDABLE)
    unknown = [n for n in names if n not in BUILDABLE]
    if unknown:
        print(f"deepserve build: unknown model(s) {unknown}; choose from {list(BUILDABLE)}", file=sys.stderr)
        return 2
    if args.data is not None and names != ["fraud-autoencoder"]:
        print("deepserve build: --data trains the anomaly detector; use it with --only fraud-autoencoder",
              file=sys.stderr)
        return 2
    if (args.edges is not None or args.node_features is not None) and names != ["graph-recommender"]:
        print("deepserve build: --edges/--node-features train the graph recommender; use them with "
              "--only graph-recommender", file=sys.stderr)
        return 2
    if args.data is not None and not args.data.is_file():
        print(f"deepserve build: --data {args.data}: no such file", file=sys.stderr)
        return 2
    judged = [n for n in names if BUILDABLE[n] in ("dcgan", "diffusion")]
    if judged and "digit-classifier" not in names and not ModelRepository(args.repo).versions("digit-classifier"):
        print(f"deepserve build: {judged} are judged by digit-classifier, which is not in {args.repo}; "
              "build it first (--only digit-classifier)", file=sys.stderr)
        return 2
    repo = args.repo
    repo.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    written: list[Path] = []

    if "fraud-autoencoder" in names:
        from deepserve.models import fraud

        options = fraud.FraudBuildOptions(
            name=args.name or "fraud-autoencoder", data=args.data,
            label_column=args.label_column, fpr=args.fpr,
        )
        try:
            written.append(fraud.build(repo, args.seed, options))
        except ValueError as exc:  # a bad --data table
            print(f"deepserve build: {exc}", file=sys.stderr)
            return 2
    digit_names = [n for n in names if BUILDABLE[n] == "digits"]
    if digit_names:
        from deepserve.models import digits

        written += digits.build(repo, args.seed, digit_names)
    if "digit-dcgan" in names:
        from deepserve.models import dcgan

        written.append(dcgan.build(repo, args.seed))
    if "digit-diffusion" in names:
        from deepserve.models import diffusion

        written.append(diffusion.build(repo, args.seed))
    if "graph-recommender" in names:
        from deepserve.models import graph

        options = graph.GraphBuildOptions(edges=args.edges, features=args.node_features)
        try:
            written.append(graph.build(repo, args.seed, options))
        except ValueError as exc:  # a bad --edges or --node-features table
            print(f"deepserve build: {exc}", file=sys.stderr)
            return 2

    for directory in written:
        manifest = ModelRepository(repo).get(directory.parent.name, directory.name).manifest
        shown = {k: v for k, v in manifest.metrics.items() if isinstance(v, float)}
        figures = ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
        print(f"built {manifest.name} v{manifest.version} -> {directory}\n    {figures}")
    print(f"deepserve build: {len(written)} model(s) in {time.perf_counter() - started:.1f} s")
    return 0


def _models(args: argparse.Namespace) -> int:
    if args.live:
        return rollout.live(args)
    repo = ModelRepository(args.repo)
    try:
        names = repo.model_names()
    except DeepServeError as exc:  # a remote repository that cannot be read
        print(f"deepserve models: {exc}", file=sys.stderr)
        return 1
    if not names:
        print(f"no models in {repo.location} (run `deepserve build`)")
        return 1
    for name in names:
        for version in repo.versions(name):
            kind, state = "?", "ok"
            try:
                model = repo.get(name, version)  # a remote repository: fetches the manifest,
                kind = model.manifest.kind
                model.read_model_bytes()  # and the model file unless the cached copy matches,
                model.read_files()  # and its sidecar files likewise
            except DeepServeError as exc:
                state = f"REFUSED: {exc}"
            print(f"{name:26s} v{version:4s} {kind:11s} {state}")
        routing = _routing(repo, name)
        if routing:
            print(f"{'':26s} routing.json: {routing}")
    return 0


def _routing(repo: ModelRepository, name: str) -> str:
    """The route ``deepserve rollout`` set for the model, as one line ('' when none)."""
    try:
        routing = repo.routing(name)
    except (DeepServeError, ValueError) as exc:
        return f"unreadable ({exc})"
    return json.dumps(routing["route"]) if routing and "route" in routing else ""


def default_config() -> Path:
    """The Serve config that ships with the package (``deploy/serve_config.yaml`` in a
    checkout; inside the installed package otherwise)."""
    from importlib.resources import files

    return Path(str(files("deepserve.deploy").joinpath("serve_config.yaml")))


def _serve(args: argparse.Namespace) -> int:
    import ray
    import yaml
    from ray import serve

    from deepserve.app import build_app
    from deepserve.autoscaling import nodes_offering
    from deepserve.settings import Settings

    config = yaml.safe_load((args.config or default_config()).read_text())
    app_config = config["applications"][0]
    app_name = app_config.get("name", "deepserve")
    app_args = dict(app_config.get("args") or {})
    app_args["repository"] = args.repo if "://" in args.repo else str(Path(args.repo).resolve())
    if args.port is not None:
        app_args["grpc_port"] = args.port
    elif "DEEPSERVE_GRPC_PORT" in os.environ:
        app_args["grpc_port"] = int(os.environ["DEEPSERVE_GRPC_PORT"])
    # Security settings travel in the app's args, as paths: they reach the gateway replicas
    # wherever they run (an environment variable set here would reach only local ones).
    for option, setting in SERVE_SECURITY_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            app_args[setting] = str(value.resolve())
    if args.reflection:
        app_args["reflection"] = True
    if args.health_port is not None:
        app_args["health_port"] = args.health_port
    if args.admission_front:
        app_args["admission_front"] = True
    deployments = app_config.get("deployments") or []
    if args.models:  # a subset of the config's models, with their configured options
        configured = app_args.get("models") or {}
        app_args["models"] = {n: configured.get(n, {}) for n in args.models}
        deployments = [d for d in deployments if d["name"] in ("Gateway", *args.models)]
    port = int(app_args.get("grpc_port", 9000))
    metrics_port = args.metrics_port or Settings().metrics_port
    app = build_app(app_args, deployments)
    if not args.address:  # the gateway runs here: check its certificate and tokens files before starting Ray
        from deepserve.security import SecurityConfigError, ServerSecurity

        try:
            ServerSecurity.from_settings(Settings(**{k: v for k, v in app_args.items()
                                                     if k not in ("repository", "models")}))
        except SecurityConfigError as exc:
            print(f"deepserve serve: {exc}", file=sys.stderr)
            return 2
    # The resources a gateway asks for (deepserve_gateway in the shipped config): the nodes
    # that offer them are the ones that serve.
    gateway = next((d for d in deployments if d["name"] == "Gateway"), {})
    node_resources = (gateway.get("ray_actor_options") or {}).get("resources") or {}

    # Serve runs replica code on the replica's main event loop instead of a second thread:
    # the gateway's gRPC server then shares no GIL hand-offs with it (+10-25% req/s here;
    # docs/benchmarks.md). Workers of a local cluster inherit it; set it on cluster nodes too.
    os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
    if args.address:
        ray.init(address=args.address, namespace="deepserve")
        missing = [r for r in node_resources if nodes_offering(r) == 0]
        if missing:
            print(f"deepserve serve: no node of the cluster at {args.address} offers {missing}, which the gateway "
                  f"needs: start serving nodes with `ray start ... --resources "
                  f"'{json.dumps({r: 1 for r in missing})}'`", file=sys.stderr)
            return 2
    else:  # an embedded single-node cluster, sized for a laptop or a small VM
        # Ray's metrics agent serves every process's metrics, ours included, on this port.
        ray.init(address="local", namespace="deepserve", include_dashboard=False,  # a new cluster, always
                 resources={r: 1 for r in node_resources},  # a serving node: it runs a gateway
                 object_store_memory=args.object_store_mb * 1024 * 1024,
                 _metrics_export_port=metrics_port)
    serve.start(proxy_location="Disabled")
    started = time.perf_counter()
    serve.run(app, name=app_name, route_prefix=None)  # returns once every replica has started
    status = _wait_ready(serve.get_app_handle(app_name), timeout=120)
    where = "every serving node" if args.address else "this machine"
    front = " behind the admission front (nginx)" if status.get("front") else ""
    print(f"DeepServe ready in {time.perf_counter() - started:.1f} s on port {port} of {where}{front} "
          f"(Open Inference Protocol v2 + deepserve.v1, gRPC); metrics on "
          f"{'the cluster nodes' if args.address else f'http://127.0.0.1:{metrics_port}/metrics'}:")
    for name, m in sorted(status["models"].items()):
        print(f"  {name:26s} v{m['version']:3s} {m['kind']:11s} {m.get('provider', '')}")
    print("Try:  .venv/bin/deepserve classify --digit 3     (Ctrl-C stops the server)", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("shutting down")
    if args.address:
        serve.delete(app_name)
    else:
        serve.shutdown()
        ray.shutdown()
    return 0


def _wait_ready(handle, timeout: float) -> dict:
    """Ask a gateway (through the app's handle, wherever the gateways run) until every
    model is ready; its status report."""
    deadline = time.monotonic() + timeout
    while True:
        status = handle.status.remote().result(timeout_s=timeout)
        if status["ready"]:
            return status
        if time.monotonic() > deadline:
            waiting = sorted(n for n, m in status["models"].items() if not m["ready"])
            raise TimeoutError(f"DeepServe not ready after {timeout:.0f} s; waiting for {waiting}")
        time.sleep(0.2)


def _target(args: argparse.Namespace) -> str:
    return args.target or f"127.0.0.1:{os.environ.get('DEEPSERVE_GRPC_PORT', '9000')}"


def _client(args: argparse.Namespace, **options):
    """A DeepServeClient to the command's target, with its TLS and token options."""
    from deepserve.client import DeepServeClient

    try:
        return DeepServeClient(_target(args), tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                               tls_key=args.tls_key, token=args.token or None, **options)
    except (OSError, ValueError) as exc:  # a PEM file that cannot be read, a certificate without its key
        raise SystemExit(f"deepserve {args.command}: {exc}") from None


def _score(args: argparse.Namespace) -> int:
    import csv

    with open(args.csv, newline="") as f:
        reader = csv.DictReader(f)
        rows = [{k: float(v) for k, v in r.items() if k not in ("Class", "label", "")} for r in reader]
    with _client(args) as client:
        response = client.score(rows, model=args.model, threshold=args.threshold)
    print(f"{response.model} v{response.version}: {len(response.results)} transaction(s)")
    for i, r in enumerate(response.results):
        reasons = ", ".join(f"{c.name} {c.error:.2f}" for c in r.top_features)
        verdict = "FRAUD" if r.is_fraud else "ok   "
        print(f"  #{i:<4d} {verdict} score {r.score:9.3f} (threshold {r.threshold:.3f})  top: {reasons}")
    return 0


def _classify(args: argparse.Namespace) -> int:
    if args.digit is not None:  # an example from scikit-learn's bundled digits
        from sklearn.datasets import load_digits

        digits = load_digits()
        index = int(next(i for i, t in enumerate(digits.target) if t == args.digit))
        images, names = [digits.images[index] / 16.0], [f"sklearn digit #{index} (a {args.digit})"]
    else:
        images = [Path(p).read_bytes() for p in args.images]
        names = list(args.images)
    if not images:
        print("deepserve classify: give PNG files or --digit N", file=sys.stderr)
        return 2
    with _client(args) as client:
        response = client.classify(images, top_k=args.top_k, model=args.model)
    for name, result in zip(names, response.results):
        top = ", ".join(f"{s.label} ({s.probability:.1%})" for s in result.top)
        print(f"{name}: {top}   [{response.model} v{response.version}]")
    return 0


def _ascii(pixels, width: int) -> list[str]:
    """An image as text rows, darker characters for brighter pixels."""
    ramp = " .:-=+*#%@"
    rows = [pixels[i : i + width] for i in range(0, len(pixels), width)]
    return ["".join(ramp[min(int(v * len(ramp)), len(ramp) - 1)] * 2 for v in row) for row in rows]


def _generate(args: argparse.Namespace) -> int:
    options = dict(model=args.model, steps=args.steps, guidance=args.guidance, sampler=args.sampler)
    with _client(args, timeout=args.timeout) as client:
        result = None
        for event in client.generate_stream(label=args.label, count=args.count, seed=args.seed, **options):
            if event.HasField("progress"):
                step, steps = event.progress.step, event.progress.steps
                print(f"\rstep {step}/{steps} [{'#' * (30 * step // steps):30s}]", end="", file=sys.stderr, flush=True)
            else:
                result = event.result
    print(file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{result.model} v{result.version}: {len(result.images)} image(s), seed {result.seed}, "
          f"{result.steps} step(s), sampler {result.sampler}, guidance {result.guidance:g}")
    for i, image in enumerate(result.images):
        label = "none" if image.label < 0 else image.label
        path = args.out / f"{result.model}-seed{result.seed}-{i}-label{label}.png"
        path.write_bytes(image.png)
        print(f"  {path}")
        if not args.quiet:
            print("\n".join("    " + row for row in _ascii(image.pixels, result.width)))
    return 0


def _recommend(args: argparse.Namespace) -> int:
    if args.user is None and not args.neighbors:
        print("deepserve recommend: give --user ID, or --neighbors ID... for a new user", file=sys.stderr)
        return 2
    with _client(args) as client:
        response = client.recommend(user=args.user, neighbors=args.neighbors or [], k=args.k,
                                    exclude_known=not args.include_known, model=args.model)
    who = f"user {args.user}" if args.user is not None else "a new user"
    how = " (cold start from its neighbours)" if response.cold_start else ""
    print(f"{response.model} v{response.version}: top {len(response.users)} for {who}{how}")
    for rank, r in enumerate(response.users, 1):
        print(f"  {rank:3d}. user {r.user:<8d} score {r.score:8.3f}")
    return 0


# `deepserve serve` option -> the Settings field it sets (docs/security.md).
SERVE_SECURITY_OPTIONS = {
    "tls_cert": "tls_cert_file",
    "tls_key": "tls_key_file",
    "tls_client_ca": "tls_client_ca_file",
    "auth_tokens_file": "auth_tokens_file",
}


def _connection_options(c: argparse.ArgumentParser) -> None:
    """A client command's TLS and token options."""
    c.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs (implied by --tls-ca)")
    c.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA that signed the server's certificate (TLS)")
    c.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate, for mutual TLS (with --tls-key)")
    c.add_argument("--tls-key", type=Path, metavar="PEM", help="client private key, for mutual TLS")
    c.add_argument("--token", default=os.environ.get("DEEPSERVE_TOKEN"),
                   help="bearer token (default $DEEPSERVE_TOKEN; prefer it: arguments show in the process list)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepserve", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="train, export and verify models into a model repository")
    b.add_argument("--only", action="append", metavar="NAME",
                   help=f"build only this model (repeatable): {', '.join(BUILDABLE)}")
    b.add_argument("--data", type=Path, help="CSV to train the anomaly detector on (bring your own data)")
    b.add_argument("--label-column", help="label column in --data, used for evaluation only")
    b.add_argument("--name", help="model name for a --data build (default fraud-autoencoder)")
    b.add_argument("--fpr", type=float, default=0.01, help="false-positive rate the threshold is calibrated to")
    b.add_argument("--edges", type=Path, metavar="PATH",
                   help="edge-list CSV (src,dst) or graph-tool .gt/.gt.gz file for graph-recommender "
                        "(bring your own graph)")
    b.add_argument("--node-features", type=Path, metavar="PATH",
                   help="node-feature CSV (id, then numeric columns) to go with --edges")
    b.add_argument("--repo", type=Path, default=default_root(), help="model repository directory")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=_build)

    m = sub.add_parser("models", help="list the models in a repository and verify their files")
    m.add_argument("--repo", default=default_location(),
                   help="model repository: a directory or a URI (http://, s3://, ...; see docs/model-repository.md)")
    m.add_argument("--live", action="store_true", help="what a running server serves: every version, "
                   "its role (default, canary, shadow, standby) and readiness")
    m.add_argument("--target", help="server address for --live (default 127.0.0.1:$DEEPSERVE_GRPC_PORT or :9000)")
    _connection_options(m)
    m.set_defaults(func=_models)
    rollout.add_commands(sub, _connection_options)

    s = sub.add_parser("serve", help="serve the repository on Ray Serve over gRPC (port 9000)")
    s.add_argument("--repo", default=str(default_root()),
                   help="model repository: a directory (on a shared volume for a cluster) or a URI "
                        "(http(s)://, s3://, ...) that every replica fetches and verifies")
    s.add_argument("--config", type=Path, help="Serve config YAML (default: the one the package ships, "
                   "deploy/serve_config.yaml)")
    s.add_argument("--address", help="an existing Ray cluster (e.g. ray://head:10001 or auto)")
    s.add_argument("--port", type=int, help="gRPC port (default $DEEPSERVE_GRPC_PORT or the config's)")
    s.add_argument("--models", nargs="+", help="serve only these models")
    s.add_argument("--object-store-mb", type=int, default=256, help="embedded cluster's object store")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus endpoint of the embedded cluster's node (default $DEEPSERVE_METRICS_PORT "
                        "or 8080); on a cluster: `ray start --metrics-export-port`")
    s.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate: TLS on the gRPC port "
                   "(with --tls-key; on a cluster the path must exist on every serving node)")
    s.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key (unencrypted)")
    s.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                   help="CA of the client certificates: mutual TLS, clients without one are refused")
    s.add_argument("--auth-tokens-file", type=Path, metavar="FILE",
                   help="bearer tokens and their groups, one 'TOKEN GROUP[,GROUP...]' per line "
                        "(docs/security.md); without it, no authentication")
    s.add_argument("--reflection", action="store_true", help="serve gRPC server reflection (off by default)")
    s.add_argument("--health-port", type=int, help="also serve grpc.health.v1 alone, in plaintext, on this port "
                   "(for probes that cannot speak TLS)")
    s.add_argument("--admission-front", action="store_true",
                   help="nginx in front of the gateway's workers: it holds the port and refuses calls beyond "
                        "their bound at once, RESOURCE_EXHAUSTED (docs/reliability.md, 'Overload'); needs nginx")
    s.set_defaults(func=_serve)

    for name, func, helptext in (("score", _score, "score a CSV of transactions (fraud-autoencoder)"),
                                 ("classify", _classify, "classify PNG images (digit-classifier)")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--target", help="server address (default 127.0.0.1:$DEEPSERVE_GRPC_PORT or :9000)")
        _connection_options(c)
        c.add_argument("--model", default="", help="model name (default: the API's default model)")
        if name == "score":
            c.add_argument("csv", type=Path, help="CSV with the model's columns (a Class column is ignored)")
            c.add_argument("--threshold", type=float, help="override the calibrated threshold")
        else:
            c.add_argument("images", nargs="*", help="PNG files")
            c.add_argument("--digit", type=int, choices=range(10), help="send a bundled example of this digit")
            c.add_argument("--top-k", type=int, default=3)
        c.set_defaults(func=func)

    g = sub.add_parser("generate", help="generate digit images (digit-diffusion, digit-dcgan), saved as PNGs")
    g.add_argument("--target", help="server address (default 127.0.0.1:$DEEPSERVE_GRPC_PORT or :9000)")
    _connection_options(g)
    g.add_argument("--model", default="", help="generator (default digit-diffusion)")
    g.add_argument("--label", type=int, help="digit to generate (default: none)")
    g.add_argument("--count", type=int, default=1)
    g.add_argument("--seed", type=int, help="same seed, same images (default: picked by the server)")
    g.add_argument("--steps", type=int, default=0, help="sampling steps (default: the model's)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--sampler", default="", choices=("", "ddim", "ddpm"), help="diffusion sampler (default ddim)")
    g.add_argument("--out", type=Path, default=Path("generated"), help="directory for the PNGs")
    g.add_argument("--timeout", type=float, default=60.0)
    g.add_argument("--quiet", action="store_true", help="no text rendering of the images")
    g.set_defaults(func=_generate)

    r = sub.add_parser("recommend", help="recommend users to a user (graph-recommender)")
    r.add_argument("--target", help="server address (default 127.0.0.1:$DEEPSERVE_GRPC_PORT or :9000)")
    _connection_options(r)
    r.add_argument("--model", default="", help="recommender (default graph-recommender)")
    r.add_argument("--user", type=int, help="a user in the graph")
    r.add_argument("--neighbors", type=int, nargs="+", help="a new user's known neighbours (cold start)")
    r.add_argument("-k", type=int, default=10, help="how many users (1..100)")
    r.add_argument("--include-known", action="store_true", help="do not leave out known neighbours")
    r.set_defaults(func=_recommend)
    return p


def main(argv: list[str] | None = None) -> int:
    import grpc

    args = parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except grpc.RpcError as exc:  # a client command's call failed: say why, no traceback
        print(f"deepserve {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader left (`deepserve models | head`): stop quietly, as cat does
        # Point stdout at /dev/null so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
