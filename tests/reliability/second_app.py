"""What the reliability tests share: a second Serve application (its own gateway, on its own
port, in the session's Ray cluster), Open Inference Protocol calls that return their outcome,
the server-side figures (the gateway's status, a replica's report, the Prometheus endpoint),
and waiting for a condition with a deadline instead of sleeping."""

from __future__ import annotations

import contextlib
import re
import time
import urllib.request
from typing import Any, Callable

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import METRICS_PORT, free_port
from deepserve.proto import inference_pb2 as oip

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@contextlib.contextmanager
def second_app(name: str, repository, models: dict[str, Any], deployments: list[dict[str, Any]] = (),
               **settings):
    """Serve application ``name`` with ``models`` from ``repository``; yields its gRPC target
    once every model is ready, and deletes the application afterwards.

    Its gateway runs without the gateway resource (the session's app holds it) on 0.1 CPU;
    the event-loop lag bound is off (two cores run the tests too; overload has its own tests).
    """
    from ray import serve

    from deepserve.app import build_app
    from deepserve.client import DeepServeClient

    port = free_port()
    args = {"repository": str(repository), "models": models, "grpc_port": port, "grpc_host": "127.0.0.1",
            "readiness_poll_s": 0.5, "max_loop_lag_s": 0, **settings}
    gateway = {"name": "Gateway", "ray_actor_options": {"num_cpus": 0.1}}
    serve.run(build_app(args, [gateway, *deployments]), name=name, route_prefix=None)
    target = f"127.0.0.1:{port}"
    try:
        with DeepServeClient(target) as client:
            client.wait_ready(timeout=120)
        yield target
    finally:
        serve.delete(name)


def infer_request(model: str, x, width: int = 1) -> oip.ModelInferRequest:
    """A ModelInfer request of the test models (:mod:`faulty_models`): input ``x``, FP32."""
    array = np.asarray(x, np.float32).reshape(-1, width)
    request = oip.ModelInferRequest(model_name=model, raw_input_contents=[array.tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=list(array.shape))
    return request


def outcome(call: Callable[[], Any]) -> tuple[grpc.StatusCode, Any]:
    """``(OK, response)``, or ``(code, the RpcError)``."""
    try:
        return grpc.StatusCode.OK, call()
    except grpc.RpcError as error:
        return error.code(), error


def output(response: oip.ModelInferResponse, name: str = "y") -> np.ndarray:
    index = [o.name for o in response.outputs].index(name)
    shape = list(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], np.float32).reshape(shape)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.1):
    """Poll ``condition`` until it returns something true (returned), for up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s (last: {value!r})"
        time.sleep(every)


def health(target: str, service: str = "") -> int | None:
    """grpc.health.v1's answer for ``service`` (NOT_SERVING, SERVING), None if no answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            return None


def gateway_status(app: str) -> dict[str, Any]:
    """The gateway's status(): live figures of the models it computes itself."""
    from ray import serve

    return serve.get_app_handle(app).status.remote().result(timeout_s=30)


def replica_info(app: str, deployment: str) -> dict[str, Any]:
    """One replica's report (any one: the tests' deployments have one replica)."""
    from ray import serve

    return serve.get_deployment_handle(deployment, app).info.remote().result(timeout_s=30)


_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>.*)\} (?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scraped(metric: str, **labels: str) -> float:
    """The sum of ``metric``'s series on the cluster's Prometheus endpoint whose labels include
    ``labels`` (Ray adds per-process labels: summing over them is what a query would do)."""
    return sum(samples(metric, **labels))


def samples(metric: str, **labels: str) -> list[float]:
    """The values of ``metric``'s series whose labels include ``labels`` ([] when none is exported)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] == metric:
            series = dict(_LABEL.findall(match["labels"]))
            if all(series.get(k) == v for k, v in labels.items()):
                found.append(float(match["value"]))
    return found


def replica_actors(app: str, deployment: str) -> set[tuple[str, str]]:
    """The live replica actors of a deployment, as ``(name, namespace)``: Serve names each
    ``SERVE_REPLICA::<app>#<deployment>#<id>``, and a replacement gets a new id."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}
