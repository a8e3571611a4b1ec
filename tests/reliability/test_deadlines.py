"""A request whose deadline passes is dropped by the server, and its work freed: while it waits
for its batch (never computed), while its batch computes (the ONNX Runtime run is stopped), and
for generators at the next step; in the gateway's process and in a model's own deployment. A
request sent without a deadline gets ``default_timeout_s``.

Every assertion on dropping reads the server's own figures: the backend's report
(``deadline_exceeded`` by stage, ``terminated_runs``, ``batched_requests``, ``in_flight``) and the
``ray_deepserve_deadline_exceeded_total`` series on the Prometheus endpoint.

The second application serves the test model ``slow`` (:mod:`faulty_models`: a request's compute
time is its value in microseconds) twice: ``slow`` in the gateway, ``slow-remote`` in a deployment.
The generator case uses the session's diffusion deployment.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from conftest import nginx_or_skip
from deepserve.client import DeepServeClient
from deepserve.proto import inference_pb2_grpc as oip_grpc
from faulty_models import write_model
from second_app import gateway_status, infer_request, outcome, output, replica_info, scraped, second_app, wait_for

pytestmark = pytest.mark.timeout(180)

APP = "deepserve-deadlines"
DEFAULT_TIMEOUT_S = 4.0
LONG = 2e7  # ~17 s of counting: were its run not stopped, it would hold the session that long
Code = grpc.StatusCode


@pytest.fixture(scope="module", params=["grpc", "front"])
def target(request, server, tmp_path_factory):
    """Without and with the admission front: behind it, the deadline travels in nginx's
    forwarded ``grpc-timeout``. One worker behind the front, so that the calls of one connection
    share a queue as they do without it (nginx spreads a connection's calls over the workers)."""
    front = {"admission_front": True, "gateway_processes": 1} if request.param == "front" else {}
    if front:
        nginx_or_skip()
    root = tmp_path_factory.mktemp("deadline-models")
    for name in ("slow", "slow-remote"):
        write_model(root, name, "slow")
    # threaded: the zeros of a warm-up take microseconds, which would have the models computed
    # inline on the event loop, where nothing can be stopped.
    batching = {"max_batch_size": 4, "threaded": True}
    models = {"slow": {"placement": "gateway", "batching": batching},
              "slow-remote": {"placement": "deployment", "batching": batching}}
    with second_app(APP, root, models, default_timeout_s=DEFAULT_TIMEOUT_S, **front) as target:
        yield target


@pytest.fixture(scope="module")
def stub(target):
    with grpc.insecure_channel(target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def _report(model: str) -> dict:
    """The backend's live report: the gateway's own for ``slow``, the replica's for ``slow-remote``."""
    return gateway_status(APP)["models"][model] if model == "slow" else replica_info(APP, model)


def _gained(before: dict, after: dict) -> dict:
    return {"queued": after["deadline_exceeded"]["queued"] - before["deadline_exceeded"]["queued"],
            "computing": after["deadline_exceeded"]["computing"] - before["deadline_exceeded"]["computing"],
            "terminated_runs": after["terminated_runs"] - before["terminated_runs"]}


def _answers_promptly(stub, model: str) -> None:
    """The session is free: a small request is computed at once (the long run before it stopped)."""
    code, response = outcome(lambda: stub.ModelInfer(infer_request(model, [5.0, 7.0]), timeout=5))
    assert code == Code.OK, response
    np.testing.assert_array_equal(output(response).ravel(), [12.0, 14.0])  # x + max(x)


@pytest.mark.parametrize("model", ["slow", "slow-remote"])
def test_a_computing_request_is_stopped_at_its_deadline(stub, model):
    before = _report(model)
    started = time.monotonic()
    code, error = outcome(lambda: stub.ModelInfer(infer_request(model, [LONG]), timeout=1.5))
    assert code == Code.DEADLINE_EXCEEDED, error
    assert time.monotonic() - started < 10  # answered at its deadline, not when its run would end
    gained = wait_for(lambda: (g := _gained(before, _report(model)))["terminated_runs"] >= 1 and g,
                      timeout=20, what=f"{model}: the run stopped")
    assert gained == {"queued": 0, "computing": 1, "terminated_runs": 1}
    _answers_promptly(stub, model)
    after = _report(model)
    assert after["batched_requests"] == before["batched_requests"] + 1  # only the prompt one ran to the end
    assert after["in_flight"] == 0


@pytest.mark.parametrize("model", ["slow", "slow-remote"])
def test_a_queued_request_is_never_computed(stub, model):
    """The queued one is dropped when its deadline passes, while the long one computes; the long
    one then stops at its own deadline: neither ever ran to the end."""
    before = _report(model)
    long = stub.ModelInfer.future(infer_request(model, [LONG]), timeout=3.5)
    wait_for(lambda: _report(model)["in_flight"] == 1, timeout=2, what="the long request computes")
    code, error = outcome(lambda: stub.ModelInfer(infer_request(model, [1.0]), timeout=1.0))
    assert code == Code.DEADLINE_EXCEEDED, error
    assert outcome(long.result)[0] == Code.DEADLINE_EXCEEDED
    gained = wait_for(lambda: (g := _gained(before, _report(model)))["terminated_runs"] >= 1 and g,
                      timeout=20, what=f"{model}: the run stopped")
    assert gained == {"queued": 1, "computing": 1, "terminated_runs": 1}
    after = _report(model)
    assert after["batched_requests"] == before["batched_requests"]
    assert after["in_flight"] == 0
    _answers_promptly(stub, model)


def test_a_request_without_a_deadline_gets_the_default_timeout(stub):
    """No deadline from the client: the server ends the call at ``default_timeout_s`` itself."""
    before = _report("slow")
    started = time.monotonic()
    code, error = outcome(lambda: stub.ModelInfer(infer_request("slow", [LONG])))  # no timeout
    elapsed = time.monotonic() - started
    assert code == Code.DEADLINE_EXCEEDED and "deadline" in error.details(), error
    assert DEFAULT_TIMEOUT_S <= elapsed < DEFAULT_TIMEOUT_S + 5, elapsed
    gained = wait_for(lambda: (g := _gained(before, _report("slow")))["terminated_runs"] >= 1 and g,
                      timeout=20, what="the run stopped")
    assert gained == {"queued": 0, "computing": 1, "terminated_runs": 1}


def _idle(report, quiet_s: float = 1.5):
    """A condition: ``report()`` once no job is in flight and its step count has not moved for
    ``quiet_s`` (a job still running adds steps)."""
    since = {"steps": None, "at": 0.0}

    def condition():
        now = report()
        if now["in_flight"] != 0 or now["batched_requests"] != since["steps"]:
            since.update(steps=now["batched_requests"], at=time.monotonic())
            return None
        return now if time.monotonic() - since["at"] >= quiet_s else None

    return condition


def _diffusion() -> dict:
    return replica_info("deepserve", "digit-diffusion")  # the session app's generator deployment


@pytest.mark.parametrize("stream", [False, True], ids=["Generate", "GenerateStream"])
def test_a_generation_is_dropped_at_its_deadline(server, stream):
    """A 1,000-step generation with a one-second deadline: its job leaves the step batcher
    (no job in flight, the step count stops moving far short of 1,000) and is counted."""
    before = _diffusion()
    # 64 images take ~25 ms a step here: 1,000 steps are ~25 s of work.
    request = DeepServeClient.generate_request(label=3, count=64, seed=5, steps=1000, sampler="ddpm")
    with DeepServeClient(server) as client:
        if stream:
            code, error = outcome(lambda: list(client.generator.GenerateStream(request, timeout=1.0)))
        else:
            code, error = outcome(lambda: client.generator.Generate(request, timeout=1.0))
    assert code == Code.DEADLINE_EXCEEDED, error

    after = wait_for(_idle(_diffusion), timeout=30, what="the diffusion replica idle")
    dropped = {stage: after["deadline_exceeded"][stage] - before["deadline_exceeded"][stage]
               for stage in ("queued", "computing")}
    assert dropped == {"queued": 0, "computing": 1}, dropped
    assert 0 < after["batched_requests"] - before["batched_requests"] < 500  # steps it took: not 1,000


def test_drops_reach_prometheus(target):
    """``ray_deepserve_deadline_exceeded_total`` on the metrics endpoint agrees with the reports:
    the series of this application's process (its Ray ``WorkerId``), not those an earlier
    application of the same models left there."""
    for model in ("slow", "slow-remote"):
        report = _report(model)
        worker = gateway_status(APP)["worker_id"] if model == "slow" else report["worker_id"]
        for stage, count in report["deadline_exceeded"].items():
            wait_for(lambda: scraped("ray_deepserve_deadline_exceeded_total", model=model, stage=stage,
                                     WorkerId=worker) == count,
                     timeout=30, what=f"{model} {stage}: {count} on the metrics endpoint", every=0.5)
        wait_for(lambda: scraped("ray_deepserve_terminated_runs_total", model=model, WorkerId=worker)
                 == report["terminated_runs"], timeout=30, what=f"{model}: terminated runs on the metrics endpoint",
                 every=0.5)
