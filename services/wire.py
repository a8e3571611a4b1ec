"""Request bodies that are not the protobuf message their method takes: INVALID_ARGUMENT.

gRPC Python parses a request with its method handler's ``request_deserializer`` before any
servicer code runs, and an exception raised there becomes UNKNOWN, with protobuf's own text
("Unexpected <class 'google.protobuf.message.DecodeError'>: ..."): the wrong status for the
client's mistake, and a Python class name in its hands. :class:`TolerantRegistry` gives every
served method (both APIs, health, reflection) a deserializer that cannot fail: bytes that do
not parse become a :class:`Malformed` marker, which the method's wrapped behaviour answers
with INVALID_ARGUMENT before the servicer sees it.

It wraps the handlers when they are registered (the generated ``add_*_to_server`` code,
grpc_health and grpc_reflection register through it), not on every call: a grpc.aio server
interceptor, which this was, cost a bare server 14-20% of its fraud-scoring throughput
(docs/benchmarks.md). It covers every transport (plaintext or TLS), and the token check
(:mod:`deepserve.security`, an interceptor, which decides before any request is parsed) still
comes first: the bytes of a call it refuses are never parsed at all.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

__all__ = ["TolerantRegistry", "Malformed", "tolerant"]


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes did not parse as ``message_type``."""

    message_type: str

    @property
    def message(self) -> str:
        """What the client reads: the message expected, nothing of what the parser said."""
        return f"the request is not a valid {self.message_type} message"


def _message_type(deserializer, method: str) -> str:
    """The full protobuf name of what ``deserializer`` parses: generated code passes the
    message class's ``FromString``, whose ``__self__`` is that class."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    full_name = getattr(descriptor, "full_name", None)
    return full_name if isinstance(full_name, str) else f"{method} request"


async def _refuse(request: Malformed, context) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _checked_unary(behavior):
    """``behavior`` (one request), refusing a :class:`Malformed` one first. The wrapper keeps
    the behaviour's shape, which gRPC inspects: a coroutine (returning its answer, or writing
    a stream with ``context.write``) or an async generator (yielding a stream)."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            if isinstance(request, Malformed):
                await _refuse(request, context)
            async for response in behavior(request, context):
                yield response

        return stream

    async def call(request, context):
        if isinstance(request, Malformed):
            await _refuse(request, context)
        return await behavior(request, context)

    return call


def _checked_stream(behavior):
    """``behavior`` (a stream of requests), refusing the stream at its first :class:`Malformed`
    request: the servicer's ``async for`` over the requests raises gRPC's abort."""

    async def requests(request_iterator, context):
        async for request in request_iterator:
            if isinstance(request, Malformed):
                await _refuse(request, context)
            yield request

    if inspect.isasyncgenfunction(behavior):
        async def stream(request_iterator, context):
            async for response in behavior(requests(request_iterator, context), context):
                yield response

        return stream

    async def call(request_iterator, context):
        return await behavior(requests(request_iterator, context), context)

    return call


_FACTORIES = {  # (request_streaming, response_streaming) -> (behaviour attribute, handler factory)
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def tolerant(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that returns :class:`Malformed` instead of raising, and a
    behaviour that answers it with INVALID_ARGUMENT.

    A handler without a deserializer (it takes raw bytes), or whose behaviour is a plain
    function (which gRPC's asyncio server would run on a thread), is returned as it is.
    """
    parse = handler.request_deserializer
    attribute, factory = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    behavior = getattr(handler, attribute)
    if parse is None or not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler
    malformed = Malformed(_message_type(parse, method))

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError:  # corrupt wire format, invalid UTF-8 in a string, nesting too deep
            return malformed

    checked = _checked_stream(behavior) if handler.request_streaming else _checked_unary(behavior)
    return factory(checked, request_deserializer=deserialize, response_serializer=handler.response_serializer)


class TolerantRegistry:
    """Stands in for a server where services are registered, and registers each of them with
    tolerant method handlers (:func:`tolerant`): pass it to the ``add_*_to_server`` functions.

    Generated code registers every service twice, as a generic handler and as registered
    method handlers (which gRPC looks up first); both are wrapped.
    """

    def __init__(self, server: grpc.aio.Server):
        self.server = server

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.server.add_registered_method_handlers(
            service, {name: tolerant(h, f"/{service}/{name}") for name, h in handlers.items()})

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.server.add_generic_rpc_handlers(tuple(_TolerantGeneric(h) for h in handlers))


class _TolerantGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are :func:`tolerant`, built once per method."""

    def __init__(self, inner: grpc.GenericRpcHandler):
        self.inner = inner
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}  # only served methods: bounded

    def service(self, handler_call_details):
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = self.inner.service(handler_call_details)
            if handler is None:  # not served here: UNIMPLEMENTED, or another handler's
                return None
            handler = self._handlers[method] = tolerant(handler, method)
        return handler
