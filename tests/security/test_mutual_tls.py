"""Mutual TLS on the real gRPC server class (:class:`~deepserve.grpc_server.GrpcServer`, built
from Settings as the gateway builds it), in this process: a client needs a certificate signed
by the configured CA; tokens still apply on top of it.

The gateway under Ray Serve with TLS and tokens: test_gateway_security.py. The handshake is
the same code; here no model is needed, so the server runs over a stub dataplane.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deepserve.client import open_channel
from deepserve.grpc_server import GrpcServer
from deepserve.proto import inference_pb2 as oip
from deepserve.proto import inference_pb2_grpc as oip_grpc
from deepserve.security import ServerSecurity
from deepserve.settings import Settings
from pki import make_material

pytestmark = pytest.mark.timeout(30)

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_material(tmp_path_factory.mktemp("pki"))


@contextlib.contextmanager
def serving(settings: Settings):
    """A GrpcServer with the settings' security on a free port, on an event loop of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dataplane = SimpleNamespace(models={}, live=lambda: True, ready=lambda: True, labels=lambda name: ("", ""))

    async def start() -> GrpcServer:
        server = GrpcServer(dataplane, "127.0.0.1", 0, 1 << 20, "test-node",  # as the gateway builds it
                            security=ServerSecurity.from_settings(settings), reflection=settings.reflection,
                            health_port=settings.health_port)
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _health(target: str, **tls) -> grpc.StatusCode | int:
    with open_channel(target, **tls) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError as exc:
            return exc.code()


@pytest.fixture(scope="module")
def mtls_server(material):
    settings = Settings(tls_cert_file=str(material.server_cert), tls_key_file=str(material.server_key),
                        tls_client_ca_file=str(material.ca), auth_tokens_file=str(material.tokens), health_port=0)
    with serving(settings) as server:
        yield server


@pytest.fixture(scope="module")
def mtls(mtls_server):
    return f"localhost:{mtls_server.port}"


def test_mtls_accepts_a_client_certificate_signed_by_the_ca(mtls, material):
    assert _health(mtls, tls_ca=material.ca, tls_cert=material.client_cert, tls_key=material.client_key) == SERVING


def test_mtls_refuses_a_client_without_a_certificate_or_with_another_cas(mtls, material):
    assert _health(mtls, tls_ca=material.ca) == grpc.StatusCode.UNAVAILABLE
    assert _health(mtls, tls_ca=material.ca, tls_cert=material.rogue_cert,
                   tls_key=material.rogue_key) == grpc.StatusCode.UNAVAILABLE


def test_tokens_apply_on_top_of_mtls(mtls, material):
    tls = dict(tls_ca=material.ca, tls_cert=material.client_cert, tls_key=material.client_key)
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), (material.inference_token, grpc.StatusCode.PERMISSION_DENIED)):
        with open_channel(mtls, token=token, **tls) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest(), timeout=5)
            assert refused.value.code() == code
    with open_channel(mtls, token=material.metadata_token, **tls) as channel:
        assert oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest(), timeout=5).live


def test_tls_without_a_client_ca_asks_for_no_client_certificate(material):
    settings = Settings(tls_cert_file=str(material.server_cert), tls_key_file=str(material.server_key))
    with serving(settings) as server:
        target = f"localhost:{server.port}"
        assert _health(target, tls_ca=material.ca) == SERVING
        assert _health(target, tls=True) == grpc.StatusCode.UNAVAILABLE  # the system's CAs do not know ours
        assert _health(target) == grpc.StatusCode.UNAVAILABLE  # plaintext


def test_the_health_port_answers_probes_in_plaintext_and_serves_nothing_else(mtls_server):
    """Kubernetes' gRPC probes speak neither TLS nor tokens: `health_port` serves them health alone."""
    target = f"127.0.0.1:{mtls_server.health_port}"
    assert _health(target) == SERVING
    with open_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as absent:
            oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest(), timeout=5)
        assert absent.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ---------------------------------------------------------------------------- behind the admission front


@pytest.fixture(scope="module")
def mtls_front(server, repository, material):
    """A gateway under Serve behind the admission front, which terminates mutual TLS (nginx's
    ``ssl_verify_client``); the workers check the tokens."""
    from ray import serve

    from conftest import free_port, nginx_or_skip
    from deepserve.app import build_app

    nginx_or_skip()
    port, app_name = free_port(), "deepserve-mtls-front"
    app = build_app({
        "repository": str(repository.root), "models": {"fraud-autoencoder": {"placement": "gateway"}},
        "grpc_port": port, "grpc_host": "127.0.0.1", "readiness_poll_s": 0.5, "admission_front": True,
        "tls_cert_file": str(material.server_cert), "tls_key_file": str(material.server_key),
        "tls_client_ca_file": str(material.ca), "auth_tokens_file": str(material.tokens),
    }, [{"name": "Gateway", "ray_actor_options": {"num_cpus": 0.1}}])
    serve.run(app, name=app_name, route_prefix=None)
    target = f"127.0.0.1:{port}"
    try:
        tls = dict(tls_ca=material.ca, tls_cert=material.client_cert, tls_key=material.client_key)
        with open_channel(target, **tls) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        yield target
    finally:
        serve.delete(app_name)


@pytest.mark.timeout(120)
def test_behind_the_front_mtls_and_tokens_hold(mtls_front, material):
    tls = dict(tls_ca=material.ca, tls_cert=material.client_cert, tls_key=material.client_key)
    assert _health(mtls_front, **tls) == SERVING
    with open_channel(mtls_front, token=material.metadata_token, **tls) as channel:
        assert oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest(), timeout=5).live
    with open_channel(mtls_front, token=material.inference_token, **tls) as channel:  # not its group
        with pytest.raises(grpc.RpcError) as refused:
            oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # nginx completes the handshake and refuses the call: without a certificate, or with one of
    # another CA, the client is not authenticated (without the front: the handshake fails).
    assert _health(mtls_front, tls_ca=material.ca) == grpc.StatusCode.UNAUTHENTICATED
    assert _health(mtls_front, tls_ca=material.ca, tls_cert=material.rogue_cert,
                   tls_key=material.rogue_key) == grpc.StatusCode.UNAUTHENTICATED
