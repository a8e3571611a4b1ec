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

from deepserve import sampling
from deepserve.codec import DATATYPE_TO_NUMPY, numpy_to_datatype
from deepserve.drift import AgreementShadow, OverlapShadow, ScoreShadow
from deepserve.errors import InvalidInput
from deepserve.images import decode_png, encode_png
from deepserve.repository import Manifest, TensorSpec
from deepserve.statistics import NO_TIMING, Timing

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


ASSIGNED_GPUS_ENV = "DEEPSERVE_ASSIGNED_GPUS"


def assigned_gpus() -> list[str]:
    """The GPUs Ray gave this process (its actor's ``num_gpus``); none outside a Ray worker.

    A gateway's worker processes are not Ray workers: their replica passes its own GPUs on
    in ``$DEEPSERVE_ASSIGNED_GPUS`` (comma-separated ids), and Ray is not imported.
    """
    if ASSIGNED_GPUS_ENV in os.environ:
        return [g for g in os.environ[ASSIGNED_GPUS_ENV].split(",") if g]
    import ray

    if not ray.is_initialized():
        return []
    return [str(g) for g in ray.get_gpu_ids()]


def choose_providers(gpus: list[str], available: list[str], visible: str | None) -> list:
    """ONNX Runtime's providers for a session: CUDA on the GPU Ray assigned, else the CPU.

    A replica uses a GPU only when Ray gave it one (``ray_actor_options.num_gpus``, a fraction
    included): a GPU merely present on the machine belongs to whoever Ray gave it to. Ray
    narrows ``CUDA_VISIBLE_DEVICES`` to the assigned GPUs, so ONNX Runtime's ``device_id`` is
    the assigned GPU's position in that list (0 for one GPU). ``DEEPSERVE_PROVIDER=cpu``
    forces the CPU.

    Args:
        gpus: GPU ids Ray assigned (:func:`assigned_gpus`).
        available: ONNX Runtime's available providers.
        visible: ``$CUDA_VISIBLE_DEVICES``.
    """
    if not gpus or CUDA not in available or os.environ.get("DEEPSERVE_PROVIDER", "auto").lower() == "cpu":
        return [CPU]
    order = [d.strip() for d in visible.split(",")] if visible else []
    device = order.index(gpus[0]) if gpus[0] in order else (0 if order else int(gpus[0]))
    return [(CUDA, {"device_id": device}), CPU]


def run_options():
    """A fresh ``onnxruntime.RunOptions`` for one session run: setting its ``terminate`` from
    another thread stops the run between two kernels (and between two iterations of a
    ``Loop``), and the run raises. The batching backends stop a run this way once every
    request in it has left (deadline passed, or cancelled)."""
    import onnxruntime as ort

    return ort.RunOptions()


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
        self.max_image_side = 0  # models that take images: see runtime_for

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

    # ------------------------------------------------------------------ lifecycle (docs/lifecycle.md)

    def monitored_values(self, outputs: dict[str, np.ndarray]) -> np.ndarray | None:
        """The per-row values whose distribution is watched for drift against the manifest's
        ``score_reference`` (kinds that record one override this)."""
        return None

    def shadow_values(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """What a shadow comparison compares, per row, from the graph's outputs."""
        raise NotImplementedError(f"no shadow comparison for {self.kind} models")

    def shadow_comparison(self, candidate: "Runtime"):
        """A comparison of this (live) version's answers with ``candidate``'s on the same
        requests (:mod:`deepserve.drift`), or None when they cannot be compared: the kind has
        no comparison, or the candidate's graph takes other inputs."""
        comparison = self._comparison(candidate)
        same_inputs = ({n: (t.datatype, t.shape) for n, t in self.inputs.items()}
                       == {n: (t.datatype, t.shape) for n, t in candidate.inputs.items()})
        return comparison if same_inputs and candidate.kind == self.kind else None

    def _comparison(self, candidate: "Runtime"):
        return None

    def check_tensor(self, name: str, datatype: str, shape: tuple[int, ...]) -> None:
        """One tensor's name, datatype and shape against the signature: what can be judged
        before its data is read (the Open Inference Protocol path calls it before decoding).

        Raises:
            InvalidInput: naming the input and what was expected.
        """
        spec = self.inputs.get(name)
        if spec is None:
            raise InvalidInput(f"model '{self.name}' has no input '{name}'; it expects {list(self.inputs)}")
        if datatype != spec.datatype:
            raise InvalidInput(f"input '{name}': expected datatype {spec.datatype}, got {datatype}")
        if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape)):
            raise InvalidInput(f"input '{name}': expected shape {spec.shape} (-1 = any), got {list(shape)}")
        if shape[0] == 0:
            raise InvalidInput(f"input '{name}': empty batch; send at least one row")
        if shape[0] > self.max_rows:
            raise InvalidInput(f"input '{name}': batch of {shape[0]} rows exceeds the limit of {self.max_rows}")

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
        for name in self.inputs:
            array = inputs[name]
            self.check_tensor(name, numpy_to_datatype(array.dtype), array.shape)
            if batch is not None and array.shape[0] != batch:
                raise InvalidInput(f"input '{name}': batch size {array.shape[0]} differs from the other inputs' {batch}")
            batch = array.shape[0]
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
        providers = choose_providers(assigned_gpus(), ort.get_available_providers(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        self.session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.probe()  # the first run pays for lazy initialization; a broken graph fails here
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

    def run(self, inputs: dict[str, np.ndarray], options=None) -> dict[str, np.ndarray]:
        """The graph's outputs for already validated inputs.

        Args:
            options: the run's ``onnxruntime.RunOptions`` (:func:`run_options`): another thread
                stops the run by setting its ``terminate``.
        """
        names = [t.name for t in self.manifest.outputs]
        return dict(zip(names, self.session.run(names, inputs, options)))

    def probe(self, options=None) -> None:
        """One row of :meth:`example_inputs` through the session: a replica's health check.

        A session object proves nothing about whether it can still compute (a hung or failed
        device, a thread stuck in a run): this runs the graph, one row, the cheapest real run
        (generators: one network evaluation, not a sampling run).

        Raises:
            RuntimeError: the run failed, or gave NaN (corrupted weights, a faulty device).
        """
        outputs = self.run(self.example_inputs(1), options)
        broken = [name for name, array in outputs.items() if array.dtype.kind == "f" and np.isnan(array).any()]
        if broken:
            raise RuntimeError(f"model '{self.name}': NaN in {broken} for the example input")

    # ------------------------------------------------------------------ kind hooks

    def preprocess(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        """Open Inference Protocol inputs as the graph takes them (checked against the signature)."""
        return inputs

    def postprocess(self, outputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        """Outputs as served through the Open Inference Protocol; parameters may steer them."""
        if parameters:
            raise InvalidInput(f"model '{self.name}' takes no request parameters; got {sorted(parameters)}")
        return outputs


def as_number(value: Any, what: str, kind: type[int] | type[float]) -> int | float | None:
    """A request option as ``kind``: a number, or a numeric string (tritonclient sends only
    string and integer parameters); ``None`` stays ``None``.

    Raises:
        InvalidInput: naming ``what`` and the value.
    """
    if value is None:
        return None
    number = value
    if isinstance(number, str):
        try:
            number = kind(number)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)) or (
            kind is int and not float(number).is_integer()):
        raise InvalidInput(f"{what}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(number)


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
        value = as_number(override, "parameter 'threshold'", float)
        if value is None:
            return self.threshold
        if not np.isfinite(value):
            raise InvalidInput(f"parameter 'threshold': expected a finite number, got {override!r}")
        return value

    def postprocess(self, outputs, parameters):
        if not parameters:  # the common case: the calibrated threshold
            return {**outputs, "is_fraud": outputs["score"] > self.threshold}
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

    def resolve_top_features(self, requested: int | None) -> int:
        """Features to explain each score with: ``TOP_FEATURES`` when unset, 0 for none."""
        if requested is None:
            return self.TOP_FEATURES
        if requested > len(self.feature_names):
            raise InvalidInput(f"top_features: at most {len(self.feature_names)} (the model's features), "
                               f"got {requested}")
        return requested

    def monitored_values(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return outputs["score"]

    def shadow_values(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return outputs["score"]

    def _comparison(self, candidate: "AnomalyRuntime") -> ScoreShadow:
        # Each version flags with its own calibrated threshold.
        return ScoreShadow(self.threshold, candidate.threshold)

    def explain(self, outputs: dict[str, np.ndarray], threshold: float,
                top_features: int = TOP_FEATURES) -> list[AnomalyResult]:
        scores = outputs["score"]
        if top_features == 0:  # the score and the decision only: no per-row sort, no strings
            return [AnomalyResult(score=s, is_fraud=s > threshold, threshold=threshold, top_features=[])
                    for s in scores.tolist()]
        errors = outputs["feature_errors"]  # (B, F)
        top = np.argsort(-errors, axis=1)[:, :top_features]  # (B, k)
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

    # PNGs up to this many times the model's input side are accepted unless configured.
    IMAGE_SIDE_FACTOR = 8

    def image_from_png(self, index: int, data: bytes) -> np.ndarray:
        """A PNG (any mode) -> grayscale, resized to the model's input, scaled to [0, 1].
        Its declared size is checked before it is decoded (:func:`deepserve.images.decode_png`)."""
        height, width = self.image_shape[1:]
        max_side = self.max_image_side or self.IMAGE_SIDE_FACTOR * max(height, width)
        return decode_png(data, (width, height), max_side, f"image {index}").reshape(self.image_shape)

    def images_batch(self, images: list[tuple[str, Any]]) -> np.ndarray:
        """``("pixels", array)`` or ``("png", bytes)`` images as one (B, 1, H, W) batch."""
        return np.stack([
            self.image_from_png(i, data) if form == "png" else self.images_from_pixels(i, data)
            for i, (form, data) in enumerate(images)
        ]).astype(np.float32)

    def resolve_top_k(self, k: int) -> int:
        k = k or 3
        if not 1 <= k <= self.MAX_TOP_K:
            raise InvalidInput(f"top_k: expected 1..{self.MAX_TOP_K}, got {k}")
        return k

    def monitored_values(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return outputs["probabilities"].max(axis=1)  # the confidence in the top class

    def shadow_values(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return outputs["probabilities"].argmax(axis=1)

    def _comparison(self, candidate: "ClassifierRuntime") -> AgreementShadow:
        return AgreementShadow()

    def top_k(self, probabilities: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        order = np.argsort(-probabilities, axis=1)[:, :k]
        return [[(int(j), float(p[j])) for j in row] for p, row in zip(probabilities, order)]


# ---------------------------------------------------------------------------- generators


@dataclass
class GenerationRequest:
    """What a client asks a generator for, validated (see :meth:`GenerativeRuntime.request`)."""

    labels: np.ndarray  # (count,) int64: the class per image, -1 = none
    seed: int
    steps: int
    guidance: float
    sampler: str
    preview_every: int = 0  # a preview with every n-th step's progress; 0 = none
    progress: bool = True  # report progress per step (streaming); False = only the result


@dataclass
class GenerationProgress:
    step: int  # steps done, 1..steps
    steps: int
    previews: np.ndarray | None = None  # (count, 1, H, W) in [0, 1]: where each image is heading


@dataclass
class GenerationResult:
    images: np.ndarray  # (count, 1, H, W) float32 in [0, 1]
    labels: np.ndarray  # (count,) int64, as generated (-1 = unconditional)
    seed: int
    steps: int
    guidance: float
    sampler: str
    timing: Timing = NO_TIMING  # what computing it cost (the step batcher fills it in)


class GenerationJob:
    """One request's progress through a generator: the rows it adds to the next session run,
    and what it does with that run's outputs. Jobs of different requests share runs
    (:class:`~deepserve.generation.StepBatcher`)."""

    request: GenerationRequest
    rows: int  # network rows this job adds to a session run
    done: bool = False

    def feeds(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def advance(self, outputs: dict[str, np.ndarray]) -> GenerationProgress:
        raise NotImplementedError

    def result(self) -> GenerationResult:
        raise NotImplementedError


def _image_rngs(seed: int, count: int) -> list[np.random.Generator]:
    """One generator per image, keyed by (seed, index): image i of a request depends on the
    seed and i only, not on the count or on which requests shared its batches."""
    return [np.random.default_rng([seed, i]) for i in range(count)]


class GenerativeRuntime(Runtime):
    """Generators: requests are labels plus sampling options, not the graph's tensors.

    Served through the Open Inference Protocol as ``label`` (INT64, one row per image, -1 =
    none) with parameters ``seed``, ``steps``, ``guidance``, ``sampler``; outputs ``images``
    (FP32, [0, 1]) and ``png`` (BYTES).
    """

    MAX_COUNT = 64  # images per request
    NUM_CLASSES = 10
    PARAMETERS = ("seed", "steps", "guidance", "sampler")

    def __init__(self, manifest: Manifest, max_rows: int = 4096):
        super().__init__(manifest, max_rows)
        self.graph_inputs = {t.name: t for t in manifest.inputs}
        self.inputs = {"label": TensorSpec("label", "INT64", [-1], "class per image, 0..9; -1 = none")}
        self.image_shape = tuple(manifest.outputs[0].shape[1:])
        self.classes = int(manifest.extra.get("num_classes", self.NUM_CLASSES))

    def output_specs(self) -> list[TensorSpec]:
        return [
            TensorSpec("images", "FP32", [-1, *self.image_shape], "generated images, pixels in [0, 1]"),
            TensorSpec("png", "BYTES", [-1], "the same images as grayscale PNG files"),
            TensorSpec("seed", "UINT64", [-1], "the seed used (parameter 'seed', or picked by the server)"),
            TensorSpec("generated_label", "INT64", [-1], "the class each image was generated for, -1 = none"),
        ]

    def example_inputs(self, rows: int) -> dict[str, np.ndarray]:
        return {
            n: np.zeros([rows, *s.shape[1:]], dtype=DATATYPE_TO_NUMPY[s.datatype])
            for n, s in self.graph_inputs.items()
        }

    # ------------------------------------------------------------------ requests

    def request(
        self,
        labels: np.ndarray,
        seed: int | None,
        steps: int | None,
        guidance: float | None,
        sampler: str | None,
        preview_every: int = 0,
        progress: bool = True,
    ) -> GenerationRequest:
        """Validate a request; unset options take the model's defaults, an unset seed a random one.

        Raises:
            InvalidInput: naming the option and its limits.
        """
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if not 1 <= len(labels) <= self.MAX_COUNT:
            raise InvalidInput(f"count: expected 1..{self.MAX_COUNT} images, got {len(labels)}")
        bad = labels[(labels < -1) | (labels >= self.classes)]
        if bad.size:
            raise InvalidInput(f"label: expected 0..{self.classes - 1} or none, got {int(bad[0])}")
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2**63))
        elif not 0 <= seed < 2**64:
            raise InvalidInput(f"seed: expected 0..2^64-1, got {seed}")
        if preview_every < 0:
            raise InvalidInput(f"preview_every: expected >= 0, got {preview_every}")
        request = self._options(labels, int(seed), steps, guidance, sampler, preview_every)
        request.progress = progress
        return request

    def _options(self, labels, seed, steps, guidance, sampler, preview_every) -> GenerationRequest:
        raise NotImplementedError

    def request_from_tensors(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> GenerationRequest:
        """An Open Inference Protocol request: the ``label`` tensor plus parameters."""
        self.validate(inputs)
        unknown = set(parameters) - set(self.PARAMETERS)
        if unknown:
            raise InvalidInput(f"model '{self.name}' accepts the parameters {list(self.PARAMETERS)}; "
                               f"got {sorted(unknown)}")
        return self.request(
            inputs["label"],
            seed=as_number(parameters.get("seed"), "parameter 'seed'", int),
            steps=as_number(parameters.get("steps"), "parameter 'steps'", int),
            guidance=as_number(parameters.get("guidance"), "parameter 'guidance'", float),
            sampler=_str_parameter(parameters, "sampler"),
            progress=False,
        )

    def new_job(self, request: GenerationRequest) -> GenerationJob:
        raise NotImplementedError

    def postprocess(self, outputs, parameters):
        return outputs  # parameters were consumed by request_from_tensors

    def encode(self, result: GenerationResult) -> dict[str, np.ndarray]:
        """A result as Open Inference Protocol outputs."""
        pngs = np.array([encode_png(image) for image in result.images], dtype=object)
        count = len(result.images)
        return {"images": result.images, "png": pngs, "seed": np.full(count, result.seed, dtype=np.uint64),
                "generated_label": result.labels.astype(np.int64)}


def _str_parameter(parameters, key):
    value = parameters.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"parameter '{key}': expected a string, got {value!r}")
    return value


class _GanJob(GenerationJob):
    def __init__(self, runtime: "GanRuntime", request: GenerationRequest):
        self.request = request
        count = len(request.labels)
        rngs = _image_rngs(request.seed, count)
        self.noise = np.stack([r.standard_normal(runtime.latent_dim) for r in rngs]).astype(np.float32)  # (B, Z)
        # "No label" draws a class per image from the seed: the generator is class-conditional.
        self.labels = np.array(
            [label if label >= 0 else r.integers(0, runtime.classes) for label, r in zip(request.labels, rngs)],
            dtype=np.int64,
        )
        self.rows = count
        self.images: np.ndarray | None = None

    def feeds(self):
        return {"noise": self.noise, "label": self.labels}

    def advance(self, outputs):
        self.images = np.clip(outputs["images"], 0.0, 1.0).astype(np.float32)
        self.done = True
        return GenerationProgress(1, 1, self.images if self.request.preview_every else None)

    def result(self):
        r = self.request
        return GenerationResult(self.images, self.labels, r.seed, 1, 0.0, "gan")


class GanRuntime(GenerativeRuntime):
    """GAN generators: one network evaluation, (noise, label) -> image."""

    kind = "gan"

    def __init__(self, manifest: Manifest, max_rows: int = 4096):
        super().__init__(manifest, max_rows)
        self.latent_dim = int(self.graph_inputs["noise"].shape[1])

    def _options(self, labels, seed, steps, guidance, sampler, preview_every):
        if steps not in (None, 0, 1):
            raise InvalidInput(f"steps: model '{self.name}' is a GAN and generates in one step; got {steps}")
        if guidance is not None:
            raise InvalidInput(f"guidance: model '{self.name}' is a GAN and takes no guidance scale")
        if sampler not in (None, "", "gan"):
            raise InvalidInput(f"sampler: model '{self.name}' is a GAN and has no sampler; got '{sampler}'")
        return GenerationRequest(labels, seed, 1, 0.0, "gan", preview_every)

    def new_job(self, request):
        return _GanJob(self, request)


class _DiffusionJob(GenerationJob):
    def __init__(self, runtime: "DiffusionRuntime", request: GenerationRequest):
        self.runtime = runtime
        self.request = request
        self.schedule = runtime.schedule
        self.timesteps = self.schedule.sampling_steps(request.steps)
        self.eta = sampling.SAMPLERS[request.sampler]
        count = len(request.labels)
        self.rngs = _image_rngs(request.seed, count)
        self.x = np.stack([r.standard_normal(runtime.image_shape) for r in self.rngs])  # (B, 1, H, W) float64
        # Guidance needs the unconditional prediction too: those images take two rows.
        conditional = request.labels >= 0
        self.guided = conditional & (request.guidance != 1.0)
        self.cond_labels = np.where(conditional, request.labels, runtime.null_label)
        self.rows = count + int(self.guided.sum())
        self.index = 0  # steps done

    def feeds(self):
        t = self.timesteps[self.index]
        x = self.x.astype(np.float32)
        x_rows = np.concatenate([x, x[self.guided]])  # (rows, 1, H, W)
        labels = np.concatenate([self.cond_labels, np.full(int(self.guided.sum()), self.runtime.null_label)])
        return {"x": x_rows, "t": np.full(self.rows, t, dtype=np.int64), "label": labels.astype(np.int64)}

    def advance(self, outputs):
        eps_rows = outputs["eps"].astype(np.float64)
        count = len(self.request.labels)
        eps = eps_rows[:count].copy()
        eps[self.guided] = sampling.guided_noise(eps[self.guided], eps_rows[count:], self.request.guidance)
        t = int(self.timesteps[self.index])
        t_prev = int(self.timesteps[self.index + 1]) if self.index + 1 < len(self.timesteps) else -1
        noise = np.stack([r.standard_normal(self.x.shape[1:]) for r in self.rngs]) if self.eta > 0 and t_prev >= 0 else None
        self.x, x0 = sampling.denoise_step(self.schedule, self.x, t, t_prev, eps, self.eta, noise)
        self.index += 1
        self.done = self.index == len(self.timesteps)
        every = self.request.preview_every
        preview = every and (self.index % every == 0 or self.done)
        return GenerationProgress(self.index, len(self.timesteps), _to_unit(x0) if preview else None)

    def result(self):
        r = self.request
        return GenerationResult(_to_unit(self.x), r.labels, r.seed, r.steps, r.guidance, r.sampler)


def _to_unit(x: np.ndarray) -> np.ndarray:
    """Model space [-1, 1] -> pixels [0, 1], float32."""
    return ((np.clip(x, -1.0, 1.0) + 1.0) / 2.0).astype(np.float32)


class DiffusionRuntime(GenerativeRuntime):
    """Diffusion models: a noise-prediction network evaluated once per sampling step.

    The manifest's ``extra`` holds the training schedule (``schedule``), the label that
    means "no class" (``null_label``, for classifier-free guidance) and the defaults.
    """

    kind = "diffusion"

    def __init__(self, manifest: Manifest, max_rows: int = 4096):
        super().__init__(manifest, max_rows)
        extra = manifest.extra
        self.schedule = sampling.NoiseSchedule.from_config(extra["schedule"])
        self.null_label = int(extra["null_label"])
        self.default_steps = int(extra.get("default_steps", 20))
        self.default_guidance = float(extra.get("default_guidance", 1.0))
        self.max_steps = min(int(extra.get("max_steps", self.schedule.timesteps)), self.schedule.timesteps)
        self.max_guidance = 20.0

    def _options(self, labels, seed, steps, guidance, sampler, preview_every):
        steps = steps or self.default_steps
        if not 1 <= steps <= self.max_steps:
            raise InvalidInput(f"steps: expected 1..{self.max_steps}, got {steps}")
        guidance = self.default_guidance if guidance is None else guidance
        if not (np.isfinite(guidance) and 0.0 <= guidance <= self.max_guidance):
            raise InvalidInput(f"guidance: expected a number in 0..{self.max_guidance:g}, got {guidance}")
        sampler = sampler or "ddim"
        if sampler not in sampling.SAMPLERS:
            raise InvalidInput(f"sampler: expected one of {sorted(sampling.SAMPLERS)}, got '{sampler}'")
        if preview_every > steps:
            raise InvalidInput(f"preview_every: expected 0..{steps} (the steps), got {preview_every}")
        return GenerationRequest(labels, seed, int(steps), float(guidance), sampler, preview_every)

    def new_job(self, request):
        return _DiffusionJob(self, request)


# ---------------------------------------------------------------------------- recommender


@dataclass
class Recommendation:
    ids: list[int]  # best first
    scores: list[float]
    cold_start: bool  # computed from the neighbour list: the user is not in the training graph


class RecommenderRuntime(Runtime):
    """Graph recommenders: top-k users for a known user, or for a new one from its neighbours.

    This class maps user ids to graph indices and back, checks them, and cuts the ranking
    to the request's ``k``. A user that is neither in the training graph nor given with
    neighbours is an error (INVALID_ARGUMENT), not a popularity fallback: a client should
    know when it gets no personalisation.

    A version whose manifest lists a ``graph.npz`` sidecar (docs/model-repository.md) is a
    two-stage recommender: :meth:`run` draws candidates and their pair features in numpy
    from the sidecar's arrays (:mod:`deepserve.models.graph.pairs`, numpy only), the ONNX
    graph scores the pairs, and the best ``max_k`` come back. An older version without one
    does it all in its graph (embedding lookup, scores, masks, TopK).
    """

    kind = "recommender"
    MAX_NEIGHBORS = 1024
    DEFAULT_K = 10

    def __init__(self, manifest: Manifest, max_rows: int = 4096):
        super().__init__(manifest, max_rows)
        extra = manifest.extra
        self.max_k = int(extra["max_k"])
        self.num_users = int(extra["num_users"])
        node_ids = extra.get("node_ids")
        self.node_ids = None if node_ids is None else np.asarray(node_ids, dtype=np.int64)  # sorted
        # Graph indices without a training edge: given neighbours, the graph embeds them from those.
        self.edgeless = np.asarray(extra.get("edgeless_users", []), dtype=np.int64)
        self.files: dict[str, bytes] = {}  # verified sidecar files (deepserve.loading sets them)
        self.index = None  # the candidate index over the sidecar's arrays, once loaded

    def load(self, onnx_bytes: bytes, intra_op_threads: int = 1) -> None:
        """Load the sidecar's arrays (when the manifest lists one), then the session."""
        sidecar = self.manifest.extra.get("sidecar")
        if sidecar is not None:
            import io

            from deepserve.models.graph.pairs import CandidateIndex  # numpy only

            if sidecar not in self.files:
                raise RuntimeError(f"model '{self.name}': its sidecar file {sidecar} was not read")
            with np.load(io.BytesIO(self.files[sidecar]), allow_pickle=False) as arrays:
                self.index = CandidateIndex(dict(arrays), **self.manifest.extra["candidates"])
            self.files = {}  # parsed into arrays: the bytes need not stay in memory
        super().load(onnx_bytes, intra_op_threads)

    def run(self, inputs: dict[str, np.ndarray], options=None) -> dict[str, np.ndarray]:
        """Candidates and pair features (numpy), pair scores (the ONNX graph), the best ``max_k``."""
        if self.index is None:
            return super().run(inputs, options)
        prepared = self.index.prepare(inputs["user"], inputs["neighbors"], inputs["exclude_known"])
        scores = self.session.run(["scores"], prepared.feeds(), options)[0]  # (B, C)
        ids, top = self.index.top_k(prepared, scores, self.max_k, float(self.manifest.extra["masked_score"]))
        return {"ids": ids, "scores": top, "embedding": prepared.query}

    def example_inputs(self, rows: int) -> dict[str, np.ndarray]:
        return {"user": np.zeros(rows, np.int64), "neighbors": np.full((rows, 1), -1, np.int64),
                "exclude_known": np.ones(rows, bool)}

    def resolve_k(self, k: Any) -> int:
        """The request's ``k`` (an integer, or a numeric string), ``DEFAULT_K`` when unset."""
        value = as_number(k, "k", int)
        if value is None:
            return min(self.DEFAULT_K, self.max_k)
        if not 1 <= value <= self.max_k:
            raise InvalidInput(f"k: expected an integer in 1..{self.max_k}, got {k!r}")
        return value

    def to_index(self, ids: np.ndarray) -> np.ndarray:
        """External user ids -> graph indices; -1 where an id is not in the training graph."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.node_ids is None:
            return np.where((ids >= 0) & (ids < self.num_users), ids, -1)
        pos = np.clip(np.searchsorted(self.node_ids, ids), 0, len(self.node_ids) - 1)
        return np.where(self.node_ids[pos] == ids, pos, -1)

    def to_ids(self, index: np.ndarray) -> np.ndarray:
        return index if self.node_ids is None else self.node_ids[index]

    def graph_inputs(self, users: np.ndarray, neighbors: np.ndarray, exclude_known: np.ndarray) -> dict[str, np.ndarray]:
        """Requests in external ids (``users`` (B,), -1 = new; ``neighbors`` (B, M), -1 = padding)
        as graph inputs, with every id checked.

        Raises:
            InvalidInput: unknown neighbour ids, too many neighbours, or a user that is neither
                known nor given with neighbours.
        """
        if neighbors.shape[1] > self.MAX_NEIGHBORS:
            raise InvalidInput(f"neighbors: at most {self.MAX_NEIGHBORS} per user, got {neighbors.shape[1]}")
        given = neighbors >= 0
        index = self.to_index(np.where(given, neighbors, 0))
        unknown = given & (index < 0)
        if unknown.any():
            row, col = np.argwhere(unknown)[0]
            raise InvalidInput(f"user {row}: neighbour {int(neighbors[row, col])} is not in the graph")
        bad = neighbors[neighbors < -1]
        if bad.size:
            raise InvalidInput(f"neighbors: ids are >= 0 (-1 pads), got {int(bad[0])}")
        user_index = np.where(users >= 0, self.to_index(np.maximum(users, 0)), -1)
        lost = (user_index < 0) & ~given.any(axis=1)
        if lost.any():
            i = int(np.argmax(lost))
            who = f"user {int(users[i])} is not in the graph" if users[i] >= 0 else "a new user (-1)"
            raise InvalidInput(f"row {i}: {who} and no neighbours were given; send the ids of its known "
                               "neighbours for a cold-start recommendation")
        return {"user": user_index.astype(np.int64), "neighbors": np.where(given, index, -1).astype(np.int64),
                "exclude_known": exclude_known.astype(bool)}

    def preprocess(self, inputs, parameters):
        self.validate(inputs)
        unknown = set(parameters) - {"k"}
        if unknown:
            raise InvalidInput(f"model '{self.name}' accepts the parameter 'k' only; got {sorted(unknown)}")
        self.resolve_k(parameters.get("k"))
        return self.graph_inputs(inputs["user"], inputs["neighbors"], inputs["exclude_known"])

    def postprocess(self, outputs, parameters):
        k = self.resolve_k(parameters.get("k"))
        return {**outputs, "ids": self.to_ids(outputs["ids"][:, :k]), "scores": outputs["scores"][:, :k]}

    def shadow_values(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        # External ids: two versions trained on different graphs index users differently.
        return self.to_ids(outputs["ids"][:, :self.DEFAULT_K])

    def _comparison(self, candidate: "RecommenderRuntime") -> OverlapShadow | None:
        # The graph inputs are this version's indices: the candidate must index users alike.
        same_users = self.num_users == candidate.num_users and (
            (self.node_ids is None and candidate.node_ids is None)
            or (self.node_ids is not None and candidate.node_ids is not None
                and np.array_equal(self.node_ids, candidate.node_ids)))
        return OverlapShadow(self.DEFAULT_K) if same_users else None

    def recommendations(self, graph_inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], k: int) -> list[Recommendation]:
        ids = self.to_ids(outputs["ids"][:, :k])
        users = graph_inputs["user"]
        given = (graph_inputs["neighbors"] >= 0).any(axis=1)
        cold = (users < 0) | (np.isin(users, self.edgeless) & given)
        return [
            Recommendation(ids=row.tolist(), scores=scores.tolist(), cold_start=bool(c))
            for row, scores, c in zip(ids, outputs["scores"][:, :k], cold)
        ]


RUNTIMES: dict[str, type[Runtime]] = {
    cls.kind: cls for cls in (AnomalyRuntime, ClassifierRuntime, GanRuntime, DiffusionRuntime, RecommenderRuntime)
}


def runtime_for(manifest: Manifest, max_rows: int = 4096, max_image_side: int = 0) -> Runtime:
    """The runtime class registered for the manifest's kind (the generic base otherwise).

    Args:
        manifest: the model version's manifest.
        max_rows: the most rows one request may carry.
        max_image_side: the largest PNG width or height accepted (models that take images);
            0: eight times the model's own.
    """
    runtime = RUNTIMES.get(manifest.kind, Runtime)(manifest, max_rows)
    runtime.max_image_side = max_image_side
    return runtime
