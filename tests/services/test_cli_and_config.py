"""The CLI against the running service, and the Serve config as shipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from deepserve.app import build_app
from deepserve.models import fraud

PROJECT = Path(__file__).resolve().parents[2]
CONFIG = PROJECT / "deploy" / "serve_config.yaml"


def _cli(*args):
    done = subprocess.run([sys.executable, "-m", "deepserve.cli", *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_classify_command(server):
    out = _cli("classify", "--digit", "3", "--target", server)
    assert out.startswith("sklearn digit") and ": 3 (" in out and "digit-classifier v1" in out


def test_score_command(server, tmp_path):
    x, label, _ = fraud.generate_transactions(0, fraud.SyntheticConfig(n_rows=2000))
    rows = list(range(5)) + [int(i) for i in (label == 1).nonzero()[0][:3]]
    path = tmp_path / "transactions.csv"
    fraud.write_csv(path, x[rows], label[rows])
    out = _cli("score", str(path), "--target", server)
    lines = out.splitlines()
    assert lines[0].startswith("fraud-autoencoder v1: 8 transaction(s)")
    assert len(lines) == 9 and all("score" in line and "top:" in line for line in lines[1:])
    assert sum("FRAUD" in line for line in lines[-3:]) >= 2  # the fraud rows, mostly


def test_shipped_serve_config_is_valid_and_builds(repository):
    config = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` would check
    app_config = config["applications"][0]
    assert app_config["import_path"] == "deepserve.app:build_app"
    args = {**app_config["args"], "repository": str(repository.root)}
    app = build_app(args, app_config["deployments"])
    assert app is not None
