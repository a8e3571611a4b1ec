"""DeepServe's error hierarchy and the one table from errors to gRPC status codes.

Every layer raises one of these; the transports (Open Inference Protocol and
``deepserve.v1`` servicers) turn them into a status code with :func:`to_status`.
Any other exception is a bug: it becomes INTERNAL with a generic message, and its
traceback goes to the server log, never to the client.
"""

from __future__ import annotations

import grpc


class DeepServeError(Exception):
    """Base class: an error whose message is safe and useful to show a client."""


class InvalidInput(DeepServeError):
    """The request is malformed: wrong dtype, shape, byte length, value or limit."""


class ModelNotFound(DeepServeError):
    """No model (or no such version of it) in the repository."""


class ModelNotReady(DeepServeError):
    """The model exists but cannot serve yet (loading, warming up, or shut down)."""


class ModelIntegrityError(DeepServeError):
    """A model file does not match the sha256 recorded in its manifest (or the manifest names
    a file outside its version folder)."""


class RepositoryUnavailable(DeepServeError):
    """The model repository cannot be reached or read (a remote one: network, server, credentials)."""


class Overloaded(DeepServeError):
    """Too many requests in flight: the client should back off and retry."""


class DeadlineExceeded(DeepServeError):
    """The request's deadline passed before its answer was ready."""


# The one table. Order matters only for subclasses (none today).
STATUS_CODES: dict[type[DeepServeError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    ModelIntegrityError: grpc.StatusCode.FAILED_PRECONDITION,
    RepositoryUnavailable: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

INTERNAL_MESSAGE = "internal error; the server log has the details"


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to the gRPC status code and message a client sees.

    Args:
        exc: Any exception raised while handling a request.

    Returns:
        ``(code, message)``. Unknown exceptions map to INTERNAL with a generic
        message so that no stack trace or internal detail reaches the client.
    """
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
