"""The acceptance figures, recomputed with ONNX Runtime from the built artifacts.

Nothing here trusts the manifest's own metrics: held-out data is rebuilt from the
recorded split seed and scored by the exported graph.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.metrics import roc_auc_score

from deepserve.models import digits, fraud
from deepserve.models.common import PARITY_TOLERANCE


def _session(repository, name):
    model, data = repository.load(name)
    return model.manifest, ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def digits_split(repository):
    manifest = repository.get("digit-classifier").manifest
    return digits.load_digits_split(manifest.training_data["split_seed"])


def _onnx_accuracy(session, x, y):
    probs, feats = session.run(["probabilities", "features"], {"images": x})
    assert probs.shape == (len(x), 10) and feats.shape[0] == len(x)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    return float((probs.argmax(1) == y).mean())


def _onnx_fgsm_accuracy(session, x, y, eps, h=1e-3):
    """FGSM against the exported graph itself, with the loss gradient by central differences.

    ONNX Runtime gives no gradients, so each pixel is nudged by +-h in one large batch;
    the sign of the cross-entropy change is the FGSM direction.
    """
    n, pixels = len(x), x[0].size
    bumps = np.eye(pixels, dtype=np.float32).reshape(pixels, 1, 8, 8) * h  # (64, 1, 8, 8)
    plus = (x[:, None] + bumps[None]).reshape(-1, 1, 8, 8)                 # (n*64, 1, 8, 8)
    minus = (x[:, None] - bumps[None]).reshape(-1, 1, 8, 8)
    probs = session.run(["probabilities"], {"images": np.concatenate([plus, minus])})[0]
    # Cross-entropy -log(p_y) = -log(1 - q), q the other classes' probability mass: both
    # move together, and q keeps its precision in float32 where p_y rounds to 1.
    others = probs.copy()
    others[np.arange(2 * n * pixels), np.tile(np.repeat(y, pixels), 2)] = 0.0
    q = others.sum(1).reshape(2, n, pixels)
    sign = np.sign(q[0] - q[1]).reshape(x.shape)
    adversarial = np.clip(x + eps * sign, 0.0, 1.0).astype(np.float32)
    return _onnx_accuracy(session, adversarial, y)


def test_digit_classifier_accuracy(repository, digits_split):
    manifest, session = _session(repository, "digit-classifier")
    acc = _onnx_accuracy(session, digits_split.x_test, digits_split.y_test)
    assert acc >= 0.97
    assert acc == pytest.approx(manifest.metrics["accuracy"], abs=1e-6)


def test_robust_classifier_accuracy_and_fgsm(repository, digits_split):
    plain = repository.get("digit-classifier").manifest.metrics
    manifest, session = _session(repository, "digit-classifier-robust")
    acc = _onnx_accuracy(session, digits_split.x_test, digits_split.y_test)
    assert acc >= 0.95
    _, plain_session = _session(repository, "digit-classifier")
    x, y = digits_split.x_test, digits_split.y_test
    fgsm = {
        "plain": _onnx_fgsm_accuracy(plain_session, x, y, 0.1),
        "robust": _onnx_fgsm_accuracy(session, x, y, 0.1),
    }
    assert fgsm["robust"] >= 2 * fgsm["plain"], fgsm
    # The manifests' figures (PyTorch autograd at build time) agree with the served graphs.
    # Not exactly: the sign of a near-zero gradient component can differ between autograd
    # and the central differences above, and at 360 test images one flipped answer is 0.3%.
    # Seen: 0.133 here vs 0.167 in a manifest (12 images).
    assert fgsm["plain"] == pytest.approx(plain["fgsm_accuracy_eps_0.1"], abs=0.05)
    assert fgsm["robust"] == pytest.approx(manifest.metrics["fgsm_accuracy_eps_0.1"], abs=0.05)


def test_fraud_autoencoder_auc_and_recall(repository):
    manifest, session = _session(repository, "fraud-autoencoder")
    x, label, _ = fraud.generate_transactions(manifest.seed)
    _, calibration, evaluation = fraud.split_rows(label, manifest.seed)
    score, feature_errors = session.run(
        ["score", "feature_errors"], {"transactions": x[evaluation].astype(np.float32)}
    )
    assert feature_errors.shape == (len(evaluation), 30)
    assert roc_auc_score(label[evaluation], score) >= 0.95
    flagged = score > manifest.threshold
    assert flagged[label[evaluation] == 1].mean() >= 0.6
    # The threshold is where it claims to be: about 1% of unseen normal rows above it.
    assert flagged[label[evaluation] == 0].mean() == pytest.approx(0.01, abs=0.005)
    # The explanation adds up: large per-feature errors are what makes a large score.
    order = np.argsort(score)
    assert feature_errors[order[-50:]].sum(1).mean() > 10 * feature_errors[order[:50]].sum(1).mean()


@pytest.mark.parametrize("name", ["fraud-autoencoder", "digit-classifier", "digit-classifier-robust"])
def test_manifest_records_parity_and_provenance(repository, name):
    manifest = repository.get(name).manifest
    assert manifest.metrics["onnx_parity_max_diff"] <= PARITY_TOLERANCE
    assert len(manifest.sha256) == 64 and manifest.code_revision
    assert manifest.inputs[0].shape[0] == -1  # dynamic batch axis
    assert (repository.get(name).directory / "card.md").is_file()


def test_dynamic_batch_axis(repository):
    _, session = _session(repository, "digit-classifier")
    for batch in (1, 7, 300):
        probs = session.run(["probabilities"], {"images": np.zeros((batch, 1, 8, 8), np.float32)})[0]
        assert probs.shape == (batch, 10)
