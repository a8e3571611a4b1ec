"""Autoscaling for the gateway, whose requests bypass Serve's router.

Serve's default policy scales on the requests its router has in flight; gRPC clients talk
to the gateway directly, so the router sees none of them. The gateway reports its own load
instead (``Gateway.record_autoscaling_stats``: requests per second and requests in flight)
and :class:`GatewayLoadPolicy` turns those reports into a replica count. Serve applies
``min_replicas``/``max_replicas``, the up/down-scaling delays and factors on top.

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      policy:
        policy_function: deepserve.autoscaling:GatewayLoadPolicy
        policy_kwargs: {target_requests_per_s: 1500}
"""

from __future__ import annotations

import math
from typing import Any


class GatewayLoadPolicy:
    """Enough replicas that each handles about ``target_requests_per_s``.

    Args:
        target_requests_per_s: the load one gateway replica should carry; measure what one
            replica sustains at the latency you want (``make bench``) and leave headroom.
        target_in_flight: also scale up when more requests than this wait per replica
            (slow models placed in the gateway queue up before the rate shows it).
    """

    def __init__(self, target_requests_per_s: float = 1500.0, target_in_flight: float = 64.0):
        if target_requests_per_s <= 0 or target_in_flight <= 0:
            raise ValueError("targets must be positive")
        self.target_requests_per_s = target_requests_per_s
        self.target_in_flight = target_in_flight

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        rate = sum(metrics.get("requests_per_s", {}).values())
        in_flight = sum(metrics.get("in_flight", {}).values())
        if not metrics:  # no report yet (replicas starting): keep what we have
            return ctx.target_num_replicas, {}
        wanted = max(rate / self.target_requests_per_s, in_flight / self.target_in_flight)
        return max(1, math.ceil(wanted)), {}
