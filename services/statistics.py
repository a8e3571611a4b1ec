"""Per-model request and execution statistics, as Triton's ``ModelStatistics`` reports them.

Each gateway keeps cumulative figures for the inference requests it handled: how many
succeeded or failed and how long they took, how long they queued and computed, how many
rows (inferences) and model executions they amounted to, and executions by batch size.

Executions are shared: one ONNX Runtime run may carry several requests, possibly sent
through several gateways, and for a model placed ``deployment`` it happens in another
process. So each request brings back its :class:`Timing` — its wait, its run's duration and
the number of requests in that run — and adds ``1 / requests`` of an execution. Summed over
the requests of a run, that is one execution, exactly, whichever gateways they came through.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Timing:
    """What one request's computation cost, as its backend measured it.

    Attributes:
        queue_s: time it waited before its first run started.
        compute_s: duration of the runs it was part of.
        executions: its share of runs: the sum of ``1 / requests in the run`` over its runs.
        batch_rows: rows in its (last) run: the batch size of Triton's batch statistics.
    """

    queue_s: float = 0.0
    compute_s: float = 0.0
    executions: float = 0.0
    batch_rows: int = 0


NO_TIMING = Timing()

NS = 1_000_000_000


@dataclass
class ModelStats:
    """Cumulative figures of one model version (Triton's ``ModelStatistics``)."""

    success: list[float] = field(default_factory=lambda: [0, 0.0])  # [count, seconds]
    fail: list[float] = field(default_factory=lambda: [0, 0.0])
    queue: list[float] = field(default_factory=lambda: [0, 0.0])
    compute: list[float] = field(default_factory=lambda: [0, 0.0])
    inferences: int = 0  # rows computed
    executions: float = 0.0  # shares of runs: sums to whole runs
    last_inference_ms: int = 0
    batches: dict[int, list[float]] = field(default_factory=dict)  # rows -> [runs, seconds]

    def computed(self, rows: int, timing: Timing) -> None:
        self.inferences += rows
        self.queue[0] += 1
        self.queue[1] += timing.queue_s
        self.compute[0] += 1
        self.compute[1] += timing.compute_s
        self.executions += timing.executions
        if timing.batch_rows and timing.executions:
            entry = self.batches.setdefault(timing.batch_rows, [0.0, 0.0])
            entry[0] += timing.executions
            entry[1] += timing.compute_s * timing.executions  # this request's share of the run's time

    def answered(self, ok: bool, seconds: float) -> None:
        outcome = self.success if ok else self.fail
        outcome[0] += 1
        outcome[1] += seconds
        if ok:
            self.last_inference_ms = int(time.time() * 1000)


class Statistics:
    """The statistics of every model version this gateway serves, keyed by (model, version)."""

    def __init__(self):
        self.models: dict[tuple[str, str], ModelStats] = {}

    def of(self, model: str, version: str) -> ModelStats:
        stats = self.models.get((model, version))
        if stats is None:
            stats = self.models[(model, version)] = ModelStats()
        return stats

    @staticmethod
    def combined(parts: list["Statistics"]) -> "Statistics":
        """The statistics of several processes of one gateway (its workers), added up."""
        total = Statistics()
        for part in parts:
            for key, stats in part.models.items():
                into = total.of(*key)
                for name in ("success", "fail", "queue", "compute"):
                    mine, theirs = getattr(into, name), getattr(stats, name)
                    mine[0] += theirs[0]
                    mine[1] += theirs[1]
                into.inferences += stats.inferences
                into.executions += stats.executions
                into.last_inference_ms = max(into.last_inference_ms, stats.last_inference_ms)
                for rows, (runs, seconds) in stats.batches.items():
                    entry = into.batches.setdefault(rows, [0.0, 0.0])
                    entry[0] += runs
                    entry[1] += seconds
        return total
