"""Process-level settings, from ``DEEPSERVE_*`` environment variables.

Per-model Ray knobs (replicas, batching, autoscaling, queue limits) live in the Serve
config under ``deploy/``, not here.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEEPSERVE_", protected_namespaces=())

    grpc_host: str = "0.0.0.0"
    """Address the gRPC server binds; 127.0.0.1 keeps it off the network."""

    grpc_port: int = 9000
    """Port of both gRPC APIs (Open Inference Protocol and deepserve.v1)."""

    metrics_port: int = 8080
    """Port of the Prometheus scrape endpoint."""

    model_repository: str = "model-repository"
    """The model repository: a directory, or a URI (http(s)://, s3://, ...) that replicas fetch
    into a verified local cache (see docs/model-repository.md)."""

    gateway_processes: int = Field(default=0, ge=0)
    """Worker processes a gateway replica serves gRPC with, all on ``grpc_port`` (the kernel
    spreads connections over them); each holds its own sessions of the models placed
    ``gateway``. 0: one per CPU core the replica may use (its affinity, capped by a cgroup CPU
    limit)."""

    max_rows_per_request: int = Field(default=4096, ge=1)
    """Largest batch one request may carry; beyond it: INVALID_ARGUMENT."""

    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Largest gRPC message accepted or sent (a request of 4,096 fraud rows takes 0.5 MB).
    Larger messages are refused by gRPC before any of DeepServe's code sees them."""

    max_concurrent_rpcs: int = Field(default=1024, ge=1)
    """Calls a gateway works on at once, of every kind (streams included). grpc.aio does not
    refuse calls beyond it: it stops taking new calls from gRPC's own queue until one ends
    (docs/reliability.md, "Overload", says what that means under overload)."""

    admission_front: bool = False
    """Put nginx in front of the gateway's workers (services/gateway/front.py): it holds
    ``grpc_port`` and answers a call beyond ``front_in_flight`` with RESOURCE_EXHAUSTED at once,
    which grpc.aio alone cannot do under a heavy overload (docs/reliability.md, "Overload").
    Needs the ``nginx`` executable (Debian: nginx-light)."""

    front_in_flight: int = Field(default=32, ge=1)
    """With ``admission_front``: calls each gRPC method group (OIP inference; fraud scoring,
    classification, generation, recommendation) may have in flight behind the front, per gateway
    worker process; beyond it RESOURCE_EXHAUSTED. Calls queue in the workers up to this bound, so it
    also bounds the wait of an admitted call: about front_in_flight / the rate one worker serves."""

    front_binary: str = "nginx"
    """The nginx executable for ``admission_front`` (a name on PATH or /usr/sbin, or a path)."""

    max_rows_in_flight: int = Field(default=65536, ge=1)
    """Rows (transactions, images, users) of all requests a gateway holds at once; beyond
    it RESOURCE_EXHAUSTED."""

    max_loop_lag_s: float = Field(default=0.02, ge=0)
    """While the gateway's event loop runs calls this late, new inference calls are refused
    with RESOURCE_EXHAUSTED (the backlog of an overloaded inline model); 0: never."""

    max_image_side: int = Field(default=0, ge=0)
    """Largest width or height of a PNG sent to a model that takes images, checked from its
    header before it is decoded; 0: eight times the model's own input side."""

    default_timeout_s: float = Field(default=30.0, gt=0)
    """Deadline for requests that come without one, and the longest any request gets: a
    client's longer deadline is cut to this (so a drain of ``drain_grace_s`` ends them all)."""

    readiness_poll_s: float = Field(default=1.0, gt=0)
    """How often the gateway checks that each model's replicas answer."""

    repository_poll_s: float = Field(default=5.0, ge=0)
    """How often every serving process looks at the repository for new versions and route
    changes (``deepserve rollout``); 0: never, the versions at deploy time stay (docs/lifecycle.md)."""

    shadow_in_flight: int = Field(default=16, ge=0)
    """Shadow requests (mirrored to a candidate version) in flight per gateway worker; beyond
    it, or while the server is busy, mirroring is shed first (docs/lifecycle.md)."""

    probe_timeout_s: float = Field(default=10.0, gt=0)
    """Bound on one health probe: a one-row inference that waits for the batch (or generation
    step) computing before it, so keep it above a model's longest batch. A replica that misses
    it fails Serve's health check (Serve replaces it after three in a row) and, twice in a
    row, the gateway's readiness probe (the model turns NOT_SERVING)."""

    drain_grace_s: float | None = Field(default=None, ge=0)
    """How long a stopping gateway (scale-down, redeploy, shutdown) lets calls in flight finish
    after it stops taking new ones; model replicas get as long (Serve's
    ``graceful_shutdown_timeout_s`` is set from it, unless the Serve config sets its own).
    Unset: ``default_timeout_s``, which bounds every request's deadline, so none is cut short."""

    node_name: str = ""
    """Name each answer carries in its ``deepserve-node`` trailing metadata (on Kubernetes:
    the pod's node name, from the downward API); empty: the Ray node's IP address."""

    max_connection_age_s: float = Field(default=60.0, gt=0)
    """A client connection older than this is closed (GOAWAY) and the client reconnects,
    possibly to another gateway: long-lived clients spread over gateways that joined later."""

    connection_age_grace_s: float = Field(default=30.0, ge=0)
    """Calls in flight on a connection being closed for its age get this long to finish."""

    # Security (services/security.py, docs/security.md). Secrets come from files, such as a
    # Kubernetes Secret mounted as a volume: these settings hold paths, never secret values.

    tls_cert_file: str = ""
    """PEM certificate (chain) the gRPC port presents; with ``tls_key_file`` it turns TLS on.
    Empty: plaintext gRPC."""

    tls_key_file: str = ""
    """PEM private key (unencrypted) of ``tls_cert_file``."""

    tls_client_ca_file: str = ""
    """PEM CA bundle; when set, mutual TLS: every client must present a certificate signed by
    one of these CAs, or its connection is refused. Needs ``tls_cert_file``."""

    auth_tokens_file: str = ""
    """Bearer tokens and their groups, one ``TOKEN GROUP[,GROUP...]`` per line (groups:
    ``inference``, ``metadata``, ``models``). When set, every call but the health checks needs
    ``authorization: Bearer <token>``. Empty: no authentication (set it in production)."""

    health_port: int | None = Field(default=None, ge=0, le=65535)
    """A second port serving only ``grpc.health.v1``, in plaintext and without tokens, for
    probes that cannot speak TLS (Kubernetes' gRPC probes); unset: health only on ``grpc_port``."""

    reflection: bool = False
    """Serve gRPC server reflection (for grpcurl and similar tools); with tokens, a token of
    the ``metadata`` group may use it."""

    @model_validator(mode="after")
    def _tls_files_together(self) -> "Settings":
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file (DEEPSERVE_TLS_CERT_FILE) and tls_key_file (DEEPSERVE_TLS_KEY_FILE) "
                             "go together: set both for TLS, or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (DEEPSERVE_TLS_CLIENT_CA_FILE) asks for mutual TLS: it needs "
                             "tls_cert_file and tls_key_file too")
        return self
