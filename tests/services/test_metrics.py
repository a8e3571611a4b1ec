"""A real Prometheus scrapes the running service; its HTTP API must agree with the load sent."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from conftest import METRICS_PORT, TEST_MODELS, free_port
from deepserve.proto import deepserve_pb2 as v1
from deepserve.proto import deepserve_pb2_grpc as v1_grpc
from deepserve.proto import inference_pb2 as oip
from deepserve.proto import inference_pb2_grpc as oip_grpc

PROJECT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None and not os.environ.get("CI"),
    reason="Debian's prometheus package is not installed (`make test` installs it where it may)",
)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus itself, scraping the service's metrics endpoint every second, with our rules."""
    assert PROMETHEUS, "prometheus not installed: `make test` installs Debian's package"
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROJECT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROJECT / "deploy/prometheus/rules.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{METRICS_PORT}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "w"),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if urllib.request.urlopen(f"{base}/-/ready", timeout=1).status == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, (work / "prometheus.log").read_text()[-2000:]
        time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(10)


def query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    body = json.load(urllib.request.urlopen(url, timeout=5))
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(base: str, promql: str) -> float:
    result = query(base, promql)
    return float(result[0]["value"][1]) if result else 0.0


def settled(base: str, promql: str, quiet_s: float = 5.0, timeout: float = 90.0, exists: bool = False) -> float:
    """The value once it has stopped changing (and, with ``exists``, once the series is there):
    the process flushes each second, Ray exports each second (in tests) and Prometheus scrapes
    each second, so 5 s of quiet means caught up."""
    deadline = time.monotonic() + timeout
    value, since = scalar(base, promql), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = scalar(base, promql)
        if now != value:
            value, since = now, time.monotonic()
        elif (value > 0 or not exists) and time.monotonic() - since >= quiet_s:
            return value
    raise AssertionError(f"{promql} never settled")


def reaches(base: str, promql: str, want: float, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = scalar(base, promql)
        if got >= want:
            return got
        time.sleep(0.5)
    return scalar(base, promql)


REQUESTS = 'sum(ray_deepserve_requests_total{{model="{model}",method="{method}",code="{code}"}})'


@needs_prometheus
def test_scraped_counters_match_the_load(prometheus, server):
    model = "digit-classifier-robust"
    counts = {"OK": 37, "INVALID_ARGUMENT": 11}
    good = oip.ModelInferRequest(model_name=model)
    good.inputs.add(name="images", datatype="FP32", shape=[2, 1, 8, 8])
    good.raw_input_contents.append(np.zeros((2, 1, 8, 8), np.float32).tobytes())
    bad = oip.ModelInferRequest(model_name=model)
    bad.inputs.add(name="images", datatype="FP32", shape=[2, 64])
    bad.raw_input_contents.append(np.zeros((2, 64), np.float32).tobytes())
    unknown = oip.ModelInferRequest(model_name="typo-model-123")
    # One of each first: every series exists before the baseline is read (a series that
    # earlier tests started may not have reached Prometheus yet, and would read as 0).
    with grpc.insecure_channel(server) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(good, timeout=10)
        for request in (bad, unknown):
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(request, timeout=10)
    before = {code: settled(prometheus, REQUESTS.format(model=model, method="ModelInfer", code=code), exists=True)
              for code in counts}
    before_unknown = settled(prometheus, REQUESTS.format(model="unknown", method="ModelInfer", code="NOT_FOUND"),
                             exists=True)
    before_count = settled(prometheus, f'sum(ray_deepserve_request_duration_seconds_count{{model="{model}",'
                                       f'method="ModelInfer"}})', exists=True)

    with grpc.insecure_channel(server) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(counts["OK"]):
            stub.ModelInfer(good, timeout=10)
        for request, n in ((bad, counts["INVALID_ARGUMENT"]), (unknown, 5)):
            for _ in range(n):
                with pytest.raises(grpc.RpcError):
                    stub.ModelInfer(request, timeout=10)

    for code, n in counts.items():
        promql = REQUESTS.format(model=model, method="ModelInfer", code=code)
        assert reaches(prometheus, promql, before[code] + n) == before[code] + n, code
    unknown_q = REQUESTS.format(model="unknown", method="ModelInfer", code="NOT_FOUND")
    assert reaches(prometheus, unknown_q, before_unknown + 5) == before_unknown + 5  # the typo is no label
    assert not query(prometheus, 'ray_deepserve_requests_total{model="typo-model-123"}')
    count_q = f'sum(ray_deepserve_request_duration_seconds_count{{model="{model}",method="ModelInfer"}})'
    assert reaches(prometheus, count_q, before_count + 48) == before_count + 48

    # Over everything observed so far (rate() would need two scrapes of a new series).
    p99 = scalar(prometheus, 'histogram_quantile(0.99, sum by (le) ('
                             f'ray_deepserve_request_duration_seconds_bucket{{model="{model}"}}))')
    assert math.isfinite(p99) and 0 < p99 < 1.0  # these calls take milliseconds
    # rate() sees increases between scrapes: a series born in one burst shows none, so trickle.
    rate = f'sum(rate(ray_deepserve_requests_total{{model="{model}",code="OK"}}[1m]))'
    with grpc.insecure_channel(server) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(20):
            stub.ModelInfer(good, timeout=10)
            time.sleep(0.2)
    assert reaches(prometheus, rate, 1e-9) > 0


@needs_prometheus
def test_model_health_series(prometheus, server, repository):
    import onnxruntime as ort

    from deepserve.models import fraud

    rows, flagged = "sum(ray_deepserve_fraud_scored_rows_total)", "sum(ray_deepserve_fraud_flagged_rows_total)"
    before_rows, before_flagged = settled(prometheus, rows), settled(prometheus, flagged)
    x, label, _ = fraud.generate_transactions(1, fraud.SyntheticConfig(n_rows=4000))
    batch = np.concatenate([x[label == 1][:12], x[label == 0][:18]]).astype(np.float32)
    model, data = repository.load("fraud-autoencoder")
    scores = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(["score"], {"transactions": batch})[0]
    expected = int((scores > model.manifest.threshold).sum())  # at the calibrated threshold...
    with grpc.insecure_channel(server) as channel:
        stub = v1_grpc.FraudScoringStub(channel)
        transactions = [v1.Transaction(features=row.tolist()) for row in batch]
        stub.Score(v1.ScoreRequest(transactions=transactions, threshold=1e9), timeout=10)  # ...whatever the override
    assert 0 < expected < len(batch)
    assert reaches(prometheus, rows, before_rows + len(batch)) == before_rows + len(batch)
    assert reaches(prometheus, flagged, before_flagged + expected) == before_flagged + expected

    ready = query(prometheus, "max by (model) (ray_deepserve_model_ready)")
    assert {r["metric"]["model"]: float(r["value"][1]) for r in ready} == dict.fromkeys(TEST_MODELS, 1.0)
    info = query(prometheus, "ray_deepserve_model_info")
    assert {(r["metric"]["model"], r["metric"]["placement"], r["metric"]["provider"]) for r in info} == {
        (name, entry["placement"], "CPUExecutionProvider") for name, entry in TEST_MODELS.items()}
    assert scalar(prometheus, 'sum(ray_deepserve_batch_size_requests_count{model="digit-classifier-robust"})') > 0
    assert scalar(prometheus, "sum(ray_deepserve_classifier_confidence_ratio_count)") > 0
    assert scalar(prometheus, 'sum(ray_deepserve_process_resident_memory_bytes{component="gateway"})') > 1e7
    # The recording rules evaluate on real data.
    assert reaches(prometheus, 'count(deepserve:requests:rate1m{model="fraud-autoencoder"})', 1) >= 1


@needs_prometheus
def test_generation_series_count_steps_and_images(prometheus, server):
    steps = 'sum(ray_deepserve_generation_steps_total{model="digit-diffusion"})'
    images = 'sum(ray_deepserve_generated_images_total{model="digit-diffusion"})'
    before_steps, before_images = settled(prometheus, steps), settled(prometheus, images)
    with grpc.insecure_channel(server) as channel:
        stub = v1_grpc.GeneratorStub(channel)
        response = stub.Generate(v1.GenerateRequest(label=2, count=3, steps=7, seed=1), timeout=30)
    assert len(response.images) == 3
    assert reaches(prometheus, steps, before_steps + 7) == before_steps + 7
    assert reaches(prometheus, images, before_images + 3) == before_images + 3


@pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"), reason="promtool not installed")
def test_promtool_accepts_config_and_rules():
    assert PROMTOOL, "promtool not installed: `make test` installs Debian's prometheus package"
    config = subprocess.run([PROMTOOL, "check", "config", "prometheus.yml"], cwd=PROJECT / "deploy/prometheus",
                            capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr
    rules = subprocess.run([PROMTOOL, "check", "rules", "rules.yml"], cwd=PROJECT / "deploy/prometheus",
                           capture_output=True, text=True)
    assert rules.returncode == 0 and "SUCCESS: 13 rules found" in rules.stdout, rules.stdout + rules.stderr


@pytest.mark.skipif(PROMTOOL is None and not os.environ.get("CI"), reason="promtool not installed")
def test_rollout_alerts_fire_as_their_unit_tests_say():
    """deploy/prometheus/rules_test.yml: which shadow divergences and drifts alert, and when."""
    assert PROMTOOL, "promtool not installed: `make test` installs Debian's prometheus package"
    result = subprocess.run([PROMTOOL, "test", "rules", "rules_test.yml"], cwd=PROJECT / "deploy/prometheus",
                            capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


# ---------------------------------------------------------------------------- rollout series, recorded locally


class _Captured:
    """Stands in for Ray's export: keeps what :meth:`Metrics.refresh` would hand to Ray."""

    def __init__(self):
        self.gauges = {}

    def export(self, snapshot, tag_keys, everything):
        self.gauges = snapshot["gauges"]


def test_rollout_series_count_and_combine_across_gateway_workers():
    from deepserve.metrics import Metrics

    replica, worker = Metrics(True), Metrics(True)
    replica._export = captured = _Captured()
    for m, figures, psi in ((replica, {"psi": 0.05, "ks": 0.3, "flagged_rate_diff": 0.01, "agreement": 0.99}, 0.1),
                            (worker, {"psi": 0.4, "ks": 0.1, "flagged_rate_diff": -0.03, "agreement": 0.9}, 0.3)):
        m.routed("fraud-autoencoder", "2", "canary")
        m.shadowed("fraud-autoencoder", "1", "2", "compared")
        m.divergence("fraud-autoencoder", "1", "2", figures)
        m.drift("fraud-autoencoder", "1", psi)
    worker.shadowed("fraud-autoencoder", "1", "2", "shed")
    replica.absorb("worker-0", worker.snapshot())
    assert replica.route_requests.pending == {("fraud-autoencoder", "2", "canary"): 2}
    assert replica.shadow_requests.pending == {("fraud-autoencoder", "1", "2", "compared"): 2,
                                               ("fraud-autoencoder", "1", "2", "shed"): 1}
    replica.refresh()
    key = ("fraud-autoencoder", "1", "2")
    # The worst of the two processes: the larger distance, the signed difference farthest
    # from 0, the lower agreement.
    assert captured.gauges["deepserve_shadow_divergence"] == {
        (*key, "psi"): 0.4, (*key, "ks"): 0.3, (*key, "flagged_rate_diff"): -0.03, (*key, "agreement"): 0.9}
    assert captured.gauges["deepserve_drift_psi"] == {("fraud-autoencoder", "1"): 0.3}

    # New figures replace the pair's old ones; {} and None remove the series.
    replica.divergence("fraud-autoencoder", "1", "2", {"psi": 0.01})
    assert replica.shadow_divergence.values == {(*key, "psi"): 0.01}
    replica.divergence("fraud-autoencoder", "1", "2", {})
    replica.drift("fraud-autoencoder", "1", None)
    assert replica.shadow_divergence.values == {} and replica.drift_psi.values == {}


def test_rollout_recording_is_a_no_op_when_disabled():
    from deepserve.metrics import Metrics

    m = Metrics(False)
    m.routed("m", "1", "default")
    m.shadowed("m", "1", "2", "failed")
    m.divergence("m", "1", "2", {"psi": 1.0})
    m.drift("m", "1", 0.5)
    assert m.snapshot() == {"counters": {}, "histograms": {}, "gauges": {}}
