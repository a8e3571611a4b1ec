"""DeepServe's error hierarchy and the one table from errors to gRPC status codes.

Every layer raises one of these; the transports (Open Inference Protocol and
``deepserve.v1`` servicers) turn them into a status code with :func:`to_status`.
Any other exception is a bug: it becomes INTERNAL with a generic message, and its
traceback goes to the server log, never to the client.

Messages quote what the client sent (a model name, a parameter key, a datatype), and a client
may send megabytes there. :func:`to_status` is also where every message is bounded
(:func:`bounded`), so that no message, whichever module built it, echoes a request back at its
sender or outgrows the few KiB of metadata a gRPC client accepts in a status.
"""

from __future__ import annotations

import re

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
    """Too many requests in flight: the client should back off and retry.

    Args:
        retry_after_s: a hint for how long to wait; it reaches the client as the
            ``grpc-retry-pushback-ms`` trailer, which gRPC's retry policies obey.
    """

    def __init__(self, message: str, retry_after_s: float = 0.1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


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

ECHO_CHARS = 100  # the longest run of one word (a name, a value, a list without spaces) a message shows
MESSAGE_CHARS = 1000  # the longest message a client reads: far below gRPC's 8 KiB metadata limit

_RUNS = re.compile(r"\S+|\s+")  # a message's words and the spaces between them
_LONG_WORD = re.compile(r"\S{%d,}" % (ECHO_CHARS + 1))  # a word to clip


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` as a message may show it: its first ``limit`` characters, and its length when
    longer ("xxxx… (10000 characters)")."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def _clip_word(word: str) -> str:
    """A word of a message, clipped, its quotes, brackets and trailing punctuation kept whole:
    the length shown is the value's ("'xxxx… (10000 characters)',")."""
    if len(word) <= ECHO_CHARS:
        return word
    value = word.lstrip("'\"[({")
    head = word[: len(word) - len(value)]
    core = value.rstrip("'\"])},;:.")
    return head + clip(core) + value[len(core):]


def _printable(text: str) -> str:
    """Control characters and lone surrogates (which UTF-8 cannot encode) as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def bounded(message: str) -> str:
    """``message`` as a client may read it, whatever the request put in it: each word longer
    than :data:`ECHO_CHARS` clipped (:func:`clip`), characters that are not printable escaped,
    and at most :data:`MESSAGE_CHARS` characters in all.

    Messages are built by every layer, most of which quote the client's names and values as
    they are; bounding them here, where they leave the server, covers all of them. The words
    are read lazily and the reading stops at the limit, so a message of megabytes costs little
    more than a short one.
    """
    if len(message) <= MESSAGE_CHARS and message.isprintable() and not _LONG_WORD.search(message):
        return message  # the usual message: nothing to do
    shown: list[str] = []
    size = 0
    for run in _RUNS.finditer(message):
        text = _printable(_clip_word(run.group(0)))
        shown.append(text)
        size += len(text)
        if size > MESSAGE_CHARS:
            return f"{''.join(shown)[:MESSAGE_CHARS]}… ({len(message)} characters)"
    return "".join(shown)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to the gRPC status code and message a client sees.

    Args:
        exc: Any exception raised while handling a request.

    Returns:
        ``(code, message)``, the message :func:`bounded`. Unknown exceptions map to
        INTERNAL with a generic message so that no stack trace or internal detail reaches
        the client.
    """
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code, bounded(str(exc))
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
