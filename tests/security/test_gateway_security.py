"""A gateway with TLS and bearer tokens, served by the real Ray Serve (a second application in
the session's cluster): TLS, tokens, groups, open health checks, reflection off, Triton's
client and the CLI over TLS, no secrets in the logs, and the refusal of a held port.

The certificates and tokens are made here, at test time (tests/security/pki.py).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import free_port, nginx_or_skip
from deepserve.client import DeepServeClient, open_channel
from deepserve.proto import deepserve_pb2 as v1
from deepserve.proto import deepserve_pb2_grpc as v1_grpc
from deepserve.proto import inference_pb2 as oip
from pki import make_material

pytestmark = pytest.mark.timeout(60)

APP = "deepserve-secure"
MODEL = "fraud-autoencoder"
ROW = [0.0] * 30
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_material(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", params=["grpc", "front"])
def secure(request, server, repository, material):
    """The gateway's target: TLS (no client certificate asked) and bearer tokens, one model in
    the gateway. Its settings travel in the app's args, as `deepserve serve` sends them. Every
    test runs twice: with the workers' gRPC server on the port, and behind the admission front
    (nginx terminates TLS; the workers check the tokens)."""
    from ray import serve

    from deepserve.app import build_app

    front = request.param == "front"
    if front:
        nginx_or_skip()
    port = free_port()
    app = build_app({
        "repository": str(repository.root), "models": {MODEL: {"placement": "gateway"}},
        "grpc_port": port, "grpc_host": "127.0.0.1", "readiness_poll_s": 0.5,
        "tls_cert_file": str(material.server_cert), "tls_key_file": str(material.server_key),
        "auth_tokens_file": str(material.tokens), "admission_front": front,
    }, [{"name": "Gateway", "ray_actor_options": {"num_cpus": 0.1}}])  # no gateway resource: the main app holds it
    serve.run(app, name=APP, route_prefix=None)
    target = f"127.0.0.1:{port}"
    try:
        with DeepServeClient(target, tls_ca=material.ca, token=material.admin_token) as client:
            client.wait_ready(timeout=60)
        yield target
    finally:
        serve.delete(APP)


def _code(call, *args, **kwargs) -> Code:
    try:
        call(*args, timeout=5, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return Code.OK


def _score(client: DeepServeClient) -> Code:
    return _code(client.fraud.Score, v1.ScoreRequest(transactions=[v1.Transaction(features=ROW)]))


def _infer_request() -> oip.ModelInferRequest:
    tensor = oip.ModelInferRequest.InferInputTensor(name="transactions", datatype="FP32", shape=[1, 30])
    return oip.ModelInferRequest(model_name=MODEL, inputs=[tensor],
                                 raw_input_contents=[np.zeros((1, 30), np.float32).tobytes()])


# ---------------------------------------------------------------------------- TLS


def test_tls_with_the_ca_works_and_without_it_fails(secure, material):
    with DeepServeClient(secure, tls_ca=material.ca, token=material.inference_token) as client:
        response = client.score([ROW])
        assert response.model == MODEL and len(response.results) == 1
    # The server's certificate is not trusted without its CA (system CAs, another CA), and a
    # plaintext client gets no answer at all.
    for options in ({"tls": True}, {"tls_ca": material.rogue_cert}, {}):
        with DeepServeClient(secure, token=material.inference_token, **options) as client:
            assert _score(client) == Code.UNAVAILABLE, options


# ---------------------------------------------------------------------------- tokens and groups


def test_a_call_without_a_valid_token_is_unauthenticated(secure, material, request):
    front = request.node.callspec.params["secure"] == "front"
    with DeepServeClient(secure, tls_ca=material.ca) as client:  # no token
        with pytest.raises(grpc.RpcError) as refused:
            client.score([ROW])
        assert refused.value.code() == Code.UNAUTHENTICATED
        assert "bearer token is required" in refused.value.details()
        assert _code(client.inference.ServerReady, oip.ServerReadyRequest()) == Code.UNAUTHENTICATED
    wrong = material.inference_token[:-1] + ("0" if material.inference_token[-1] != "0" else "1")
    with DeepServeClient(secure, tls_ca=material.ca, token=wrong) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.score([ROW])
        assert refused.value.code() == Code.UNAUTHENTICATED and refused.value.details() == "invalid bearer token"
    # Another scheme, or the token twice, is not a bearer token.
    with open_channel(secure, tls_ca=material.ca) as channel:
        stub = v1_grpc.FraudScoringStub(channel)
        request = v1.ScoreRequest(transactions=[v1.Transaction(features=ROW)])
        basic = (("authorization", f"Basic {material.inference_token}"),)
        twice = (("authorization", f"Bearer {material.inference_token}"),) * 2
        assert _code(stub.Score, request, metadata=basic) == Code.UNAUTHENTICATED
        # The front (nginx) refuses a repeated authorization header itself, as a malformed request.
        assert _code(stub.Score, request, metadata=twice) == (Code.INVALID_ARGUMENT if front else Code.UNAUTHENTICATED)
        lower = (("authorization", f"bearer {material.inference_token}"),)
        assert _code(stub.Score, request, metadata=lower) == Code.OK


def test_each_group_reaches_only_its_rpcs(secure, material):
    """inference: model calls; metadata: server and model metadata; models: ListModels."""
    calls = {
        "ModelInfer": lambda c: _code(c.inference.ModelInfer, _infer_request()),
        "Score": _score,
        "ModelMetadata": lambda c: _code(c.inference.ModelMetadata, oip.ModelMetadataRequest(name=MODEL)),
        "ServerReady": lambda c: _code(c.inference.ServerReady, oip.ServerReadyRequest()),
        "ModelStatistics": lambda c: _code(c.inference.ModelStatistics, oip.ModelStatisticsRequest(name=MODEL)),
        "ListModels": lambda c: _code(c.models.ListModels, v1.ListModelsRequest()),
    }
    expected = {
        material.inference_token: {"ModelInfer", "Score"},
        material.metadata_token: {"ModelMetadata", "ServerReady", "ModelStatistics"},
        material.admin_token: set(calls),
    }
    for token, allowed in expected.items():
        with DeepServeClient(secure, tls_ca=material.ca, token=token) as client:
            codes = {name: call(client) for name, call in calls.items()}
        assert codes == {name: Code.OK if name in allowed else Code.PERMISSION_DENIED for name in calls}, codes


def test_a_refused_stream_is_refused_before_it_runs(secure, material):
    """GenerateStream (server streaming): the metadata group is refused; the inference group
    passes the check and reaches the dataplane (this app serves no generator: NOT_FOUND)."""
    request = DeepServeClient.generate_request(model="digit-diffusion", steps=2)
    for token, code in ((material.metadata_token, Code.PERMISSION_DENIED), (material.inference_token, Code.NOT_FOUND)):
        with DeepServeClient(secure, tls_ca=material.ca, token=token) as client:
            with pytest.raises(grpc.RpcError) as refused:
                list(client.generator.GenerateStream(request, timeout=5))
            assert refused.value.code() == code


# ---------------------------------------------------------------------------- health, reflection


def test_health_needs_no_token(secure, material):
    with open_channel(secure, tls_ca=material.ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", MODEL):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_is_off_by_default(secure, material):
    with open_channel(secure, tls_ca=material.ca, token=material.admin_token) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as off:
            next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        assert off.value.code() == Code.UNIMPLEMENTED


# ---------------------------------------------------------------------------- clients


def test_tritonclient_over_tls_with_a_token(secure, material):
    headers = {"authorization": f"Bearer {material.inference_token}"}
    x = triton.InferInput("transactions", [1, 30], "FP32")
    x.set_data_from_numpy(np.zeros((1, 30), np.float32))
    with triton.InferenceServerClient(secure, ssl=True, root_certificates=str(material.ca)) as client:
        result = client.infer(MODEL, [x], headers=headers)
        assert result.as_numpy("score").shape == (1,)
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL, [x])
        assert "UNAUTHENTICATED" in refused.value.status()
        assert client.is_server_ready(headers={"authorization": f"Bearer {material.metadata_token}"})


def test_cli_scores_over_tls_with_a_token(secure, material, repository, tmp_path):
    names = repository.get(MODEL).manifest.extra["feature_names"]
    csv = tmp_path / "transactions.csv"
    csv.write_text(",".join(names) + "\n" + "\n".join(",".join(["0.5"] * len(names)) for _ in range(3)) + "\n")
    command = [sys.executable, "-m", "deepserve.cli", "score", str(csv), "--target", secure, "--tls-ca", str(material.ca)]
    env = {**os.environ, "DEEPSERVE_TOKEN": material.inference_token}
    done = subprocess.run(command, capture_output=True, text=True, timeout=45, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"{MODEL} v1: 3 transaction(s)")
    env.pop("DEEPSERVE_TOKEN")
    done = subprocess.run([*command, "--token", material.metadata_token], capture_output=True, text=True,
                          timeout=45, env=env)
    assert done.returncode == 1 and "PERMISSION_DENIED" in done.stderr, done.stderr[-2000:]


# ---------------------------------------------------------------------------- logs, port


def _log_files() -> list[Path]:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return [p for p in logs.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]


def test_refusals_are_logged_without_the_token(secure, material, request):
    """The gateway logs a refusal (method, peer, outcome) and no token ever reaches a log."""
    # The peer: the client's address, or behind the front, the worker's socket the front called.
    peer = "unix:" if request.node.callspec.params["secure"] == "front" else "ipv4:127.0.0.1:"
    wrong = "x" * 40 + material.admin_token[:8]  # distinct from every real token
    with DeepServeClient(secure, tls_ca=material.ca, token=wrong) as client:
        deadline = time.monotonic() + 20
        while True:  # refusals are logged at most once a second: call until one is
            assert _score(client) == Code.UNAUTHENTICATED
            # deepserve's loggers write to the replica worker's stderr (the main app's gateway
            # has no tokens: every refusal line is the secure gateway's).
            text = "".join(p.read_text(errors="replace") for p in _log_files() if p.suffix == ".err")
            if f"refused /deepserve.v1.FraudScoring/Score from {peer}" in text:
                break
            assert time.monotonic() < deadline, "no refusal in the secure gateway's log"
            time.sleep(0.2)
    for path in _log_files():
        text = path.read_text(errors="replace")
        for token in (wrong, material.inference_token, material.metadata_token, material.admin_token):
            assert token not in text, f"a token in {path}"


def test_a_second_server_on_a_held_port_is_refused(secure, material):
    """Only the gateway's own workers share its port: a plain server fails to bind it, and a
    second gateway (whose workers would bind with SO_REUSEPORT) fails its replica's check
    first; both with a message naming the port, and the gateway keeps serving."""
    from deepserve.gateway.replica import claim_port
    from deepserve.grpc_server import GrpcServer

    port = int(secure.rsplit(":", 1)[1])
    stub_dataplane = SimpleNamespace(models={}, ready=lambda: True)

    async def second_server():
        return GrpcServer(stub_dataplane, "127.0.0.1", port, 1 << 20, "intruder")

    with pytest.raises(RuntimeError, match=f"cannot listen on gRPC port {port} .*another process holds it"):
        asyncio.run(second_server())
    with pytest.raises(RuntimeError, match=f"cannot listen on gRPC port {port} .*another process holds it"):
        claim_port("127.0.0.1", port, "grpc_port")
    with open_channel(secure, tls_ca=material.ca) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
