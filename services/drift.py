"""Score distributions compared: live against training (drift), candidate against live (shadow).

Numpy only: gateway worker processes import this and never import torch or scipy.

- :class:`Reference` is the training (or calibration) distribution of a model's score, kept
  in its manifest as ``extra["score_reference"]``: equal-frequency bins fitted at build time.
- :class:`DriftMonitor` bins the recent live scores into the reference's bins; its
  :meth:`~DriftMonitor.psi` is the population stability index against the reference.
- The shadow comparators (:class:`ScoreShadow`, :class:`AgreementShadow`,
  :class:`OverlapShadow`) take the primary's and the candidate's outputs on the same requests
  and say how far apart they are. They share one interface: :meth:`~Shadow.add` per request,
  :meth:`~Shadow.figures` about once a second.

Everything keeps a bounded window of the most recent values (:class:`Window`): ``add`` and
``observe`` cost a copy of the request's rows (no allocation that grows), the figures
cost O(window) when asked for. None of this is thread-safe: one thread (a process's event
loop) records and reads.

PSI reading, by the usual rule of thumb: below 0.1 stable, 0.1 to 0.2 a moderate shift,
above 0.2 a significant one (the alert threshold in ``deploy/prometheus/rules.yml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

WINDOW = 5000      # recent values kept per monitor or comparator
MIN_COUNT = 200    # fewer values than this give no figure: too noisy to alert on
BINS = 10          # equal-frequency bins of a fitted reference
PSI_FLOOR = 1e-4   # bin fractions are floored here: an empty bin adds a large term, not inf
EXTRA_KEY = "score_reference"
MEASURES = ("score", "confidence")  # what a reference describes: anomaly score, top-class probability
# Fitted edges sit on this grid, per measure: each is the largest grid point below its
# quantile. A confident classifier's top-class probabilities pile up within float32 steps of
# 1.0 (1.0, 0.99999994, ...), where two execution providers (CPU, CUDA) may round one image's
# probability differently: an edge among them would move such rows between bins, and PSI
# would see drift that is only rounding.
RESOLUTION = {"score": 0.0, "confidence": 1e-5}
# Shadow measures where higher means closer (the others are distances: higher means further).
SIMILARITIES = frozenset({"agreement", "overlap_at_k"})


# ---------------------------------------------------------------------------- statistics


def psi(expected: Iterable[float], observed: Iterable[float], floor: float = PSI_FLOOR) -> float:
    """Population stability index: sum over bins of (o - e) * ln(o / e).

    Args:
        expected: per-bin counts or fractions of the reference distribution.
        observed: per-bin counts or fractions of the distribution compared, same bins.
        floor: each normalized fraction is raised to at least this, so that a bin empty on
            one side contributes a large finite term.

    Returns:
        0 for identical distributions; > 0.2 is commonly read as a significant shift.
    """
    e, o = np.asarray(expected, np.float64), np.asarray(observed, np.float64)
    if e.shape != o.shape or e.ndim != 1:
        raise ValueError(f"psi: expected and observed need the same bins, got {e.shape} and {o.shape}")
    if e.sum() <= 0 or o.sum() <= 0:
        raise ValueError("psi: a distribution with nothing in it")
    e = np.maximum(e / e.sum(), floor)
    o = np.maximum(o / o.sum(), floor)
    return float(np.sum((o - e) * np.log(o / e)))


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs
    (exact, as ``scipy.stats.ks_2samp``'s statistic)."""
    a = np.sort(np.asarray(a, np.float64).ravel())
    b = np.sort(np.asarray(b, np.float64).ravel())
    if not len(a) or not len(b):
        raise ValueError("ks: an empty sample")
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def bin_counts(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in the bins that the ascending inner ``edges`` make: bin 0 is
    below ``edges[0]``, bin i is ``[edges[i-1], edges[i])``, the last is ``edges[-1]`` and up."""
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


# ---------------------------------------------------------------------------- the reference


@dataclass(frozen=True)
class Reference:
    """A score distribution as equal-frequency bins, as kept in a manifest.

    Attributes:
        measure: ``"score"`` (an anomaly model's score) or ``"confidence"`` (a classifier's
            top-class probability).
        edges: the inner bin edges, strictly ascending (see :func:`bin_counts`).
        fractions: the share of the reference values in each bin (``len(edges) + 1``).
        rows: how many values the fractions were measured on.
    """

    measure: str
    edges: tuple[float, ...]
    fractions: tuple[float, ...]
    rows: int

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise ValueError(f"score_reference: measure is one of {', '.join(MEASURES)}, not {self.measure!r}")
        edges = np.asarray(self.edges, np.float64)
        if edges.ndim != 1 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
            raise ValueError("score_reference: edges must be finite and strictly ascending")
        if len(self.fractions) != len(self.edges) + 1:
            raise ValueError(f"score_reference: {len(self.edges)} edges need {len(self.edges) + 1} "
                             f"fractions, got {len(self.fractions)}")
        if self.rows < 1 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError("score_reference: fractions must be >= 0 and sum to 1, over rows >= 1")

    @classmethod
    def fit(cls, values: np.ndarray, measure: str, bins: int = BINS) -> Reference:
        """Equal-frequency bins of ``values`` and the share of them in each bin.

        Edge i lies halfway between the sorted values ``k - 1`` and ``k``, ``k`` the nearest
        integer to ``i * N / bins``: no value of the sample sits on an edge (unless it is tied),
        so a score the served graph computes a rounding step away from the build's falls in
        the same bin. With a :data:`RESOLUTION`, each edge moves down to the largest point of
        the grid below it. Where edges tie (values piled up at a classifier's
        confidence of 1.0) equal edges merge, so there may be fewer bins, and shares are
        measured, not assumed to be ``1 / bins``. Deterministic.

        Args:
            values: (N,) the scores, as the served model computes them (float32 outputs stay
                float32 values: live scores are binned against these edges).
            measure: what the values are (:data:`MEASURES`).
            bins: at most this many bins.
        """
        v = _finite(np.asarray(values, np.float64).ravel())
        if not len(v) or bins < 1:
            raise ValueError("Reference.fit needs finite values and bins >= 1")
        v = np.sort(v)
        below = np.round(np.arange(1, bins) * len(v) / bins).astype(np.int64)  # values below each edge
        below = below[(below > 0) & (below < len(v))]
        edges = (v[below - 1] + v[below]) / 2
        resolution = RESOLUTION.get(measure, 0.0)
        if resolution:  # round() first: 1.0 / 1e-5 is 99999.99999999999 in floats
            steps = np.ceil(np.round(edges / resolution, 6)) - 1
            edges = np.round(steps * resolution, 12)
        edges = np.unique(edges)
        counts = bin_counts(edges, v)
        return cls(measure, tuple(edges.tolist()), tuple((counts / len(v)).tolist()), int(len(v)))

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> Reference | None:
        """The reference in a manifest's ``extra``; None where it has none (manifests written
        before there were references).

        Raises:
            ValueError: there is one, and it is malformed.
        """
        entry = (extra or {}).get(EXTRA_KEY)
        if entry is None:
            return None
        try:
            return cls(str(entry["measure"]), tuple(float(e) for e in entry["edges"]),
                       tuple(float(f) for f in entry["fractions"]), int(entry["rows"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"score_reference: expected measure, edges, fractions and rows ({exc!r})") from None

    def to_extra(self) -> dict[str, Any]:
        """``{"score_reference": {...}}``, to merge into a manifest's ``extra``."""
        return {EXTRA_KEY: {"measure": self.measure, "edges": list(self.edges),
                            "fractions": list(self.fractions), "rows": self.rows}}

    def counts(self, values: np.ndarray) -> np.ndarray:
        """Per-bin counts of ``values`` in this reference's bins."""
        return bin_counts(np.asarray(self.edges, np.float64), values)


# ---------------------------------------------------------------------------- windows


class Window:
    """The last ``size`` rows added: a ring buffer, allocated once.

    Args:
        size: rows kept.
        width: values per row (None: scalar rows).
        dtype: the stored type.
    """

    def __init__(self, size: int = WINDOW, width: int | None = None, dtype=np.float64):
        if size < 1:
            raise ValueError("Window size must be >= 1")
        self._data = np.empty((size,) if width is None else (size, width), dtype)
        self._next = 0   # where the next row goes
        self._count = 0  # rows held, at most size

    def __len__(self) -> int:
        return self._count

    @property
    def size(self) -> int:
        return len(self._data)

    def add(self, rows: np.ndarray) -> None:
        """Keep ``rows`` (``(n,)``, or ``(n, width)``), dropping the oldest beyond ``size``."""
        rows = np.asarray(rows)
        n, size = len(rows), len(self._data)
        if n >= size:
            self._data[:] = rows[n - size:]
            self._next, self._count = 0, size
            return
        end = self._next + n
        if end <= size:
            self._data[self._next:end] = rows
        else:
            split = size - self._next
            self._data[self._next:] = rows[:split]
            self._data[:n - split] = rows[split:]
        self._next, self._count = end % size, min(size, self._count + n)

    def values(self) -> np.ndarray:
        """The rows held (a copy, in no particular order; rows added together stay together)."""
        return self._data[:self._count].copy()


# ---------------------------------------------------------------------------- drift


class DriftMonitor:
    """PSI of the recent live values of one model version against its training reference.

    Args:
        reference: the manifest's :class:`Reference`.
        window: recent values kept.
        min_count: values needed before :meth:`psi` gives a figure.
    """

    def __init__(self, reference: Reference, window: int = WINDOW, min_count: int = MIN_COUNT):
        self.reference, self.min_count = reference, min_count
        self._window = Window(window)

    def observe(self, values: np.ndarray) -> None:
        """Record a request's values: scores (B,), or confidences (B,) (the top-class probability)."""
        self._window.add(np.asarray(values, np.float64).ravel())

    def __len__(self) -> int:
        return len(self._window)

    def psi(self) -> float | None:
        """PSI of the window against the reference; None below ``min_count`` values."""
        values = _finite(self._window.values())
        if len(values) < self.min_count:
            return None
        return psi(self.reference.fractions, self.reference.counts(values))


# ---------------------------------------------------------------------------- shadow comparison


class Shadow:
    """Compares a candidate version's outputs with the primary's on the same requests.

    Subclasses say what one request's outputs are (:meth:`add`) and what the figures are.
    Only the last ``window`` rows count, and :meth:`figures` is ``{}`` below ``min_count``.
    """

    def __init__(self, window: int = WINDOW, min_count: int = MIN_COUNT, width: int | None = None):
        self.min_count = min_count
        self._window = Window(window, width)

    def __len__(self) -> int:
        return len(self._window)

    def add(self, primary: np.ndarray, candidate: np.ndarray) -> None:
        """Record one request's outputs: row i of ``primary`` and of ``candidate`` answer
        the same input row."""
        raise NotImplementedError

    def figures(self) -> dict[str, float]:
        """Measure name -> value over the window (``{}`` until ``min_count`` rows)."""
        if len(self._window) < self.min_count:
            return {}
        return self._figures(self._window.values())

    def _figures(self, rows: np.ndarray) -> dict[str, float]:
        raise NotImplementedError


def _paired(primary: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    primary, candidate = np.asarray(primary), np.asarray(candidate)
    if len(primary) != len(candidate):
        raise ValueError(f"shadow: {len(primary)} primary rows and {len(candidate)} candidate rows")
    return primary, candidate


class ScoreShadow(Shadow):
    """Anomaly scores: PSI and KS between the two score distributions, and the difference in
    the share flagged, each version at its own manifest threshold (flagged: score > threshold).

    Figures: ``psi`` (the candidate's scores in equal-frequency bins of the primary's),
    ``ks``, ``flagged_rate_diff`` (candidate minus primary, in [-1, 1]).
    """

    def __init__(self, primary_threshold: float, candidate_threshold: float, window: int = WINDOW,
                 min_count: int = MIN_COUNT, bins: int = BINS):
        super().__init__(window, min_count, width=2)
        self.thresholds, self.bins = (float(primary_threshold), float(candidate_threshold)), bins

    def add(self, primary: np.ndarray, candidate: np.ndarray) -> None:
        primary, candidate = _paired(primary, candidate)
        self._window.add(np.stack([primary.ravel(), candidate.ravel()], axis=1))  # (B, 2)

    def _figures(self, rows: np.ndarray) -> dict[str, float]:
        rows = rows[np.isfinite(rows).all(axis=1)]
        if len(rows) < self.min_count:
            return {}
        primary, candidate = rows[:, 0], rows[:, 1]
        bins = Reference.fit(primary, "score", self.bins)
        flagged = (rows > np.asarray(self.thresholds)).mean(axis=0)  # (2,) per version
        return {"psi": psi(bins.fractions, bins.counts(candidate)), "ks": ks(primary, candidate),
                "flagged_rate_diff": float(flagged[1] - flagged[0])}


class AgreementShadow(Shadow):
    """Classifiers: the share of rows whose top class is the same.

    ``add`` takes per-row labels (B,), or probabilities (B, C), whose argmax it takes.
    Figure: ``agreement`` in [0, 1].
    """

    def __init__(self, window: int = WINDOW, min_count: int = MIN_COUNT):
        super().__init__(window, min_count)

    def add(self, primary: np.ndarray, candidate: np.ndarray) -> None:
        primary, candidate = _paired(primary, candidate)
        if primary.ndim == 2:
            primary = primary.argmax(axis=1)
        if candidate.ndim == 2:
            candidate = candidate.argmax(axis=1)
        self._window.add(primary == candidate)  # (B,) 1.0 where they agree

    def _figures(self, rows: np.ndarray) -> dict[str, float]:
        return {"agreement": float(rows.mean())}


class OverlapShadow(Shadow):
    """Recommenders: overlap@k, the mean over rows of |top-k ∩ top-k| / k.

    ``add`` takes (B, k') item ids per version, best first; the first ``k`` columns count.
    Negative ids (padding) never match. Figure: ``overlap_at_k`` in [0, 1].
    """

    def __init__(self, k: int, window: int = WINDOW, min_count: int = MIN_COUNT):
        if k < 1:
            raise ValueError("OverlapShadow: k >= 1")
        super().__init__(window, min_count)
        self.k = k

    def add(self, primary: np.ndarray, candidate: np.ndarray) -> None:
        primary, candidate = _paired(primary, candidate)
        a, b = primary[:, :self.k], candidate[:, :self.k]                 # (B, k)
        shared = (a[:, :, None] == b[:, None, :]).any(axis=2) & (a >= 0)  # (B, k): a's id is in b's
        self._window.add(shared.sum(axis=1) / self.k)                     # (B,)

    def _figures(self, rows: np.ndarray) -> dict[str, float]:
        return {"overlap_at_k": float(rows.mean())}
