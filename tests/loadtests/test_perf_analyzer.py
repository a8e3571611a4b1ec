"""Triton's perf_analyzer, unchanged, against every served model (loadtests/perf_analyzer.py).

It reads each model's configuration (ModelConfig), sends Open Inference Protocol requests
and reads the server's side from ModelStatistics: if any of the three did not answer as
Triton does, it would stop with an error.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_MODELS

PROJECT = Path(__file__).resolve().parents[2]
SCRIPT = PROJECT / "loadtests" / "perf_analyzer.py"

pytestmark = pytest.mark.timeout(300)


def _script():
    spec = importlib.util.spec_from_file_location("perf_analyzer_runner", SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_perf_analyzer_measures_every_model(server, tmp_path, figures):
    why = _script().unavailable()
    if why:
        pytest.skip(f"perf_analyzer test skipped: {why}")
    out = tmp_path / "perf.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--target", server, "--quick", "--json", str(out)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=280)
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {r["model"]: r for r in json.loads(out.read_text())}
    assert set(results) == set(TEST_MODELS)
    for name, r in results.items():
        assert not r["error"] and r["throughput"] > 0, r
        assert r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"], r
        assert r["server_compute_us"] > 0, r  # read back from ModelStatistics
        figures[f"perf_analyzer c1: {name} infer/s"] = round(r["throughput"], 1)
