"""The lifecycle's decisions without a server (services/lifecycle.py): which versions a policy
and a route serve, where an unversioned request goes, what a rollback restores. The served
behaviour is tests/reliability/test_lifecycle.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deepserve.lifecycle import (
    Canary,
    LifecycleError,
    Plan,
    Route,
    Shadow,
    VersionPolicy,
    bucket,
    pick,
    plan,
    rollback_route,
    route_of,
    routing_update,
)

AVAILABLE = ["1", "2", "3", "10"]  # integer order: 10 is the newest


def test_policies_select_versions_in_integer_order():
    assert VersionPolicy(latest=1).select(AVAILABLE) == ["10"]
    assert VersionPolicy(latest=2).select(AVAILABLE) == ["3", "10"]
    assert VersionPolicy(latest=9).select(AVAILABLE) == AVAILABLE
    assert VersionPolicy(all=True).select(AVAILABLE) == AVAILABLE
    assert VersionPolicy(specific=[10, 2, 2]).select(AVAILABLE) == ["2", "10"]
    with pytest.raises(LifecycleError, match=r"versions \[7\] are not in the repository"):
        VersionPolicy(specific=[7]).select(AVAILABLE)
    with pytest.raises(ValidationError, match="choose one of latest, specific, all"):
        VersionPolicy(latest=1, specific=[1])
    with pytest.raises(ValidationError):
        VersionPolicy(specific=[])


def test_a_plan_serves_the_policy_and_every_version_the_route_names():
    served = plan(AVAILABLE, VersionPolicy(latest=1), Route())
    assert served == Plan(("10",), "10")
    served = plan(AVAILABLE, VersionPolicy(latest=1),
                  Route(default=2, canary=Canary(version=3, weight=0.25), shadow=Shadow(version=1, fraction=0.5)))
    assert served.versions == ("1", "2", "3", "10") and served.default == "2"
    assert [served.role(v) for v in served.versions] == ["shadow", "default", "canary", "standby"]
    assert Plan.from_dict(served.to_dict()) == served
    assert served.route() == Route(default=2, canary=Canary(version=3, weight=0.25),
                                   shadow=Shadow(version=1, fraction=0.5))
    with pytest.raises(LifecycleError, match=r"names version\(s\) \['4'\]"):
        plan(AVAILABLE, VersionPolicy(latest=1), Route(default=4))
    with pytest.raises(LifecycleError, match="no version"):
        plan([], VersionPolicy(latest=1), Route())
    with pytest.raises(ValidationError, match="the canary is the default version"):
        Route(default=2, canary=Canary(version=2, weight=0.5))


def test_the_canary_split_is_sticky_by_key_and_near_its_weight():
    served = plan(AVAILABLE, VersionPolicy(latest=1), Route(default=10, canary=Canary(version=3, weight=0.3)))
    picks = [pick(served, f"account-{i}") for i in range(20_000)]
    share = sum(1 for version, _ in picks if version == "3") / len(picks)
    assert abs(share - 0.3) < 0.015  # 4.6 standard deviations
    assert {pick(served, "account-42") for _ in range(50)} == {picks[42]}
    assert picks[42][1] == ("canary" if picks[42][0] == "3" else "default")
    assert 0 <= bucket("") < 1 and bucket("a") == bucket("a") != bucket("b")
    # Without a key, each request is drawn: both versions answer.
    assert {pick(served, None)[0] for _ in range(200)} == {"3", "10"}
    assert pick(plan(AVAILABLE, VersionPolicy(latest=1), Route()), "x") == ("10", "default")


def test_rollback_restores_the_earlier_default_or_ends_a_trial():
    first = plan(AVAILABLE, VersionPolicy(latest=1), Route(default=2))
    routing = routing_update(None, first, Route(default=3))  # rollout 2 -> 3
    assert routing["route"] == {"default": 3} and routing["history"] == [{"default": 2}]
    now = plan(AVAILABLE, VersionPolicy(latest=1), route_of(routing, Route()))
    assert now.default == "3"
    assert rollback_route(routing, now, AVAILABLE) == Route(default=2)
    trial = plan(AVAILABLE, VersionPolicy(latest=1), Route(default=3, canary=Canary(version=10, weight=0.1)))
    assert rollback_route(routing, trial, AVAILABLE) == Route(default=3)  # the canary ends, the default stays
    # No history (the default came by itself, a new build under `latest`): the version before it.
    newest = plan(AVAILABLE, VersionPolicy(latest=2), Route())
    assert rollback_route(None, newest, AVAILABLE) == Route(default=3)
    with pytest.raises(LifecycleError, match="no version before 1"):
        rollback_route(None, plan(AVAILABLE, VersionPolicy(latest=1), Route(default=1)), AVAILABLE)
    with pytest.raises(LifecycleError, match="routing.json"):
        route_of({"route": {"default": 0}}, Route())
    assert route_of(None, Route(default=2)) == Route(default=2)
