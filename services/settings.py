"""Process-level settings, from ``DEEPSERVE_*`` environment variables.

Per-model Ray knobs (replicas, batching, autoscaling, queue limits) live in the Serve
config under ``deploy/``, not here.
"""

from __future__ import annotations

from pydantic import Field
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

    max_rows_per_request: int = Field(default=4096, ge=1)
    """Largest batch one request may carry; beyond it: INVALID_ARGUMENT."""

    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest gRPC message accepted or sent."""

    default_timeout_s: float = Field(default=30.0, gt=0)
    """Deadline for requests that come without one."""

    readiness_poll_s: float = Field(default=1.0, gt=0)
    """How often the gateway checks that each model's replicas answer."""

    node_name: str = ""
    """Name each answer carries in its ``deepserve-node`` trailing metadata (on Kubernetes:
    the pod's node name, from the downward API); empty: the Ray node's IP address."""

    max_connection_age_s: float = Field(default=60.0, gt=0)
    """A client connection older than this is closed (GOAWAY) and the client reconnects,
    possibly to another gateway: long-lived clients spread over gateways that joined later."""

    connection_age_grace_s: float = Field(default=30.0, ge=0)
    """Calls in flight on a connection being closed for its age get this long to finish."""
