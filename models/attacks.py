"""L-infinity evasion attacks on image classifiers, for robustness reports.

Pixels live in [0, 1]; an attack at ``eps`` may move each pixel by at most ``eps`` and keeps
the image in [0, 1]. The attacks see a model only through an :class:`AttackTarget`, so the
same code attacks a PyTorch network at build time (:class:`TorchTarget`, gradients by
autograd) and the exported ONNX file in tests (:class:`OnnxTarget`, gradients by central
differences of its outputs):

- :func:`fgsm`: one signed-gradient step (Goodfellow et al., 2015).
- :func:`pgd`: projected gradient descent from random starts (Madry et al., 2018); an image
  counts as broken when any restart, at any step, is misclassified.
- :func:`square_attack`: score-based random search over the corners of the eps-box
  (Andriushchenko et al., 2020). It never looks at a gradient, so a model that hides its
  gradients (gradient masking) cannot hide from it: see :func:`check_gradient_masking`.

Maintained libraries (torchattacks, adversarial-robustness-toolbox) were considered: the first
requires torchvision (a second multi-GB torch stack beside the pinned CPU torch), and neither
attacks an ONNX Runtime session, which the tests must do. This module is small and its tests
pin it to a linear model, where the optimal attack is known in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

LOG_FLOOR = 1e-45  # the smallest float32 probability above 0: log(0) would be -inf


# ---------------------------------------------------------------------------- targets


class AttackTarget(Protocol):
    """What an attack needs from a model."""

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        """(B, ...) images -> (B, classes) float64 log-probabilities."""

    def gradient(self, x: np.ndarray, y: np.ndarray, loss: str) -> tuple[np.ndarray, np.ndarray]:
        """``(d loss / d x, log_probs(x))``; ``loss`` is a name from :func:`loss_values`."""


def loss_values(log_probs: np.ndarray, y: np.ndarray, loss: str) -> np.ndarray:
    """Per-example attack losses (higher = closer to a wrong answer).

    ``"ce"``: cross-entropy ``-log p_y``. ``"margin"``: ``max_{j != y} log p_j - log p_y``,
    which is positive exactly when the image is misclassified (the softmax's shift cancels, so
    it is the logit margin of Carlini & Wagner).
    """
    rows = np.arange(len(y))
    own = log_probs[rows, y]
    if loss == "ce":
        return -own
    if loss == "margin":
        others = log_probs.copy()
        others[rows, y] = -np.inf
        return others.max(axis=1) - own
    raise ValueError(f"unknown attack loss {loss!r}; expected 'ce' or 'margin'")


class TorchTarget:
    """A PyTorch module returning logits; gradients by autograd, in eval mode."""

    def __init__(self, net, batch: int = 1024):
        import torch

        self.torch = torch
        self.net = net.eval()
        self.batch = batch

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            parts = [torch.log_softmax(self.net(torch.from_numpy(x[i : i + self.batch])).double(), dim=1)
                     for i in range(0, len(x), self.batch)]
        return torch.cat(parts).numpy()

    def gradient(self, x: np.ndarray, y: np.ndarray, loss: str) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).requires_grad_(True)
        log_probs = torch.log_softmax(self.net(xt).double(), dim=1)  # (B, classes)
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
        own = log_probs.gather(1, yt[:, None])[:, 0]
        if loss == "ce":
            values = -own
        elif loss == "margin":
            others = log_probs.masked_fill(torch.nn.functional.one_hot(yt, log_probs.shape[1]).bool(), -np.inf)
            values = others.max(dim=1).values - own
        else:
            raise ValueError(f"unknown attack loss {loss!r}; expected 'ce' or 'margin'")
        (grad,) = torch.autograd.grad(values.sum(), xt)
        return grad.numpy(), log_probs.detach().numpy()


class OnnxTarget:
    """An ONNX Runtime session with a probabilities output; gradients by central differences.

    ONNX Runtime computes no gradients. Each pixel is moved by +-``h`` in one large batch and
    the loss difference over ``2 h`` is that pixel's derivative: ``2 * pixels`` model runs per
    image and step, cheap for 8x8 images.
    """

    def __init__(self, session, input_name: str = "images", output_name: str = "probabilities",
                 h: float = 1e-3, batch: int = 8192):
        self.session = session
        self.input_name = input_name
        self.output_name = output_name
        self.h = h
        self.batch = batch

    def log_probs(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        probs = np.concatenate([
            self.session.run([self.output_name], {self.input_name: x[i : i + self.batch]})[0]
            for i in range(0, len(x), self.batch)
        ]).astype(np.float64)  # (B, classes)
        log_probs = np.log(np.maximum(probs, LOG_FLOOR))
        # For the top class p rounds to 1 in float32 while 1 - p (the other classes' mass, each
        # held to full relative precision) does not: log p = log1p(-others) keeps the loss
        # differences of confident answers, which central differences need.
        rows, top = np.arange(len(probs)), probs.argmax(axis=1)
        others = probs.copy()
        others[rows, top] = 0.0
        log_probs[rows, top] = np.log1p(-others.sum(axis=1))
        return log_probs

    def gradient(self, x: np.ndarray, y: np.ndarray, loss: str) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float32)
        n, shape = len(x), x.shape[1:]
        pixels = int(np.prod(shape))
        bumps = (np.eye(pixels, dtype=np.float32) * self.h).reshape(pixels, *shape)  # (P, ...)
        plus = (x[:, None] + bumps[None]).reshape(n * pixels, *shape)                # (B*P, ...)
        minus = (x[:, None] - bumps[None]).reshape(n * pixels, *shape)
        lp = self.log_probs(np.concatenate([plus, minus, x]))
        ys = np.tile(np.repeat(y, pixels), 2)
        values = loss_values(lp[: 2 * n * pixels], ys, loss).reshape(2, n, pixels)
        grad = ((values[0] - values[1]) / (2 * self.h)).reshape(x.shape)
        return grad, lp[2 * n * pixels :]


# ---------------------------------------------------------------------------- attacks


@dataclass
class AttackResult:
    """Per image: the adversarial image found, and whether it is misclassified."""

    x_adv: np.ndarray    # (B, ...) in [0, 1], within eps of the input
    fooled: np.ndarray   # (B,) bool

    @property
    def accuracy(self) -> float:
        return float(1.0 - self.fooled.mean())


def _project(x_adv: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
    return np.clip(np.clip(x_adv, x - eps, x + eps), 0.0, 1.0).astype(np.float32)


def clean_predictions(target: AttackTarget, x: np.ndarray) -> np.ndarray:
    return target.log_probs(np.asarray(x, dtype=np.float32)).argmax(axis=1)


def fgsm(target: AttackTarget, x: np.ndarray, y: np.ndarray, eps: float) -> AttackResult:
    """One step of size ``eps`` along the sign of the cross-entropy gradient.

    An image the model already gets wrong counts as fooled (accuracy under attack never
    exceeds clean accuracy).
    """
    x = np.asarray(x, dtype=np.float32)
    grad, log_probs = target.gradient(x, y, "ce")
    x_adv = _project(x + eps * np.sign(grad), x, eps)
    fooled = (log_probs.argmax(axis=1) != y) | (clean_predictions(target, x_adv) != y)
    return AttackResult(np.where(_rows(log_probs.argmax(axis=1) != y, x), x, x_adv), fooled)


def pgd(target: AttackTarget, x: np.ndarray, y: np.ndarray, eps: float, steps: int = 20,
        restarts: int = 5, step_size: float | None = None, loss: str | tuple[str, ...] = "ce",
        seed: int = 0) -> AttackResult:
    """Projected gradient ascent on ``loss`` from uniform random starts in the eps-box.

    Args:
        target: the model.
        x: (B, ...) images in [0, 1].
        y: (B,) true labels.
        eps: the L-infinity radius.
        steps: gradient steps per restart.
        restarts: random starts; each later one attacks only the images not yet fooled, so
            the result is the per-image worst case over restarts.
        step_size: defaults to ``2.5 * eps / steps`` (Madry et al.).
        loss: ``"ce"`` or ``"margin"``, or a tuple of them taken in turn by the restarts: no one
            loss is strongest on every model (cross-entropy's gradient fades on confident
            answers, the margin's follows one rival class at a time).
        seed: seeds the random starts.

    Returns:
        Per image, a misclassified iterate if any restart reached one (else the last iterate).
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    alpha = 2.5 * eps / steps if step_size is None else step_size
    losses = (loss,) if isinstance(loss, str) else tuple(loss)
    rng = np.random.default_rng(seed)
    fooled = clean_predictions(target, x) != y
    best = x.copy()
    for restart in range(restarts):
        active = np.flatnonzero(~fooled)
        if not len(active):
            break
        xs, ys = x[active], y[active]
        xa = _project(xs + rng.uniform(-eps, eps, xs.shape).astype(np.float32), xs, eps)
        hit = np.zeros(len(active), bool)
        found = xa.copy()
        for _ in range(steps):
            grad, log_probs = target.gradient(xa, ys, losses[restart % len(losses)])
            wrong = (log_probs.argmax(axis=1) != ys) & ~hit
            found[wrong], hit = xa[wrong], hit | wrong
            xa = _project(xa + alpha * np.sign(grad), xs, eps)
        wrong = (clean_predictions(target, xa) != ys) & ~hit
        found[wrong], hit = xa[wrong], hit | wrong
        best[active] = np.where(_rows(hit, found), found, xa)
        fooled[active] = hit
    return AttackResult(best, fooled)


def square_attack(target: AttackTarget, x: np.ndarray, y: np.ndarray, eps: float,
                  queries: int = 1000, p_init: float = 0.8, seed: int = 0) -> AttackResult:
    """The L-infinity Square attack (Andriushchenko et al., 2020): random search, no gradients.

    Starts from vertical stripes of +-eps, then repeatedly redraws one random square window
    of the perturbation to +eps or -eps (one sign per window and channel) and keeps the change
    when the margin loss (:func:`loss_values`) goes up. The window covers a share ``p`` of the
    pixels, ``p`` halving on the paper's schedule. Images already fooled stop querying.

    Args:
        target: the model (only ``log_probs`` is used).
        x: (B, C, H, W) images in [0, 1].
        y: (B,) true labels.
        eps: the L-infinity radius.
        queries: model evaluations per image, at most.
        p_init: the initial share of pixels a window covers (0.8 suits small images).
        seed: seeds the search.

    Returns:
        The best perturbation found per image.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    b, c, h, w = x.shape
    x_best = _project(x + eps * rng.choice([-1.0, 1.0], size=(b, c, 1, w)).astype(np.float32), x, eps)
    margin = loss_values(target.log_probs(x_best), y, "margin")  # > 0: fooled
    clean_wrong = clean_predictions(target, x) != y
    x_best[clean_wrong], margin[clean_wrong] = x[clean_wrong], np.inf
    rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    for i in range(1, queries):
        active = np.flatnonzero(margin <= 0)
        if not len(active):
            break
        side = int(round(np.sqrt(_square_share(p_init, i, queries) * h * w)))
        side = min(max(side, 1), h - 1)
        xs, cur = x[active], x_best[active]
        top = rng.integers(0, h - side + 1, len(active))[:, None, None]
        left = rng.integers(0, w - side + 1, len(active))[:, None, None]
        window = ((rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side))[:, None]
        signs = rng.choice([-1.0, 1.0], size=(len(active), c, 1, 1)).astype(np.float32)
        candidate = _project(np.where(window, xs + eps * signs, cur), xs, eps)
        new_margin = loss_values(target.log_probs(candidate), y[active], "margin")
        better = new_margin > margin[active]
        x_best[active[better]] = candidate[better]
        margin[active[better]] = new_margin[better]
    return AttackResult(x_best, clean_wrong | (margin > 0))


def _square_share(p_init: float, i: int, queries: int) -> float:
    """The share of pixels a window covers at query ``i`` (the paper's schedule, for 10,000
    queries, rescaled to ``queries``)."""
    i = int(i / queries * 10_000)
    halvings = sum(i > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2 ** halvings


def _rows(mask: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A per-image boolean mask shaped to broadcast over images like ``like``."""
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------- report


ATTACKS = ("fgsm", "pgd20x5", "square")  # the metric-name prefixes, in the report's order
ATTACK_DESCRIPTIONS = {
    "fgsm": "FGSM: one step of size eps along the sign of the cross-entropy gradient",
    "pgd20x5": "PGD-20x5: 20 steps of 2.5 eps / 20 from each of 5 uniform random starts, the starts "
               "taking the cross-entropy and the margin (Carlini-Wagner) loss in turn (3 and 2); an "
               "image counts as broken if any start at any step is misclassified",
    "square": "Square attack: score-based random search, no gradients, {queries} queries per image, "
              "margin loss",
}
PGD_LOSSES = ("ce", "margin")  # taken in turn by PGD-20x5's restarts
MASKING_MARGIN = 0.05


class GradientMaskingError(RuntimeError):
    """A gradient-free attack did much better than the gradient attack: the gradients lie."""


@dataclass
class RobustnessReport:
    """Held-out accuracy under each attack at each eps, and the per-image worst case."""

    accuracy: float                          # clean
    by_attack: dict[str, dict[float, float]]  # attack -> eps -> accuracy under it
    worst: dict[float, float]                # eps -> share of images no attack broke
    square_queries: int
    size: int                                # images attacked

    def strongest(self, eps: float) -> str:
        """The attack with the lowest accuracy at ``eps`` (the first in ATTACKS on a tie)."""
        return min(ATTACKS, key=lambda a: (self.by_attack[a][eps], ATTACKS.index(a)))

    def metrics(self) -> dict[str, float]:
        """Manifest metrics: ``{attack}_accuracy_eps_{eps}`` and ``robust_accuracy_eps_{eps}``
        (no attack broke the image)."""
        out = {}
        for eps in self.worst:
            for attack in ATTACKS:
                out[f"{attack}_accuracy_eps_{eps}"] = self.by_attack[attack][eps]
            out[f"robust_accuracy_eps_{eps}"] = self.worst[eps]
        return out

    def check_gradient_masking(self, name: str, margin: float = MASKING_MARGIN) -> None:
        """Raise when the gradient-free attack beats PGD by more than ``margin`` at any eps.

        A model whose gradients point nowhere useful (saturated softmax, quantization, shattered
        gradients) looks robust to PGD while a search that only reads outputs still breaks it.

        Raises:
            GradientMaskingError: naming the model, eps and both accuracies.
        """
        for eps, pgd_accuracy in self.by_attack["pgd20x5"].items():
            square_accuracy = self.by_attack["square"][eps]
            if square_accuracy < pgd_accuracy - margin:
                raise GradientMaskingError(
                    f"{name}: gradient masking suspected at eps={eps}: the gradient-free Square attack "
                    f"leaves {square_accuracy:.3f} accuracy, PGD-20x5 {pgd_accuracy:.3f} (allowed gap "
                    f"{margin}); PGD's figures would overstate robustness, so the build stops"
                )


def robustness_report(target: AttackTarget, x: np.ndarray, y: np.ndarray, epsilons,
                      square_queries: int = 1000, seed: int = 0) -> RobustnessReport:
    """Run every attack in ATTACKS at every eps on ``(x, y)``.

    Args:
        target: the model.
        x: (B, C, H, W) held-out images in [0, 1].
        y: (B,) their labels.
        epsilons: L-infinity radii.
        square_queries: the Square attack's budget per image.
        seed: seeds PGD's starts and the Square attack's search.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    by_attack: dict[str, dict[float, float]] = {a: {} for a in ATTACKS}
    worst = {}
    for eps in epsilons:
        results = {
            "fgsm": fgsm(target, x, y, eps),
            "pgd20x5": pgd(target, x, y, eps, steps=20, restarts=5, loss=PGD_LOSSES, seed=seed),
            "square": square_attack(target, x, y, eps, queries=square_queries, seed=seed),
        }
        for attack, result in results.items():
            by_attack[attack][eps] = result.accuracy
        worst[eps] = float(1.0 - np.logical_or.reduce([r.fooled for r in results.values()]).mean())
    accuracy = float((clean_predictions(target, x) == y).mean())
    return RobustnessReport(accuracy, by_attack, worst, square_queries, len(y))
