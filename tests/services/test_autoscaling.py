"""The gateway policy follows the serving nodes (and load, if asked); the gateway reports its load.

The policy runs inside Serve's controller through Serve's custom-policy API, which Ray marks
alpha: ``test_policy_runs_against_this_rays_context`` pins the parts of Serve's context the
policy reads, and the multi-node test (tests/deploy/test_cluster.py) watches it follow a node
that leaves and joins a real cluster.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from ray import serve

from deepserve.autoscaling import GATEWAY_RESOURCE, GatewayLoadPolicy


def _ctx(rates=(), in_flight=(), target=1):
    return SimpleNamespace(
        aggregated_metrics={"requests_per_s": dict(enumerate(rates)), "in_flight": dict(enumerate(in_flight))},
        target_num_replicas=target,
    )


def _nodes(count):
    asked = []

    def count_nodes(resource):
        asked.append(resource)
        if isinstance(count, Exception):
            raise count
        return count

    return count_nodes, asked


def test_policy_follows_the_serving_nodes():
    count_nodes, asked = _nodes(3)
    policy = GatewayLoadPolicy(count_nodes=count_nodes, refresh_s=0)
    assert policy(_ctx([5000], [500])) == (3, {"serving_nodes": 3})  # no load targets: nodes only
    assert asked == [GATEWAY_RESOURCE]
    zero, _ = _nodes(0)
    assert GatewayLoadPolicy(count_nodes=zero)(_ctx())[0] == 1  # never below one (it waits for a node)
    broken, _ = _nodes(ConnectionError("GCS away"))
    assert GatewayLoadPolicy(count_nodes=broken)(_ctx(target=2))[0] == 2  # keep what we have


def test_policy_scales_beyond_the_nodes_on_load_when_asked():
    count_nodes, _ = _nodes(1)
    policy = GatewayLoadPolicy(target_requests_per_s=1000, target_in_flight=50, count_nodes=count_nodes)
    assert policy(_ctx([400], [3]))[0] == 1
    assert policy(_ctx([1800, 1700], [10, 10]))[0] == 4  # 3,500 req/s: three more nodes wanted
    assert policy(_ctx([100], [180]))[0] == 4  # a slow queue, before the rate shows it
    assert policy(SimpleNamespace(aggregated_metrics={}, target_num_replicas=1))[0] == 1
    with pytest.raises(ValueError):
        GatewayLoadPolicy(target_requests_per_s=0)


def test_node_count_is_cached_between_calls():
    count_nodes, asked = _nodes(2)
    policy = GatewayLoadPolicy(count_nodes=count_nodes, refresh_s=60)
    for _ in range(100):
        policy(_ctx())
    assert len(asked) == 1


def test_policy_runs_against_this_rays_context(server):
    """Serve's AutoscalingContext still has what the policy reads, and the local node offers
    the gateway resource (the session's Ray is started as `deepserve serve` starts it)."""
    import inspect

    from ray.serve.config import AutoscalingContext

    params = inspect.signature(AutoscalingContext.__init__).parameters
    assert {"target_num_replicas", "aggregated_metrics"} <= set(params)
    policy = GatewayLoadPolicy()
    assert policy.nodes() == 1
    assert policy(_ctx())[0] == 1


def test_gateway_reports_its_load(server, client):
    """The replica adds up its workers' requests (collected each second) into a rate."""
    gateway = serve.get_app_handle("deepserve")
    gateway.record_autoscaling_stats.remote().result()  # start a fresh window
    for _ in range(50):
        client.score([[0.0] * 30])
    deadline = time.monotonic() + 10
    report = gateway.record_autoscaling_stats.remote().result()
    while report["requests_per_s"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # the requests reach the replica with its workers' next report
        report = gateway.record_autoscaling_stats.remote().result()
    assert set(report) == {"requests_per_s", "in_flight"}
    assert report["requests_per_s"] > 0 and report["in_flight"] == 0
