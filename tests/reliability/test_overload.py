"""Overload: a gateway with the shipped admission bounds, offered four times what it serves.

The promise (docs/reliability.md, "Overload"): what a gateway cannot serve it refuses at once
with RESOURCE_EXHAUSTED and a retry hint (the ``grpc-retry-pushback-ms`` trailer); no call
ends any other way (no DEADLINE_EXCEEDED pile-up, no CANCELLED); the gateway is ready and
answers right afterwards.

Its own application (tests/reliability/second_app.py) with the shipped admission settings:
the fraud model in the gateway (computed inline, on the event loop: the hottest path) and
digit-classifier in the gateway too, batched behind a small ``max_queued``. For each, the
load generator of ``make overload`` (loadtests/bench/overload.py) measures the capacity
closed loop, then sends four times that open loop. The latency targets (admitted p99 at most
twice the unloaded p99, refusals under 50 ms) are figures, printed at the end of the run:
on two shared cores they are not pass/fail; ``make overload`` measures them on a quiet machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from deepserve.client import DeepServeClient
from deepserve.settings import Settings
from second_app import second_app

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtests" / "bench"))
import overload  # noqa: E402 - loadtests/bench/overload.py: the open-loop generator

pytestmark = pytest.mark.timeout(600)

APP = "deepserve-overload"
MAX_QUEUED = 16  # digit-classifier's queue here: small, so that it fills
MODELS = {
    "fraud-autoencoder": {"placement": "gateway"},
    "digit-classifier": {"placement": "gateway", "batching": {"max_batch_size": 64, "max_queued": MAX_QUEUED}},
}
WORKLOADS = {"fraud-1": overload.fraud_workload, "digit-1": overload.classify_workload}
FACTOR = 4.0
OVERLOAD_S = 5.0


@pytest.fixture(scope="module")
def gateway(server, repository):
    """The second application's target. Its admission settings are the shipped defaults:
    second_app turns the loop-lag bound off for the other reliability tests; here it is set
    back to the default, read from Settings itself."""
    shipped_lag = Settings.model_fields["max_loop_lag_s"].default
    with second_app(APP, repository.root, MODELS, max_loop_lag_s=shipped_lag) as target:
        yield target


@pytest.mark.xfail(strict=True, reason=(
    "issue 12 is open on this: at 4x capacity grpc.aio leaves the excess in gRPC core's queue, where "
    "no DeepServe code sees it, and core cancels it (CANCELLED) or it waits out its deadline; "
    "docs/reliability.md, 'Overload', has the figures and the options. strict: the day it passes, "
    "this mark must go"))
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_excess_load_is_refused_at_once_with_a_retry_hint(gateway, workload, figures):
    report = overload.measure(gateway, WORKLOADS[workload](), factor=FACTOR, duration=OVERLOAD_S,
                              closed_loop_s=2.0, concurrencies=(8, 32))
    for name, value in report.figures().items():
        figures[f"overload {workload}: {name}"] = value
    o = report.overload
    print(f"{workload}: capacity {report.capacity}\n{o.line()}\n{o.other_details}")

    assert o.sent > 0 and o.ok > 0, "nothing was answered during the overload"
    # No call waits out its deadline or is cut off: the excess is refused, nothing else.
    assert o.other_codes == {}, f"status codes besides OK and RESOURCE_EXHAUSTED: {o.other_codes} {o.other_details}"
    assert o.refused > 0, f"{o.offered_rate:.0f} calls/s offered, none refused"
    # Every refusal carries the hint gRPC retry policies obey.
    assert o.refused_with_hint == o.refused
    # A generous bound on the slowest call (its deadline is 2 s): no pile-up behind the bounds.
    assert o.slowest_ms < 1000, f"slowest call {o.slowest_ms:.0f} ms"


def test_the_gateway_is_ready_and_answers_after_the_overload(gateway):
    """Runs after the overloads above (file order): nothing stays refused or broken."""
    with DeepServeClient(gateway) as client:
        client.wait_ready(timeout=10)
        assert len(client.score([[0.0] * 30]).results) == 1
        assert len(client.classify([np.zeros((8, 8))], model="digit-classifier").results) == 1
