"""The load-test runner against the real service: real Locust users, real gRPC.

The runner runs as a subprocess: importing locust monkey-patches the standard library with
gevent, which must not happen to the pytest process that hosts Ray and the server.
"""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
RUNNER = PROJECT / "loadtests" / "run.py"
MIX = {"FraudScoring.Score", "FraudScoring.Score[64]", "ModelInfer[fraud-autoencoder]", "Classifier.Classify"}


def run_loadtest(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *args], cwd=PROJECT, capture_output=True,
                          text=True, timeout=timeout)


def test_mix_meets_lenient_slos_with_every_workload(server, tmp_path):
    out = tmp_path / "mix"
    result = run_loadtest("--host", server, "--users", "4", "--spawn-rate", "4", "--duration", "8",
                          "--user", "MixUser", "--out", str(out), "--slo-error-rate", "0", "--slo-min-rps", "20")
    assert result.returncode == 0, result.stdout + result.stderr

    summary = json.loads(out.with_name("mix_summary.json").read_text())
    assert {w["name"] for w in summary["workloads"]} == MIX
    assert summary["skipped_workloads"] == []
    for name in MIX:
        assert summary["requests"][name]["requests"] > 0, name
        assert summary["requests"][name]["failures"] == 0, name
    assert summary["total"]["failures"] == 0 and summary["errors"] == []
    # Fraud scoring dominates the mix (70% single-row Score).
    assert summary["requests"]["FraudScoring.Score"]["requests"] > summary["requests"]["Classifier.Classify"]["requests"]
    assert [(s["name"], s["passed"]) for s in summary["slos"]] == [("error rate", True), ("throughput", True)]
    assert summary["passed"] is True

    with open(out.with_name("mix_stats.csv"), newline="") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert MIX | {"Total"} <= set(rows)
    assert int(rows["Total"]["requests"]) == summary["total"]["requests"]
    assert float(rows["Total"]["p50_ms"]) <= float(rows["Total"]["p99_ms"])


def test_every_workload_runs_without_failures(server, tmp_path):
    out = tmp_path / "every"
    result = run_loadtest("--host", server, "--users", "4", "--spawn-rate", "4", "--duration", "8",
                          "--user", "EveryModelUser", "--out", str(out), "--slo-error-rate", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(out.with_name("every_summary.json").read_text())
    names = MIX | {"Generator.Generate[diffusion]", "Generator.Generate[dcgan]", "Recommender.Recommend",
                   "Recommender.Recommend[cold]"}
    assert {w["name"] for w in summary["workloads"]} == names and summary["skipped_workloads"] == []
    for name in names:
        assert summary["requests"][name]["requests"] > 0, name
        assert summary["requests"][name]["failures"] == 0, name


def test_missed_slo_exits_1_and_names_it(server, tmp_path):
    result = run_loadtest("--host", server, "--users", "2", "--duration", "2", "--user", "FraudScoreUser",
                          "--out", str(tmp_path / "slo"), "--slo-p99-ms", "0.001", "--slo-error-rate", "0.5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  p99" in result.stdout and "PASS  error rate" in result.stdout
    summary = json.loads((tmp_path / "slo_summary.json").read_text())
    assert [(s["name"], s["passed"]) for s in summary["slos"]] == [("p99", False), ("error rate", True)]


def test_unreachable_server_and_bad_arguments_exit_2(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    result = run_loadtest("--host", nobody, "--ready-timeout", "0.5", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "unreachable" in result.stderr
    assert not (tmp_path / "x_summary.json").exists()
    assert run_loadtest("--host", "http://127.0.0.1:9000").returncode == 2
    assert run_loadtest("--users", "0").returncode == 2
