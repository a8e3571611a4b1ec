"""The attack code (deepserve.models.attacks) against a linear classifier, where the strongest
L-infinity attack is known in closed form.

For logits ``W x + b`` and an image inside ``[eps, 1 - eps]`` (so the [0, 1] box never
binds), the lowest margin of class ``y`` over class ``j`` within the eps-box is
``(w_y - w_j) . x + b_y - b_j - eps * |w_y - w_j|_1``, reached at ``x - eps * sign(w_y - w_j)``:
an image is breakable exactly when some ``j`` makes that negative. The same linear model
runs as a PyTorch module (autograd) and as an ONNX graph (central differences).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from deepserve.models import attacks

EPS = 0.1
SHAPE = (1, 8, 8)


def _linear(classes: int, seed: int):
    """A nearest-prototype classifier (logits ``2 mu_c . x - |mu_c|^2``) and noisy images of
    its prototypes, all inside [eps, 1 - eps]; labels are the model's own clean answers."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.2, 0.8, size=(classes, 64))
    noisy = prototypes[rng.integers(0, classes, 400)] + rng.normal(0, 0.25, (400, 64))
    x = np.clip(noisy, EPS, 1 - EPS).astype(np.float32).reshape(400, *SHAPE)
    w = (2 * prototypes).astype(np.float32)
    b = -(prototypes**2).sum(1).astype(np.float32)
    y = (x.reshape(len(x), -1) @ w.T + b).argmax(1)
    return w, b, x, y


def _breakable(w, b, x, y, eps):
    """Per image: does some class j beat y somewhere in the eps-box (closed form)?"""
    flat = x.reshape(len(x), -1).astype(np.float64)
    logits = flat @ w.T.astype(np.float64) + b
    diff = w[y][:, None, :] - w[None, :, :]                    # (N, classes, 64): w_y - w_j
    worst = logits[np.arange(len(x)), y][:, None] - logits - eps * np.abs(diff).sum(-1)
    worst[np.arange(len(x)), y] = np.inf
    return (worst < 0).any(1)


class _LinearNet(torch.nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.linear = torch.nn.Linear(64, len(b))
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(w))
            self.linear.bias.copy_(torch.from_numpy(b))

    def forward(self, x):
        return self.linear(x.flatten(1))  # (B, classes) logits


def _onnx_linear(w, b) -> ort.InferenceSession:
    """``softmax(flatten(images) W^T + b)`` as an ONNX graph with the classifiers' IO names."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["images"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "linear",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", *SHAPE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(b)])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()),
         helper.make_tensor("b", TensorProto.FLOAT, b.shape, b)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _targets(w, b):
    return {"torch": attacks.TorchTarget(_LinearNet(w, b)), "onnx": attacks.OnnxTarget(_onnx_linear(w, b))}


def _assert_valid(result, target, x, y, eps):
    """Every adversarial image stays in the eps-box and [0, 1]; every 'fooled' one is wrong."""
    assert np.abs(result.x_adv - x).max() <= eps + 1e-6
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
    predictions = target.log_probs(result.x_adv).argmax(1)
    np.testing.assert_array_equal(predictions != y, result.fooled)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_fgsm_is_the_optimal_attack_on_a_two_class_linear_model(backend):
    w, b, x, y = _linear(2, seed=0)
    target = _targets(w, b)[backend]
    result = attacks.fgsm(target, x, y, EPS)
    # Two classes: the cross-entropy gradient's sign is -sign(w_y - w_other), the optimum.
    optimal = np.clip(x - EPS * np.sign(w[y] - w[1 - y]).reshape(-1, *SHAPE), 0, 1)
    np.testing.assert_allclose(result.x_adv, optimal, atol=1e-6)
    np.testing.assert_array_equal(result.fooled, _breakable(w, b, x, y, EPS))
    _assert_valid(result, target, x, y, EPS)


def _assert_sound_and_complete(result, target, w, b, x, y, breakable) -> None:
    """Sound: the attack never breaks a provably robust image. Complete where it counts: it
    breaks every image that is breakable with 20% to spare (at 0.8 eps); right at the edge a
    sign step or a random square may stop short of the one corner that works."""
    assert not (result.fooled & ~breakable).any()
    clearly = _breakable(w, b, x, y, 0.8 * EPS)
    assert result.fooled[clearly].all(), np.flatnonzero(clearly & ~result.fooled)
    _assert_valid(result, target, x, y, EPS)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_pgd_finds_exactly_the_breakable_images_of_a_ten_class_linear_model(backend):
    w, b, x, y = _linear(10, seed=1)
    target = _targets(w, b)[backend]
    breakable = _breakable(w, b, x, y, EPS)
    assert 0.2 < breakable.mean() < 0.8  # a case where the answer is not trivial
    restarts = 5 if backend == "torch" else 2  # central differences cost 128 runs a step
    result = attacks.pgd(target, x, y, EPS, steps=20, restarts=restarts, loss="margin")
    _assert_sound_and_complete(result, target, w, b, x, y, breakable)


@pytest.mark.timeout(60)
def test_square_attack_breaks_the_breakable_images_without_gradients():
    w, b, x, y = _linear(10, seed=1)
    target = _targets(w, b)["onnx"]
    breakable = _breakable(w, b, x, y, EPS)
    result = attacks.square_attack(target, x, y, EPS, queries=1000)
    _assert_sound_and_complete(result, target, w, b, x, y, breakable)


@pytest.mark.timeout(60)
def test_central_differences_match_autograd():
    w, b, x, y = _linear(10, seed=2)
    targets = _targets(w, b)
    for loss in ("ce", "margin"):
        want, want_lp = targets["torch"].gradient(x[:50], y[:50], loss)
        got, got_lp = targets["onnx"].gradient(x[:50], y[:50], loss)
        np.testing.assert_allclose(got_lp, want_lp, atol=1e-4)  # float32 graph vs float64 softmax
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


class _Quantized(torch.nn.Module):
    """The linear model behind input quantization to sklearn's 17 levels: autograd sees a
    zero gradient everywhere (torch.round), the textbook case of gradient masking."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 16) / 16)


@pytest.mark.timeout(60)
def test_masked_gradients_fail_the_report():
    w, b, x, y = _linear(10, seed=1)
    honest = attacks.robustness_report(attacks.TorchTarget(_LinearNet(w, b)), x, y, [EPS])
    honest.check_gradient_masking("linear")  # does not raise
    masked = attacks.robustness_report(attacks.TorchTarget(_Quantized(_LinearNet(w, b))), x, y, [EPS])
    assert masked.by_attack["square"][EPS] < masked.by_attack["pgd20x5"][EPS] - attacks.MASKING_MARGIN
    assert masked.strongest(EPS) == "square"
    with pytest.raises(attacks.GradientMaskingError, match="eps=0.1"):
        masked.check_gradient_masking("linear")
