"""The Serve application's model table (``args.models`` of deploy/serve_config.yaml), validated.

Every option is checked when the app is built (``serve deploy``, ``deepserve serve``), not
in a replica later: an unknown key, a zero or negative size, a placement that does not exist
is refused with a message that names the model and the field. Process-level options
(``grpc_port``, limits, ...) are :class:`~deepserve.settings.Settings` fields, validated the
same way; batching is :class:`~deepserve.batching.BatchingConfig`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deepserve.batching import BatchingConfig
from deepserve.lifecycle import Route, VersionPolicy


class ModelOptions(BaseModel):
    """How one model is served."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    placement: Literal["gateway", "deployment"] = "gateway"
    """``gateway``: in the gateway's process; ``deployment``: its own Serve deployment."""

    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    """Dynamic batching and the in-flight bound (see deepserve.batching)."""

    intra_op_threads: int = Field(default=1, ge=1, le=256)
    """ONNX Runtime threads per session run."""

    sha256: str | dict[str, str] | None = None
    """The model file's digest, pinned: a manifest that says otherwise is refused, so that
    whoever can rewrite the repository cannot swap a model by rewriting the file and its
    manifest together (docs/security.md). One digest pins the version served at deploy time;
    a mapping ``{version: digest}`` pins each version, and a version it does not name is
    refused (a new version needs a config change)."""

    versions: VersionPolicy = Field(default_factory=lambda: VersionPolicy(latest=1))
    """Which versions are served (docs/lifecycle.md): ``{latest: N}``, ``{specific: [..]}``
    or ``{all: true}``."""

    route: Route = Field(default_factory=Route)
    """The starting route: ``default`` version, ``canary`` and ``shadow`` (the model's
    ``routing.json``, written by ``deepserve rollout``, wins over it)."""

    @field_validator("sha256")
    @classmethod
    def _digests(cls, value):
        digests = [value] if isinstance(value, str) else list((value or {}).values())
        keys = [] if isinstance(value, str) or value is None else list(value)
        if any(not _DIGEST.match(d) for d in digests):
            raise ValueError("a sha256 digest is 64 lowercase hex digits")
        if any(not (k.isascii() and k.isdigit()) for k in keys):
            raise ValueError(f"pinned versions are integers, got {keys}")
        return value


_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def model_options(models: dict[str, Any]) -> dict[str, ModelOptions]:
    """Each model's options, validated.

    Raises:
        ValueError: naming every model and field that is wrong, e.g.
            ``models.digit-diffusion.batching.max_batch_size: Input should be greater than
            or equal to 1 (got 0)``.
    """
    options, problems = {}, []
    for name, entry in models.items():
        try:
            options[name] = ModelOptions.model_validate(entry or {})
        except ValidationError as exc:
            problems += [describe(error, f"models.{name}") for error in exc.errors()]
    if problems:
        raise ValueError("invalid Serve config: " + "; ".join(problems))
    return options


def describe(error: dict[str, Any], prefix: str) -> str:
    """One pydantic error as ``prefix.field.path: message (got value)``; an error of the whole
    object (a validator across fields) is ``prefix: message``."""
    where = ".".join([prefix, *(str(part) for part in error["loc"])])
    message = "unknown option" if error["type"] == "extra_forbidden" else error["msg"]
    message = message.removeprefix("Value error, ")
    got = (f" (got {error['input']!r})" if error["loc"] and error["type"] != "missing"
           and not isinstance(error["input"], dict) else "")
    return f"{where}: {message}{got}"
