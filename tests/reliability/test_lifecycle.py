"""Model lifecycle with the real service (docs/lifecycle.md): versions side by side, rollout and
rollback under Locust load with no failed request, a sticky canary split, shadow comparison
metrics and drift against training.

Three versions of ``fraud-autoencoder``, each made by ``deepserve build``:

- v1: the session repository's (seed 0);
- v2: built again with seed 0: the same model (a retrain that changed nothing);
- v3: trained on shifted transactions (every ``V`` feature moved by +1.5 and amounts ×4):
  a candidate whose scores differ.

Its own application (tests/reliability/second_app.py) serves them from a repository of its
own, polled every half second; the Serve config starts with v1 alone. Routes change the way an
operator changes them: ``deepserve rollout`` and ``deepserve rollback`` write the model's
``routing.json``, and ``--wait`` returns once the server serves it.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from deepserve.cli import main as deepserve
from deepserve.client import DeepServeClient
from second_app import gateway_status, samples, scraped, second_app, wait_for

pytestmark = pytest.mark.timeout(600)

PROJECT = Path(__file__).resolve().parents[2]
RUNNER = PROJECT / "loadtests" / "run.py"
APP = "deepserve-lifecycle"
MODEL = "fraud-autoencoder"
# Threaded: computed in the session's thread, so that mirrored requests stay in flight a while
# (inline, a copy computes within one turn of the event loop and never waits: nothing to shed).
CONFIG = {"placement": "gateway", "versions": {"specific": [1]}, "route": {"default": 1},
          "batching": {"threaded": True}}
USERS = 4


def shifted_transactions(rows: int, seed: int) -> np.ndarray:
    """Card transactions as the build generates them, moved: V1..V28 +1.5, amounts ×4."""
    from deepserve.models.fraud import SyntheticConfig, generate_transactions

    x, _, _ = generate_transactions(seed, SyntheticConfig(n_rows=rows))
    x[:, 1:29] += 1.5
    x[:, 29] *= 4.0
    return x


def normal_transactions(rows: int, seed: int) -> np.ndarray:
    from deepserve.models.fraud import SyntheticConfig, generate_transactions

    x, label, _ = generate_transactions(seed, SyntheticConfig(n_rows=rows * 2))
    return x[label == 0][:rows]


def build(repo: Path, *options: str) -> None:
    done = subprocess.run([sys.executable, "-m", "deepserve.cli", "build", "--only", MODEL, "--repo", str(repo),
                           *options], cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def versions(repository, tmp_path_factory) -> Path:
    """A repository with v1 (copied), v2 (rebuilt, seed 0) and v3 (shifted data) of the model."""
    from deepserve.models.fraud import write_csv

    root = tmp_path_factory.mktemp("lifecycle-repository")
    shutil.copytree(repository.root / MODEL / "1", root / MODEL / "1")
    build(root, "--seed", "0")
    shifted = root.parent / "shifted.csv"
    x = shifted_transactions(60_000, seed=7)
    write_csv(shifted, x, np.zeros(len(x), np.int64))
    build(root, "--seed", "0", "--data", str(shifted))
    return root


@pytest.fixture(scope="module")
def lifecycle(server, versions, tmp_path_factory):
    """The application's gRPC target and the Serve config file the CLI reads."""
    config = tmp_path_factory.mktemp("lifecycle-config") / "serve_config.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": APP, "args": {"models": {MODEL: CONFIG}}}]}))
    # At most two mirrored requests in flight per worker: a burst sheds the rest.
    with second_app(APP, versions, {MODEL: CONFIG}, repository_poll_s=0.5, shadow_in_flight=2) as target:
        yield target, config


def cli(command: str, *args: str, target: str, config: Path, repo: Path) -> None:
    code = deepserve([command, MODEL, *args, "--repo", str(repo), "--config", str(config), "--wait",
                      "--timeout", "60", "--target", target])
    assert code == 0, f"deepserve {command} {' '.join(args)} failed"


def roles(target: str) -> dict[str, str]:
    with DeepServeClient(target) as client:
        return {m.version: m.role for m in client.list_models().models if m.name == MODEL}


def answered_by(target: str, rows: np.ndarray, key: str | None = None) -> str:
    with DeepServeClient(target) as client:
        return client.score(rows.tolist(), top_features=0, request_key=key).version


def settles_on(target: str, rows: np.ndarray, version: str, timeout: float = 10.0) -> None:
    """Every process follows a route within its repository poll, with no cluster-wide barrier
    (docs/lifecycle.md, Limits): `--wait` saw one process live; wait until 20 answers in a row
    come from ``version``."""
    deadline = time.monotonic() + timeout
    while (seen := {answered_by(target, rows) for _ in range(20)}) != {version}:
        assert time.monotonic() < deadline, f"still answered by {seen} {timeout:g} s after the change"
        time.sleep(0.5)


def locust(target: str, seconds: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(RUNNER), "--host", target, "--users", str(USERS), "--duration", str(seconds),
         "--user", "FraudScoreUser", "--timeout", "5", "--ready-timeout", "30", "--out", str(out)],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def summary(process: subprocess.Popen, out: Path) -> dict:
    output, _ = process.communicate(timeout=300)
    path = out.with_name(out.name + "_summary.json")
    assert path.exists(), output[-3000:]
    return json.loads(path.read_text())["total"]


# ---------------------------------------------------------------------------- tests


def test_versions_are_served_side_by_side_and_named_requests_reach_them(lifecycle, versions):
    target, config = lifecycle
    assert roles(target) == {"1": "default"}
    row = normal_transactions(1, seed=3)
    assert answered_by(target, row) == "1"
    with DeepServeClient(target) as client:
        with pytest.raises(Exception) as missing:
            client.score(row.tolist(), version="2")
        assert "version '2' is not served; served versions: 1" in str(missing.value)
    # A version can be rolled out only if it is in the repository: nothing is written otherwise.
    assert deepserve(["rollout", MODEL, "9", "--repo", str(versions), "--config", str(config)]) == 2
    assert not (versions / MODEL / "routing.json").exists()


def test_drift_gauge_responds_to_shifted_traffic(lifecycle, figures):
    target, _ = lifecycle

    # This application's gateway's series: the session's application serves the same model
    # and version, and exports its own drift gauge (of whatever traffic other tests sent it).
    gateway = gateway_status(APP)["worker_id"]

    def drift() -> float | None:
        found = samples("ray_deepserve_drift_psi", model=MODEL, version="1", WorkerId=gateway)
        return max(found) if found else None

    # Each of the gateway's processes keeps the last 5,000 scores it computed, and the gauge is
    # the highest PSI among them. One connection reaches one process: this test comes before the
    # load of the others, whose own transactions (loadtests/locustfile.py) are not training-like.
    with DeepServeClient(target, timeout=30) as client:
        normal = normal_transactions(16000, seed=8)
        for start in range(0, len(normal), 1000):
            client.score(normal[start:start + 1000].tolist(), top_features=0)
        calm = wait_for(lambda: (d := drift()) is not None and d < 0.1 and d + 1e-9, 30,
                        "drift near 0 on training-like traffic")
        shifted = shifted_transactions(16000, seed=9)
        for start in range(0, len(shifted), 1000):
            client.score(shifted[start:start + 1000].tolist(), top_features=0)
    moved = wait_for(lambda: (d := drift()) is not None and d > 0.25 and d, 30, "drift on shifted traffic")
    figures["lifecycle: drift psi, training-like / shifted traffic"] = [round(calm, 4), round(moved, 4)]


def test_rollout_and_rollback_under_load_fail_nothing(lifecycle, versions, figures, tmp_path):
    """Locust scores transactions throughout; v2 is rolled out, then rolled back: no call fails,
    and the p99 of each phase stays within 2x of the steady state's."""
    target, config = lifecycle
    steady = summary(run := locust(target, 8, tmp_path / "steady"), tmp_path / "steady")
    assert steady["failures"] == 0, steady

    phases = {}
    for name, command, args, expect in (("rollout", "rollout", ["2"], "2"), ("rollback", "rollback", [], "1")):
        out = tmp_path / name
        run = locust(target, 14, out)
        time.sleep(3)
        started = time.monotonic()
        cli(command, *args, target=target, config=config, repo=versions)
        switched_s = time.monotonic() - started
        assert answered_by(target, normal_transactions(1, seed=4)) == expect
        phases[name] = (summary(run, out), switched_s)

    figures["lifecycle: steady p99 ms"] = round(steady["p99_ms"], 2)
    for name, (total, switched_s) in phases.items():
        figures[f"lifecycle: {name} calls / failed"] = [total["requests"], total["failures"]]
        figures[f"lifecycle: {name} p99 ms"] = round(total["p99_ms"], 2)
        figures[f"lifecycle: {name} live after s"] = round(switched_s, 2)
    for name, (total, _) in phases.items():
        assert total["requests"] > 100 and total["failures"] == 0, (name, total)
        assert total["p99_ms"] <= 2 * steady["p99_ms"], (name, total["p99_ms"], steady["p99_ms"])
    assert roles(target) == {"1": "default"}  # v2 left once nothing was in flight on it


def test_canary_split_is_sticky_and_near_its_weight(lifecycle, versions, figures):
    target, config = lifecycle
    cli("rollout", "3", "--canary", "0.2", target=target, config=config, repo=versions)
    assert roles(target) == {"1": "default", "3": "canary"}
    row = normal_transactions(1, seed=5)
    before = scraped("ray_deepserve_route_requests_total", model=MODEL, version="3", route="canary")
    with DeepServeClient(target) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: client.score(row.tolist(), top_features=0,
                                                       request_key=f"customer-{i}").version, range(1000)))
        again = {client.score(row.tolist(), top_features=0, request_key="customer-17").version for _ in range(20)}
    share = answers.count("3") / len(answers)
    figures["lifecycle: canary weight 0.2, realised share of 1000 keys"] = share
    assert abs(share - 0.2) < 0.05, share
    assert again == {answers[17]}  # one customer, one version
    wait_for(lambda: scraped("ray_deepserve_route_requests_total", model=MODEL, version="3", route="canary")
             - before >= answers.count("3"), 30, "the canary's requests in the route metric")
    cli("rollback", target=target, config=config, repo=versions)  # ends the canary
    assert roles(target) == {"1": "default"}


def shadow_figures(candidate: str) -> dict[str, float] | None:
    """The gateway's comparison of v1 with the candidate, None until every measure is exported
    (the gauge of each of the gateway's processes: one series per process)."""
    found = {measure: samples("ray_deepserve_shadow_divergence", model=MODEL, version="1", candidate=candidate,
                              measure=measure) for measure in ("psi", "ks", "flagged_rate_diff")}
    return {m: max(v, key=abs) for m, v in found.items()} if all(found.values()) else None


def test_shadow_metrics_stay_near_zero_for_the_same_model_and_move_for_a_shifted_one(lifecycle, versions, figures):
    target, config = lifecycle
    rows = normal_transactions(2000, seed=6)
    for candidate, same in (("2", True), ("3", False)):
        cli("rollout", candidate, "--shadow", "1.0", target=target, config=config, repo=versions)
        assert roles(target) == {"1": "default", candidate: "shadow"}
        compared = scraped("ray_deepserve_shadow_requests_total", model=MODEL, version="1", candidate=candidate,
                           outcome="compared")
        with DeepServeClient(target) as client:
            for start in range(0, len(rows), 50):  # answered by v1 alone: the shadow never answers
                assert client.score(rows[start:start + 50].tolist(), top_features=0).version == "1"
        wait_for(lambda: scraped("ray_deepserve_shadow_requests_total", model=MODEL, version="1",
                                 candidate=candidate, outcome="compared") >= compared + 20,
                 30, "the mirrored requests compared")
        if same:
            found = wait_for(lambda: shadow_figures(candidate), 30, "the comparison's figures")
            assert found["psi"] < 0.01 and found["ks"] < 0.01 and abs(found["flagged_rate_diff"]) < 0.005, found
        else:
            found = wait_for(lambda: (f := shadow_figures(candidate)) and f["psi"] > 0.2 and f, 30,
                             "the shifted candidate's divergence")
            assert found["ks"] > 0.2 and found["flagged_rate_diff"] > 0.02, found
        figures[f"lifecycle: shadow v{candidate} psi / ks / flagged diff"] = [round(v, 4) for v in found.values()]

    # A burst: mirroring is shed first, and no answer fails or comes from the shadow.
    shed = scraped("ray_deepserve_shadow_requests_total", model=MODEL, version="1", candidate="3", outcome="shed")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answered = list(pool.map(lambda i: answered_by(target, rows[i % 100: i % 100 + 1]), range(400)))
    assert answered == ["1"] * 400
    wait_for(lambda: scraped("ray_deepserve_shadow_requests_total", model=MODEL, version="1", candidate="3",
                             outcome="shed") > shed, 30, "mirrored requests shed in a burst")
    cli("rollback", target=target, config=config, repo=versions)
    assert roles(target) == {"1": "default"}


def test_a_model_in_its_own_deployment_rolls_out_and_back_too(server, versions, tmp_path):
    """Placed ``deployment``: each replica follows the plan itself (and loads a version it is
    asked for before its own poll saw it); the gateway probes the new version before routing."""
    app = "deepserve-lifecycle-remote"
    options = {**CONFIG, "placement": "deployment"}
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": app, "args": {"models": {MODEL: options}}}]}))
    (versions / MODEL / "routing.json").unlink(missing_ok=True)  # start from the config's route
    deployment = {"name": MODEL, "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}}
    with second_app(app, versions, {MODEL: options}, [deployment], repository_poll_s=0.5) as target:
        row = normal_transactions(1, seed=10)
        assert answered_by(target, row) == "1"
        cli("rollout", "2", target=target, config=config, repo=versions)
        settles_on(target, row, "2")
        cli("rollback", target=target, config=config, repo=versions)
        settles_on(target, row, "1")
        assert roles(target) == {"1": "default"}
