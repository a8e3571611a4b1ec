"""Digit classifiers: a small CNN on scikit-learn's bundled 8x8 digits.

Two models come from this file:
- ``digit-classifier``: trained on clean images.
- ``digit-classifier-robust``: adversarially trained, each batch mixing clean images with
  FGSM examples made against the model being trained (Goodfellow et al., 2015).

Both are evaluated on clean held-out images and under FGSM at several epsilons
(pixels in [0, 1]). The exported graph takes images in [0, 1], shape (B, 1, 8, 8), and
returns class probabilities and the penultimate-layer features (used to compare image
distributions, e.g. for the generators' Fréchet distance).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepserve.models.common import ExportSpec, card_header, export_and_publish, progress, seed_everything
from deepserve.repository import Manifest

FGSM_EPSILONS = (0.05, 0.1, 0.2)
PIXEL_SCALE = 16.0  # sklearn's digits hold integers 0..16


# ---------------------------------------------------------------------------- data


@dataclass
class DigitsSplit:
    x_train: np.ndarray  # (N, 1, 8, 8) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(seed: int, test_fraction: float = 0.2) -> DigitsSplit:
    """scikit-learn's 1,797 digits, scaled to [0, 1], split stratified by class.

    The split depends only on ``seed``, so tests and other models (the generators'
    evaluation) can rebuild the same held-out set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / PIXEL_SCALE).astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return DigitsSplit(x_tr, y_tr, x_te, y_te)


# ---------------------------------------------------------------------------- network


@dataclass
class DigitCNNConfig:
    channels: tuple[int, int, int] = (32, 64, 64)
    hidden: int = 128
    dropout: float = 0.3
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4


class DigitCNN(nn.Module):
    """Per-pixel standardization, conv-conv-pool-conv-pool, a hidden layer (the features), logits.

    The standardization (as scikit-learn's StandardScaler would do it) lives in the graph, so
    clients send plain [0, 1] pixels. It matters for robustness: pixels that are almost always
    blank (the borders) get tiny standard deviations, so a plain network becomes very sensitive
    to them and FGSM exploits that; adversarial training teaches the robust variant to ignore them.
    """

    def __init__(self, cfg: DigitCNNConfig, pixel_mean: torch.Tensor, pixel_std: torch.Tensor):
        super().__init__()
        self.register_buffer("pixel_mean", pixel_mean)  # (1, 8, 8)
        self.register_buffer("pixel_std", pixel_std)    # (1, 8, 8)
        c1, c2, c3 = cfg.channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),   # (B, c1, 8, 8)
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),  # (B, c2, 8, 8)
            nn.MaxPool2d(2),                             # (B, c2, 4, 4)
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),  # (B, c3, 4, 4)
            nn.MaxPool2d(2),                             # (B, c3, 2, 2)
            nn.Flatten(),                                # (B, 4*c3)
        )
        self.hidden = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(4 * c3, cfg.hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.pixel_mean) / self.pixel_std
        return self.hidden(self.conv(x))  # (B, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 10) logits


class ExportedClassifier(nn.Module):
    """The served graph: images in [0, 1] -> (probabilities, features)."""

    def __init__(self, net: DigitCNN):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor):
        feats = self.net.features(images)
        return torch.softmax(self.net.head(feats), dim=1), feats


# ---------------------------------------------------------------------------- attacks


def fgsm(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Fast gradient sign method: one signed-gradient step of size ``eps``, clipped to [0, 1]."""
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(net(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray, eps: float = 0.0) -> float:
    """Accuracy on ``x``; with ``eps > 0``, on FGSM examples made against ``net`` itself."""
    net.eval()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if eps > 0:
        xt = fgsm(net, xt, yt, eps)
    with torch.no_grad():
        pred = net(xt).argmax(1)
    return int((pred == yt).sum()) / len(yt)


# ---------------------------------------------------------------------------- training


def train(split: DigitsSplit, cfg: DigitCNNConfig, seed: int, adversarial: bool, desc: str) -> DigitCNN:
    """Train a DigitCNN; with ``adversarial``, half of each batch's loss is on FGSM examples.

    The robust variant draws each example's epsilon uniformly from [0, 0.25] so that it
    learns to resist every strength in the evaluated range, not one step size.
    """
    torch.manual_seed(seed)
    pixel_mean = torch.from_numpy(split.x_train.mean(axis=0))  # (1, 8, 8)
    pixel_std = torch.from_numpy(split.x_train.std(axis=0))
    pixel_std = torch.where(pixel_std < 1e-6, torch.ones_like(pixel_std), pixel_std)  # constant pixels
    net = DigitCNN(cfg, pixel_mean, pixel_std)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    gen = torch.Generator().manual_seed(seed)
    for _ in progress(range(cfg.epochs), desc, "epoch"):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            loss = F.cross_entropy(net(xb), yb)
            if adversarial:
                eps = torch.rand(len(xb), 1, 1, 1, generator=gen) * 0.25  # (B, 1, 1, 1)
                net.eval()  # attack the deterministic network, as the evaluation does
                x_adv = fgsm(net, xb, yb, eps)
                net.train()
                loss = 0.5 * loss + 0.5 * F.cross_entropy(net(x_adv), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


def evaluate(net: DigitCNN, split: DigitsSplit) -> dict:
    metrics = {"accuracy": accuracy(net, split.x_test, split.y_test)}
    for eps in FGSM_EPSILONS:
        metrics[f"fgsm_accuracy_eps_{eps}"] = accuracy(net, split.x_test, split.y_test, eps)
    with torch.no_grad():
        pred = net(torch.from_numpy(split.x_test)).argmax(1).numpy()
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (split.y_test, pred), 1)
    metrics["confusion_matrix"] = confusion.tolist()
    metrics["test_size"] = int(len(split.y_test))
    return metrics


# ---------------------------------------------------------------------------- judging generated images
#
# The generators (``dcgan.py``, ``diffusion.py``) are judged by the exported classifier:
# does it see the requested digit, and do the generated images' penultimate-layer features
# follow the real images' distribution (the Frechet distance of Heusel et al., 2017, with
# this classifier in place of Inception)? Serving tests use the same functions.

JUDGE_NOISE_SEED = 0  # the uniform-noise reference images are the same on every call


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to two sets of feature vectors.

    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``. The trace of the matrix square
    root is computed as the sum of the square roots of the eigenvalues of the symmetric
    ``C_a^(1/2) C_b C_a^(1/2)`` (similar to ``C_a C_b``): real by construction, and tiny
    negative eigenvalues from rounding are clipped to 0 rather than turning into imaginary
    parts.

    Args:
        features_a: (N, D) features of one set (N >= 2).
        features_b: (M, D) features of the other (M >= 2).

    Returns:
        The distance (>= 0; 0 for identical sets).
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"expected two (N, D) feature sets with N >= 2, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D)
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T  # C_a^(1/2), symmetric
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(distance, 0.0)


def classifier_outputs(session, images: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities, features)`` of an exported classifier's ONNX Runtime session."""
    images = np.asarray(images, dtype=np.float32)
    parts = [session.run(["probabilities", "features"], {"images": images[i : i + batch]})
             for i in range(0, len(images), batch)]
    return np.concatenate([p for p, _ in parts]), np.concatenate([f for _, f in parts])


def judge(classifier_session, images: np.ndarray, requested_labels: np.ndarray,
          real_images: np.ndarray) -> dict:
    """The classifier's verdict on generated images.

    Args:
        classifier_session: an ONNX Runtime session of an exported digit classifier
            (inputs ``images``; outputs ``probabilities`` and ``features``).
        images: (N, 1, 8, 8) generated images, pixels in [0, 1].
        requested_labels: (N,) the class asked for per image.
        real_images: (M, 1, 8, 8) real images to compare with, e.g. the classifier's
            held-out split (``load_digits_split(seed).x_test``).

    Returns:
        ``class_accuracy`` (the classifier's top class is the requested one),
        ``frechet_distance`` (generated vs real, penultimate-layer features),
        ``noise_frechet_distance`` (as many U[0, 1] noise images vs real: the scale of a
        useless generator) and ``frechet_ratio`` (the first over the second; 0 is ideal).
    """
    images = np.asarray(images, dtype=np.float32)
    requested = np.asarray(requested_labels).reshape(-1)
    if len(images) != len(requested):
        raise ValueError(f"{len(images)} images but {len(requested)} labels")
    probabilities, generated = classifier_outputs(classifier_session, images)
    _, real = classifier_outputs(classifier_session, real_images)
    noise_images = np.random.default_rng(JUDGE_NOISE_SEED).random(images.shape, dtype=np.float32)
    _, noise = classifier_outputs(classifier_session, noise_images)
    fd = frechet_distance(generated, real)
    noise_fd = frechet_distance(noise, real)
    return {
        "class_accuracy": float((probabilities.argmax(axis=1) == requested).mean()),
        "frechet_distance": fd,
        "noise_frechet_distance": noise_fd,
        "frechet_ratio": fd / noise_fd,
        "judged_images": int(len(images)),
    }


@dataclass
class Judge:
    """An exported digit classifier judging generated images against its held-out split."""

    session: Any              # ONNX Runtime session of the classifier
    real_images: np.ndarray   # (M, 1, 8, 8): the classifier's held-out images
    reference_images: np.ndarray  # (N, 1, 8, 8): real training images, for the real-vs-real floor
    classifier: str           # "name vN", for cards
    split_seed: int

    @classmethod
    def from_repository(cls, repo: Path, name: str = "digit-classifier") -> "Judge":
        """Load the latest ``name`` from the model repository at ``repo``.

        Raises:
            RuntimeError: the classifier is not in the repository yet.
        """
        import onnxruntime as ort

        from deepserve.repository import ModelRepository

        repository = ModelRepository(repo)
        if not repository.versions(name):
            raise RuntimeError(
                f"the generators are judged by '{name}', which is not in the repository {repository.root}; "
                f"build it first: deepserve build --repo {repository.root} --only {name}"
            )
        model, data = repository.load(name)
        split_seed = int(model.manifest.training_data["split_seed"])
        split = load_digits_split(split_seed)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return cls(session, split.x_test, split.x_train, f"{name} v{model.manifest.version}", split_seed)

    def __call__(self, images: np.ndarray, requested_labels: np.ndarray) -> dict:
        return judge(self.session, images, requested_labels, self.real_images)

    def real_floor(self, count: int) -> float:
        """The Frechet distance of ``count`` real training images to the held-out ones: what a
        perfect generator would score with that many samples (the estimate is biased upward
        for small counts)."""
        return frechet_distance(classifier_outputs(self.session, self.reference_images[:count])[1],
                                classifier_outputs(self.session, self.real_images)[1])


JUDGED_SAMPLES = 1000  # per generator, 100 per class
JUDGED_SEED = 1_000_000  # request seeds of the judged samples (the cards' grids use 0..)


def judge_generator(runtime, judge: Judge) -> tuple[dict, np.ndarray, np.ndarray, float]:
    """The headline figures of a generator with its defaults: ``JUDGED_SAMPLES`` balanced
    images through the serving runtime, judged, with the real-vs-real floor and the time.

    Returns:
        ``(figures, images, labels, seconds)``.
    """
    labels = balanced_labels(JUDGED_SAMPLES)
    started = time.perf_counter()
    images = generate_through_runtime(runtime, labels, JUDGED_SEED)
    seconds = time.perf_counter() - started
    figures = {
        **judge(images, labels),
        "real_frechet_distance": judge.real_floor(JUDGED_SAMPLES),
        "seconds_per_image": seconds / JUDGED_SAMPLES,
    }
    return figures, images, labels, seconds


def generator_training_data(split: DigitsSplit, seed: int, judge: Judge) -> dict:
    """A generator's ``training_data``: the classifiers' training split, and its judge."""
    return {
        "description": "scikit-learn's bundled 8x8 handwritten digits, the training part "
                       f"({len(split.y_train)} images) of the classifiers' stratified 80/20 split "
                       f"(seed {seed}); pixels scaled to [-1, 1] for training.",
        "source": "sklearn.datasets.load_digits",
        "train_size": int(len(split.y_train)),
        "split_seed": seed,
        "judge": judge.classifier,
        "judge_split_seed": judge.split_seed,
    }


def judge_card_section(manifest: Manifest, judge: Judge, how: str) -> str:
    """The model card's "Judged by the digit classifier" section (``how``: how the images
    were generated, e.g. "with the defaults")."""
    m = manifest.metrics
    return (
        "## Judged by the digit classifier\n\n"
        f"{JUDGED_SAMPLES} images (100 per class) generated{' ' + how if how else ''} from the exported "
        "graph through "
        f"the serving runtime, judged by `{judge.classifier}`: class accuracy is the share the "
        "classifier reads as the requested digit; the Frechet distance compares its "
        f"penultimate-layer features with those of its {len(judge.real_images)} held-out images "
        f"(split seed {judge.split_seed}).\n\n"
        "| figure | value |\n|---|---|\n"
        f"| class accuracy | {m['class_accuracy']:.3f} |\n"
        f"| Frechet distance (generated vs held-out) | {m['frechet_distance']:.2f} |\n"
        f"| Frechet distance, {JUDGED_SAMPLES} real training images vs held-out (the floor) "
        f"| {m['real_frechet_distance']:.2f} |\n"
        f"| Frechet distance, uniform noise vs held-out | {m['noise_frechet_distance']:.4g} |\n"
        f"| Frechet ratio (generated / noise) | {m['frechet_ratio']:.2e} |\n"
        f"| time per image (requests of 64, one thread) | {1000 * m['seconds_per_image']:.3f} ms |\n\n"
        "The noise reference is far away because the classifier standardizes each pixel: noise on "
        "the nearly always blank border pixels moves its features a long way. The real-vs-real "
        "floor is the more telling comparison.\n\n"
    )


def save_samples_grid(path: Path, runtime, title: str, classes: int = 10) -> None:
    """10 samples per class through ``runtime`` (request seed = class), one row per class."""
    grid = [generate_through_runtime(runtime, np.full(10, c), seed=c) for c in range(classes)]
    save_image_grid(path, grid, [str(c) for c in range(classes)], title)


def balanced_labels(count: int, classes: int = 10) -> np.ndarray:
    """``count`` labels cycling through the classes: 0, 1, ..., 9, 0, 1, ..."""
    return np.arange(count, dtype=np.int64) % classes


def serving_runtime(onnx_bytes: bytes, manifest: Manifest):
    """The runtime that serves ``manifest``'s kind, with a session on ``onnx_bytes``."""
    from deepserve.runtime import runtime_for

    runtime = runtime_for(manifest)
    runtime.load(onnx_bytes)
    return runtime


def generate_through_runtime(runtime, labels: np.ndarray, seed: int, steps: int | None = None,
                             guidance: float | None = None, sampler: str | None = None) -> np.ndarray:
    """Images for ``labels`` through the serving code path, one request per ``MAX_COUNT`` images.

    Request ``k`` uses seed ``seed + k``; image ``i`` of a request depends on its seed and
    ``i`` only, so the first images of a longer call equal those of a shorter one.

    Args:
        runtime: a loaded :class:`deepserve.runtime.GenerativeRuntime`.
        labels: (N,) the class per image.

    Returns:
        (N, 1, H, W) images in [0, 1].
    """
    from deepserve.generation import generate_now

    labels = np.asarray(labels, dtype=np.int64)
    size = runtime.MAX_COUNT
    parts = []
    for k, start in enumerate(range(0, len(labels), size)):
        request = runtime.request(labels[start : start + size], seed=seed + k, steps=steps,
                                  guidance=guidance, sampler=sampler)
        parts.append(generate_now(runtime, request).images)
    return np.concatenate(parts)


def save_image_grid(path: Path, rows: list[np.ndarray], row_labels: list[str], title: str,
                    column_labels: list[str] | None = None) -> None:
    """A PNG of images in rows: ``rows[r]`` is (columns, 1, H, W) in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(0.55 * n_cols + 0.8, 0.55 * n_rows + 0.6),
                             squeeze=False)
    for r, images in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c, 0], cmap="gray_r", vmin=0.0, vmax=1.0)
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
            if column_labels and r == 0 and c < len(column_labels):
                ax.set_title(column_labels[c], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- model card


def _write_card(directory: Path, manifest: Manifest) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = manifest.metrics
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    cm = np.array(m["confusion_matrix"])
    ax1.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        if v:
            ax1.text(j, i, str(v), ha="center", va="center", fontsize=7,
                     color="white" if v > cm.max() / 2 else "black")
    ax1.set(xlabel="predicted", ylabel="true", xticks=range(10), yticks=range(10),
            title=f"confusion matrix (held-out, n={m['test_size']})")
    eps = [0.0, *FGSM_EPSILONS]
    acc = [m["accuracy"], *(m[f"fgsm_accuracy_eps_{e}"] for e in FGSM_EPSILONS)]
    ax2.plot(eps, acc, marker="o", label=manifest.name)
    for peer, peer_acc in manifest.extra.get("compare_fgsm", {}).items():
        ax2.plot(eps, peer_acc, marker="s", linestyle="--", label=peer)
    ax2.set(xlabel="FGSM epsilon (pixels in [0, 1])", ylabel="accuracy", ylim=(0, 1.02),
            title="accuracy under FGSM")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(directory / "card.png", dpi=110)
    plt.close(fig)

    rows = "\n".join(
        f"| {e} | {a:.4f} |" for e, a in zip(eps, acc)
    )
    text = card_header(manifest) + (
        "## Data\n\n"
        f"{manifest.training_data['description']}\n\n"
        "## Results on the held-out split\n\n"
        "| FGSM epsilon | accuracy |\n|---|---|\n" + rows + "\n\n"
        f"Adversarial training: {manifest.extra['adversarial_training']}.\n\n"
        "![confusion matrix and accuracy versus epsilon](card.png)\n\n"
        "## Limits\n\n"
        "Trained on 8x8 grayscale digits only; FGSM is a one-step white-box attack, "
        "so these figures are an upper bound on robustness to stronger attacks (PGD, "
        "transfer attacks).\n"
    )
    (directory / "card.md").write_text(text)


# ---------------------------------------------------------------------------- build


def build(repo: Path, seed: int, names: list[str]) -> list[Path]:
    """Train, evaluate, export and publish the requested digit classifiers."""
    seed_everything(seed)
    split = load_digits_split(seed)
    cfg = DigitCNNConfig()
    written = []
    plain_fgsm = None
    for name in ("digit-classifier", "digit-classifier-robust"):
        robust = name.endswith("-robust")
        net = train(split, cfg, seed, adversarial=robust, desc=f"train {name}")
        metrics = evaluate(net, split)
        curve = [metrics["accuracy"], *(metrics[f"fgsm_accuracy_eps_{e}"] for e in FGSM_EPSILONS)]
        if not robust:
            plain_fgsm = curve
        if name not in names:
            continue
        spec = ExportSpec(
            name=name,
            kind="classifier",
            module=ExportedClassifier(net).eval(),
            example_inputs=(torch.from_numpy(split.x_test[:64]),),
            input_names=["images"],
            output_names=["probabilities", "features"],
            descriptions={
                "images": "grayscale 8x8 digit, pixels in [0, 1] (sklearn value / 16)",
                "probabilities": "softmax over the classes 0..9",
                "features": "penultimate-layer activations (for distribution comparisons)",
            },
            preprocessing={
                "input_range": [0.0, 1.0],
                "image_shape": [8, 8],
                "client": "scale 0..16 sklearn digit values (or 0..255 PNG pixels) linearly to [0, 1]",
                "in_graph": "per-pixel standardization with the training set's mean and std",
            },
            training_data={
                "description": "scikit-learn's bundled 8x8 handwritten digits (1,797 images, "
                               "UCI optdigits test set), split 80/20 stratified by class.",
                "source": "sklearn.datasets.load_digits",
                "train_size": int(len(split.y_train)),
                "test_size": int(len(split.y_test)),
                "split_seed": seed,
                "test_fraction": 0.2,
            },
            metrics=metrics,
            seed=seed,
            extra={
                "labels": [str(i) for i in range(10)],
                "adversarial_training": "FGSM, eps ~ U[0, 0.25] per example, 50/50 clean/adversarial loss"
                if robust else "none",
                "compare_fgsm": {"digit-classifier": plain_fgsm} if robust and plain_fgsm else {},
                "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            },
            write_card=_write_card,
        )
        written.append(export_and_publish(spec, repo))
    return written
