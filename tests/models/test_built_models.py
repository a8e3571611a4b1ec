"""The acceptance figures, recomputed with ONNX Runtime from the built artifacts.

Nothing here trusts the manifest's own metrics: held-out data is rebuilt from the
recorded split seed and scored by the exported graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from sklearn.metrics import roc_auc_score

from deepserve.models import attacks, digits, fraud
from deepserve.models.common import PARITY_TOLERANCE

pytestmark = pytest.mark.timeout(60)  # each test; the attack tests set their own


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


def test_digit_classifier_accuracy(repository, digits_split):
    manifest, session = _session(repository, "digit-classifier")
    acc = _onnx_accuracy(session, digits_split.x_test, digits_split.y_test)
    assert acc >= 0.97
    assert acc == pytest.approx(manifest.metrics["accuracy"], abs=1e-6)


# ---------------------------------------------------------------------------- robustness
#
# The robustness figures are recomputed on the exported files. PGD needs gradients, which
# ONNX Runtime does not give: it runs with autograd on a network holding the file's own
# weights (outputs checked against ONNX Runtime's), and ONNX Runtime judges every adversarial
# image. The Square attack and issue 17's numerical-gradient PGD run through ONNX Runtime alone.

ATTACKED_EPSILONS = (0.1, 0.2)  # the targets' radii (0.05 is in the manifests, not re-run here)


def _network_from_onnx(data: bytes) -> digits.DigitCNN:
    """A DigitCNN holding the exported graph's weights (initializers ``net.<parameter>``)."""
    graph = onnx.load_from_string(data).graph
    weights = {i.name.removeprefix("net."): torch.from_numpy(numpy_helper.to_array(i).copy())
               for i in graph.initializer}
    cfg = digits.DigitCNNConfig(
        channels=tuple(weights[f"conv.{k}.weight"].shape[0] for k in (0, 2, 5)),
        hidden=weights["hidden.1.weight"].shape[0],
    )
    net = digits.DigitCNN(cfg, weights["pixel_mean"], weights["pixel_std"])
    net.load_state_dict(weights)  # strict: every tensor in the file has its place, and no more
    return net.eval()


def _assert_same_function(net, session, x):
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(session.run(["probabilities"], {"images": x})[0], want, atol=1e-5)


@pytest.fixture(scope="module")
def onnx_robustness(repository, digits_split):
    """Per (model, eps), per attack: which held-out images it broke, judged by ONNX Runtime,
    with the manifest's own attack settings and seeds (so the manifest's figures come out)."""
    x, y = digits_split.x_test, digits_split.y_test
    found = {}
    for name in ("digit-classifier", "digit-classifier-robust"):
        manifest, session = _session(repository, name)
        net = _network_from_onnx(repository.load(name)[1])
        _assert_same_function(net, session, x)
        for eps in ATTACKED_EPSILONS:
            pgd = attacks.pgd(attacks.TorchTarget(net), x, y, eps, steps=20, restarts=5,
                              loss=attacks.PGD_LOSSES, seed=manifest.seed)
            _assert_same_function(net, session, pgd.x_adv)
            square = attacks.square_attack(attacks.OnnxTarget(session), x, y, eps,
                                           queries=manifest.extra["robustness"]["square_queries"],
                                           seed=manifest.seed)
            found[name, eps] = {
                "pgd20x5": session.run(["probabilities"], {"images": pgd.x_adv})[0].argmax(1) != y,
                "square": square.fooled,
            }
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["digit-classifier", "digit-classifier-robust"])
def test_robustness_figures_hold_on_the_onnx_file(repository, onnx_robustness, figures, name):
    metrics = repository.get(name).manifest.metrics
    for eps in ATTACKED_EPSILONS:
        fooled = onnx_robustness[name, eps]
        measured = {attack: 1 - float(f.mean()) for attack, f in fooled.items()}
        measured["robust"] = 1 - float((fooled["pgd20x5"] | fooled["square"]).mean())
        figures[f"{name} onnx robust_accuracy_eps_{eps}"] = round(measured["robust"], 4)
        # The manifest says what the file does (one image of slack: a float32 near-tie).
        one_image = 1.01 / len(fooled["square"])
        for attack, value in measured.items():
            want = metrics[f"{attack}_accuracy_eps_{eps}"]
            if attack == "robust":  # the manifest's also counts FGSM, so it can only be lower
                assert want <= value + one_image, (eps, want, value)
            else:
                assert value == pytest.approx(want, abs=one_image), (attack, eps)
        # Gradient masking: the gradient-free attack does not beat PGD by a wide margin.
        assert measured["square"] >= measured["pgd20x5"] - attacks.MASKING_MARGIN, (eps, measured)


@pytest.mark.timeout(300)
def test_robust_classifier_meets_its_targets_on_the_onnx_file(repository, digits_split, onnx_robustness):
    _, session = _session(repository, "digit-classifier-robust")
    assert _onnx_accuracy(session, digits_split.x_test, digits_split.y_test) >= digits.TARGETS["accuracy"]
    for eps in ATTACKED_EPSILONS:
        fooled = onnx_robustness["digit-classifier-robust", eps]
        robust = 1 - float((fooled["pgd20x5"] | fooled["square"]).mean())
        assert robust >= digits.TARGETS[f"robust_accuracy_eps_{eps}"], (eps, robust)
    # The plain model, reported beside it, has next to none.
    assert 1 - onnx_robustness["digit-classifier", 0.1]["pgd20x5"].mean() <= 0.1


@pytest.mark.timeout(120)
def test_numerical_gradient_pgd_of_issue_17(repository, digits_split, figures):
    """The attack issue 17 reported with (L-infinity PGD, 10 steps of eps/4, a random start,
    gradients by central differences through ONNX Runtime) on the first 100 held-out images;
    it left the FGSM-trained model 0.50 accuracy at eps=0.1 and 0.01 at eps=0.2."""
    _, session = _session(repository, "digit-classifier-robust")
    x, y = digits_split.x_test[:100], digits_split.y_test[:100]
    for eps in ATTACKED_EPSILONS:
        result = attacks.pgd(attacks.OnnxTarget(session), x, y, eps, steps=10, restarts=1, step_size=eps / 4)
        figures[f"digit-classifier-robust issue-17 PGD accuracy eps={eps} (100 images)"] = result.accuracy
        assert result.accuracy >= digits.TARGETS[f"robust_accuracy_eps_{eps}"], (eps, result.accuracy)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["digit-classifier", "digit-classifier-robust"])
def test_robustness_report_in_manifest_and_card(repository, name):
    model = repository.get(name)
    metrics = model.manifest.metrics
    for eps in digits.EPSILONS:
        names = [f"{a}_accuracy_eps_{eps}" for a in (*attacks.ATTACKS, "robust")]
        # Plain floats: ListModels carries every numeric metric to clients.
        assert all(type(metrics[n]) is float for n in names)
        assert metrics[f"robust_accuracy_eps_{eps}"] <= min(metrics[n] for n in names)
        assert (metrics[f"square_accuracy_eps_{eps}"]
                >= metrics[f"pgd20x5_accuracy_eps_{eps}"] - attacks.MASKING_MARGIN)
    card = (model.directory / "card.md").read_text()
    assert "Strongest single attack" in card and "](card.png)" in card
    assert (model.directory / "card.png").is_file()


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
