"""The gateway serves from worker processes: no Ray in them, connections spread over them,
one that dies is replaced while the others serve, and they die with their replica."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
from ray import serve

from deepserve.gateway.replica import available_cores
from deepserve.proto import deepserve_pb2 as v1
from deepserve.proto import deepserve_pb2_grpc as v1_grpc


def _status() -> dict:
    return serve.get_app_handle("deepserve").status.remote().result(timeout_s=30)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _score(target: str, channels: int, calls: int) -> None:
    """``calls`` scores over each of ``channels`` separate connections."""
    for _ in range(channels):
        # A local subchannel pool: a connection of its own, not one shared with other channels.
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = v1_grpc.FraudScoringStub(channel)
            for _ in range(calls):
                stub.Score(v1.ScoreRequest(transactions=[v1.Transaction(features=[0.0] * 30)]), timeout=10)


def _wait_all_serving(timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = _status()
        if status["ready"] and all(w["alive"] for w in status["workers"]):
            return status
        assert time.monotonic() < deadline, status["workers"]
        time.sleep(0.2)


def test_one_worker_per_core_none_of_them_with_ray(server):
    status = _status()
    workers = status["workers"]
    assert len(workers) == available_cores() >= 1
    assert len({w["pid"] for w in workers}) == len(workers) and status["pid"] not in {w["pid"] for w in workers}
    assert all(_parent(w["pid"]) == status["pid"] for w in workers)  # children of the Serve replica
    reports = status["worker_reports"]
    assert len(reports) == len(workers) and not any(r["ray_imported"] for r in reports)


def test_connections_spread_over_the_workers(server):
    before = {r["pid"]: r["requests_total"] for r in _status()["worker_reports"]}
    _score(server, channels=16, calls=5)
    after = {r["pid"]: r["requests_total"] for r in _status()["worker_reports"]}
    served = {pid: after[pid] - before.get(pid, 0) for pid in after}
    assert sum(served.values()) == 80
    if len(after) > 1:  # 16 connections all on one of two workers: 1 in 32,768
        assert all(n > 0 for n in served.values()), served


def test_a_dead_worker_is_replaced_while_the_others_serve(server, figures):
    status = _wait_all_serving()
    if len(status["workers"]) < 2:
        pytest.skip("one core: one worker, nothing else serves while it is replaced")
    victim = status["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()
    # Until every thread of it has exited, its listening socket may still take connections,
    # which are reset when it closes (clients retry those): wait until the replica reaps it.
    while (w := _status()["workers"][0])["pid"] == victim["pid"] and w["alive"]:
        time.sleep(0.05)
    _score(server, channels=8, calls=3)  # new connections reach the workers still listening
    replaced = _wait_all_serving()
    figures["gateway worker replaced, killed to serving (s)"] = round(time.monotonic() - killed, 1)
    worker = replaced["workers"][0]
    assert worker["pid"] != victim["pid"] and worker["restarts"] == victim["restarts"] + 1
    assert _parent(worker["pid"]) == replaced["pid"]
    _score(server, channels=4, calls=3)


def test_a_worker_dies_with_its_parent(tmp_path):
    """PR_SET_PDEATHSIG: a SIGKILLed replica takes its workers with it, however it dies."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import os, time; from deepserve.gateway.worker import _die_with; "
            "_die_with(os.getppid()); print('armed', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "armed"
        print(child.pid, flush=True)
        time.sleep(60)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while _alive(child):
        assert time.monotonic() < deadline, "the worker outlived its parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting for init to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
