"""Test-only ONNX models that misbehave on purpose, written as a real model repository (manifest,
sha256, ONNX file) so that the real service loads and serves them like any other model.

- ``slow``: ``y = x + n`` where the graph counts to ``n = max(x)`` in a ``Loop``, one iteration
  at a time (about a microsecond each): a request's compute time is its largest value, in
  microseconds. The zeros of a health probe cost nothing. ONNX Runtime checks its terminate
  flag between iterations, so a run can be stopped midway.
- ``fails-on-batch``: ``y = reshape(x, [1, 4])``: its signature takes any batch (-1), but ONNX
  Runtime fails at run time for any batch other than one row. Probes (one row) pass.

Both use the generic runtime (kind ``generic``): Open Inference Protocol only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from deepserve.repository import MANIFEST_FILE, MODEL_FILE, Manifest, TensorSpec

OPSET = 17


def slow_graph() -> onnx.ModelProto:
    """``y = x + max(x)``, computed by counting to ``max(x)`` one Loop iteration at a time."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["count_in", "one"], ["count_out"])],
        "count",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("count_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("count_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0),  # () over the whole batch
         helper.make_node("Cast", ["largest"], ["n"], to=TensorProto.INT64),
         helper.make_node("Loop", ["n", "true", "zero"], ["counted"], body=body),  # (1,) = n
         helper.make_node("Add", ["x", "counted"], ["y"])],  # (B, 1)
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor("true", TensorProto.BOOL, [], [True]),
         helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])],
    )
    return _model(graph)


def fails_on_batch_graph() -> onnx.ModelProto:
    """``y = reshape(x, [1, 4])``: right for one row, an ONNX Runtime error for any other batch."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "fails_on_batch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])],
    )
    return _model(graph)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


GRAPHS = {
    "slow": (slow_graph, [TensorSpec("x", "FP32", [-1, 1])], [TensorSpec("y", "FP32", [-1, 1])]),
    "fails-on-batch": (fails_on_batch_graph, [TensorSpec("x", "FP32", [-1, 4])], [TensorSpec("y", "FP32", [-1, 4])]),
}


def write_model(root: Path, name: str, graph: str) -> None:
    """Write ``graph`` (a key of :data:`GRAPHS`) as version 1 of model ``name`` under ``root``."""
    build, inputs, outputs = GRAPHS[graph]
    directory = root / name / "1"
    directory.mkdir(parents=True)
    data = build().SerializeToString()
    (directory / MODEL_FILE).write_bytes(data)
    manifest = Manifest(
        name=name, version="1", kind="generic", sha256=hashlib.sha256(data).hexdigest(),
        inputs=inputs, outputs=outputs, preprocessing={}, training_data={"description": "none: a test graph"},
        metrics={}, created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        code_revision="test", seed=0,
    )
    (directory / MANIFEST_FILE).write_text(manifest.to_json())  # last: now it is a version


def copy_model(source: Path, root: Path, name: str) -> None:
    """Copy a built model's latest version (the real repository's) into ``root``."""
    versions = sorted((p for p in (source / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    shutil.copytree(versions[-1], root / name / versions[-1].name)
