"""From a plan entry to a backend that computes: shared by every process that holds a session
(a gateway worker, a model replica). Ray-free: gateway workers import it."""

from __future__ import annotations

from typing import Any

from deepserve import metrics
from deepserve.batching import BatchingBackend, BatchingConfig
from deepserve.generation import StepBatcher
from deepserve.repository import ModelRepository
from deepserve.runtime import GenerativeRuntime, runtime_for


def backend_for(runtime, batching: dict[str, Any]):
    """Generators batch step by step (:class:`StepBatcher`); the others request by request."""
    config = BatchingConfig.from_dict(batching)
    if isinstance(runtime, GenerativeRuntime):
        return StepBatcher(runtime, config)
    return BatchingBackend(runtime, config)


def load_runtime(repository: str, name: str, entry: dict[str, Any], max_rows: int, placement: str,
                 max_image_side: int = 0):
    """The model's runtime with its session created from verified bytes and warmed up:
    ready means ready."""
    model, data = ModelRepository(repository).load(name, entry["version"], pinned=entry["sha256"])
    runtime = runtime_for(model.manifest, max_rows, max_image_side)
    runtime.load(data, entry["intra_op_threads"])
    metrics.get().loaded(name, entry["version"], runtime.kind, placement, runtime.provider, runtime.load_seconds)
    return runtime
