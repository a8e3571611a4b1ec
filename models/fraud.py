"""Fraud autoencoder: a denoising autoencoder trained on normal transactions only.

The anomaly score is the reconstruction error. The exported graph does everything a
client should not have to: feature transforms and scaling, the reconstruction, the
per-feature squared errors (the explanation a fraud analyst reads) and their mean (the
score). The decision threshold is calibrated on held-out normal rows at a chosen
false-positive rate and stored in the manifest.

Data comes from one of:
- :func:`generate_transactions`: a seeded synthetic card-transaction table in the common
  public schema (``Time``, ``V1``..``V28``, ``Amount``, ``Class``), about 0.5% fraud made
  of four distinct fraud patterns;
- :func:`load_table`: any CSV with that schema, or any numeric table with an optional
  label column that is used only for evaluation (bring your own data).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepserve.drift import Reference
from deepserve.models.common import ExportSpec, card_header, export_and_publish, progress, seed_everything
from deepserve.repository import Manifest

TRANSACTION_COLUMNS = ["Time", *(f"V{i}" for i in range(1, 29)), "Amount"]
LABEL_CANDIDATES = ("Class", "label", "target", "is_fraud", "anomaly")
SECONDS_PER_DAY = 86_400.0
MIN_STEPS = 2_000  # optimizer steps, whatever the table size
MIN_NORMAL_ROWS = 10  # a table needs this many to train (60%), calibrate (20%) and evaluate (20%)
SCORE_BATCH_ROWS = 65_536  # scoring a held-out split a batch at a time keeps its memory bounded

# ---------------------------------------------------------------------------- synthetic data
#
# Normal behaviour lives near a low-dimensional manifold, as in real PCA-transformed card
# data: a latent vector z (a mixture of customer segments) is mapped to V1..V28 by a fixed
# random linear map plus a mild nonlinearity and noise; Amount and the hour of day depend
# on the segment. Fraud breaks that structure in four different ways:
#   card_testing       tiny amounts at night, a few components pushed off the manifold;
#   account_takeover   large amounts, shifted V12/V14/V17 (the strongest real-data signals);
#   off_manifold       latent draws that look normal per feature, but violate the
#                      correlations between features (no single column gives them away);
#   synthetic_identity a tight cluster far from every customer segment, ordinary amounts.

FRAUD_PATTERNS = ("card_testing", "account_takeover", "off_manifold", "synthetic_identity")


@dataclass
class SyntheticConfig:
    n_rows: int = 120_000
    fraud_rate: float = 0.005
    latent_dim: int = 6
    segments: int = 5
    days: float = 2.0
    structure_seed: int = 1234  # fixes the "world" (segments, linear map); the build seed samples rows


def _world(cfg: SyntheticConfig):
    rng = np.random.default_rng(cfg.structure_seed)
    mixing = rng.normal(size=(28, cfg.latent_dim)) / np.sqrt(cfg.latent_dim)  # (28, k)
    # Component variances fall off as after a PCA.
    scales = np.linspace(2.0, 0.4, 28)[:, None]
    mixing *= scales
    centres = rng.normal(scale=1.2, size=(cfg.segments, cfg.latent_dim))  # (S, k)
    weights = rng.dirichlet(np.full(cfg.segments, 4.0))
    amount_mu = rng.uniform(2.5, 4.5, size=cfg.segments)  # log-amount per segment
    busy_hour = rng.uniform(9.0, 20.0, size=cfg.segments)
    curve = rng.normal(scale=0.25, size=(28, cfg.latent_dim))  # mild nonlinearity
    return mixing, centres, weights, amount_mu, busy_hour, curve


def _emit(z: np.ndarray, world, rng: np.random.Generator, noise: float = 0.25) -> np.ndarray:
    """Latent draws (N, k) -> V1..V28 (N, 28): linear map, mild nonlinearity, noise."""
    mixing, *_, curve = world
    v = z @ mixing.T + np.tanh(z) @ curve.T * 0.5  # (N, 28)
    v += rng.normal(scale=noise, size=v.shape) * np.linspace(1.0, 0.3, 28)
    return v


def generate_transactions(seed: int, cfg: SyntheticConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded synthetic transaction table.

    Returns:
        ``(x, label, pattern)``: ``x`` (N, 30) float64 in ``TRANSACTION_COLUMNS`` order,
        ``label`` (N,) 0/1, ``pattern`` (N,) the fraud pattern name ('' for normal rows).
    """
    cfg = cfg or SyntheticConfig()
    world = _world(cfg)
    mixing, centres, weights, amount_mu, busy_hour, _ = world
    rng = np.random.default_rng(seed)
    n_fraud = int(round(cfg.n_rows * cfg.fraud_rate))
    n_normal = cfg.n_rows - n_fraud

    # Normal rows.
    seg = rng.choice(cfg.segments, size=n_normal, p=weights)
    z = centres[seg] + rng.normal(scale=0.6, size=(n_normal, cfg.latent_dim))
    hour = (busy_hour[seg] + rng.normal(scale=3.5, size=n_normal)) % 24
    log_amount = amount_mu[seg] + 0.3 * z[:, 0] + rng.normal(scale=0.6, size=n_normal)
    v = _emit(z, world, rng)
    normal = np.column_stack([hour, v, np.expm1(np.clip(log_amount, 0, None))])

    # Fraud rows, split between the four patterns.
    parts, names = [], []
    counts = rng.multinomial(n_fraud, [0.3, 0.25, 0.25, 0.2])
    for pattern, n in zip(FRAUD_PATTERNS, counts):
        seg = rng.choice(cfg.segments, size=n, p=weights)
        z = centres[seg] + rng.normal(scale=0.6, size=(n, cfg.latent_dim))
        if pattern == "card_testing":
            hour = rng.uniform(1.0, 5.0, size=n)
            log_amount = np.log1p(rng.uniform(0.0, 3.0, size=n))
            v = _emit(z, world, rng)
            v[:, [2, 9, 15]] += rng.normal(loc=[2.2, -2.0, 1.8], scale=0.6, size=(n, 3))
        elif pattern == "account_takeover":
            hour = (busy_hour[seg] + rng.normal(scale=4.0, size=n)) % 24
            log_amount = amount_mu[seg] + rng.uniform(1.5, 3.0, size=n)
            v = _emit(z, world, rng)
            v[:, [11, 13, 16]] += rng.normal(loc=[-2.5, -3.0, -2.0], scale=0.8, size=(n, 3))
        elif pattern == "off_manifold":
            hour = (busy_hour[seg] + rng.normal(scale=3.5, size=n)) % 24
            log_amount = amount_mu[seg] + rng.normal(scale=0.6, size=n)
            v = _emit(z, world, rng)
            # Re-pair components across rows: every marginal stays plausible, the joint does not.
            cols = rng.choice(28, size=10, replace=False)
            v[:, cols] = v[rng.permutation(n)][:, cols] * 1.3
        else:  # synthetic_identity
            far = centres.mean(0) + 2.8 * rng.normal(size=cfg.latent_dim)
            z = far + rng.normal(scale=0.4, size=(n, cfg.latent_dim))
            hour = rng.uniform(0.0, 24.0, size=n)
            log_amount = rng.normal(loc=amount_mu.mean(), scale=0.6, size=n)
            v = _emit(z, world, rng)
        parts.append(np.column_stack([hour, v, np.expm1(np.clip(log_amount, 0, None))]))
        names += [pattern] * n

    x = np.vstack([normal, *parts])
    label = np.concatenate([np.zeros(n_normal, np.int64), np.ones(n_fraud, np.int64)])
    pattern = np.array([""] * n_normal + names, dtype=object)
    # Time: seconds since the first transaction, spread over `days`, at the row's hour.
    day = rng.integers(0, int(np.ceil(cfg.days)), size=len(x))
    x[:, 0] = day * SECONDS_PER_DAY + x[:, 0] * 3600.0 + rng.uniform(0, 60, size=len(x))
    order = np.argsort(x[:, 0], kind="stable")  # chronological, as a transaction log is
    return x[order], label[order], pattern[order]


def write_csv(path: Path, x: np.ndarray, label: np.ndarray, columns=TRANSACTION_COLUMNS,
              append: bool = False) -> None:
    """Write a table in the repository schema (``Class`` as the label column).

    Args:
        path: the CSV file.
        x: (N, F) feature values, written with 6 significant digits.
        label: (N,) 0/1 labels.
        columns: the F feature names of the header row.
        append: add the rows to an existing file, without a header (a table written in parts).
    """
    fmt = ",".join(["%.6g"] * x.shape[1] + ["%d"])
    with open(path, "a" if append else "w") as f:
        if not append:
            f.write(",".join([*columns, "Class"]) + "\n")
        for start in range(0, len(x), 65_536):  # bounded temporaries, whatever N
            part = np.column_stack([x[start : start + 65_536], label[start : start + 65_536]])
            np.savetxt(f, part, fmt=fmt)


# ---------------------------------------------------------------------------- bring your own data


@dataclass
class Table:
    """A numeric table: features, their names, and an optional 0/1 label (1 = anomalous)."""

    x: np.ndarray  # (N, F) float32
    columns: list[str]
    label: np.ndarray | None  # (N,) int64
    schema: str  # "transactions" (the public card schema) or "generic"
    source: str


CSV_BLOCK_BYTES = 1 << 20  # pyarrow parses the file a block at a time (larger: slower, more memory)


def _count_lines(path: Path) -> int:
    """Newline-terminated lines, plus an unterminated last one: an upper bound on the rows."""
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(CSV_BLOCK_BYTES):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def _csv_error(path: Path, header: list[str], exc: Exception) -> ValueError:
    """pyarrow's parse or conversion error, with the column's name instead of its index."""
    message = str(exc)
    # e.g. "In CSV column #2: CSV conversion error to float: invalid value 'oops'"
    conversion = re.match(r"In CSV column #(\d+): CSV conversion error to \w+: (.*)", message, re.S)
    if conversion is None:
        return ValueError(f"{path}: malformed CSV ({message})")
    j, what = int(conversion.group(1)), conversion.group(2)
    name = header[j] if j < len(header) else f"#{j}"
    return ValueError(f"{path}: every value must be numeric (column '{name}': {what})")


def load_table(path: Path, label_column: str | None = None) -> Table:
    """Load a CSV: the transaction schema, or any numeric table.

    The file is parsed by pyarrow a block at a time, straight into one preallocated
    float32 (N, F) array: peak memory is that array plus a block, whatever N.

    Args:
        path: a CSV file with a header row.
        label_column: the label's column; when None, the first of ``LABEL_CANDIDATES``
            present is used, if any. Nonzero labels mark anomalies; they are used only to
            pick the normal training rows and for evaluation.

    Raises:
        ValueError: a non-numeric, missing, NaN or infinite value, a malformed row, a named
            label column not found, or no data row.
    """
    import pyarrow as pa
    import pyarrow.csv as pcsv

    with open(path, newline="") as f:
        header = [h.strip() for h in next(csv.reader(f), [])]
    if not header:
        raise ValueError(f"{path}: needs a header row and at least one data row")
    if label_column is None:
        label_column = next((c for c in LABEL_CANDIDATES if c in header), None)
    elif label_column not in header:
        raise ValueError(f"{path}: label column '{label_column}' not in header {header}")
    j_label = None if label_column is None else header.index(label_column)
    features = [j for j in range(len(header)) if j != j_label]
    slot = {j: k for k, j in enumerate(features)}  # CSV column -> column of x

    # Positional names: a header may repeat a name or hold one pyarrow would rewrite.
    names = [f"c{j}" for j in range(len(header))]
    types = {n: pa.float32() for n in names}
    if j_label is not None:
        types[names[j_label]] = pa.float64()  # exact: a label of 1e-50 is still nonzero
    reader_options = pcsv.ReadOptions(column_names=names, skip_rows=1, block_size=CSV_BLOCK_BYTES)
    # Only an empty cell is missing; "nan" and "inf" parse as floats and are refused below.
    convert_options = pcsv.ConvertOptions(column_types=types, null_values=[""],
                                          quoted_strings_can_be_null=True)

    capacity = max(_count_lines(path) - 1, 0)
    x = np.empty((capacity, len(features)), np.float32)  # (N, F), filled a block at a time
    label = np.empty(capacity, np.int64) if j_label is not None else None
    n = 0
    try:
        reader = pcsv.open_csv(path, read_options=reader_options, convert_options=convert_options)
        for batch in reader:
            rows = batch.num_rows
            if n + rows > capacity:  # only where lines end in a bare '\r'
                capacity = max(2 * capacity, n + rows)
                x.resize((capacity, len(features)), refcheck=False)
                if label is not None:
                    label.resize(capacity, refcheck=False)
            for j, column in enumerate(batch.columns):
                if column.null_count:
                    row = n + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                    raise ValueError(f"{path}: missing value in column '{header[j]}', data row {row + 1}")
                values = column.to_numpy()
                if not np.isfinite(values).all():
                    row = n + int(np.flatnonzero(~np.isfinite(values))[0])
                    raise ValueError(f"{path}: contains NaN or infinite values "
                                     f"(column '{header[j]}', data row {row + 1})")
                if j == j_label:
                    np.not_equal(values, 0, out=label[n : n + rows], casting="unsafe")
                else:
                    x[n : n + rows, slot[j]] = values
            n += rows
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" not in str(exc):  # that one: a header and nothing else, said below
            raise _csv_error(path, header, exc) from None
    if n == 0:
        raise ValueError(f"{path}: needs a header row and at least one data row")
    if n < capacity:  # blank lines: give back the unused tail (a realloc, not a copy of N rows)
        x.resize((n, len(features)), refcheck=False)
        if label is not None:
            label.resize(n, refcheck=False)
    columns = [header[j] for j in features]
    schema = "transactions" if columns == TRANSACTION_COLUMNS else "generic"
    return Table(x=x, columns=columns, label=label, schema=schema, source=str(path))


# ---------------------------------------------------------------------------- preprocessing


def feature_transforms(columns: list[str], schema: str) -> list[str]:
    """Per-column transform before standardization: 'time_of_day', 'log1p' or 'identity'."""
    if schema != "transactions":
        return ["identity"] * len(columns)
    return ["time_of_day" if c == "Time" else "log1p" if c == "Amount" else "identity" for c in columns]


class Preprocess(nn.Module):
    """Raw columns -> standardized model features, inside the ONNX graph.

    ``time_of_day`` becomes two features (sin and cos of the hour), so the model sees
    midnight as close to 23:59; ``log1p`` tames heavy-tailed amounts. Every feature is
    then standardized with the training rows' mean and std.
    """

    def __init__(self, transforms: list[str]):
        super().__init__()
        self.transforms = transforms
        n_out = sum(2 if t == "time_of_day" else 1 for t in transforms)
        self.register_buffer("mean", torch.zeros(n_out))
        self.register_buffer("std", torch.ones(n_out))
        # (n_out, n_in): sums a column's transformed features' errors back onto the column.
        fold = torch.zeros(n_out, len(transforms))
        i = 0
        for j, t in enumerate(transforms):
            width = 2 if t == "time_of_day" else 1
            fold[i : i + width, j] = 1.0 / width
            i += width
        self.register_buffer("fold", fold)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        cols = []
        for j, t in enumerate(self.transforms):
            c = x[:, j : j + 1]  # (B, 1)
            if t == "time_of_day":
                angle = torch.remainder(c, SECONDS_PER_DAY) * (2 * np.pi / SECONDS_PER_DAY)
                cols += [torch.sin(angle), torch.cos(angle)]
            elif t == "log1p":
                cols.append(torch.log1p(torch.clamp(c, min=0.0)))
            else:
                cols.append(c)
        return torch.cat(cols, dim=1)  # (B, n_out)

    def fit(self, x: torch.Tensor) -> None:
        t = self.transform(x)
        self.mean.copy_(t.mean(0))
        std = t.std(0)
        self.std.copy_(torch.where(std < 1e-8, torch.ones_like(std), std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.transform(x) - self.mean) / self.std


# ---------------------------------------------------------------------------- network


@dataclass
class AutoencoderConfig:
    hidden: tuple[int, ...] = (24, 12)
    latent: int = 6
    noise_std: float = 0.3  # denoising: Gaussian input noise in standardized units
    epochs: int = 25
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-5
    fpr: float = 0.01  # calibration: the share of normal rows the threshold may flag


def _mlp(sizes: list[int], last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class FraudAutoencoder(nn.Module):
    """The served graph: raw rows -> (score, feature_errors, reconstruction error per row).

    ``score`` (B,) is the mean squared reconstruction error over standardized features;
    ``feature_errors`` (B, F) gives each input column's share (columns expanded into two
    features, like Time, get the mean of theirs), so ``score == feature_errors.mean(1)``
    when every column maps to one feature.
    """

    def __init__(self, transforms: list[str], cfg: AutoencoderConfig):
        super().__init__()
        self.pre = Preprocess(transforms)
        n = int(self.pre.mean.numel())
        self.encoder = _mlp([n, *cfg.hidden, cfg.latent], last_activation=False)
        self.decoder = _mlp([cfg.latent, *reversed(cfg.hidden), n], last_activation=False)

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(z))

    def forward(self, transactions: torch.Tensor):
        z = self.pre(transactions)                        # (B, n)
        err = (self.reconstruct(z) - z) ** 2              # (B, n)
        return err.mean(dim=1), err @ self.pre.fold       # (B,), (B, F)


def train_autoencoder(x_train: np.ndarray, transforms: list[str], cfg: AutoencoderConfig,
                      seed: int, desc: str) -> FraudAutoencoder:
    """Fit the standardization and the network on ``x_train`` (N, F), normal rows only.

    The transformed rows (N, n features, float32) are held in memory for the whole run;
    :func:`build` bounds N (``FraudBuildOptions.max_train_rows``).
    """
    torch.manual_seed(seed)
    model = FraudAutoencoder(transforms, cfg)
    xt = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32))  # no copy when float32
    model.pre.fit(xt)
    with torch.no_grad():
        z_all = model.pre(xt)
    opt = torch.optim.AdamW(
        [p for n, p in model.named_parameters() if not n.startswith("pre.")],
        lr=cfg.lr, weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in progress(range(cfg.epochs), desc, "epoch"):
        model.train()
        order = torch.randperm(len(z_all), generator=gen)
        for start in range(0, len(z_all), cfg.batch_size):
            z = z_all[order[start : start + cfg.batch_size]]
            noisy = z + cfg.noise_std * torch.randn(z.shape, generator=gen)
            loss = F.mse_loss(model.reconstruct(noisy), z)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def score(model: FraudAutoencoder, x: np.ndarray, rows: np.ndarray | None = None,
          batch_rows: int = SCORE_BATCH_ROWS) -> np.ndarray:
    """Anomaly scores of ``x[rows]`` (every row when None), ``batch_rows`` at a time.

    Args:
        model: a trained autoencoder.
        x: (N, F) raw rows.
        rows: indices into ``x``; gathered a batch at a time, never all at once.
        batch_rows: rows per forward pass: bounds the gathered rows and the activations.

    Returns:
        (len(rows),) float64 scores.
    """
    n = len(x) if rows is None else len(rows)
    out = np.empty(n, np.float64)
    with torch.no_grad():
        for start in range(0, n, batch_rows):
            part = x[start : start + batch_rows] if rows is None else x[rows[start : start + batch_rows]]
            batch = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))  # (B, F)
            out[start : start + len(batch)] = model(batch)[0].numpy()
    return out


# ---------------------------------------------------------------------------- evaluation


def calibrate_threshold(normal_scores: np.ndarray, fpr: float) -> float:
    """The score above which only ``fpr`` of held-out normal rows fall."""
    return float(np.quantile(normal_scores, 1.0 - fpr, method="higher"))


def evaluate(scores: np.ndarray, label: np.ndarray, threshold: float,
             pattern: np.ndarray | None = None) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    flagged = scores > threshold
    pos, neg = label == 1, label == 0
    metrics = {
        "roc_auc": float(roc_auc_score(label, scores)),
        "average_precision": float(average_precision_score(label, scores)),
        "recall_at_threshold": float(flagged[pos].mean()),
        "false_positive_rate_at_threshold": float(flagged[neg].mean()),
        "precision_at_threshold": float(flagged[pos].sum() / max(flagged.sum(), 1)),
        "eval_normal_rows": int(neg.sum()),
        "eval_anomalous_rows": int(pos.sum()),
    }
    if pattern is not None:
        metrics["recall_by_pattern"] = {
            p: float(flagged[pattern == p].mean()) for p in FRAUD_PATTERNS if (pattern == p).any()
        }
    fpr, tpr, _ = roc_curve(label, scores)
    keep = np.unique(np.linspace(0, len(fpr) - 1, 200).astype(int))  # a light curve for the card
    metrics["roc_curve"] = {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}
    return metrics


# ---------------------------------------------------------------------------- model card


def _write_card(directory: Path, manifest: Manifest) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = manifest.metrics
    labelled = "roc_curve" in m  # an unlabelled table (or one without anomalies) has no ROC
    if labelled:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        ax.plot(m["roc_curve"]["fpr"], m["roc_curve"]["tpr"], label=f"AUC {m['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        op = m["false_positive_rate_at_threshold"], m["recall_at_threshold"]
        ax.scatter(*op, color="red", zorder=3, label=f"threshold: FPR {op[0]:.3f}, recall {op[1]:.3f}")
        ax.set(xlabel="false-positive rate", ylabel="recall", title=f"{manifest.name}: ROC (held-out)")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(directory / "roc.png", dpi=110)
        plt.close(fig)

    by_pattern = m.get("recall_by_pattern", {})
    pattern_rows = "".join(f"| {p} | {r:.3f} |\n" for p, r in by_pattern.items())
    td = manifest.training_data
    text = card_header(manifest) + (
        "## Data\n\n"
        f"{td['description']}\n\n"
        f"Training rows (normal only): {td['train_rows']}"
        + (f" (the network fitted on a seeded random {td['fit_rows']} of them)"
           if td.get("fit_rows", td["train_rows"]) < td["train_rows"] else "")
        + "; calibration rows (normal): "
        f"{td['calibration_rows']}; evaluation rows: {m['eval_normal_rows']} normal, "
        f"{m['eval_anomalous_rows']} anomalous.\n\n"
        "## Results on held-out data\n\n"
        f"| metric | value |\n|---|---|\n"
        + (f"| ROC-AUC | {m['roc_auc']:.4f} |\n"
           f"| average precision | {m['average_precision']:.4f} |\n" if labelled else "")
        + f"| threshold (calibrated at FPR {manifest.extra['target_fpr']}) | {manifest.threshold:.5g} |\n"
        + (f"| recall at threshold | {m['recall_at_threshold']:.4f} |\n" if labelled else "")
        + f"| false-positive rate at threshold | {m['false_positive_rate_at_threshold']:.4f} |\n"
        + (f"| precision at threshold | {m['precision_at_threshold']:.4f} |\n" if labelled else "")
        + "\n"
        + (("| fraud pattern | recall at threshold |\n|---|---|\n" + pattern_rows + "\n") if pattern_rows else "")
        + ("![ROC curve](roc.png)\n\n" if labelled else
           "No labelled anomalies among the held-out rows: only the false-positive rate is measured.\n\n")
        + "## How to read a score\n\n"
        "`score` is the mean squared reconstruction error over standardized features; a row is "
        "flagged when it exceeds the threshold. `feature_errors` says which columns the model "
        "could not reconstruct: the largest are the explanation to show an analyst.\n\n"
        "## Limits\n\n"
        "An autoencoder flags what is unlike its training rows, not fraud as such: new but "
        "legitimate behaviour is flagged too, and fraud that imitates normal rows is missed. "
        "Recalibrate the threshold when the normal traffic shifts.\n"
    )
    (directory / "card.md").write_text(text)


# ---------------------------------------------------------------------------- build


@dataclass
class FraudBuildOptions:
    name: str = "fraud-autoencoder"
    data: Path | None = None
    label_column: str | None = None
    fpr: float = 0.01
    config: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    # The network trains on at most this many of the training split's rows (a seeded
    # random sample: the split is shuffled), which bounds training time and memory on a
    # large table. The default synthetic table (71,640 training rows) is far below it.
    max_train_rows: int = 1_000_000


def split_rows(label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices for training, threshold calibration and evaluation.

    Normal rows are split 60/20/20; every anomalous row goes to evaluation only, since
    the detector must never see one before it is judged. Depends only on ``label`` and
    ``seed``, so tests can rebuild the held-out set.
    """
    rng = np.random.default_rng(seed)
    normal = np.flatnonzero(label == 0)
    normal = normal[rng.permutation(len(normal))]
    a, b = int(0.6 * len(normal)), int(0.8 * len(normal))
    return normal[:a], normal[a:b], np.concatenate([normal[b:], np.flatnonzero(label == 1)])


def build(repo: Path, seed: int, options: FraudBuildOptions | None = None) -> Path:
    """Train, calibrate, evaluate, export and publish the anomaly detector."""
    opts = options or FraudBuildOptions()
    seed_everything(seed)
    pattern = None
    if opts.data is None:
        synth = SyntheticConfig()
        x, label, pattern = generate_transactions(seed, synth)
        table = Table(x=x.astype(np.float32), columns=list(TRANSACTION_COLUMNS), label=label,
                      schema="transactions", source="synthetic")
        description = (
            f"Synthetic card transactions from deepserve.models.fraud.generate_transactions "
            f"(seed {seed}, {synth.n_rows} rows over {synth.days:g} days, fraud rate "
            f"{synth.fraud_rate:.3%}, patterns: {', '.join(FRAUD_PATTERNS)})."
        )
    else:
        table = load_table(opts.data, opts.label_column)
        description = (
            f"Table {table.source} ({len(table.x)} rows, {len(table.columns)} features, "
            f"schema '{table.schema}'"
            + (", label used for evaluation only)." if table.label is not None else ", unlabelled).")
        )
    label = table.label if table.label is not None else np.zeros(len(table.x), np.int64)
    tr, cal, ev_rows = split_rows(label, seed)
    normal_rows = len(label) - int(np.count_nonzero(label))
    if normal_rows < MIN_NORMAL_ROWS:
        raise ValueError(f"{table.source}: {normal_rows} normal (label 0) row(s); training, "
                         f"calibration and evaluation need at least {MIN_NORMAL_ROWS}")
    fit_rows = tr[: opts.max_train_rows]  # tr is in shuffled order: a seeded random sample
    transforms = feature_transforms(table.columns, table.schema)
    # Small tables get more passes: at least MIN_STEPS optimizer steps in all.
    steps_per_epoch = int(np.ceil(len(fit_rows) / opts.config.batch_size))
    epochs = max(opts.config.epochs, int(np.ceil(MIN_STEPS / steps_per_epoch)))
    cfg = replace(opts.config, fpr=opts.fpr, epochs=epochs)
    model = train_autoencoder(table.x[fit_rows], transforms, cfg, seed, desc=f"train {opts.name}")

    cal_scores = score(model, table.x, cal)
    threshold = calibrate_threshold(cal_scores, opts.fpr)
    if label.any():
        metrics = evaluate(score(model, table.x, ev_rows), label[ev_rows], threshold,
                           None if pattern is None else pattern[ev_rows])
    else:  # unlabelled: only the false-positive rate on held-out rows can be measured
        flagged = score(model, table.x, ev_rows) > threshold
        metrics = {"false_positive_rate_at_threshold": float(flagged.mean()),
                   "eval_normal_rows": int(len(ev_rows)), "eval_anomalous_rows": 0}

    example = torch.from_numpy(table.x[ev_rows[:: max(1, len(ev_rows) // 256)]])  # (≤256, F) float32
    spec = ExportSpec(
        name=opts.name,
        kind="anomaly",
        module=model,
        example_inputs=(example,),
        input_names=["transactions"],
        output_names=["score", "feature_errors"],
        descriptions={
            "transactions": f"raw rows, columns in feature_names order ({len(table.columns)} features)",
            "score": "anomaly score: mean squared reconstruction error (higher = more unusual)",
            "feature_errors": "per-column reconstruction error, the explanation of the score",
        },
        preprocessing={
            "in_graph": True,
            "transforms": dict(zip(table.columns, transforms)),
            "then": "standardize with the training rows' mean and std",
            "client": "send raw values in feature_names order; nothing to scale",
        },
        training_data={
            "description": description,
            "schema": table.schema,
            "source": table.source,
            "train_rows": int(len(tr)),
            "fit_rows": int(len(fit_rows)),
            "calibration_rows": int(len(cal)),
            "split_seed": seed,
            "label_use": "evaluation only; training and calibration use normal rows",
        },
        metrics=metrics,
        seed=seed,
        threshold=threshold,
        extra={
            "feature_names": table.columns,
            "target_fpr": opts.fpr,
            "score_direction": "higher is more anomalous; flagged when score > threshold",
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            # What live scores drift from: the held-out normal rows' scores (the calibration split).
            **Reference.fit(cal_scores, "score").to_extra(),
        },
        write_card=_write_card,
    )
    return export_and_publish(spec, repo)
