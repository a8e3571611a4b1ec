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
    """Directory of the model repository (see docs/model-repository.md)."""

    max_rows_per_request: int = Field(default=4096, ge=1)
    """Largest batch one request may carry; beyond it: INVALID_ARGUMENT."""

    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest gRPC message accepted or sent."""

    default_timeout_s: float = Field(default=30.0, gt=0)
    """Deadline for requests that come without one."""

    readiness_poll_s: float = Field(default=1.0, gt=0)
    """How often the gateway checks that each model's replicas answer."""
