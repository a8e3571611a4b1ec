"""Faults, and the status codes and recoveries they get: a model's full Serve queue is
RESOURCE_EXHAUSTED with a retry hint; an ONNX Runtime failure is INTERNAL and says nothing of
ONNX Runtime's message; health checks run the model, so a session stuck in a run fails them
and Serve replaces its replica; losing every replica of a model turns it NOT_SERVING, its
calls UNAVAILABLE (never INTERNAL or UNKNOWN), until it recovers; every Ray error that means
"the cluster could not carry the call out" is UNAVAILABLE.

The second application serves the test models of :mod:`faulty_models`: ``slow-remote`` in its
own deployment (one replica, one request at a time and one queued: Serve's queue limits), and
``fails-on-batch`` in the gateway. Its probes are bounded at one second.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time

import grpc
import numpy as np
import pytest
import ray
import ray.exceptions as rx
import ray.serve.exceptions as sx

from deepserve.errors import INTERNAL_MESSAGE, ModelNotReady, to_status
from deepserve.proto import inference_pb2_grpc as oip_grpc
from faulty_models import write_model
from second_app import (
    NOT_SERVING,
    SERVING,
    gateway_status,
    health,
    infer_request,
    outcome,
    output,
    replica_actors,
    replica_info,
    second_app,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

APP = "deepserve-model-faults"
REMOTE = "slow-remote"
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def target(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-models")
    write_model(root, REMOTE, "slow")
    write_model(root, "fails-on-batch", "fails-on-batch")
    threaded = {"threaded": True}  # in the session's worker thread, where a run can be stopped
    models = {REMOTE: {"placement": "deployment", "batching": threaded},
              "fails-on-batch": {"placement": "gateway", "batching": threaded}}
    remote = {"name": REMOTE, "max_ongoing_requests": 1, "max_queued_requests": 1,
              "health_check_period_s": 1, "health_check_timeout_s": 5,
              "graceful_shutdown_timeout_s": 1}  # a replica stuck in a run is not waited for
    with second_app(APP, root, models, [remote], probe_timeout_s=1.0) as target:
        yield target


@pytest.fixture(scope="module")
def stub(target):
    with grpc.insecure_channel(target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def _answers(stub) -> bool:
    code, response = outcome(lambda: stub.ModelInfer(infer_request(REMOTE, [3.0]), timeout=5))
    return code == Code.OK and output(response).ravel().tolist() == [6.0]


# ---------------------------------------------------------------------------- errors


def test_a_full_serve_queue_is_resource_exhausted_with_a_retry_hint(stub):
    """One request computes and one waits in Serve's queue: the rest of a burst is refused at
    once, with ``grpc-retry-pushback-ms``; nothing fails any other way."""
    request = infer_request(REMOTE, [1e5])  # ~0.1 s of counting each

    def call():
        code, answer = outcome(lambda: stub.ModelInfer(request, timeout=30))
        pushback = dict(answer.trailing_metadata()).get("grpc-retry-pushback-ms") if code != Code.OK else None
        return code, answer, pushback

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: call(), range(16)))
    codes = collections.Counter(code for code, _, _ in results)
    assert set(codes) == {Code.OK, Code.RESOURCE_EXHAUSTED}, codes
    for code, answer, pushback in results:
        if code == Code.RESOURCE_EXHAUSTED:
            assert "queue is full" in answer.details() and "retry" in answer.details(), answer.details()
            assert pushback is not None and int(pushback) > 0
        else:
            assert output(answer).ravel().tolist() == [2e5]


def test_an_onnx_runtime_failure_is_internal_and_tells_nothing_of_it(stub, target):
    one = np.arange(4, dtype=np.float32)
    code, response = outcome(lambda: stub.ModelInfer(infer_request("fails-on-batch", one, width=4), timeout=10))
    assert code == Code.OK and output(response).ravel().tolist() == one.tolist()
    # Two rows: the graph's Reshape to [1, 4] fails inside ONNX Runtime, at run time.
    code, error = outcome(lambda: stub.ModelInfer(infer_request("fails-on-batch", np.ones((2, 4)), width=4),
                                                  timeout=10))
    assert code == Code.INTERNAL, error
    assert error.details() == INTERNAL_MESSAGE
    for leak in ("Reshape", "ONNXRuntime", "onnxruntime", "shape", "Traceback", ".cc", ".h:"):
        assert leak not in error.details()
    # A failing request is not a failing model: it stays ready and serves.
    assert health(target, "fails-on-batch") == SERVING
    assert outcome(lambda: stub.ModelInfer(infer_request("fails-on-batch", one, width=4), timeout=10))[0] == Code.OK


# ---------------------------------------------------------------------------- health checks


def test_health_checks_run_the_model(target):
    """Serve's health checks and the gateway's readiness probes run one row through each
    model's session: the probes add up, and none of them is a batch or, for the generator, a
    generation step."""
    checks = {
        "gateway": lambda: gateway_status(APP)["models"]["fails-on-batch"],
        "deployment": lambda: replica_info(APP, REMOTE),
        "generator": lambda: replica_info("deepserve", "digit-diffusion"),  # the session app's
    }
    for where, report in checks.items():
        before = report()
        after = wait_for(lambda: (now := report())["probes"] >= before["probes"] + 3 and now, timeout=30,
                         what=f"{where}: probes that ran the model")
        assert after["probe_failures"] == before["probe_failures"], where
        assert (after["batch_runs"], after["batched_requests"]) == (before["batch_runs"], before["batched_requests"])
        assert after["last_probe_s"] > 0, where


def test_a_stuck_session_fails_its_health_checks_and_serve_replaces_the_replica(stub, target, figures):
    """A request that would count for ~15 minutes holds the replica's session. The probes wait
    behind it and time out: the gateway turns the model NOT_SERVING, and Serve, its health
    checks failing, replaces the replica. Once the call is cancelled, the model serves again
    from a new process."""
    before_pid = replica_info(APP, REMOTE)["pid"]
    before = replica_actors(APP, REMOTE)
    assert len(before) == 1
    stuck = stub.ModelInfer.future(infer_request(REMOTE, [1e9]), timeout=120)
    started = time.monotonic()
    wait_for(lambda: health(target, REMOTE) == NOT_SERVING, timeout=30, what="the gateway's readiness")
    unready_s = time.monotonic() - started
    wait_for(lambda: (now := replica_actors(APP, REMOTE)) and now.isdisjoint(before), timeout=60,
             what="Serve replacing the stuck replica")
    replaced_s = time.monotonic() - started
    # The gateway sends a call whose replica died to another one (inference has no side
    # effects): cancelling it now keeps it from holding the new replica too.
    if not stuck.cancel():  # already over: the gateway's attempts found no replica
        assert stuck.code() == Code.UNAVAILABLE, stuck.details()
    wait_for(lambda: health(target, REMOTE) == SERVING, timeout=60, what="the model serving again")
    # Each gateway worker probes for itself: the one behind `stub` may see the replica a poll later.
    wait_for(lambda: _answers(stub), timeout=10, what="the model answering through every worker")
    assert replica_info(APP, REMOTE)["pid"] != before_pid
    figures["stuck session: NOT_SERVING after (s)"] = round(unready_s, 1)
    figures["stuck session: replica replaced after (s)"] = round(replaced_s, 1)
    figures["stuck session: serving again after (s)"] = round(time.monotonic() - started, 1)


# ---------------------------------------------------------------------------- replica loss


def test_losing_every_replica_is_unavailable_until_it_recovers(stub, target, figures):
    """Every replica of the deployment killed: its health turns NOT_SERVING, its calls get
    UNAVAILABLE (a call caught waiting for a replica may reach its deadline first; while the
    new replica starts on these two cores the gateway's loop-lag bound may shed a few), never
    INTERNAL or UNKNOWN; Serve starts a new replica, and it serves again."""
    wait_for(lambda: _answers(stub), timeout=10, what="the model answering before the loss")
    codes: collections.Counter = collections.Counter()
    shed: list[str] = []
    stop = threading.Event()

    def traffic():  # one small call after another, as a client would keep sending
        while not stop.is_set():
            code, answer = outcome(lambda: stub.ModelInfer(infer_request(REMOTE, [3.0]), timeout=2))
            codes[code] += 1
            if code == Code.RESOURCE_EXHAUSTED:
                shed.append(answer.details())

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        wait_for(lambda: codes[Code.OK] >= 3, timeout=30, what="traffic answered before the loss")
        victims = replica_actors(APP, REMOTE)
        started = time.monotonic()
        for name, namespace in victims:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        wait_for(lambda: health(target, REMOTE) == NOT_SERVING, timeout=30, what="NOT_SERVING after the loss")
        unready_s = time.monotonic() - started
        wait_for(lambda: codes[Code.UNAVAILABLE] >= 1, timeout=30, what="an UNAVAILABLE call")
        wait_for(lambda: health(target, REMOTE) == SERVING, timeout=90, what="serving again")
        recovered_s = time.monotonic() - started
        ok_before = codes[Code.OK]
        wait_for(lambda: codes[Code.OK] >= ok_before + 3, timeout=30, what="traffic answered again")
    finally:
        stop.set()
        sender.join(timeout=30)
    assert set(codes) <= {Code.OK, Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED}, codes
    assert all("overloaded" in d and "retry with backoff" in d for d in shed), shed  # the admission's own
    assert replica_actors(APP, REMOTE).isdisjoint(victims)
    figures["replica loss: NOT_SERVING after (s)"] = round(unready_s, 1)
    figures["replica loss: serving again after (s)"] = round(recovered_s, 1)
    figures["replica loss: calls by code"] = {code.name: n for code, n in codes.items()}


def _ray_errors() -> list[BaseException]:
    """One instance of each Ray and Serve error that means the cluster, not the request, failed
    (made without their constructors, which want a live cluster's details)."""
    classes = [rx.RayActorError, rx.ActorDiedError, rx.ActorUnavailableError, rx.ObjectLostError,
               rx.OwnerDiedError, rx.ObjectFetchTimedOutError, rx.ObjectFreedError,
               rx.ObjectReconstructionFailedError, rx.ReferenceCountingAssertionError, rx.NodeDiedError,
               rx.WorkerCrashedError, rx.LocalRayletDiedError, rx.OutOfMemoryError, rx.RaySystemError,
               rx.RpcError, rx.ObjectStoreFullError, rx.OutOfDiskError, rx.ActorUnschedulableError,
               rx.ActorPlacementGroupRemoved, sx.DeploymentUnavailableError, sx.ReplicaUnavailableError]
    return [cls.__new__(cls) for cls in classes]


@pytest.mark.parametrize("error", _ray_errors(), ids=lambda e: type(e).__name__)
def test_ray_errors_are_unavailable(error):
    from deepserve.gateway.replica import RayBackend

    backend = RayBackend("some-model", handle=None)
    wrapped = rx.RayTaskError("infer", "Traceback ...", error, proctitle="replica", pid=1, ip="127.0.0.1")
    for raised in (error, wrapped):  # as the handle raises it, and as the cause of a replica's failure
        with pytest.raises(ModelNotReady) as caught:
            with backend._errors():
                raise raised
        assert to_status(caught.value)[0] == Code.UNAVAILABLE


def test_a_replica_bug_is_internal_and_backpressure_is_resource_exhausted():
    from deepserve.gateway.replica import RayBackend

    backend = RayBackend("some-model", handle=None)
    bug = rx.RayTaskError("infer", "Traceback ... KeyError", KeyError("x"), proctitle="replica", pid=1,
                          ip="127.0.0.1")
    with pytest.raises(RuntimeError) as caught:
        with backend._errors():
            raise bug
    assert to_status(caught.value) == (Code.INTERNAL, INTERNAL_MESSAGE)
    with pytest.raises(Exception) as caught:
        with backend._errors():
            raise sx.BackPressureError.__new__(sx.BackPressureError)
    assert to_status(caught.value)[0] == Code.RESOURCE_EXHAUSTED
