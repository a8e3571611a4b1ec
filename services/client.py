"""A small Python client for DeepServe's typed ``deepserve.v1`` API.

    from deepserve.client import DeepServeClient
    with DeepServeClient("127.0.0.1:9000") as client:
        client.wait_ready()
        print(client.score([[0.0] * 30]).results[0].score)

The target is any gRPC target: one gateway (``host:9000``), a Kubernetes Service, several
gateways (``ipv4:10.0.0.1:9000,10.0.0.2:9000``) or a headless Service's DNS name
(``dns:///deepserve-headless:9000``). Calls are spread over every address it resolves to
(round robin) and retried with backoff when a gateway is unavailable or overloaded
(:data:`SERVICE_CONFIG`), so losing a node costs a client only the calls that node held.

For the Open Inference Protocol, use any Triton/KServe client (``tritonclient.grpc``);
docs/deploy.md shows the same retry policy for tritonclient.

A server with TLS and tokens (docs/security.md)::

    DeepServeClient("deepserve:9000", tls_ca="ca.pem", token=os.environ["DEEPSERVE_TOKEN"])

``tls_cert``/``tls_key`` add a client certificate (mutual TLS); ``tls=True`` alone trusts the
system's CAs.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Iterable, Sequence

import grpc
import numpy as np

from deepserve.proto import deepserve_pb2 as v1
from deepserve.proto import deepserve_pb2_grpc as v1_grpc
from deepserve.proto import inference_pb2 as oip
from deepserve.proto import inference_pb2_grpc as oip_grpc


NODE_METADATA_KEY = "deepserve-node"  # trailing metadata of every answer: the node that gave it
REQUEST_KEY_HEADER = "x-request-key"  # call metadata that keeps a canary split sticky (docs/lifecycle.md)

# gRPC's service config: round robin over every address of the target, and retries of
# calls that failed without an answer (every DeepServe call is free of side effects). A retry
# goes to the next address, so a lost gateway's calls land on a live one.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{}],  # every service and method
        "retryPolicy": {
            "maxAttempts": 4,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        },
    }],
}

CHANNEL_OPTIONS = [
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    # A gateway that went away is retried within seconds, not gRPC's default of up to 2 min.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
    # Pings notice a node that vanished without closing its connections (the server allows them).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def channel_options(wait_for_ready: bool = False) -> list[tuple[str, object]]:
    """:data:`CHANNEL_OPTIONS`; with ``wait_for_ready``, the service config also makes every
    call wait for a connection, until its deadline, instead of failing at once with UNAVAILABLE
    while no gateway answers (a gateway restarting takes seconds: docs/reliability.md)."""
    if not wait_for_ready:
        return CHANNEL_OPTIONS
    config = {**SERVICE_CONFIG, "methodConfig": [{**SERVICE_CONFIG["methodConfig"][0], "waitForReady": True}]}
    return [("grpc.service_config", json.dumps(config)), *CHANNEL_OPTIONS[1:]]


PathOrPem = str | os.PathLike | bytes  # a PEM file's path, or its bytes


def _pem(value: PathOrPem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def channel_credentials(tls_ca: PathOrPem | None = None, tls_cert: PathOrPem | None = None,
                        tls_key: PathOrPem | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: the CA that signed the server's certificate (None: the system's CAs),
    and for mutual TLS the client's certificate and key (both or neither)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together (mutual TLS): give both or neither")
    return grpc.ssl_channel_credentials(root_certificates=_pem(tls_ca), private_key=_pem(tls_key),
                                        certificate_chain=_pem(tls_cert))


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call's metadata. An interceptor rather
    than call credentials: gRPC refuses those on a plaintext channel, and a channel may be
    plaintext up to a TLS-terminating proxy or sidecar."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self.header],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


def open_channel(target: str, *, tls: bool = False, tls_ca: PathOrPem | None = None,
                 tls_cert: PathOrPem | None = None, tls_key: PathOrPem | None = None,
                 token: str | None = None, wait_for_ready: bool = False) -> grpc.Channel:
    """A channel to ``target`` with DeepServe's load balancing, retries and keepalive.

    Args:
        target: any gRPC target (``host:port``, ``ipv4:A:9000,B:9000``, ``dns:///name:9000``).
        tls: TLS, trusting the system's CAs unless ``tls_ca`` is given. Any of ``tls_ca``,
            ``tls_cert`` and ``tls_key`` implies TLS; without them the channel is plaintext.
        tls_ca: the CA that signed the server's certificate (a PEM path, or PEM bytes).
        tls_cert, tls_key: the client's certificate and key, for a server that asks for mutual TLS.
        token: a bearer token, sent with every call (``authorization: Bearer <token>``).
        wait_for_ready: calls wait for a connection until their deadline rather than fail at
            once while no gateway answers: they ride out a gateway's restart. Off by default:
            a wrong address or certificate then ends in DEADLINE_EXCEEDED, not UNAVAILABLE.
    """
    options = channel_options(wait_for_ready)
    if tls or tls_ca is not None or tls_cert is not None or tls_key is not None:
        channel = grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if token:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel


def _keyed(request_key: str | None):
    """Call metadata carrying a request key (``x-request-key``), or none."""
    return None if request_key is None else ((REQUEST_KEY_HEADER, request_key),)


class DeepServeClient:
    """The typed API's calls on one channel (:func:`open_channel`: its TLS, token and
    ``wait_for_ready`` arguments are this constructor's keyword arguments)."""

    def __init__(self, target: str = "127.0.0.1:9000", timeout: float = 10.0, *, tls: bool = False,
                 tls_ca: PathOrPem | None = None, tls_cert: PathOrPem | None = None,
                 tls_key: PathOrPem | None = None, token: str | None = None, wait_for_ready: bool = False):
        self.channel = open_channel(target, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token,
                                    wait_for_ready=wait_for_ready)
        self.timeout = timeout
        self.fraud = v1_grpc.FraudScoringStub(self.channel)
        self.classifier = v1_grpc.ClassifierStub(self.channel)
        self.models = v1_grpc.ModelsStub(self.channel)
        self.generator = v1_grpc.GeneratorStub(self.channel)
        self.recommender = v1_grpc.RecommenderStub(self.channel)
        self.inference = oip_grpc.GRPCInferenceServiceStub(self.channel)

    def __enter__(self) -> "DeepServeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server says every model is ready.

        Raises:
            TimeoutError: not ready within ``timeout`` seconds.
            grpc.RpcError: UNAUTHENTICATED or PERMISSION_DENIED (waiting would not help; the
                call needs a token of the ``metadata`` group).
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.inference.ServerReady(oip.ServerReadyRequest(), timeout=2.0).ready:
                    return
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"DeepServe not ready after {timeout:.0f} s")
            time.sleep(0.2)

    def score(
        self,
        transactions: Iterable[Sequence[float]] | Iterable[dict[str, float]],
        model: str = "",
        threshold: float | None = None,
        top_features: int | None = None,
        version: str = "",
        request_key: str | None = None,
    ) -> v1.ScoreResponse:
        """Score transactions given as rows in schema order, or as ``{column: value}`` dicts;
        ``top_features``: features explaining each score (None: the server's 3; 0: none).
        ``version`` empty: the model's route; ``request_key`` (a customer or account id, say)
        keeps a canary split sticky (docs/lifecycle.md)."""
        items = []
        for t in transactions:
            items.append(v1.Transaction(named=t) if isinstance(t, dict) else v1.Transaction(features=list(t)))
        request = v1.ScoreRequest(model=model, version=version, transactions=items)
        if threshold is not None:
            request.threshold = threshold
        if top_features is not None:
            request.top_features = top_features
        return self.fraud.Score(request, timeout=self.timeout, metadata=_keyed(request_key))

    def classify(
        self, images: Iterable[np.ndarray | bytes], top_k: int = 3, model: str = "", version: str = "",
        request_key: str | None = None,
    ) -> v1.ClassifyResponse:
        """Classify images given as [0, 1] pixel arrays or as PNG file bytes."""
        items = [
            v1.Image(png=i) if isinstance(i, bytes) else v1.Image(pixels=np.asarray(i, np.float32).ravel())
            for i in images
        ]
        return self.classifier.Classify(
            v1.ClassifyRequest(model=model, version=version, images=items, top_k=top_k), timeout=self.timeout,
            metadata=_keyed(request_key))

    @staticmethod
    def generate_request(
        model: str = "",
        label: int | None = None,
        count: int = 1,
        seed: int | None = None,
        steps: int = 0,
        guidance: float | None = None,
        sampler: str = "",
        preview_every: int = 0,
    ) -> v1.GenerateRequest:
        """A GenerateRequest; ``None`` and 0 leave an option to the model's default."""
        request = v1.GenerateRequest(model=model, count=count, steps=steps, sampler=sampler,
                                     preview_every=preview_every)
        if label is not None:
            request.label = label
        if seed is not None:
            request.seed = seed
        if guidance is not None:
            request.guidance = guidance
        return request

    def generate(self, label: int | None = None, count: int = 1, seed: int | None = None, **options) -> v1.GenerateResponse:
        """Generate ``count`` images of class ``label`` (options: model, steps, guidance, sampler)."""
        request = self.generate_request(label=label, count=count, seed=seed, **options)
        return self.generator.Generate(request, timeout=self.timeout)

    def generate_stream(self, label: int | None = None, count: int = 1, seed: int | None = None, **options):
        """The GenerateStream call: iterate it for events; ``.cancel()`` stops the request."""
        request = self.generate_request(label=label, count=count, seed=seed, **options)
        return self.generator.GenerateStream(request, timeout=self.timeout)

    def recommend(
        self,
        user: int | None = None,
        neighbors: Sequence[int] = (),
        k: int = 10,
        exclude_known: bool = True,
        model: str = "",
    ) -> v1.RecommendResponse:
        """Top-k users for a known ``user``, or for a new user from its ``neighbors``."""
        request = v1.RecommendRequest(model=model, neighbors=list(neighbors), k=k, exclude_known=exclude_known)
        if user is not None:
            request.user = user
        return self.recommender.Recommend(request, timeout=self.timeout)

    def list_models(self) -> v1.ListModelsResponse:
        return self.models.ListModels(v1.ListModelsRequest(), timeout=self.timeout)
