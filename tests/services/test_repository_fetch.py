"""A repository behind a URI: listed and read remotely, fetched into a verified local cache.

The remote is real: a copy of the built fraud-autoencoder served over HTTP by Python's
``http.server`` on 127.0.0.1 (fsspec lists its directory index pages), no mocks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from conftest import PROJECT, free_port
from deepserve.errors import ModelIntegrityError, ModelNotFound, RepositoryUnavailable, to_status
from deepserve.repository import MANIFEST_FILE, ModelRepository, next_version
from deepserve.repository.remote import cache_dir

pytestmark = pytest.mark.timeout(60)

MODEL = "fraud-autoencoder"  # the smallest built model


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache: no test touches ~/.cache."""
    monkeypatch.setenv("DEEPSERVE_REPOSITORY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tree(repository, tmp_path) -> Path:
    """A local repository holding a copy of one built version of ``MODEL``."""
    src = repository.get(MODEL).directory
    root = tmp_path / "repo"
    shutil.copytree(src, root / MODEL / src.name)
    return root


class CountingHandler(SimpleHTTPRequestHandler):
    """Serves a directory and counts the GET requests per path."""

    def do_GET(self):
        self.server.gets[self.path] += 1
        super().do_GET()

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def http_repo(tree):
    """``tree`` on a real web server: ``url``, ``root`` (the served directory), ``gets`` (path -> count)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(tree)))
    server.gets = collections.Counter()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}/", root=tree, gets=server.gets)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _version(root: Path) -> str:
    return ModelRepository(root).latest_version(MODEL)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _model_url_path(http_repo) -> str:
    return f"/{MODEL}/{_version(http_repo.root)}/model.onnx"


# ---------------------------------------------------------------------------- listing and loading


def test_http_repository_lists_and_loads_what_the_local_one_holds(http_repo, cache):
    local_model, local_bytes = ModelRepository(http_repo.root).load(MODEL)
    repo = ModelRepository(http_repo.url)
    assert repo.location == http_repo.url.rstrip("/")
    assert repo.root == cache / hashlib.sha256(repo.location.encode()).hexdigest()[:16]
    assert repo.model_names() == [MODEL]
    assert repo.versions(MODEL) == [local_model.directory.name]

    model, data = repo.load(MODEL)
    assert model.manifest == local_model.manifest
    assert data == local_bytes
    assert model.directory == repo.root / MODEL / local_model.directory.name  # served from the cache
    assert model.model_path.read_bytes() == local_bytes
    assert json.loads((model.directory / MANIFEST_FILE).read_text())["sha256"] == model.manifest.sha256
    assert not list(model.directory.glob("*.part"))


def test_a_file_uri_reads_the_directory_in_place(tree, cache):
    repo = ModelRepository(tree.as_uri())
    assert repo.root == tree
    model, data = repo.load(MODEL)
    assert model.directory == tree / MODEL / _version(tree)
    assert data == model.model_path.read_bytes()
    assert not cache.exists()  # nothing was fetched


def test_cache_defaults_to_the_home_directory(monkeypatch):
    monkeypatch.delenv("DEEPSERVE_REPOSITORY_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "deepserve" / "repository"


def test_a_cached_model_is_not_downloaded_again_but_its_manifest_is(http_repo):
    first, data = ModelRepository(http_repo.url).load(MODEL)
    again, data_again = ModelRepository(http_repo.url).load(MODEL)  # as a second replica would
    assert data_again == data and again.directory == first.directory
    model_path = _model_url_path(http_repo)
    assert http_repo.gets[model_path] == 1
    assert http_repo.gets[model_path.replace("model.onnx", MANIFEST_FILE)] >= 2  # fresh on every load


# ---------------------------------------------------------------------------- integrity


def test_replicas_fetching_at_once_all_get_the_verified_file(http_repo):
    repos = [ModelRepository(http_repo.url) for _ in range(4)]  # one per replica on this node
    with concurrent.futures.ThreadPoolExecutor(len(repos)) as pool:
        loaded = list(pool.map(lambda repo: repo.load(MODEL), repos))
    (model, data), *others = loaded
    assert all(d == data for _, d in others)
    assert model.model_path.read_bytes() == data
    assert not list(model.directory.glob("*.part"))


def test_a_tampered_remote_model_is_refused_and_not_cached(http_repo, cache):
    served = http_repo.root / MODEL / _version(http_repo.root) / "model.onnx"
    _flip_a_byte(served)
    repo = ModelRepository(http_repo.url)
    model = repo.get(MODEL)
    with pytest.raises(ModelIntegrityError) as info:
        model.read_model_bytes()
    message = str(info.value)
    assert http_repo.url + _model_url_path(http_repo).lstrip("/") in message
    assert model.manifest.sha256 in message
    assert hashlib.sha256(served.read_bytes()).hexdigest() in message
    assert not model.model_path.exists()  # nothing under the final name
    assert not list(model.directory.glob("*.part"))  # and no temporary file left behind


def test_a_tampered_cached_copy_is_fetched_again(http_repo):
    repo = ModelRepository(http_repo.url)
    model, data = repo.load(MODEL)
    _flip_a_byte(model.model_path)
    again, data_again = repo.load(MODEL)
    assert data_again == data
    assert again.model_path.read_bytes() == data
    assert http_repo.gets[_model_url_path(http_repo)] == 2


@pytest.mark.parametrize("where", ["local", "http"])
@pytest.mark.parametrize("file", ["../x", "/etc/passwd", "a/../../x", "..", ""])
def test_a_manifest_naming_a_file_outside_its_version_is_refused(http_repo, cache, where, file):
    manifest_path = http_repo.root / MODEL / _version(http_repo.root) / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["file"] = file
    manifest_path.write_text(json.dumps(manifest))
    repo = ModelRepository(http_repo.root if where == "local" else http_repo.url)
    with pytest.raises(ModelIntegrityError, match="not inside its version folder"):
        repo.load(MODEL)
    if where == "http":
        assert http_repo.gets[_model_url_path(http_repo)] == 0  # refused before any download
        assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == [MANIFEST_FILE]


def test_non_numeric_version_folders_are_ignored(http_repo):
    version = _version(http_repo.root)
    for name in ("latest", "v2", "1.0", "³"):  # each with a manifest: still not a version
        shutil.copytree(http_repo.root / MODEL / version, http_repo.root / MODEL / name)
    for repo in (ModelRepository(http_repo.root), ModelRepository(http_repo.url)):
        assert repo.versions(MODEL) == [version]
        assert repo.get(MODEL).directory.name == version
        with pytest.raises(ModelNotFound, match=f"versions: {version}"):
            repo.get(MODEL, "latest")
    assert next_version(http_repo.root, MODEL) == str(int(version) + 1)


def test_unknown_models_and_versions_are_not_found_remotely(http_repo):
    repo = ModelRepository(http_repo.url)
    with pytest.raises(ModelNotFound, match="no-such-model"):
        repo.get("no-such-model")
    with pytest.raises(ModelNotFound, match="no version '999'"):
        repo.get(MODEL, "999")
    with pytest.raises(ModelNotFound):
        repo.get("..", "1")


# ---------------------------------------------------------------------------- an unreachable repository


def test_an_unavailable_repository_is_grpc_unavailable():
    assert to_status(RepositoryUnavailable("x")) == (grpc.StatusCode.UNAVAILABLE, "x")


def test_an_unreachable_repository_is_unavailable_and_named():
    url = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    repo = ModelRepository(url)
    with pytest.raises(RepositoryUnavailable, match=re.escape(url)):
        repo.model_names()
    with pytest.raises(RepositoryUnavailable, match=re.escape(url)):
        repo.load(MODEL, "1")  # what a replica does: the version is known
    with pytest.raises(RepositoryUnavailable, match=re.escape(url)):
        repo.load(MODEL)


# ---------------------------------------------------------------------------- callers


@pytest.mark.timeout(120)  # importing Ray Serve takes a while on a busy machine
def test_build_app_plans_from_a_remote_repository(http_repo):
    from deepserve.app import build_app

    app = build_app({"repository": http_repo.url, "models": {MODEL: {}}})
    assert app is not None
    assert http_repo.gets[_model_url_path(http_repo)] == 1  # verified at deploy time


def test_cli_models_lists_a_remote_repository(http_repo, cache):
    env = {**os.environ, "DEEPSERVE_REPOSITORY_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-m", "deepserve.cli", "models", "--repo", http_repo.url],
                            capture_output=True, text=True, env=env, cwd=PROJECT, timeout=50)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith(MODEL))
    assert line.split()[1:] == [f"v{_version(http_repo.root)}", "anomaly", "ok"]


def test_cli_models_names_an_unreachable_repository(cache):
    url = f"http://127.0.0.1:{free_port()}/"
    env = {**os.environ, "DEEPSERVE_REPOSITORY_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-m", "deepserve.cli", "models", "--repo", url],
                            capture_output=True, text=True, env=env, cwd=PROJECT, timeout=50)
    assert result.returncode == 1
    assert url in result.stderr and "Traceback" not in result.stderr
