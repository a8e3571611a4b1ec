"""Triton's views of the served models: model configuration, statistics, repository index.

Triton's tools (perf_analyzer, model_analyzer, dashboards) read these through Triton's gRPC
extensions (``ModelConfig``, ``ModelStatistics``, ``RepositoryIndex``). This module shapes
what the dataplane knows into Triton's JSON form of those messages (the form Triton's HTTP
API returns); the gRPC servicer parses it into the protobuf messages. What each field means
here, and which Triton fields stay empty, is in docs/triton-compatibility.md.
"""

from __future__ import annotations

from typing import Any

from deepserve.dataplane import PLATFORM, ServedModel
from deepserve.repository import TensorSpec
from deepserve.statistics import NS, ModelStats

BACKEND = "onnxruntime"

# Open Inference Protocol datatypes -> Triton's model-configuration data types.
DATA_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING", "BF16": "TYPE_BF16",
}


def batches_rows(inputs: list[TensorSpec]) -> bool:
    """Whether every input has a batch dimension with more behind it: Triton's
    ``max_batch_size > 0`` form, where ``dims`` leave the batch dimension out. Inputs whose
    only dimension is the batch (a generator's labels, a recommender's user ids) keep full
    shapes with ``max_batch_size: 0``, so that a client sends them as they are."""
    return all(len(t.shape) >= 2 and t.shape[0] == -1 for t in inputs)


def model_config(model: ServedModel, replicas: int, max_rows: int) -> dict[str, Any]:
    """Triton's ``ModelConfig`` of a served model, as JSON.

    Args:
        model: the served model.
        replicas: how many replicas compute it now (its instance count).
        max_rows: the most rows a request may carry (``max_batch_size`` when batched).
    """
    runtime = model.runtime
    inputs, outputs = list(runtime.inputs.values()), runtime.output_specs()
    batched = batches_rows(inputs)

    def tensor(t: TensorSpec) -> dict[str, Any]:
        described = {"name": t.name, "data_type": DATA_TYPES[t.datatype], "dims": t.shape[1:] if batched else t.shape}
        if not described["dims"]:  # one value per row: Triton writes dims [1] reshaped to []
            described.update(dims=[1], reshape={"shape": []})
        return described

    gpu = model.provider.startswith("CUDA")
    config: dict[str, Any] = {
        "name": runtime.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_rows if batched else 0,
        "input": [tensor(t) for t in inputs],
        "output": [tensor(t) for t in outputs],
        "instance_group": [{"name": f"{runtime.name}-{model.placement}", "count": replicas,
                            "kind": "KIND_GPU" if gpu else "KIND_CPU"}],
        "parameters": {k: {"string_value": str(v)} for k, v in (
            ("kind", runtime.kind), ("placement", model.placement),
            ("execution_provider", model.provider or "unknown"), ("sha256", runtime.manifest.sha256))},
    }
    batching = model.batching
    if batching.enabled:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(batching.max_wait_s * 1e6),
            "default_queue_policy": {"max_queue_size": batching.max_queued, "timeout_action": "REJECT",
                                     "allow_timeout_override": True},
        }
    return config


def _duration(count_seconds: list[float]) -> dict[str, int]:
    count, seconds = count_seconds
    return {"count": int(round(count)), "ns": int(seconds * NS)}


def model_statistics(name: str, version: str, stats: ModelStats) -> dict[str, Any]:
    """Triton's ``ModelStatistics`` of one model version, as JSON."""
    zero = {"count": 0, "ns": 0}
    # Input preparation and output extraction are not timed apart from the request: their
    # counts follow the executions' and their time is 0 (tools check the counts agree).
    computed = {"count": int(round(stats.compute[0])), "ns": 0}
    return {
        "name": name,
        "version": version,
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inferences,
        "execution_count": int(round(stats.executions)),
        "inference_stats": {
            "success": _duration(stats.success),
            "fail": _duration(stats.fail),
            "queue": _duration(stats.queue),
            "compute_input": computed,
            "compute_infer": _duration(stats.compute),
            "compute_output": computed,
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [
            {"batch_size": rows, "compute_input": {"count": round(runs), "ns": 0},
             "compute_infer": _duration([runs, seconds]), "compute_output": {"count": round(runs), "ns": 0}}
            for rows, (runs, seconds) in sorted(stats.batches.items())
        ],
    }


def repository_index(repository: dict[str, list[str]], served: dict[str, dict[str, ServedModel]],
                     ready_only: bool) -> list[dict[str, str]]:
    """Triton's ``RepositoryIndex``: every model version of the repository and its state."""
    index = []
    for name in sorted(repository):
        versions = served.get(name)
        for version in sorted(set(repository[name]) | set(versions or ()), key=int):
            model = (versions or {}).get(version)
            if versions is None:
                state, reason = "UNAVAILABLE", "not in the Serve config"
            elif model is None:
                state, reason = "UNAVAILABLE", f"not served: versions {', '.join(sorted(versions, key=int))} are"
            elif model.ready:
                state, reason = "READY", ""
            else:
                state, reason = "UNAVAILABLE", "no ready replica"
            if state == "READY" or not ready_only:
                index.append({"name": name, "version": version, "state": state, "reason": reason})
    return index
