"""`deepserve build --data`: a real table nobody here made, and build determinism."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import roc_auc_score

from deepserve.drift import Reference, psi
from deepserve.models import fraud
from deepserve.repository import ModelRepository


@pytest.fixture(scope="module")
def breast_cancer_csv(tmp_path_factory):
    """scikit-learn's breast-cancer table; label 1 = malignant (the anomaly), 0 = benign."""
    data = load_breast_cancer()
    path = tmp_path_factory.mktemp("data") / "breast_cancer.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*(n.replace(" ", "_") for n in data.feature_names), "malignant"])
        for row, target in zip(data.data, data.target):
            writer.writerow([*row, int(target == 0)])
    return path


def _build(csv_path, repo, seed=0):
    cmd = [sys.executable, "-m", "deepserve.cli", "build", "--only", "fraud-autoencoder",
           "--data", str(csv_path), "--label-column", "malignant", "--name", "breast-cancer-ae",
           "--repo", str(repo), "--seed", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return ModelRepository(repo).get("breast-cancer-ae")


@pytest.fixture(scope="module")
def built(breast_cancer_csv, tmp_path_factory):
    return _build(breast_cancer_csv, tmp_path_factory.mktemp("repo"))


def test_breast_cancer_auc_through_the_exported_graph(built, breast_cancer_csv):
    table = fraud.load_table(breast_cancer_csv, "malignant")
    assert table.schema == "generic" and table.x.shape == (569, 30)
    _, _, evaluation = fraud.split_rows(table.label, built.manifest.seed)
    session = ort.InferenceSession(built.read_model_bytes(), providers=["CPUExecutionProvider"])
    score, = session.run(["score"], {"transactions": table.x[evaluation].astype(np.float32)})
    assert roc_auc_score(table.label[evaluation], score) >= 0.90
    # The label was used for evaluation only: training saw benign rows alone.
    assert built.manifest.training_data["train_rows"] == int(0.6 * (table.label == 0).sum())
    assert built.manifest.extra["feature_names"] == table.columns


def test_same_seed_same_metrics(built, breast_cancer_csv, tmp_path):
    again = _build(breast_cancer_csv, tmp_path)
    assert again.manifest.metrics == built.manifest.metrics
    assert again.manifest.threshold == built.manifest.threshold
    assert again.manifest.extra["score_reference"] == built.manifest.extra["score_reference"]


def test_score_reference_is_the_calibration_rows_scores(built, breast_cancer_csv):
    """The drift reference: equal-frequency bins of the held-out normal rows' scores, which
    the exported graph reproduces bin for bin."""
    reference = Reference.from_extra(built.manifest.extra)
    table = fraud.load_table(breast_cancer_csv, "malignant")
    _, calibration, _ = fraud.split_rows(table.label, built.manifest.seed)
    session = ort.InferenceSession(built.read_model_bytes(), providers=["CPUExecutionProvider"])
    score, = session.run(["score"], {"transactions": table.x[calibration].astype(np.float32)})
    assert reference.measure == "score" and reference.rows == len(calibration) == 71
    assert len(reference.edges) == 9 and reference.edges[0] > 0
    counts = reference.counts(score)
    assert counts.tolist() == np.round(np.asarray(reference.fractions) * len(score)).tolist()
    assert psi(reference.fractions, counts) < 1e-12


def test_an_unlabelled_table_builds_with_its_false_positive_rate_only(breast_cancer_csv, tmp_path):
    """No label column: the model card reports what can be measured (no ROC) instead of failing."""
    with open(breast_cancer_csv) as f:
        rows = [r[:-1] for r in csv.reader(f)]
    unlabelled = tmp_path / "unlabelled.csv"
    with open(unlabelled, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    done = subprocess.run([sys.executable, "-m", "deepserve.cli", "build", "--only", "fraud-autoencoder",
                           "--data", str(unlabelled), "--name", "unlabelled-ae", "--repo", str(tmp_path / "repo")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    model = ModelRepository(tmp_path / "repo").get("unlabelled-ae")
    assert "roc_auc" not in model.manifest.metrics
    assert 0 <= model.manifest.metrics["false_positive_rate_at_threshold"] <= 0.1
    card = (model.directory / "card.md").read_text()
    assert "only the false-positive rate is measured" in card and "ROC-AUC" not in card


def test_bad_table_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,2,0\n3,oops,1\n")
    done = subprocess.run(
        [sys.executable, "-m", "deepserve.cli", "build", "--only", "fraud-autoencoder",
         "--data", str(bad), "--repo", str(tmp_path / "r")],
        capture_output=True, text=True,
    )
    assert done.returncode == 2
    assert "numeric" in done.stderr and "bad.csv" in done.stderr
    assert "Traceback" not in done.stderr


def test_synthetic_generator_is_seeded_and_has_every_fraud_pattern():
    cfg = fraud.SyntheticConfig(n_rows=20_000)
    x1, y1, p1 = fraud.generate_transactions(7, cfg)
    x2, y2, _ = fraud.generate_transactions(7, cfg)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.shape == (20_000, 30) and y1.mean() == pytest.approx(0.005, abs=1e-4)
    assert set(p1[y1 == 1]) == set(fraud.FRAUD_PATTERNS)
    assert not np.array_equal(x1, fraud.generate_transactions(8, cfg)[0])
