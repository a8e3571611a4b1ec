"""The model repository: ``<root>/<model>/<version>/{model.onnx, manifest.json, card.md}``.

``deepserve build`` writes it, the serving layer reads it. The format is documented in
docs/model-repository.md; this package is its only reader and writer. Loading a model
verifies the ONNX file's sha256 against the manifest and refuses a changed file: a
swapped model file is how a backdoor gets in. Sidecar files (per-model data kept beside the
ONNX file, listed in the manifest's ``files`` with their sha256) are verified the same way.

The repository is a local directory (a shared volume, read in place) or a URI that fsspec
reads (``http://``, ``s3://``, ``gs://``, ...): :mod:`deepserve.repository.remote` mirrors
such a repository into a local cache, and a model file enters the cache only once its
sha256 matches its manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from deepserve.errors import ModelIntegrityError, ModelNotFound

if TYPE_CHECKING:
    from deepserve.repository.remote import RemoteFiles

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
CARD_FILE = "card.md"
FORMAT_VERSION = 1
DEFAULT_ROOT = "model-repository"

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.:-]+://")  # scheme://, chained ones too (simplecache::s3://)


def default_location() -> str:
    """The repository: ``$DEEPSERVE_MODEL_REPOSITORY`` (a directory or a URI) or ``./model-repository``."""
    return os.environ.get("DEEPSERVE_MODEL_REPOSITORY", DEFAULT_ROOT)


def default_root() -> Path:
    """The repository directory that ``deepserve build`` writes: :func:`default_location` as a path."""
    return Path(default_location())


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
    # Sidecar files in the version folder (relative path -> sha256), read and verified with
    # the model file; the runtime of the model's kind knows what they hold.
    files: dict[str, str] = field(default_factory=dict)
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
    """A model version on disk: its manifest and the paths of its files.

    For a remote repository ``directory`` is the version's folder in the local cache, and
    ``origin`` the repository that the model file is fetched from.
    """

    manifest: Manifest
    directory: Path
    origin: RemoteFiles | None = field(default=None, repr=False, compare=False)

    @property
    def model_path(self) -> Path:
        """The model file, which must lie inside ``directory``.

        Raises:
            ModelIntegrityError: the manifest's ``file`` leads out of the version folder.
        """
        return self._inside(self.manifest.file)

    def _inside(self, file: str) -> Path:
        # A fault of the repository, not of a client's request: hence ModelIntegrityError
        # (FAILED_PRECONDITION) rather than InvalidInput. A manifest naming "../other/model.onnx"
        # or "/etc/passwd" would have the sha256 check vouch for a file that is not this
        # version's, and would have a remote repository's cache write outside itself.
        relative = PurePosixPath(file)
        path = self.directory / relative
        if (not relative.parts or relative.is_absolute() or ".." in relative.parts
                or "\\" in file  # a path separator to Windows and to some web servers
                or not path.resolve().is_relative_to(self.directory.resolve())):  # symlinks, too
            raise ModelIntegrityError(
                f"the manifest in {self.directory} names the model file {file!r}, which is not inside "
                "its version folder; refusing it"
            )
        return path

    def read_model_bytes(self) -> bytes:
        """Read the ONNX file and check it against the manifest's sha256.

        A remote version's file is fetched into the cache first, unless the cached copy
        already matches. Returns the bytes that were checked, so that the caller hands
        exactly those to ONNX Runtime (no window between check and use).

        Raises:
            ModelIntegrityError: the file is missing or its sha256 differs.
            RepositoryUnavailable: a remote repository cannot be read.
        """
        return self._read_verified(self.model_path, self.manifest.sha256)

    def read_files(self) -> dict[str, bytes]:
        """The sidecar files the manifest lists, each read and checked against its sha256
        like the model file (a remote version's are fetched into the cache first).

        Returns:
            Relative path -> the bytes that were checked (empty when the manifest lists none).

        Raises:
            ModelIntegrityError: a file leads out of the version folder, is missing, or its
                sha256 differs.
            RepositoryUnavailable: a remote repository cannot be read.
        """
        return {file: self._read_verified(self._inside(file), sha256) for file, sha256 in self.manifest.files.items()}

    def _read_verified(self, path: Path, sha256: str) -> bytes:
        # Remote: a cached copy that matches is used as is; a missing or changed one is fetched.
        if self.origin is not None and not (path.is_file() and sha256_file(path) == sha256):
            self.origin.fetch_model(path.relative_to(self.origin.root).as_posix(), sha256)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelIntegrityError(f"model file {path} cannot be read: {exc.strerror}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ModelIntegrityError(
                f"model file {path} does not match its manifest: sha256 is {digest}, "
                f"manifest says {sha256}; refusing to load a changed model file"
            )
        return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_version(name: str) -> bool:
    return name.isascii() and name.isdigit()  # "2", "10"; not "latest", "1.0" or "²"


def _is_folder_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


class LocalFiles:
    """A repository on a local disk or a shared volume: its files are read where they lie.

    :class:`~deepserve.repository.remote.RemoteFiles` has the same methods.
    """

    def __init__(self, root: Path):
        self.root = root
        self.location = os.path.abspath(root)  # what another process, elsewhere, can open

    def subdirs(self, *parts: str) -> list[str]:
        folder = self.root.joinpath(*parts)
        return [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []

    def has_file(self, *parts: str) -> bool:
        return self.root.joinpath(*parts).is_file()

    def manifest(self, name: str, version: str) -> str | None:
        path = self.root / name / version / MANIFEST_FILE
        return path.read_text() if path.is_file() else None

    def read_text(self, *parts: str) -> str | None:
        path = self.root.joinpath(*parts)
        return path.read_text() if path.is_file() else None

    def write_text(self, text: str, *parts: str) -> None:
        """Replace a file atomically: readers see the old content or the new, never half."""
        path = self.root.joinpath(*parts)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            tmp.write(text)
        os.replace(tmp.name, path)


def _files_at(location: str | os.PathLike[str]) -> LocalFiles | RemoteFiles:
    location = os.fspath(location)
    if not _URI.match(location):
        return LocalFiles(Path(location))
    parsed = urlparse(location)
    if parsed.scheme == "file":  # a local directory spelled as a URI: read in place, like a path
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{location}: a file:// URI names a local directory (file:///path), not a host")
        return LocalFiles(Path(url2pathname(parsed.path)))
    from deepserve.repository.remote import RemoteFiles  # here: fsspec loads only when it is needed

    return RemoteFiles(location)


class ModelRepository:
    """Read access to a model repository: a local directory or a URI.

    Attributes:
        root: the local directory that holds the files: the repository itself, or for a
            remote repository the cache folder that mirrors it.
        location: where the repository is: the absolute directory, or the URI. It names the
            repository in messages, and is what to hand another process (a replica) to open.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self._files = _files_at(root if root is not None else default_location())
        self.root: Path = self._files.root
        self.location: str = self._files.location

    def model_names(self) -> list[str]:
        """Models with at least one version, by name.

        Raises:
            RepositoryUnavailable: a remote repository cannot be read.
        """
        return sorted(name for name in self._files.subdirs() if self.versions(name))

    def versions(self, name: str) -> list[str]:
        """Versions of ``name`` that have a manifest, oldest first.

        Only integer folder names are versions; other folders are ignored.
        """
        if not _is_folder_name(name):
            return []
        # A version folder without its manifest is still being written (the manifest comes last).
        found = [v for v in self._files.subdirs(name)
                 if _is_version(v) and self._files.has_file(name, v, MANIFEST_FILE)]
        return sorted(found, key=int)

    def latest_version(self, name: str) -> str:
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' is not in the repository {self.location}")
        return versions[-1]

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The manifest of ``name`` at ``version`` (latest when None or empty).

        A remote repository's manifest is fetched into the cache every time.

        Raises:
            ModelNotFound: no such model or version.
            RepositoryUnavailable: a remote repository cannot be read.
        """
        version = version or self.latest_version(name)
        text = self._files.manifest(name, version) if _is_folder_name(name) and _is_version(version) else None
        if text is None:
            known = ", ".join(self.versions(name)) or "none"
            raise ModelNotFound(f"model '{name}' has no version '{version}' (versions: {known})")
        origin = None if isinstance(self._files, LocalFiles) else self._files
        return ModelVersion(Manifest.from_dict(json.loads(text)), self.root / name / version, origin)

    def load(self, name: str, version: str | None = None, pinned: str | None = None) -> tuple[ModelVersion, bytes]:
        """The manifest and the verified ONNX bytes of a model version.

        Args:
            pinned: the sha256 the deployment expects (the Serve config's ``sha256``): a
                manifest that says anything else is refused before its file is read.

        Raises:
            ModelIntegrityError: the manifest contradicts the pin, or the file its manifest.
        """
        model = self.get(name, version)
        if pinned is not None and model.manifest.sha256 != pinned:
            raise ModelIntegrityError(
                f"model '{name}' version {model.manifest.version}: its manifest says sha256 {model.manifest.sha256}, "
                f"the Serve config pins {pinned}; refusing it"
            )
        return model, model.read_model_bytes()

    def routing(self, name: str) -> dict | None:
        """The model's ``routing.json`` (written by ``deepserve rollout``), None when it has none.

        Raises:
            RepositoryUnavailable: a remote repository cannot be read.
            ValueError: the file is not JSON.
        """
        from deepserve.lifecycle import ROUTING_FILE

        text = self._files.read_text(name, ROUTING_FILE) if _is_folder_name(name) else None
        return None if text is None else json.loads(text)

    def write_routing(self, name: str, routing: dict) -> None:
        """Replace the model's ``routing.json``; every serving process picks it up at its next poll."""
        from deepserve.lifecycle import ROUTING_FILE

        if not self.versions(name):
            raise ModelNotFound(f"model '{name}' is not in the repository {self.location}")
        self._files.write_text(json.dumps(routing, indent=2) + "\n", name, ROUTING_FILE)


def next_version(root: Path, name: str) -> str:
    """The version a new build of ``name`` gets: one past the highest version."""
    numbers = [int(v) for v in ModelRepository(root).versions(name)]
    return str(max(numbers, default=0) + 1)
