"""What every model family's build shares: seeding, ONNX export with a parity check,
and writing a version into the model repository.

A family module (``fraud.py``, ``digits.py``, ...) trains its network and hands an
:class:`ExportSpec` to :func:`export_and_publish`.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

from deepserve.repository import (
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    TensorSpec,
    next_version,
    sha256_file,
)

PARITY_TOLERANCE = 1e-4
ONNX_OPSET = 17

_TORCH_TO_OIP = {
    torch.float32: "FP32",
    torch.float16: "FP16",
    torch.int64: "INT64",
    torch.int32: "INT32",
    torch.bool: "BOOL",
}


# ---------------------------------------------------------------------------- progress


def progress(iterable, desc: str, unit: str):
    """A progress bar on a terminal; nothing in logs (CI, ``make test``), where each redraw
    would be one more carriage-return line."""
    return tqdm(iterable, desc=desc, unit=unit, leave=False, disable=not sys.stderr.isatty())


# ---------------------------------------------------------------------------- determinism


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and torch; make torch's CPU kernels deterministic.

    Returns:
        A NumPy generator seeded with ``seed`` for the caller's own sampling.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    return np.random.default_rng(seed)


def code_revision() -> str:
    """The git commit the build ran from, with ``+dirty`` when the tree had changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


# ---------------------------------------------------------------------------- export


@dataclass
class ExportSpec:
    """What to export and how to describe it in the manifest."""

    name: str
    kind: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]  # a held-out batch: used for tracing and parity
    input_names: list[str]
    output_names: list[str]
    descriptions: dict[str, str]
    preprocessing: dict[str, Any]
    training_data: dict[str, Any]
    metrics: dict[str, Any]
    seed: int
    threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    write_card: Callable[[Path, Manifest], None] | None = None  # writes card.md + PNGs
    # Per tensor, its dynamic axes beyond the default (axis 0, "batch", on every input and
    # output), e.g. {"neighbors": {0: "batch", 1: "neighbors"}}; -1 in the manifest shape.
    dynamic_axes: dict[str, dict[int, str]] | None = None
    # Figures computed on the exported graph itself (ONNX bytes, the manifest so far);
    # merged into the manifest's metrics before the card is written.
    evaluate: Callable[[bytes, Manifest], dict[str, Any]] | None = None

    def axes(self) -> dict[str, dict[int, str]]:
        """Every input's and output's dynamic axes, as torch.onnx.export takes them."""
        axes = {n: {0: "batch"} for n in self.input_names + self.output_names}
        for name, extra_axes in (self.dynamic_axes or {}).items():
            axes[name] = {**axes.get(name, {}), **extra_axes}
        return axes


def _onnx_bytes(spec: ExportSpec) -> bytes:
    buffer = io.BytesIO()
    # The TorchScript-based exporter: deterministic output and exact dynamic batch axes
    # for the small graphs here.
    torch.onnx.export(
        spec.module,
        spec.example_inputs,
        buffer,
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_axes=spec.axes(),
        opset_version=ONNX_OPSET,
        dynamo=False,
    )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    return model.SerializeToString()


def check_parity(spec: ExportSpec, onnx_bytes: bytes) -> float:
    """Run the held-out batch through PyTorch and ONNX Runtime and compare every output.

    An element passes when ``|onnx - torch| <= PARITY_TOLERANCE * max(1, |torch|)``:
    absolute for values up to 1 (probabilities, noise), relative above (large anomaly
    scores, where float32 cannot hold 1e-4 absolute).

    Returns:
        The largest scaled difference seen (<= PARITY_TOLERANCE).

    Raises:
        RuntimeError: an output element differs by more than the tolerance.
    """
    with torch.no_grad():
        expected = spec.module(*spec.example_inputs)
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs)}
    got = session.run(spec.output_names, feeds)
    worst = 0.0
    for name, want, have in zip(spec.output_names, expected, got):
        want64 = want.numpy().astype(np.float64)
        scaled = np.abs(want64 - have.astype(np.float64)) / np.maximum(1.0, np.abs(want64))
        diff = float(scaled.max()) if scaled.size else 0.0
        if not diff <= PARITY_TOLERANCE:
            raise RuntimeError(
                f"{spec.name}: ONNX Runtime output '{name}' differs from PyTorch by {diff:.3g} "
                f"(tolerance {PARITY_TOLERANCE}, relative above 1)"
            )
        worst = max(worst, diff)
    return worst


def _tensor_specs(names: list[str], tensors, descriptions: dict[str, str],
                  axes: dict[str, dict[int, str]]) -> list[TensorSpec]:
    return [
        TensorSpec(
            name=n,
            datatype=_TORCH_TO_OIP[t.dtype],
            shape=[-1 if i in axes.get(n, {0: "batch"}) else d for i, d in enumerate(t.shape)],
            description=descriptions.get(n, ""),
        )
        for n, t in zip(names, tensors)
    ]


def export_and_publish(spec: ExportSpec, repo: Path, version: str | None = None) -> Path:
    """Export ``spec.module`` to ONNX, check parity, and write a new repository version.

    Returns:
        The version directory that was written.
    """
    spec.module.eval()
    onnx_bytes = _onnx_bytes(spec)
    parity = check_parity(spec, onnx_bytes)

    version = version or next_version(repo, spec.name)
    directory = repo / spec.name / version
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / MODEL_FILE
    model_path.write_bytes(onnx_bytes)

    with torch.no_grad():
        outputs = spec.module(*spec.example_inputs)
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    manifest = Manifest(
        name=spec.name,
        version=version,
        kind=spec.kind,
        sha256=sha256_file(model_path),
        inputs=_tensor_specs(spec.input_names, spec.example_inputs, spec.descriptions, spec.axes()),
        outputs=_tensor_specs(spec.output_names, outputs, spec.descriptions, spec.axes()),
        preprocessing=spec.preprocessing,
        training_data=spec.training_data,
        metrics={**spec.metrics, "onnx_parity_max_diff": parity},
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        code_revision=code_revision(),
        seed=spec.seed,
        threshold=spec.threshold,
        extra={
            **spec.extra,
            "onnx_opset": ONNX_OPSET,
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
        },
    )
    if spec.evaluate is not None:
        manifest.metrics.update(spec.evaluate(onnx_bytes, manifest))
    if spec.write_card is not None:
        spec.write_card(directory, manifest)
    # The manifest goes last: a version directory without one is not a version yet.
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, directory / MANIFEST_FILE)
    return directory


def card_header(manifest: Manifest) -> str:
    """The part of a model card every family shares: identity, provenance, IO."""
    rows = "\n".join(
        f"| {t.name} | in | {t.datatype} | {t.shape} | {t.description} |" for t in manifest.inputs
    ) + "\n" + "\n".join(
        f"| {t.name} | out | {t.datatype} | {t.shape} | {t.description} |" for t in manifest.outputs
    )
    return (
        f"# Model card: {manifest.name} (version {manifest.version})\n\n"
        f"- kind: `{manifest.kind}`\n"
        f"- created: {manifest.created_at}, code revision `{manifest.code_revision}`, "
        f"seed {manifest.seed}\n"
        f"- ONNX file sha256: `{manifest.sha256}`\n\n"
        f"## Inputs and outputs\n\n"
        f"| tensor | | datatype | shape | meaning |\n|---|---|---|---|---|\n{rows}\n\n"
    )

