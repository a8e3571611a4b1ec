"""The model repository: ``<root>/<model>/<version>/{model.onnx, manifest.json, card.md}``.

``deepserve build`` writes it, the serving layer reads it. The format is documented in
docs/model-repository.md; this module is its only reader and writer. Loading a model
verifies the ONNX file's sha256 against the manifest and refuses a changed file: a
swapped model file is how a backdoor gets in.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deepserve.errors import ModelIntegrityError, ModelNotFound

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
CARD_FILE = "card.md"
FORMAT_VERSION = 1
DEFAULT_ROOT = "model-repository"


def default_root() -> Path:
    """The repository root: ``$DEEPSERVE_MODEL_REPOSITORY`` or ``./model-repository``."""
    return Path(os.environ.get("DEEPSERVE_MODEL_REPOSITORY", DEFAULT_ROOT))


@dataclass
class TensorSpec:
    """One model input or output. ``-1`` in ``shape`` marks a dynamic axis."""

    name: str
    datatype: str  # Open Inference Protocol name: FP32, INT64, BOOL, BYTES, ...
    shape: list[int]
    description: str = ""


@dataclass
class Manifest:
    """Everything the serving layer and an auditor need to know about one model version."""

    name: str
    version: str
    kind: str  # runtime kind: "anomaly", "classifier", ... (one runtime class per kind)
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: dict[str, Any]
    training_data: dict[str, Any]
    metrics: dict[str, Any]
    created_at: str
    code_revision: str
    seed: int
    threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific settings
    file: str = MODEL_FILE
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        data = dict(data)
        data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
        data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
        return cls(**data)


@dataclass
class ModelVersion:
    """A verified model version on disk: its manifest and the paths of its files."""

    manifest: Manifest
    directory: Path

    @property
    def model_path(self) -> Path:
        return self.directory / self.manifest.file

    def read_model_bytes(self) -> bytes:
        """Read the ONNX file and check it against the manifest's sha256.

        Returns the bytes that were checked, so that the caller hands exactly those
        to ONNX Runtime (no window between check and use).

        Raises:
            ModelIntegrityError: the file is missing or its sha256 differs.
        """
        path = self.model_path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelIntegrityError(f"model file {path} cannot be read: {exc.strerror}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.manifest.sha256:
            raise ModelIntegrityError(
                f"model file {path} does not match its manifest: sha256 is {digest}, "
                f"manifest says {self.manifest.sha256}; refusing to load a changed model file"
            )
        return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version_key(version: str) -> tuple[int, str]:
    # Integer versions sort numerically; anything else after them, by name.
    return (int(version), "") if version.isdigit() else (1 << 62, version)


class ModelRepository:
    """Read access to a model repository directory."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root) if root is not None else default_root()

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        """Versions of ``name`` that have a manifest, oldest first."""
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        found = [p.name for p in model_dir.iterdir() if (p / MANIFEST_FILE).is_file()]
        return sorted(found, key=_version_key)

    def latest_version(self, name: str) -> str:
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' is not in the repository {self.root}")
        return versions[-1]

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The manifest of ``name`` at ``version`` (latest when None or empty).

        Raises:
            ModelNotFound: no such model or version.
        """
        version = version or self.latest_version(name)
        directory = self.root / name / version
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.is_file():
            known = ", ".join(self.versions(name)) or "none"
            raise ModelNotFound(f"model '{name}' has no version '{version}' (versions: {known})")
        manifest = Manifest.from_dict(json.loads(manifest_path.read_text()))
        return ModelVersion(manifest=manifest, directory=directory)

    def load(self, name: str, version: str | None = None) -> tuple[ModelVersion, bytes]:
        """The manifest and the verified ONNX bytes of a model version."""
        model = self.get(name, version)
        return model, model.read_model_bytes()


def next_version(root: Path, name: str) -> str:
    """The version a new build of ``name`` gets: one past the highest integer version."""
    numbers = [int(v) for v in ModelRepository(root).versions(name) if v.isdigit()]
    return str(max(numbers, default=0) + 1)
