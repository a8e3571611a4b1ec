"""DeepServe on a real two-node Ray cluster: a head and a worker, each in its own network
namespace with its own address (tests/deploy/netns.py), deployed with ``deepserve serve
--address`` and the shipped deploy/serve_config.yaml, the model repository fetched over HTTP
from the head by every replica.

What it shows, in order (the module's tests share one cluster and run in file order):
1. both nodes' gateways answer, and every answer names its node;
2. the worker is killed under a Locust load over both gateways: fewer than 1% of calls
   fail, none outlives its deadline, and the time to recover is measured;
3. the worker rejoins and its gateway takes traffic again;
4. Locust drives digit-diffusion (placed ``deployment``) from its minimum to >= 3 replicas,
   and it scales back down once the load stops; both times are measured.

The figures are printed at the end of the run (tests/conftest.py) and written to
reports/figures.json; docs/deploy.md records them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deepserve.autoscaling import GATEWAY_RESOURCE
from deepserve.client import DeepServeClient
from deepserve.proto import deepserve_pb2 as v1

import netns  # tests/deploy/netns.py

pytestmark = pytest.mark.timeout(900)

PROJECT = Path(__file__).resolve().parents[2]
RUNNER = PROJECT / "loadtests" / "run.py"
REPORTS = PROJECT / "reports"
HTTP_PORT = 8000
CALL_TIMEOUT_S = 5.0  # the load test's per-call deadline


def wait_for(predicate, timeout: float, what: str, period: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; that value. Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(period)


def serving(address: str) -> bool:
    """Does the gateway at ``address`` say every model is ready (grpc.health.v1)?"""
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def start_load(cluster, out: Path, user: str, users: int, duration: float, timeout: float = CALL_TIMEOUT_S,
               *addresses: str) -> subprocess.Popen:
    """Locust (loadtests/run.py) against the given gateways, from this namespace."""
    target = "ipv4:" + ",".join(f"{a}:{netns.GRPC_PORT}" for a in addresses)
    return subprocess.Popen(
        [sys.executable, str(RUNNER), "--host", target, "--users", str(users), "--duration", str(duration),
         "--user", user, "--timeout", str(timeout), "--ready-timeout", "30", "--out", str(out)],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_load(process: subprocess.Popen, out: Path, timeout: float = 300) -> dict:
    output, _ = process.communicate(timeout=timeout)
    summary = out.with_name(out.name + "_summary.json")
    assert summary.exists(), output[-3000:]
    print(output)
    return json.loads(summary.read_text())


def deployment_states(cluster) -> dict[str, dict[str, int]]:
    """Serve's replica states per deployment of the app (RUNNING, STARTING, ...)."""
    return cluster.python(
        "from ray import serve\n"
        "app = serve.status().applications.get('deepserve')\n"
        "print(json.dumps({} if app is None else\n"
        "                 {n: dict(d.replica_states) for n, d in app.deployments.items()}))\n")


def running(cluster, deployment: str) -> int:
    return deployment_states(cluster).get(deployment, {}).get("RUNNING", 0)


@pytest.fixture(scope="module")
def cluster(repository, figures):
    """Two namespaced nodes, a Ray cluster over them, the app deployed with the shipped config."""
    why = netns.unavailable()
    if why:
        pytest.skip(f"multi-node cluster test skipped: {why}")
    workdir = Path(tempfile.mkdtemp(prefix="ds-", dir="/tmp"))  # short: Ray's Unix sockets live here
    nodes = netns.NetnsCluster(workdir, env={"DEEPSERVE_REPOSITORY_CACHE": str(workdir / "cache")})
    try:
        nodes.create()
        head, worker = nodes.nodes["head"].address, nodes.nodes["worker"].address
        figures["cluster: head start s"] = round(nodes.start_ray("head", {GATEWAY_RESOURCE: 1}), 1)
        figures["cluster: worker join s"] = round(nodes.start_ray("worker", {GATEWAY_RESOURCE: 1}), 1)
        # The model repository, served over HTTP from the head: every replica fetches and
        # verifies what it loads (no node reads the test's files directly).
        nodes.start("head", sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", head,
                    "--directory", str(repository.root), log="http.log")
        started = time.monotonic()
        nodes.server = nodes.start("head", str(netns.VENV_BIN / "deepserve"), "serve", "--address",
                                   nodes.ray_address, "--repo", f"http://{head}:{HTTP_PORT}/", log="serve.log")
        log = workdir / "serve.log"
        wait_for(lambda: "Try:" in log.read_text() or nodes.server.poll() is not None, 300, "deepserve serve")
        assert nodes.server.poll() is None, log.read_text()[-4000:]
        wait_for(lambda: serving(f"{head}:{netns.GRPC_PORT}") and serving(f"{worker}:{netns.GRPC_PORT}"),
                 120, "a serving gateway on both nodes")
        figures["cluster: deploy to both gateways serving s"] = round(time.monotonic() - started, 1)
        yield nodes
    finally:
        server = getattr(nodes, "server", None)
        if server is not None and server.poll() is None:
            server.terminate()  # deletes the app
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for name in ("serve.log", "http.log"):
            if (workdir / name).exists():
                REPORTS.mkdir(exist_ok=True)
                shutil.copy(workdir / name, REPORTS / f"cluster-{name}")
        nodes.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def test_both_gateways_answer_and_name_their_node(cluster):
    head, worker = cluster.nodes["head"].address, cluster.nodes["worker"].address
    request = v1.ScoreRequest(transactions=[v1.Transaction(features=[0.0] * 30)])
    seen = {}
    for target in (f"{head}:9000", f"{worker}:9000", f"ipv4:{head}:9000,{worker}:9000"):
        with DeepServeClient(target) as client:
            nodes = []
            for _ in range(10):
                response, call = client.fraud.Score.with_call(request, timeout=10)
                assert len(response.results) == 1 and response.results[0].score > 0
                nodes.append(dict(call.trailing_metadata())["deepserve-node"])
            seen[target] = set(nodes)
    assert seen[f"{head}:9000"] == {head} and seen[f"{worker}:9000"] == {worker}
    assert seen[f"ipv4:{head}:9000,{worker}:9000"] == {head, worker}  # round robin over both
    placement = cluster.replicas()
    assert placement["Gateway"] == {head: 1, worker: 1}, placement  # one gateway per node
    # Two replicas of each deployment-placed model, spread over the nodes (Serve's default).
    for name in ("digit-classifier-robust", "digit-dcgan", "digit-diffusion"):
        assert sum(placement[name].values()) == 2, placement


def test_node_loss_under_load(cluster, figures, tmp_path):
    """Kill the worker (every process in its namespace) while Locust calls both gateways."""
    head, worker = cluster.nodes["head"].address, cluster.nodes["worker"].address
    out = tmp_path / "node-loss"
    load = start_load(cluster, out, "EveryModelUser", 8, 50, CALL_TIMEOUT_S, head, worker)
    time.sleep(15)  # steady state over both gateways
    killed_at = time.time()
    assert cluster.kill("worker") > 0
    marked_dead_at = cluster.python(  # the GCS's health checks notice the raylet is gone
        f"import time\nwhile any(n['Alive'] for n in ray.nodes() if n['NodeManagerAddress'] == {worker!r}):\n"
        "    time.sleep(0.1)\nprint(json.dumps(time.time()))")
    # Serve drops the lost gateway (the policy follows the nodes) and replaces lost replicas.
    wait_for(lambda: running(cluster, "Gateway") == 1 and all(
        running(cluster, d) >= 2 for d in ("digit-classifier-robust", "digit-dcgan", "digit-diffusion")),
        120, "Serve to replace what the worker held")
    replaced_s = time.time() - killed_at
    summary = finish_load(load, out)

    total = summary["total"]
    failed_seconds = [s["t"] for s in summary["timeline"] if s["failed"] and s["t"] >= int(killed_at)]
    recovery_s = (max(failed_seconds) + 1 - killed_at) if failed_seconds else 0.0
    before = [s for s in summary["timeline"] if s["t"] < int(killed_at)]
    after = [s for s in summary["timeline"] if s["t"] > int(killed_at) + 1]
    figures.update({
        "node loss: calls": total["requests"],
        "node loss: failed": total["failures"],
        "node loss: failed %": round(100 * total["failures"] / total["requests"], 3),
        "node loss: slowest call ms": round(total["max_ms"]),
        "node loss: client recovery s (kill to last failure)": round(recovery_s, 1),
        "node loss: GCS marked the node dead s": round(marked_dead_at - killed_at, 1),
        "node loss: Serve replaced lost replicas s": round(replaced_s, 1),
        "node loss: errors": [f"{e['error']} x{e['occurrences']}" for e in summary["errors"]],
    })
    assert total["requests"] > 1000
    assert total["failures"] / total["requests"] < 0.01, summary["errors"]
    assert total["max_ms"] <= (CALL_TIMEOUT_S + 1) * 1000  # every call ended by its deadline
    assert any(worker in s["nodes"] for s in before) and any(head in s["nodes"] for s in before)
    assert after and all(set(s["nodes"]) <= {head} for s in after)  # clients moved to the survivor
    assert sum(s["ok"] for s in after) > 100


def test_worker_rejoins_and_takes_traffic(cluster, figures, tmp_path):
    head, worker = cluster.nodes["head"].address, cluster.nodes["worker"].address
    started = time.monotonic()
    cluster.start_ray("worker", {GATEWAY_RESOURCE: 1})
    wait_for(lambda: serving(f"{worker}:{netns.GRPC_PORT}"), 180, "a gateway on the rejoined worker")
    figures["rejoin: ray start to serving gateway s"] = round(time.monotonic() - started, 1)
    assert running(cluster, "Gateway") == 2

    out = tmp_path / "rejoined"
    summary = finish_load(start_load(cluster, out, "MixUser", 4, 8, CALL_TIMEOUT_S, head, worker), out)
    assert summary["total"]["failures"] == 0, summary["errors"]
    assert summary["nodes"].get(worker, 0) > 100 and summary["nodes"].get(head, 0) > 100, summary["nodes"]


def test_diffusion_autoscales_up_and_down_under_load(cluster, figures, tmp_path):
    """The shipped autoscaling_config: 2 replicas at rest, >= 3 under 96 concurrent generations."""
    head, worker = cluster.nodes["head"].address, cluster.nodes["worker"].address
    assert running(cluster, "digit-diffusion") == 2
    out = tmp_path / "autoscale"
    started = time.monotonic()
    load = start_load(cluster, out, "DiffusionUser", 96, 60, 30.0, head, worker)
    wait_for(lambda: running(cluster, "digit-diffusion") >= 3, 90, "digit-diffusion to reach 3 replicas", period=1)
    figures["autoscale: load start to 3 diffusion replicas s"] = round(time.monotonic() - started, 1)
    summary = finish_load(load, out)
    load_stopped = time.monotonic()
    peak = running(cluster, "digit-diffusion")
    wait_for(lambda: running(cluster, "digit-diffusion") == 2 and not deployment_states(cluster)[
        "digit-diffusion"].get("STOPPING"), 180, "digit-diffusion back to 2 replicas", period=1)
    figures.update({
        "autoscale: diffusion replicas at the end of the load": peak,
        "autoscale: load stop to 2 replicas s": round(time.monotonic() - load_stopped, 1),
        "autoscale: generations": summary["total"]["requests"],
        "autoscale: failed": summary["total"]["failures"],
    })
    assert summary["total"]["requests"] > 0
    assert summary["total"]["failures"] / summary["total"]["requests"] < 0.01, summary["errors"]
