"""Autoscaling for the gateway: one replica on every serving node.

Clients reach the gateways directly (a Kubernetes Service or a client-side list of
addresses in front of port 9000 on each node), so Serve's router sees none of their
requests and its default policy would never scale the gateway. Instead, every node that
offers the ``deepserve_gateway`` resource runs exactly one gateway (the deployment asks for
one unit of it and sets ``max_replicas_per_node: 1``), and :class:`GatewayLoadPolicy` keeps
the replica count equal to the number of such nodes: a node that joins gets a gateway, a
node that is lost takes its gateway with it.

Optionally the policy also scales on the load the gateways report
(``Gateway.record_autoscaling_stats``: requests per second and in flight). On a cluster
whose Ray autoscaler adds nodes, a replica asked for beyond one per node waits for a new
node, and that pending demand is what makes the autoscaler add one. Serve applies
``min_replicas``/``max_replicas`` and the up/down-scaling delays on top.

    autoscaling_config:
      min_replicas: 1
      max_replicas: 64
      policy:
        policy_function: deepserve.autoscaling:GatewayLoadPolicy
        policy_kwargs: {node_resource: deepserve_gateway}   # + target_requests_per_s: 1500
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

GATEWAY_RESOURCE = "deepserve_gateway"


def nodes_offering(resource: str) -> int:
    """Alive Ray nodes that offer ``resource`` (asked of the GCS)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(resource, 0) >= 1)


class GatewayLoadPolicy:
    """One gateway per node that offers ``node_resource``, and more under load if asked.

    Args:
        node_resource: the custom resource that marks a serving node.
        target_requests_per_s: when set, also enough replicas that each carries about this
            many requests per second (measure what one gateway sustains with ``make bench``
            and leave headroom). None: follow the node count only.
        target_in_flight: with ``target_requests_per_s``, also scale when more requests than
            this wait per replica (slow in-gateway models queue before the rate shows it).
        refresh_s: how long a node count is reused (Serve calls the policy many times a second).
        count_nodes: counts the nodes offering a resource (tests give their own).
    """

    def __init__(self, node_resource: str = GATEWAY_RESOURCE, target_requests_per_s: float | None = None,
                 target_in_flight: float = 64.0, refresh_s: float = 1.0,
                 count_nodes: Callable[[str], int] = nodes_offering):
        if target_requests_per_s is not None and target_requests_per_s <= 0:
            raise ValueError("target_requests_per_s must be positive (or null: follow the nodes only)")
        if target_in_flight <= 0 or refresh_s < 0:
            raise ValueError("target_in_flight must be positive and refresh_s not negative")
        self.node_resource = node_resource
        self.target_requests_per_s = target_requests_per_s
        self.target_in_flight = target_in_flight
        self.refresh_s = refresh_s
        self.count_nodes = count_nodes
        self._nodes: tuple[float, int] | None = None  # (when counted, count)

    def nodes(self) -> int:
        now = time.monotonic()
        if self._nodes is None or now - self._nodes[0] >= self.refresh_s:
            self._nodes = (now, self.count_nodes(self.node_resource))
        return self._nodes[1]

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        try:
            nodes = self.nodes()
        except Exception:  # the GCS is unreachable for a moment: keep what we have
            return ctx.target_num_replicas, {}
        wanted = max(nodes, 1)
        if self.target_requests_per_s is not None:
            metrics = ctx.aggregated_metrics or {}
            rate = sum(metrics.get("requests_per_s", {}).values())
            in_flight = sum(metrics.get("in_flight", {}).values())
            load = max(rate / self.target_requests_per_s, in_flight / self.target_in_flight)
            wanted = max(wanted, math.ceil(load))
        return wanted, {"serving_nodes": nodes}
