"""The seeded fuzz run of ``make test`` through the admission front (nginx): hostile requests
cross a second parser on their way to the workers, and still none ends as INTERNAL or
UNKNOWN, none gets a wrong status, and the gateway is ready afterwards.

Its own application: the session's models and settings (tests/conftest.py), all placed in the
gateway (no second set of model deployments), one worker, behind the front. The full oracle
(replica restarts, the gateway's memory) is test_fuzz.py's, against the session's application.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import harness
import strategies
from conftest import MAX_ROWS, PROJECT, TEST_MODELS, nginx_or_skip
from deepserve.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from second_app import gateway_status, second_app  # noqa: E402 - tests/reliability/second_app.py

APP = "deepserve-fuzz-front"
REQUESTS = 300


@pytest.fixture(scope="module")
def fronted(server, repository):
    nginx_or_skip()
    models = {name: {**options, "placement": "gateway"} for name, options in TEST_MODELS.items()}
    with second_app(APP, repository.root, models, admission_front=True, gateway_processes=1,
                    max_rows_per_request=MAX_ROWS, max_loop_lag_s=0.5) as target:
        yield target


def _fuzz(target: str, figures: dict, total: int, rounds: int, base_seed: int | None, name: str) -> None:
    categories = strategies.categories(Settings().max_message_bytes)
    fuzzer = harness.Fuzzer(target, concurrency=4)
    try:
        harness.run(fuzzer, categories, total=total, rounds=rounds, base_seed=base_seed)
    finally:
        fuzzer.close()
    report = fuzzer.report()
    run = fuzzer.figures()
    figures[f"fuzz {name} through the front: requests"] = run["requests"]
    figures[f"fuzz {name} through the front: status codes"] = run["status_codes"]
    figures[f"fuzz {name} through the front: internal or unknown"] = run["internal_or_unknown"]
    fuzzer.write_failures(PROJECT / "reports" / f"fuzz-failures-front-{name}.json")
    assert not fuzzer.harness_errors, report
    assert fuzzer.sent >= total, report
    assert fuzzer.internal_or_unknown == 0, report
    assert not fuzzer.failure_counts, report
    assert harness.wait_ready(target, timeout=30), "not ready after the run"
    status = gateway_status(APP)
    assert status["front"]["alive"] and status["front"]["restarts"] == 0
    assert all(w["restarts"] == 0 for w in status["workers"])


@pytest.mark.timeout(300)
def test_fuzz_seeded_through_the_front(fronted, figures):
    """A few hundred derandomized hostile and valid requests (``make test``)."""
    _fuzz(fronted, figures, total=REQUESTS, rounds=1, base_seed=None, name="seeded")


@pytest.mark.fuzz
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not os.environ.get("DEEPSERVE_FUZZ_REQUESTS"),
                    reason="the full fuzz run: make fuzz (sets DEEPSERVE_FUZZ_REQUESTS)")
def test_fuzz_full_through_the_front(fronted, figures):
    """``make fuzz``: $DEEPSERVE_FUZZ_REQUESTS requests through the front too."""
    _fuzz(fronted, figures, total=int(os.environ["DEEPSERVE_FUZZ_REQUESTS"]), rounds=5,
          base_seed=int(os.environ.get("DEEPSERVE_FUZZ_SEED", "0")), name="full")
