"""The admission front (nginx, ``admission_front``; services/gateway/front.py) in front of a
gateway's workers, in its own application: both APIs and a generation stream pass through
it; a burst beyond its bound is refused with RESOURCE_EXHAUSTED and the retry hint, and the
refusals are counted in Prometheus; a message over the limit is RESOURCE_EXHAUSTED (not
nginx's HTTP 413); health has no bound and its own port; a killed front is restarted; a
killed replica takes its front with it.

TLS and tokens behind the front: tests/security/test_gateway_security.py runs every test
against a fronted gateway too. Overload: tests/reliability/test_overload.py.
"""

from __future__ import annotations

import os
import signal
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import free_port, nginx_or_skip
from deepserve.client import DeepServeClient
from deepserve.proto import deepserve_pb2 as v1
from deepserve.proto import deepserve_pb2_grpc as v1_grpc
from deepserve.proto import inference_pb2 as oip
from deepserve.proto import inference_pb2_grpc as oip_grpc
from second_app import gateway_status, health, replica_actors, samples, second_app, wait_for

pytestmark = pytest.mark.timeout(180)

APP = "deepserve-front"
MODELS = {
    "fraud-autoencoder": {"placement": "gateway"},
    "digit-diffusion": {"placement": "gateway"},
}
MAX_MESSAGE = 64 * 1024
ROW = [0.0] * 30
Code = grpc.StatusCode
NO_RETRIES = [("grpc.enable_retries", 0)]


@pytest.fixture(scope="module")
def front(server, repository):
    """(target, health target): one call in flight per worker and method group, so that a small
    burst goes beyond it; a 64 KiB message limit; health on a port of its own too."""
    nginx_or_skip()
    health_port = free_port()
    with second_app(APP, repository.root, MODELS, admission_front=True, front_in_flight=1,
                    max_message_bytes=MAX_MESSAGE, health_port=health_port) as target:
        yield target, f"127.0.0.1:{health_port}"


def _infer(channel, rows: int) -> oip.ModelInferRequest:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    tensor = oip.ModelInferRequest.InferInputTensor(name="transactions", datatype="FP32", shape=[rows, 30])
    request = oip.ModelInferRequest(model_name="fraud-autoencoder", inputs=[tensor],
                                    raw_input_contents=[np.zeros((rows, 30), np.float32).tobytes()])
    return stub.ModelInfer(request, timeout=10)


def test_both_apis_and_a_generation_stream_pass_through_the_front(front):
    target, _ = front
    with DeepServeClient(target) as client:
        assert len(client.score([ROW, ROW]).results) == 2
        events = list(client.generate_stream(label=6, count=1, seed=5, steps=8, preview_every=4,
                                             model="digit-diffusion"))
        assert [e.WhichOneof("event") for e in events] == ["progress"] * 8 + ["result"]
        assert [len(e.progress.previews) for e in events[:-1]] == [0, 0, 0, 1] * 2
        assert events[-1].result.images[0].png.startswith(b"\x89PNG")
        with grpc.insecure_channel(target) as channel:
            response = _infer(channel, 3)
            assert list(response.outputs[0].shape) == [3]
    status = gateway_status(APP)
    assert status["front"]["alive"] and status["front"]["in_flight_bound"] == len(status["workers"])


def test_a_burst_beyond_the_bound_is_refused_with_the_hint_and_counted(front):
    target, _ = front
    before = sum(samples("ray_deepserve_front_refused_total", method="Score"))
    codes: list[Code] = []
    hints: list[str] = []
    start = threading.Barrier(24)

    def one() -> None:
        with grpc.insecure_channel(target, options=NO_RETRIES) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)  # connected: the calls start together
            start.wait()
            try:
                v1_grpc.FraudScoringStub(channel).Score(  # 256 rows: about 32 KiB, within the limit
                    v1.ScoreRequest(transactions=[v1.Transaction(features=ROW)] * 256), timeout=10)
                codes.append(Code.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                hints.extend(v for k, v in exc.trailing_metadata() or () if k == "grpc-retry-pushback-ms")

    threads = [threading.Thread(target=one) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = codes.count(Code.RESOURCE_EXHAUSTED)
    assert set(codes) == {Code.OK, Code.RESOURCE_EXHAUSTED}, codes
    assert len(hints) == refused and set(hints) == {"50"}
    # Counted by the replica from the front's refusal log, exported through Ray.
    wait_for(lambda: sum(samples("ray_deepserve_front_refused_total", method="Score")) >= before + refused,
             timeout=30, what="the front's refusals in Prometheus")


def test_a_message_over_the_limit_is_resource_exhausted(front):
    target, _ = front
    with grpc.insecure_channel(target, options=NO_RETRIES) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            _infer(channel, 1024)  # 120 KiB of rows: over the 64 KiB limit
        assert refused.value.code() == Code.RESOURCE_EXHAUSTED
        assert "max_message_bytes" in refused.value.details()
        assert list(_infer(channel, 1).outputs[0].shape) == [1]


def test_health_is_served_on_both_ports_and_only_health_on_the_health_port(front):
    target, health_target = front
    assert health(target) == health_pb2.HealthCheckResponse.SERVING
    assert health(health_target, "fraud-autoencoder") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(health_target) as channel:
        with pytest.raises(grpc.RpcError) as other:
            _infer(channel, 1)
        assert other.value.code() == Code.UNIMPLEMENTED


def test_a_killed_front_is_restarted_and_serves_again(front):
    target, _ = front
    status = gateway_status(APP)["front"]
    os.kill(status["pid"], signal.SIGKILL)
    wait_for(lambda: gateway_status(APP)["front"]["restarts"] == status["restarts"] + 1, timeout=30,
             what="the front restarted")
    wait_for(lambda: _serves(target), timeout=30, what="a score through the restarted front")
    with grpc.insecure_channel(target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_the_front_dies_with_its_replica_and_the_new_replica_serves(front):
    """Runs last (file order). A gateway replica killed outright (SIGKILL: no drain) takes its
    front with it (the kernel's parent-death signal), so the port is free for the replica
    Serve starts in its place, whose own front serves."""
    import ray

    target, _ = front
    old = gateway_status(APP)["front"]["pid"]
    (name, namespace), = replica_actors(APP, "Gateway")
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    wait_for(lambda: not _alive(old), timeout=30, what="the old front gone with its replica")
    wait_for(lambda: _serves(target), timeout=120, what="a score through the new replica's front", every=0.5)
    assert gateway_status(APP)["front"]["pid"] != old


def _serves(target: str) -> bool:
    """A fresh connection without retries gets a fraud score."""
    with grpc.insecure_channel(target, options=NO_RETRIES) as channel:
        try:
            return len(_infer(channel, 1).outputs) > 0
        except grpc.RpcError:
            return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split()[2] == "Z"  # a zombie is gone too
