"""A model repository behind a URI (``http://``, ``s3://``, ``gs://``, ...), read with fsspec.

Every node mirrors what it loads into a local cache, ``<cache>/<sha256(uri)[:16]>/``, laid out
like the repository itself. Manifests are fetched afresh on every load; a model file is fetched
when the cached copy is missing or does not match its manifest, and enters the cache only
once its sha256 does. :class:`~deepserve.repository.ModelRepository` is the interface.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import fsspec

from deepserve.errors import ModelIntegrityError, RepositoryUnavailable
from deepserve.repository import MANIFEST_FILE, sha256_file

DEFAULT_CACHE = "~/.cache/deepserve/repository"
# An unreachable web server fails a replica's start within seconds instead of hanging it;
# a slow but live one may take as long as it needs, as long as bytes keep coming.
HTTP_CONNECT_TIMEOUT_S = 10.0
HTTP_READ_TIMEOUT_S = 60.0


def cache_dir() -> Path:
    """Where remote repositories are cached: ``$DEEPSERVE_REPOSITORY_CACHE`` or ``~/.cache/deepserve/repository``."""
    return Path(os.environ.get("DEEPSERVE_REPOSITORY_CACHE") or DEFAULT_CACHE).expanduser()


def _storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options by protocol; elsewhere fsspec's defaults stand (credentials from the environment)."""
    if protocol not in ("http", "https"):
        return {}
    import aiohttp  # what fsspec's HTTP filesystem runs on; ray[serve] brings it

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=HTTP_CONNECT_TIMEOUT_S, sock_read=HTTP_READ_TIMEOUT_S)
    return {"client_kwargs": {"timeout": timeout}}


class RemoteFiles:
    """A repository read through fsspec and mirrored, file by file, into a local cache folder.

    Has the methods of :class:`~deepserve.repository.LocalFiles`, plus :meth:`fetch_model`.

    Attributes:
        location: the repository's URI, for messages.
        root: the cache folder that mirrors it.
    """

    def __init__(self, uri: str):
        self.location = uri.rstrip("/")
        # A folder per repository, so that two repositories never share a cached file.
        self.root = cache_dir() / hashlib.sha256(self.location.encode()).hexdigest()[:16]
        protocol = urlparse(self.location).scheme
        try:
            self.fs, self._path = fsspec.core.url_to_fs(self.location, **_storage_options(protocol))
        except (ImportError, ValueError) as exc:  # s3:// without s3fs; a protocol fsspec does not know
            raise RepositoryUnavailable(f"cannot read the model repository at {self.location}: {exc}") from None

    def subdirs(self, *parts: str) -> list[str]:
        return [name for name, is_folder in self._ls(*parts).items() if is_folder]

    def has_file(self, *parts: str) -> bool:
        return self._ls(*parts[:-1]).get(parts[-1]) is False

    def manifest(self, name: str, version: str) -> str | None:
        # Fetched on every load: it is small, and it says which model bytes are right.
        try:
            return self._fetch(f"{name}/{version}/{MANIFEST_FILE}").read_text()
        except FileNotFoundError:
            return None

    def read_text(self, *parts: str) -> str | None:
        try:
            return self._fetch("/".join(parts)).read_text()
        except FileNotFoundError:
            return None

    def write_text(self, text: str, *parts: str) -> None:
        """Write a file to the repository (object stores replace a key atomically); an HTTP
        repository is read-only and says so."""
        url = "/".join([self.location, *parts])
        try:
            self.fs.pipe_file("/".join([self._path.rstrip("/"), *parts]), text.encode())
        except Exception as exc:  # noqa: BLE001 - each fsspec backend raises its own
            raise RepositoryUnavailable(f"cannot write {url}: {type(exc).__name__}: {exc}") from exc

    def fetch_model(self, relative: str, sha256: str) -> None:
        """Download a model file (or a sidecar file) into the cache; it arrives only if its
        sha256 matches.

        Args:
            relative: the file's path in the repository, e.g. ``fraud-autoencoder/1/model.onnx``.
            sha256: what its manifest says.

        Raises:
            ModelIntegrityError: the file is missing from the repository or does not match.
            RepositoryUnavailable: the repository cannot be read.
        """
        try:
            self._fetch(relative, sha256)
        except FileNotFoundError:
            raise ModelIntegrityError(f"model file {self.location}/{relative} is missing from the repository") from None

    def _ls(self, *parts: str) -> dict[str, bool]:
        """The entries of a folder: name -> whether it is a folder ({} when there is no such folder)."""
        with self._reading("/".join([self.location, *parts]) + "/"):
            try:
                # The trailing '/' spares a web server's redirect from ".../1" to ".../1/".
                entries = self.fs.ls("/".join([self._path.rstrip("/"), *parts]) + "/", detail=True)
            except FileNotFoundError:
                return {}
        # Names come back as full URLs (HTTP) or keys (object stores), folders often with a
        # trailing '/': the last component is the name either way.
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["type"] == "directory" for e in entries}

    def _fetch(self, relative: str, sha256: str | None = None) -> Path:
        """Copy a file from the repository to the same place under :attr:`root`.

        The bytes stream into a temporary file beside the target, which is renamed into place
        only when complete and (given ``sha256``) checked. The rename is atomic: replicas that
        fetch the same file at once never see a partial or unchecked file under its name.
        No fsync: a file torn by a crash fails the next sha256 check and is fetched again.

        Raises:
            FileNotFoundError: the repository has no such file.
            ModelIntegrityError: its sha256 is not ``sha256``.
            RepositoryUnavailable: the repository cannot be read.
        """
        url, target = f"{self.location}/{relative}", self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)  # get_file writes to a path: what every fsspec backend accepts
        try:
            with self._reading(url):
                self.fs.get_file(f"{self._path.rstrip('/')}/{relative}", part)  # streams, in chunks
            digest = None if sha256 is None else sha256_file(Path(part))
            if digest != sha256:
                raise ModelIntegrityError(
                    f"model file {url} does not match its manifest: sha256 is {digest}, "
                    f"manifest says {sha256}; refusing to cache a changed model file"
                )
            os.replace(part, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)  # already gone when it was renamed into place
        return target

    @contextlib.contextmanager
    def _reading(self, url: str) -> Iterator[None]:
        """Failures to read ``url`` as RepositoryUnavailable; a missing file stays FileNotFoundError."""
        try:
            yield
        except FileNotFoundError:
            raise
        except Exception as exc:  # each fsspec backend raises its own: aiohttp, botocore, google.auth...
            raise RepositoryUnavailable(
                f"cannot read the model repository at {url}: {type(exc).__name__}: {exc}"
            ) from exc
