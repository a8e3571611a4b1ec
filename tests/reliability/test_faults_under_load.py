"""Faults under load: a replica, then the gateway itself, killed while Locust calls both paths.

The promise (docs/reliability.md, "Faults under load"): a lost replica or a lost gateway costs
clients that use DeepServe's retry policy (:data:`deepserve.client.SERVICE_CONFIG`) with
``wait_for_ready`` fewer than 1% of their calls, no call outlives its deadline, and each path
serves again on its own.

Its own application (tests/reliability/second_app.py), so that the session's is not
disturbed: the fraud model in the gateway, digit-classifier-robust placed ``deployment`` with
two replicas. Locust (loadtests/run.py, ``BothPathsUser``: half fraud scoring, half the robust
classifier) runs for real in a subprocess, as in tests/loadtests. Meanwhile:

1. one replica of digit-classifier-robust is killed (``ray.kill`` on its actor): the gateway
   sends the calls it held again, to the other replica, and Serve starts a replacement;
2. later the gateway's actor is killed: Serve starts a new one on the same port. Until it
   listens the connection is refused; the users' calls wait for it (``wait_for_ready``, up to
   their deadline) instead of failing at once with UNAVAILABLE, which the retry policy's four
   attempts within a second cannot ride out.

Two probes, one per path, call every 50 ms without retries (a fresh connection after each
failure): the time from each kill to a probe's last failure is that fault's recovery time.
The figures are printed at the end of the run and written to reports/figures.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from deepserve.proto import deepserve_pb2 as v1
from deepserve.proto import deepserve_pb2_grpc as v1_grpc
from second_app import SERVING, health, replica_actors, second_app, wait_for

pytestmark = pytest.mark.timeout(600)

PROJECT = Path(__file__).resolve().parents[2]
RUNNER = PROJECT / "loadtests" / "run.py"
APP = "deepserve-faults"
REMOTE = "digit-classifier-robust"
MODELS = {"fraud-autoencoder": {"placement": "gateway"}, REMOTE: {"placement": "deployment"}}
DEPLOYMENTS = [{"name": REMOTE, "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}}]
PATHS = ("FraudScoring.Score", "Classifier.Classify[robust]")  # Locust's names: gateway, replica
USERS = 6
CALL_TIMEOUT_S = 5.0  # Locust's per-call deadline
LOAD_S = 60.0
STEADY_S = 10.0  # load before the first kill, and between the replica's recovery and the next


@pytest.fixture(scope="module")
def faulty(server, repository):
    with second_app(APP, repository.root, MODELS, DEPLOYMENTS) as target:
        yield target


# ---------------------------------------------------------------------------- probes


@dataclass
class Probe:
    """Calls one path every ``period_s`` without retries, recording when each call ended and how."""

    target: str
    name: str
    period_s: float = 0.05
    outcomes: list[tuple[float, float, str]] = field(default_factory=list)  # (sent, ended, code), wall clock

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"probe-{self.name}", daemon=True)

    def _call(self, channel: grpc.Channel) -> None:
        if self.name == "gateway":
            v1_grpc.FraudScoringStub(channel).Score(
                v1.ScoreRequest(transactions=[v1.Transaction(features=[0.0] * 30)]), timeout=1.0)
        else:
            v1_grpc.ClassifierStub(channel).Classify(
                v1.ClassifyRequest(model=REMOTE, images=[v1.Image(pixels=np.zeros(64, np.float32))]), timeout=1.0)

    def _run(self) -> None:
        channel = grpc.insecure_channel(self.target, options=[("grpc.enable_retries", 0)])
        while not self._stop.is_set():
            sent = time.time()
            try:
                self._call(channel)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
                channel.close()  # reconnect at once, not after gRPC's reconnection backoff
                channel = grpc.insecure_channel(self.target, options=[("grpc.enable_retries", 0)])
            self.outcomes.append((sent, time.time(), code))
            self._stop.wait(self.period_s)
        channel.close()

    def start(self) -> "Probe":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def failures(self, since: float, until: float = float("inf")) -> list[tuple[float, float, str]]:
        """Failed calls sent after ``since`` that ended before ``until``."""
        return [o for o in self.outcomes if o[2] != "OK" and o[0] >= since and o[1] < until]

    def recovery_s(self, killed_at: float, until: float = float("inf")) -> float:
        """From the kill to the end of this path's last failed call (0: none failed)."""
        failed = self.failures(killed_at, until)
        return max(0.0, failed[-1][1] - killed_at) if failed else 0.0

    def answered_after(self, t: float) -> int:
        return sum(1 for o in self.outcomes if o[2] == "OK" and o[0] >= t)


# ---------------------------------------------------------------------------- faults


def kill_actor(name: str, namespace: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)


def running(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    found = app.deployments.get(deployment) if app else None
    return found.replica_states.get("RUNNING", 0) if found else 0


def start_load(target: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(RUNNER), "--host", target, "--users", str(USERS), "--duration", str(LOAD_S),
         "--user", "BothPathsUser", "--timeout", str(CALL_TIMEOUT_S), "--ready-timeout", "30", "--wait-for-ready", "--out", str(out)],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_load(process: subprocess.Popen, out: Path) -> dict:
    output, _ = process.communicate(timeout=LOAD_S + 120)
    print(output)
    summary = out.with_name(out.name + "_summary.json")
    assert summary.exists(), output[-3000:]
    return json.loads(summary.read_text())


def test_a_lost_replica_and_a_lost_gateway_cost_under_1_percent(faulty, figures, tmp_path):
    out = tmp_path / "faults"
    load = start_load(faulty, out)
    probes = {name: Probe(faulty, name).start() for name in ("gateway", "replica")}
    try:
        time.sleep(STEADY_S)

        # 1. One of the two replicas of the deployment-placed model.
        before = replica_actors(APP, REMOTE)
        assert len(before) == 2, before
        victim = sorted(before)[0]
        replica_killed_at = time.time()
        kill_actor(*victim)
        wait_for(lambda: running(REMOTE) == 2 and victim not in replica_actors(APP, REMOTE)
                 and len(replica_actors(APP, REMOTE)) == 2, 120, "Serve to replace the killed replica", every=0.2)
        replica_replaced_s = time.time() - replica_killed_at
        time.sleep(max(0.0, replica_killed_at + STEADY_S - time.time()))

        # 2. The gateway: the front door of both paths, and the fraud model's home.
        (gateway,) = replica_actors(APP, "Gateway")
        gateway_killed_at = time.time()
        kill_actor(*gateway)
        wait_for(lambda: replica_actors(APP, "Gateway") - {gateway} and health(faulty) == SERVING, 120,
                 "a new gateway serving", every=0.2)
        gateway_serving_s = time.time() - gateway_killed_at
        summary = finish_load(load, out)
    finally:
        if load.poll() is None:
            load.kill()
        for probe in probes.values():
            probe.stop()

    total = summary["total"]
    requests = {name: summary["requests"][name]["requests"] for name in PATHS}

    def failed_calls(since: float, until: float = float("inf")) -> int:
        return sum(s["failed"] for s in summary["timeline"] if since <= s["t"] + 0.5 < until)

    figures.update({
        "faults under load: calls": total["requests"],
        "faults under load: calls by path": requests,
        "faults under load: failed": total["failures"],
        "faults under load: failed %": round(100 * total["failures"] / max(total["requests"], 1), 3),
        "faults under load: slowest call ms": round(total["max_ms"]),
        "faults under load: errors": [f"{e['error']} x{e['occurrences']}" for e in summary["errors"]],
        "replica kill: failed calls (Locust, until the gateway kill)": failed_calls(replica_killed_at,
                                                                                    gateway_killed_at),
        "gateway kill: failed calls (Locust)": failed_calls(gateway_killed_at),
        "replica kill: Serve replaced it s": round(replica_replaced_s, 1),
        "replica kill: recovery s (kill to last failed probe, replica path)":
            round(probes["replica"].recovery_s(replica_killed_at, gateway_killed_at), 2),
        "replica kill: failed probes (replica path)":
            len(probes["replica"].failures(replica_killed_at, gateway_killed_at)),
        "gateway kill: new gateway serving s": round(gateway_serving_s, 1),
        "gateway kill: recovery s (kill to last failed probe, gateway path)":
            round(probes["gateway"].recovery_s(gateway_killed_at), 2),
        "gateway kill: recovery s (kill to last failed probe, replica path)":
            round(probes["replica"].recovery_s(gateway_killed_at), 2),
        "gateway kill: probe errors": sorted({o[2] for o in probes["gateway"].failures(gateway_killed_at)}),
    })

    assert total["requests"] > 1000 and all(n > 100 for n in requests.values()), requests
    assert total["failures"] / total["requests"] < 0.01, summary["errors"]
    assert total["max_ms"] <= (CALL_TIMEOUT_S + 1) * 1000  # every call ended by its deadline
    # Both paths answered again after the last fault.
    for probe in probes.values():
        assert probe.answered_after(gateway_killed_at + gateway_serving_s) > 10, probe.name
