"""Session fixtures shared by every test: the built model repository, the real service, and
the figures tests measure (printed at the end of the run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepserve.repository import ModelRepository, default_root

PROJECT = Path(__file__).resolve().parent.parent
REQUIRED_MODELS = ("fraud-autoencoder", "digit-classifier", "digit-classifier-robust", "digit-dcgan",
                   "digit-diffusion", "graph-recommender")


FIGURES: dict[str, object] = {}


@pytest.fixture(scope="session")
def figures() -> dict[str, object]:
    """Measured figures (name -> value) a test wants on record: printed after the run and
    written to reports/figures.json. Tests still assert their targets; this only reports."""
    return FIGURES


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    import json

    terminalreporter.section("measured figures")
    for name, value in FIGURES.items():
        terminalreporter.write_line(f"{name}: {value}")
    reports = PROJECT / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "figures.json").write_text(json.dumps(FIGURES, indent=2) + "\n")


@pytest.fixture(scope="session")
def repository() -> ModelRepository:
    """The real model repository (``make models`` builds it); built here when absent."""
    repo = ModelRepository(default_root())
    missing = [m for m in REQUIRED_MODELS if not repo.versions(m)]
    if missing:
        cmd = [sys.executable, "-m", "deepserve.cli", "build", "--repo", str(repo.root)]
        for name in missing:
            cmd += ["--only", name]
        subprocess.run(cmd, check=True, cwd=PROJECT)
    return repo


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_or_skip() -> str:
    """The nginx executable the admission front runs (``make tools`` installs it as root);
    skips the test without it."""
    from deepserve.gateway.front import find_binary

    try:
        return find_binary("nginx")
    except RuntimeError:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light; `make tools` does it as root)")


# The models as the tests serve them: both placements are exercised (the diffusion model's
# streams cross Serve's handle), and digit-classifier gets a tiny queue so that overload
# can be provoked (RESOURCE_EXHAUSTED).
TEST_MODELS = {
    "fraud-autoencoder": {"placement": "gateway", "batching": {"max_batch_size": 64}},
    "digit-classifier": {"placement": "gateway",
                         "batching": {"max_batch_size": 4, "max_queued": 4, "threaded": True}},
    "digit-classifier-robust": {"placement": "deployment"},
    "digit-dcgan": {"placement": "gateway", "batching": {"max_batch_size": 256}},
    "digit-diffusion": {"placement": "deployment", "batching": {"max_batch_size": 512, "max_queued": 64}},
    "graph-recommender": {"placement": "gateway", "batching": {"max_batch_size": 64}},
}
MAX_ROWS = 1024
METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def server(repository):
    """The real service: a local Ray cluster, Serve, the gateway on a free port. Started once."""
    import ray
    from ray import serve

    from deepserve.app import build_app
    from deepserve.autoscaling import GATEWAY_RESOURCE
    from deepserve.client import DeepServeClient

    port = free_port()
    os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")  # as `deepserve serve` runs
    ray.init(address="local", num_cpus=2, resources={GATEWAY_RESOURCE: 1}, include_dashboard=False,
             object_store_memory=150 * 1024 * 1024, namespace="deepserve-tests", log_to_driver=False,
             _metrics_export_port=METRICS_PORT,
             _system_config={"metrics_report_interval_ms": 1000})  # tests wait for exports: be quick
    serve.start(proxy_location="Disabled")
    gateway = {  # the shipped autoscaling policy runs: one node, one gateway
        "name": "Gateway",
        "max_replicas_per_node": 1,
        "ray_actor_options": {"num_cpus": 0.1, "resources": {GATEWAY_RESOURCE: 1}},
        "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 4,
            "policy": {"policy_function": "deepserve.autoscaling:GatewayLoadPolicy"},
        },
    }
    app = build_app({
        "repository": str(repository.root), "models": TEST_MODELS, "grpc_port": port,
        "grpc_host": "127.0.0.1", "max_rows_per_request": MAX_ROWS, "readiness_poll_s": 0.5,
        "reflection": True,  # off by default; tests/services/test_serving.py lists the services with it
        # Shedding on event-loop lag is tested against the shipped default by its own app
        # (tests/reliability/test_overload.py); here two cores also run the tests and
        # Prometheus, and a shed request would fail an unrelated test.
        "max_loop_lag_s": 0.5,
    }, [gateway])
    serve.run(app, name="deepserve", route_prefix=None)
    target = f"127.0.0.1:{port}"
    with DeepServeClient(target) as client:
        client.wait_ready(timeout=120)
    yield target
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def client(server):
    from deepserve.client import DeepServeClient

    with DeepServeClient(server) as c:
        yield c
