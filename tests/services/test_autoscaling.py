"""The gateway reports its load, and the policy turns reports into replica counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray import serve

from deepserve.autoscaling import GatewayLoadPolicy


def _ctx(rates, in_flight, target=1):
    return SimpleNamespace(
        aggregated_metrics={"requests_per_s": dict(enumerate(rates)), "in_flight": dict(enumerate(in_flight))},
        target_num_replicas=target,
    )


def test_policy_scales_with_request_rate_and_in_flight():
    policy = GatewayLoadPolicy(target_requests_per_s=1000, target_in_flight=50)
    assert policy(_ctx([400], [3]))[0] == 1
    assert policy(_ctx([1800, 1700], [10, 10]))[0] == 4  # 3,500 req/s
    assert policy(_ctx([100], [180]))[0] == 4  # a slow queue, before the rate shows it
    assert policy(SimpleNamespace(aggregated_metrics={}, target_num_replicas=3))[0] == 3
    with pytest.raises(ValueError):
        GatewayLoadPolicy(target_requests_per_s=0)


def test_gateway_reports_its_load(server, client):
    gateway = serve.get_app_handle("deepserve")
    gateway.record_autoscaling_stats.remote().result()  # start a fresh window
    for _ in range(50):
        client.score([[0.0] * 30])
    report = gateway.record_autoscaling_stats.remote().result()
    assert set(report) == {"requests_per_s", "in_flight"}
    assert report["requests_per_s"] > 0 and report["in_flight"] == 0
