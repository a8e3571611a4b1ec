"""The admission bounds that no load test reaches on two cores (docs/reliability.md, "Bounds
and queues"): rows in flight per gateway, requests in flight per model, the event loop's lag,
the PNG pool, and the message size limit (the last over real gRPC, against the session's
service)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from deepserve.admission import Admission, LagMonitor
from deepserve.errors import Overloaded
from deepserve.images import Offloaded
from deepserve.proto import inference_pb2 as oip
from deepserve.proto import inference_pb2_grpc as oip_grpc
from deepserve.settings import Settings

pytestmark = pytest.mark.timeout(120)


def test_a_model_beyond_its_in_flight_bound_is_refused_with_a_hint():
    admission = Admission(max_rows_in_flight=1000, max_loop_lag_s=0)
    admission.admit("m", in_flight=3, max_in_flight=4, rows=1)  # the 4th: admitted
    with pytest.raises(Overloaded, match="model 'm' is overloaded: 4 requests in flight") as info:
        admission.admit("m", in_flight=4, max_in_flight=4, rows=1)
    assert 0.05 <= info.value.retry_after_s <= 1.0
    assert admission.rows_in_flight == 1 and admission.refused == 1


def test_rows_in_flight_are_bounded_per_gateway_and_released():
    admission = Admission(max_rows_in_flight=100, max_loop_lag_s=0)
    admission.admit("a", 0, 10, rows=60)
    admission.admit("b", 0, 10, rows=40)  # exactly the bound
    with pytest.raises(Overloaded, match="100 rows in flight, 1 more would exceed 100"):
        admission.admit("c", 0, 10, rows=1)
    admission.release(60)
    admission.admit("c", 0, 10, rows=60)  # room again once released
    assert admission.rows_in_flight == 100


def test_a_late_event_loop_refuses_new_calls_until_it_catches_up():
    """A real loop kept busy by callbacks that each hold it 30 ms (a backlog, not one long
    step): the lag, the smallest of the window's samples, passes the 20 ms bound, and
    check_loop refuses; once the backlog is gone it admits again."""

    async def scenario() -> tuple[float, bool, float, bool]:
        admission = Admission(max_loop_lag_s=0.02)
        admission.lag = LagMonitor(period_s=0.002, window=10)
        admission.start()
        loop = asyncio.get_running_loop()
        stop = time.monotonic() + 1.0

        def busy():  # holds the loop 30 ms, then queues itself again: a standing backlog
            time.sleep(0.03)
            if time.monotonic() < stop:
                loop.call_soon(busy)

        loop.call_soon(busy)
        await asyncio.sleep(0.8)
        lag_busy = admission.lag.lag_s
        try:
            admission.check_loop()
            refused_busy = False
        except Overloaded:
            refused_busy = True
        await asyncio.sleep(0.6)  # the backlog ends at 1.0 s; 10 samples of 2 ms after that
        lag_idle = admission.lag.lag_s
        try:
            admission.check_loop()
            refused_idle = False
        except Overloaded:
            refused_idle = True
        admission.lag.stop()
        return lag_busy, refused_busy, lag_idle, refused_idle

    lag_busy, refused_busy, lag_idle, refused_idle = asyncio.run(scenario())
    assert lag_busy > 0.02 and refused_busy, lag_busy
    assert lag_idle < 0.02 and not refused_idle, lag_idle


def test_the_png_pool_refuses_beyond_its_jobs():
    async def scenario() -> str:
        pool = Offloaded(threads=1, max_jobs=2)
        release = threading.Event()
        held = [asyncio.ensure_future(pool.run(release.wait, 10)) for _ in range(2)]
        await asyncio.sleep(0.05)
        try:
            await pool.run(lambda: None)
            outcome = "admitted"
        except Overloaded as exc:
            outcome = str(exc)
        release.set()
        await asyncio.gather(*held)
        await pool.run(lambda: None)  # room again
        return outcome

    assert "2 image jobs are waiting" in asyncio.run(scenario())


def test_a_message_over_the_limit_is_resource_exhausted_before_decoding(server):
    limit = Settings().max_message_bytes
    assert limit == 8 * 1024 * 1024  # the shipped default
    rows = limit // (30 * 4) + 1  # one row more than fits
    request = oip.ModelInferRequest(model_name="fraud-autoencoder")
    request.inputs.add(name="transactions", datatype="FP32", shape=[rows, 30])
    request.raw_input_contents.append(np.zeros((rows, 30), np.float32).tobytes())
    with grpc.insecure_channel(server, options=[("grpc.max_send_message_length", 2 * limit)]) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server is fine afterwards.
        assert stub.ServerReady(oip.ServerReadyRequest(), timeout=10).ready


def test_connections_are_closed_at_their_age_and_calls_go_on(tmp_path):
    """``max_connection_age_s``: the gateway sends GOAWAY to a connection of that age, the
    client reconnects (possibly to another gateway: the point, docs/deploy.md), and calls made
    across those reconnections all succeed. Seen from the client: its channel passes through
    READY once per connection."""
    from types import SimpleNamespace

    from deepserve.grpc_server import GrpcServer

    dataplane = SimpleNamespace(models={}, live=lambda: True, ready=lambda: True, labels=lambda name: ("", ""))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> GrpcServer:
        server = GrpcServer(dataplane, "127.0.0.1", 0, 1 << 20, "test-node", max_connection_age_s=0.5, grace_s=0.5)
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    connections = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            channel.subscribe(lambda state: state == grpc.ChannelConnectivity.READY and connections.append(state))
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            answered = 0
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                assert stub.ServerLive(oip.ServerLiveRequest(), timeout=5, wait_for_ready=True).live
                answered += 1
                time.sleep(0.02)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    assert answered > 50
    # 3 s of calls over connections that live ~0.5 s (gRPC adds up to 10% jitter): several.
    assert len(connections) >= 3, connections
