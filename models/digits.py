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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from deepserve.models.common import ExportSpec, card_header, export_and_publish, seed_everything
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
    for _ in tqdm(range(cfg.epochs), desc=desc, unit="epoch", leave=False):
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
