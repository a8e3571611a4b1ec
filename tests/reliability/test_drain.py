"""A gateway that Serve stops (here: its application deleted mid-generation; scale-down and
redeploys stop replicas the same way) drains: it stops taking calls at once (health
NOT_SERVING, new calls UNAVAILABLE) and lets the calls in flight finish, for up to
``drain_grace_s``, which defaults to ``default_timeout_s``, the longest a request may last.
Serve is told to wait that long for the gateway and for the model replicas.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from ray import serve

from conftest import free_port, nginx_or_skip
from deepserve.app import STOP_MARGIN_S
from deepserve.client import DeepServeClient
from deepserve.proto import deepserve_pb2_grpc as v1_grpc
from deepserve.proto import inference_pb2 as oip
from deepserve.proto import inference_pb2_grpc as oip_grpc
from second_app import NOT_SERVING, SERVING, health, outcome, replica_info, second_app, wait_for

pytestmark = pytest.mark.timeout(240)

APP = "deepserve-drain"
MODEL = "digit-diffusion"
DEFAULT_TIMEOUT_S = 60.0  # so the drain, unset, lasts up to a minute
Code = grpc.StatusCode


@pytest.fixture(scope="module", params=["grpc", "front"])
def drain_app(request, server, repository):
    """Without and with the admission front: behind it, the workers drain the same way and the
    front carries the answers of the calls in flight, then closes the port."""
    front = request.param == "front"
    if front:
        nginx_or_skip()
    health_port = free_port()
    models = {MODEL: {"placement": "deployment", "batching": {"max_batch_size": 256}}}
    with second_app(APP, repository.root, models, default_timeout_s=DEFAULT_TIMEOUT_S,
                    health_port=health_port, admission_front=front) as target:
        yield target, f"127.0.0.1:{health_port}"


def test_serve_waits_as_long_as_a_request_may_last(drain_app):
    from ray.serve.context import _get_global_client

    deployments = _get_global_client().get_serve_details()["applications"][APP]["deployments"]
    for name in ("Gateway", MODEL):
        config = deployments[name]["deployment_config"]
        assert config["graceful_shutdown_timeout_s"] == DEFAULT_TIMEOUT_S + STOP_MARGIN_S, name


def test_deleting_the_app_lets_a_generation_in_flight_finish_and_refuses_new_calls(drain_app, figures):
    target, health_target = drain_app
    assert health(health_target) == SERVING
    # 64 images take ~25 ms a step here: 300 steps are several seconds of work.
    request = DeepServeClient.generate_request(label=7, count=64, seed=9, steps=300, sampler="ddpm")
    with grpc.insecure_channel(target) as channel:
        call = v1_grpc.GeneratorStub(channel).Generate.future(request, timeout=DEFAULT_TIMEOUT_S)
        wait_for(lambda: replica_info(APP, MODEL)["in_flight"] == 1, timeout=30, what="the generation running")
        deleting = threading.Thread(target=serve.delete, args=(APP,))
        started = time.monotonic()
        deleting.start()

        # The gateway stops taking calls: health says NOT_SERVING on the health port (which stays
        # up while the main port drains), and a new call is refused.
        wait_for(lambda: health(health_target) == NOT_SERVING, timeout=30, what="health NOT_SERVING")
        unhealthy_s = time.monotonic() - started

        def refused():
            with grpc.insecure_channel(target) as fresh:
                stub = oip_grpc.GRPCInferenceServiceStub(fresh)
                return outcome(lambda: stub.ServerLive(oip.ServerLiveRequest(), timeout=2))[0] == Code.UNAVAILABLE

        wait_for(refused, timeout=30, what="new calls refused")
        refused_s = time.monotonic() - started
        assert not call.done(), "the generation ended before the gateway stopped taking calls"

        response = call.result(timeout=DEFAULT_TIMEOUT_S)  # the call in flight finishes: OK
        finished_s = time.monotonic() - started
        assert len(response.images) == 64 and response.steps == 300
    deleting.join(timeout=90)
    assert not deleting.is_alive()
    assert APP not in serve.status().applications
    figures["drain: health NOT_SERVING after (s)"] = round(unhealthy_s, 1)
    figures["drain: new calls refused after (s)"] = round(refused_s, 1)
    figures["drain: call in flight finished OK after (s)"] = round(finished_s, 1)
