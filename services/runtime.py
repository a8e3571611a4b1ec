"""Model runtimes: one ONNX Runtime base and one small subclass per model kind.

A runtime is built from a manifest. Without a session it validates requests against the
model's signature and does the kind's pre/post-processing (the gateway uses it that
way); :meth:`Runtime.load` adds an ONNX Runtime session for the replicas that compute.
The manifest's ``kind`` picks the class through :data:`RUNTIMES`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from deepserve.codec import DATATYPE_TO_NUMPY
from deepserve.errors import InvalidInput
from deepserve.repository import Manifest, TensorSpec

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def choose_providers() -> list[str]:
    """CUDA first when ONNX Runtime has it and the machine has an NVIDIA device, then CPU.

    ``DEEPSERVE_PROVIDER=cpu`` forces the CPU. (onnxruntime-gpu lists CUDA even where no
    GPU exists; trying it there only adds warnings before the fallback.)
    """
    import onnxruntime as ort

    forced = os.environ.get("DEEPSERVE_PROVIDER", "auto").lower()
    have_gpu = os.path.exists("/dev/nvidiactl") or bool(os.environ.get("NVIDIA_VISIBLE_DEVICES"))
    if forced != "cpu" and CUDA in ort.get_available_providers() and have_gpu:
        return [CUDA, CPU]
    return [CPU]


class Runtime:
    """Signature checks, an optional ONNX Runtime session, and kind hooks."""

    kind: ClassVar[str] = "generic"

    def __init__(self, manifest: Manifest, max_rows: int = 4096):
        self.manifest = manifest
        self.max_rows = max_rows
        self.inputs = {t.name: t for t in manifest.inputs}
        self.session = None
        self.provider = "none"
        self.load_seconds = 0.0

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    # ------------------------------------------------------------------ signature

    def output_specs(self) -> list[TensorSpec]:
        """Outputs as served: the graph's, plus any the kind adds (see :meth:`postprocess`)."""
        return list(self.manifest.outputs)

    def validate(self, inputs: dict[str, np.ndarray]) -> int:
        """Check a request's tensors against the signature; return its batch size.

        Raises:
            InvalidInput: naming the input and what was expected.
        """
        missing = [n for n in self.inputs if n not in inputs]
        unknown = [n for n in inputs if n not in self.inputs]
        if missing or unknown:
            raise InvalidInput(
                f"model '{self.name}' expects inputs {list(self.inputs)}; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown {unknown}" if unknown else "")
            )
        batch = None
        for name, spec in self.inputs.items():
            array = inputs[name]
            want = DATATYPE_TO_NUMPY[spec.datatype]
            if array.dtype != want:
                got = next((k for k, v in DATATYPE_TO_NUMPY.items() if v == array.dtype), str(array.dtype))
                raise InvalidInput(f"input '{name}': expected datatype {spec.datatype}, got {got}")
            shape = list(array.shape)
            if len(shape) != len(spec.shape) or any(
                want_dim not in (-1, got_dim) for want_dim, got_dim in zip(spec.shape, shape)
            ):
                raise InvalidInput(f"input '{name}': expected shape {spec.shape} (-1 = any), got {shape}")
            if shape[0] == 0:
                raise InvalidInput(f"input '{name}': empty batch; send at least one row")
            if shape[0] > self.max_rows:
                raise InvalidInput(
                    f"input '{name}': batch of {shape[0]} rows exceeds the limit of {self.max_rows}"
                )
            if batch is not None and shape[0] != batch:
                raise InvalidInput(f"input '{name}': batch size {shape[0]} differs from the other inputs' {batch}")
            batch = shape[0]
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise InvalidInput(f"input '{name}': contains NaN or infinite values")
        return int(batch or 0)

    # ------------------------------------------------------------------ compute (replicas)

    def load(self, onnx_bytes: bytes, intra_op_threads: int = 1) -> None:
        """Create the ONNX Runtime session and warm it up with a one-row batch."""
        import onnxruntime as ort

        started = time.perf_counter()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads  # small models: threads cost more than they give
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=choose_providers())
        self.provider = self.session.get_providers()[0]
        self.run(self.example_inputs(1))  # the first run pays for lazy initialization
        self.load_seconds = time.perf_counter() - started
        log.info("%s v%s loaded on %s in %.2f s", self.name, self.version, self.provider, self.load_seconds)

    def example_inputs(self, rows: int) -> dict[str, np.ndarray]:
        return {
            n: np.zeros([rows, *s.shape[1:]], dtype=DATATYPE_TO_NUMPY[s.datatype])
            for n, s in self.inputs.items()
        }

    def time_run(self, rows: int, repeats: int = 3) -> float:
        """Seconds one warm session run over ``rows`` rows takes (best of ``repeats``)."""
        example = self.example_inputs(rows)
        self.run(example)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            self.run(example)
            best = min(best, time.perf_counter() - started)
        return best

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's outputs for already validated inputs."""
        names = [t.name for t in self.manifest.outputs]
        return dict(zip(names, self.session.run(names, inputs)))

    # ------------------------------------------------------------------ kind hooks

    def postprocess(self, outputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        """Outputs as served through the Open Inference Protocol; parameters may steer them."""
        if parameters:
            raise InvalidInput(f"model '{self.name}' takes no request parameters; got {sorted(parameters)}")
        return outputs


# ---------------------------------------------------------------------------- anomaly


@dataclass
class AnomalyResult:
    score: float
    is_fraud: bool
    threshold: float
    top_features: list[tuple[str, float]]


class AnomalyRuntime(Runtime):
    """Autoencoder anomaly detectors: adds the decision (``is_fraud``) and the explanation."""

    kind = "anomaly"
    TOP_FEATURES = 3

    def __init__(self, manifest: Manifest, max_rows: int = 4096):
        super().__init__(manifest, max_rows)
        self.feature_names: list[str] = list(manifest.extra["feature_names"])
        self.threshold = float(manifest.threshold)

    def output_specs(self) -> list[TensorSpec]:
        decision = TensorSpec("is_fraud", "BOOL", [-1], "score > threshold (parameter 'threshold' overrides)")
        return [*self.manifest.outputs, decision]

    def resolve_threshold(self, override: Any) -> float:
        """The request's threshold (a number, or a numeric string for clients that send only
        string parameters), else the calibrated one."""
        if override is None:
            return self.threshold
        value = override
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                value = None
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise InvalidInput(f"parameter 'threshold': expected a finite number, got {override!r}")
        return float(value)

    def postprocess(self, outputs, parameters):
        unknown = set(parameters) - {"threshold"}
        if unknown:
            raise InvalidInput(f"model '{self.name}' accepts the parameter 'threshold' only; got {sorted(unknown)}")
        threshold = self.resolve_threshold(parameters.get("threshold"))
        return {**outputs, "is_fraud": outputs["score"] > threshold}

    def rows_from_named(self, named: list[dict[str, float]]) -> np.ndarray:
        """Transactions given by column name -> a (B, F) matrix in schema order."""
        index = {n: j for j, n in enumerate(self.feature_names)}
        rows = np.empty((len(named), len(index)), dtype=np.float32)
        for i, row in enumerate(named):
            if row.keys() != index.keys():
                missing = sorted(index.keys() - row.keys())
                unknown = sorted(row.keys() - index.keys())
                raise InvalidInput(
                    f"transaction {i}: named features must be exactly the schema's columns; "
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unknown {unknown[:5]}"
                )
            for name, value in row.items():
                rows[i, index[name]] = value
        return rows

    def explain(self, outputs: dict[str, np.ndarray], threshold: float) -> list[AnomalyResult]:
        scores = outputs["score"]
        errors = outputs["feature_errors"]  # (B, F)
        top = np.argsort(-errors, axis=1)[:, : self.TOP_FEATURES]  # (B, 3)
        return [
            AnomalyResult(
                score=float(s),
                is_fraud=bool(s > threshold),
                threshold=threshold,
                top_features=[(self.feature_names[j], float(errors[i, j])) for j in top[i]],
            )
            for i, s in enumerate(scores)
        ]


# ---------------------------------------------------------------------------- classifier


class ClassifierRuntime(Runtime):
    """Image classifiers: top-k labels, and PNG decoding for the typed API."""

    kind = "classifier"
    MAX_TOP_K = 10

    def __init__(self, manifest: Manifest, max_rows: int = 4096):
        super().__init__(manifest, max_rows)
        self.labels: list[str] = list(manifest.extra.get("labels", []))
        self.image_shape = tuple(manifest.inputs[0].shape[1:])  # (1, H, W)

    def images_from_pixels(self, index: int, pixels: np.ndarray) -> np.ndarray:
        size = int(np.prod(self.image_shape))
        if pixels.size != size:
            raise InvalidInput(
                f"image {index}: expected {size} pixels ({'x'.join(map(str, self.image_shape[1:]))}), "
                f"got {pixels.size}"
            )
        if not np.isfinite(pixels).all() or pixels.min() < 0.0 or pixels.max() > 1.0:
            raise InvalidInput(f"image {index}: pixels must be finite values in [0, 1]")
        return pixels.reshape(self.image_shape)

    def image_from_png(self, index: int, data: bytes) -> np.ndarray:
        """A PNG (any mode) -> grayscale, resized to the model's input, scaled to [0, 1]."""
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format != "PNG":
                    raise InvalidInput(f"image {index}: expected a PNG file, got {img.format}")
                gray = img.convert("L").resize(self.image_shape[:0:-1], Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidInput(f"image {index}: not a readable PNG ({exc.__class__.__name__})") from None
        return (np.asarray(gray, dtype=np.float32) / 255.0).reshape(self.image_shape)

    def resolve_top_k(self, k: int) -> int:
        k = k or 3
        if not 1 <= k <= self.MAX_TOP_K:
            raise InvalidInput(f"top_k: expected 1..{self.MAX_TOP_K}, got {k}")
        return k

    def top_k(self, probabilities: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        order = np.argsort(-probabilities, axis=1)[:, :k]
        return [[(int(j), float(p[j])) for j in row] for p, row in zip(probabilities, order)]


RUNTIMES: dict[str, type[Runtime]] = {cls.kind: cls for cls in (AnomalyRuntime, ClassifierRuntime)}


def runtime_for(manifest: Manifest, max_rows: int = 4096) -> Runtime:
    """The runtime class registered for the manifest's kind (the generic base otherwise)."""
    return RUNTIMES.get(manifest.kind, Runtime)(manifest, max_rows)
