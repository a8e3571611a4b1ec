"""Overload: a gateway with the shipped admission bounds, offered four times what it serves.

The promise (docs/reliability.md, "Overload"): what a gateway cannot serve it refuses at once
with RESOURCE_EXHAUSTED and a retry hint (the ``grpc-retry-pushback-ms`` trailer); no call
ends any other way (no DEADLINE_EXCEEDED pile-up, no CANCELLED); the gateway is ready and
answers right afterwards.

Two applications of its own (tests/reliability/second_app.py), one behind the admission
front (nginx: ``admission_front``, services/gateway/front.py), which keeps this promise, and
one without it, which does not (an xfail that shows what grpc.aio alone does), each with the
shipped admission settings:
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
from conftest import nginx_or_skip
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


FRONT_IN_FLIGHT = 2  # per worker and method group: calls wait behind the front at most ~2 service times


def _app(repository, **settings):
    """The second application with the shipped admission settings: second_app turns the
    loop-lag bound off for the other reliability tests; here it is set back to the default,
    read from Settings itself."""
    shipped_lag = Settings.model_fields["max_loop_lag_s"].default
    return second_app(settings.pop("name"), repository.root, MODELS, max_loop_lag_s=shipped_lag, **settings)


@pytest.fixture(scope="module")
def fronted(server, repository):
    """The gateway behind the admission front (nginx), bounded at FRONT_IN_FLIGHT per worker."""
    nginx_or_skip()
    with _app(repository, name=f"{APP}-front", admission_front=True, front_in_flight=FRONT_IN_FLIGHT) as target:
        yield target


@pytest.fixture(scope="module")
def bare(server, repository):
    """The gateway's workers on the port themselves (admission_front off, the default)."""
    with _app(repository, name=APP) as target:
        yield target


def _overload(target: str, workload: str, figures: dict, label: str) -> overload.OpenLoop:
    # Closed loop at concurrency up to 8: beyond the front's bound, a closed loop measures how fast
    # refusals come back, not what the gateway serves.
    report = overload.measure(target, WORKLOADS[workload](), factor=FACTOR, duration=OVERLOAD_S,
                              closed_loop_s=2.0, concurrencies=(2, 4, 8))
    for name, value in report.figures().items():
        figures[f"overload {label} {workload}: {name}"] = value
    o = report.overload
    print(f"{label} {workload}: capacity {report.capacity}\n{o.line()}\n{o.other_details}")
    return o


def _assert_refused_at_once(o: overload.OpenLoop) -> None:
    assert o.sent > 0 and o.ok > 0, "nothing was answered during the overload"
    # No call waits out its deadline or is cut off: the excess is refused, nothing else.
    assert o.other_codes == {}, f"status codes besides OK and RESOURCE_EXHAUSTED: {o.other_codes} {o.other_details}"
    assert o.refused > 0, f"{o.offered_rate:.0f} calls/s offered, none refused"
    # Every refusal carries the hint gRPC retry policies obey.
    assert o.refused_with_hint == o.refused
    # A generous bound on the slowest call (its deadline is 2 s): no pile-up behind the bounds.
    assert o.slowest_ms < 1000, f"slowest call {o.slowest_ms:.0f} ms"


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_behind_the_front_excess_load_is_refused_at_once_with_a_retry_hint(fronted, workload, figures):
    _assert_refused_at_once(_overload(fronted, workload, figures, "front"))


def test_the_fronted_gateway_is_ready_and_answers_after_the_overload(fronted):
    """Runs after the overloads above (file order): nothing stays refused or broken."""
    with DeepServeClient(fronted) as client:
        client.wait_ready(timeout=10)
        assert len(client.score([[0.0] * 30]).results) == 1
        assert len(client.classify([np.zeros((8, 8))], model="digit-classifier").results) == 1


@pytest.mark.xfail(strict=True, reason=(
    "without the admission front, at 4x capacity grpc.aio leaves the excess in gRPC core's queue, where "
    "no DeepServe code sees it, and core cancels it (CANCELLED) or it waits out its deadline; "
    "docs/reliability.md, 'Overload', has the figures. strict: the day it passes, this mark must go"))
def test_without_the_front_excess_load_ends_in_grpc_cores_queue(bare, figures):
    _assert_refused_at_once(_overload(bare, "fraud-1", figures, "no front"))


def test_the_bare_gateway_is_ready_and_answers_after_the_overload(bare):
    with DeepServeClient(bare) as client:
        client.wait_ready(timeout=10)
        assert len(client.score([[0.0] * 30]).results) == 1
