"""The private channel between a gateway replica and its worker processes.

gRPC over unix-domain sockets in a directory only this user can open (``mkdtemp``: mode
0700), messages pickled: both ends are processes of the same gateway, started by it. Two
services, each a handful of methods:

- ``Relay``, served by the replica: calls to the models placed ``deployment`` (only a Ray
  process holds their Serve handles) and Serve's replica counts. A worker sees them as a
  :class:`RelayBackend`, with the dataplane's :class:`~deepserve.dataplane.Backend` interface.
- ``Control``, served by each worker: its live status and its metrics snapshot.

A :class:`~deepserve.errors.DeepServeError` raised at one end is raised again at the other
(the status code table stays in one place); any other failure is logged where it happened
and arrives as a generic RuntimeError, which the transport answers as INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from deepserve.errors import DeadlineExceeded, DeepServeError, ModelNotReady

log = logging.getLogger(__name__)

RELAY = "deepserve.internal.Relay"
CONTROL = "deepserve.internal.Control"

# Beyond a call's own deadline, how long the channel waits for the far end to say so itself
# (a DeadlineExceeded with its message) before gRPC's deadline cuts the call.
MARGIN_S = 1.0
# Inputs and outputs of one request: the client's message limit is far below this.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]


def _dumps(message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _failure(exc: Exception, what: str) -> tuple[str, Exception]:
    """An exception as the far end will raise it."""
    if isinstance(exc, DeepServeError):
        return ("error", exc)
    log.error("%s failed: %r", what, exc, exc_info=exc)
    return ("error", RuntimeError(f"{what} failed"))


def _raise(kind: str, value: Any) -> Any:
    if kind == "error":
        raise value
    return value


def _rpc_error(exc: grpc.aio.AioRpcError, what: str) -> Exception:
    """The channel itself failed: the far end is gone (restarting, stopping) or too slow."""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{what} did not answer within the deadline")
    if exc.code() == grpc.StatusCode.CANCELLED:
        return asyncio.CancelledError()
    return ModelNotReady(f"{what} is unavailable ({exc.code().name}); retry shortly")


def server(path: str, service: str, unary: dict[str, Callable[..., Awaitable[Any]]],
           streams: dict[str, Callable[..., AsyncIterator[Any]]] | None = None) -> grpc.aio.Server:
    """A server on the unix socket ``path`` for ``service``: each handler takes the pickled
    request's arguments and the call's remaining time (None: no deadline)."""

    def one(name, handle):
        async def method(request, context):
            try:
                return ("ok", await handle(*request, context.time_remaining()))
            except Exception as exc:  # noqa: BLE001 - sent to the caller, which raises it
                return _failure(exc, f"{service}.{name}")
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=pickle.loads,
                                                   response_serializer=_dumps)

    def many(name, handle):
        async def method(request, context):
            try:
                async for item in handle(*request, context.time_remaining()):
                    yield ("ok", item)
            except Exception as exc:  # noqa: BLE001 - sent to the caller, which raises it
                yield _failure(exc, f"{service}.{name}")
        return grpc.unary_stream_rpc_method_handler(method, request_deserializer=pickle.loads,
                                                    response_serializer=_dumps)

    handlers = {name: one(name, h) for name, h in unary.items()}
    handlers.update({name: many(name, h) for name, h in (streams or {}).items()})
    srv = grpc.aio.server(options=CHANNEL_OPTIONS)
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    if srv.add_insecure_port(f"unix:{path}") == 0:
        raise RuntimeError(f"cannot listen on {path}")
    return srv


class Client:
    """Calls to one end's ``service`` over its unix socket."""

    def __init__(self, path: str, service: str, what: str):
        self.channel = grpc.aio.insecure_channel(f"unix:{path}", options=CHANNEL_OPTIONS)
        self.service, self.what = service, what

    def _method(self, name: str, stream: bool = False):
        make = self.channel.unary_stream if stream else self.channel.unary_unary
        return make(f"/{self.service}/{name}", request_serializer=_dumps, response_deserializer=pickle.loads)

    async def call(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        try:
            kind, value = await self._method(name)(args, timeout=None if timeout is None else timeout + MARGIN_S)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, self.what) from None
        return _raise(kind, value)

    async def stream(self, name: str, *args: Any, timeout: float | None = None) -> AsyncIterator[Any]:
        call = self._method(name, stream=True)(args, timeout=None if timeout is None else timeout + MARGIN_S)
        try:
            async for kind, value in call:
                yield _raise(kind, value)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, self.what) from None
        finally:
            call.cancel()  # the consumer stopped early (or failed): so does the far end's stream

    async def close(self) -> None:
        await self.channel.close()


class RelayBackend:
    """A model placed ``deployment``, as a worker's dataplane sees it: each call crosses to the
    gateway replica, which makes it through the model's Serve handle (with its retries and its
    mapping of Ray's errors)."""

    def __init__(self, name: str, version: str, relay: Client):
        self.name, self.version = name, version
        self.relay = relay

    async def infer(self, inputs, timeout: float):
        return await self.relay.call("call", "infer", self.name, self.version, inputs, timeout=timeout)

    async def info(self, timeout: float) -> dict[str, Any]:
        return await self.relay.call("call", "info", self.name, self.version, timeout=max(timeout, 0.0))

    async def check(self, timeout: float) -> dict[str, Any]:
        return await self.relay.call("call", "check", self.name, self.version, timeout=timeout)

    async def generate(self, request, timeout: float):
        async for event in self.relay.stream("generate", self.name, self.version, request, timeout=timeout):
            yield event

    def close(self) -> None:
        """Nothing to free here: the replica's sessions follow the plan themselves."""
