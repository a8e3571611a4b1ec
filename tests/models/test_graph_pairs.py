"""graph-recommender's numpy half and its files: pair features checked against dense matrix
algebra, candidates outside the masks, no torch in serving, and the sidecar verified like
the ONNX file (locally and through a remote repository's cache)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import fsspec
import numpy as np
import pytest

from deepserve.errors import ModelIntegrityError
from deepserve.models.graph.data import csr
from deepserve.models.graph.pairs import PAIR_FEATURES, CandidateIndex
from deepserve.repository import ModelRepository

MODEL = "graph-recommender"


def _index(n: int = 60, seed: int = 0, two_hop: int = 20, nearest: int = 10) -> tuple[CandidateIndex, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = np.triu(rng.random((n, n)) < 0.12, 1)
    edges = np.argwhere(a)
    indptr, indices = csr(n, edges)
    f, h, d = 3, 5, 4
    arrays = {"indptr": indptr, "indices": indices, "z": rng.normal(size=(n, d)).astype(np.float32),
              "x": rng.normal(size=(n, f + 1)).astype(np.float32), "h1": rng.normal(size=(n, h)).astype(np.float32),
              "smoothed": rng.normal(size=(n, f)).astype(np.float32),
              "self1_w": rng.normal(size=(h, f + 1)), "self1_b": rng.normal(size=h),
              "neigh1_w": rng.normal(size=(h, f + 1)),
              "self2_w": rng.normal(size=(d, h)), "self2_b": rng.normal(size=d), "neigh2_w": rng.normal(size=(d, h)),
              "degree_stats": np.array([2.0, 0.5])}
    dense = (a | a.T).astype(np.float64)
    return CandidateIndex(arrays, two_hop=two_hop, nearest=nearest), dense


def test_walk_and_three_hop_features_match_matrix_algebra():
    index, a = _index()
    degree = a.sum(1)
    u = int(np.argmax(degree))
    seeds = np.flatnonzero(a[u])
    reached, cn, aa, ra = index.walk(seeds, cold=False)
    two = a[u] @ a  # 2-paths from u
    np.testing.assert_array_equal(reached, np.flatnonzero(two))
    np.testing.assert_allclose(cn, two[reached])
    np.testing.assert_allclose(aa, ((a[u] / np.log(np.maximum(degree, 2))) @ a)[reached], rtol=1e-6)
    np.testing.assert_allclose(ra, ((a[u] / np.maximum(degree, 1)) @ a)[reached], rtol=1e-6)
    candidates = np.arange(a.shape[0])
    p3, n21, ra3 = index.three_hop(candidates, reached, cn, ra)
    np.testing.assert_allclose(p3, (two @ a), rtol=1e-6)  # paths of length 3
    np.testing.assert_allclose(n21, ((two > 0).astype(float) @ a))
    ra_u = (a[u] / np.maximum(degree, 1)) @ a
    np.testing.assert_allclose(ra3, (ra_u / np.maximum(degree, 1)) @ a, rtol=1e-5)
    # A new user's link adds one to each of its neighbours' degree.
    _, _, aa_cold, _ = index.walk(seeds, cold=True)
    np.testing.assert_allclose(aa_cold, ((a[u] / np.log(np.maximum(degree + 1, 2))) @ a)[reached], rtol=1e-6)


def test_candidates_leave_out_the_masked_users_and_features_line_up():
    index, a = _index()
    users = np.array([0, 5, -1])
    neighbors = np.array([[7, -1, -1], [-1, -1, -1], [1, 2, 3]])
    prepared = index.prepare(users, neighbors, np.array([True, True, True]))
    assert prepared.candidates.shape == (3, index.width)
    assert prepared.pair_features.shape == (3, index.width, len(PAIR_FEATURES) + 3)
    assert prepared.cold.tolist() == [False, False, True]
    for row, user, given in zip(prepared.candidates, users, neighbors):
        chosen = row[row >= 0]
        masked = set(given[given >= 0].tolist())
        if user >= 0:
            masked |= {int(user), *np.flatnonzero(a[user]).tolist()}
        assert not masked & set(chosen.tolist())
        assert len(set(chosen.tolist())) == len(chosen)
    # Common neighbours of user 5 and each candidate, feature 0 = log1p(CN).
    row = prepared.candidates[1]
    cn = (a[5] @ a)[row[row >= 0]]
    np.testing.assert_allclose(prepared.pair_features[1, : (row >= 0).sum(), 0], np.log1p(cn), rtol=1e-6)
    np.testing.assert_allclose(prepared.query[0], index.z[0])
    ids, scores = index.top_k(prepared, np.zeros(prepared.candidates.shape, np.float32), 5, -1e30)
    assert ids.shape == scores.shape == (3, 5) and (ids >= 0).all()


def test_the_serving_side_never_imports_torch():
    code = ("import sys; from deepserve.runtime import RecommenderRuntime; "
            "import deepserve.models.graph.pairs; import deepserve.models.graph.data; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------------- sidecar files


@pytest.fixture
def copy(repository, tmp_path):
    """A private copy of the built graph-recommender's latest version."""
    src = repository.get(MODEL).directory
    shutil.copytree(src, tmp_path / "repo" / MODEL / src.name)
    return ModelRepository(tmp_path / "repo"), tmp_path / "repo" / MODEL / src.name


def test_a_changed_sidecar_is_refused(copy):
    repo, directory = copy
    model, _ = repo.load(MODEL)
    files = model.read_files()
    assert list(files) == ["graph.npz"]
    data = bytearray((directory / "graph.npz").read_bytes())
    data[-100] ^= 1
    (directory / "graph.npz").write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="does not match its manifest"):
        model.read_files()
    (directory / "graph.npz").unlink()
    with pytest.raises(ModelIntegrityError, match="cannot be read"):
        model.read_files()


def test_a_sidecar_outside_the_version_folder_is_refused(copy):
    repo, _ = copy
    model, _ = repo.load(MODEL)
    model.manifest.files = {"../../elsewhere.npz": "0" * 64}
    with pytest.raises(ModelIntegrityError, match="not inside"):
        model.read_files()


def test_a_remote_repository_fetches_and_verifies_the_sidecar(copy, tmp_path, monkeypatch):
    _, directory = copy
    monkeypatch.setenv("DEEPSERVE_REPOSITORY_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"/sidecar-test-{tmp_path.name}"
    for path in directory.iterdir():
        fs.pipe_file(f"{root}/{MODEL}/{directory.name}/{path.name}", path.read_bytes())
    remote = ModelRepository(f"memory://{root}")
    model, _ = remote.load(MODEL)
    files = model.read_files()
    assert files["graph.npz"] == (directory / "graph.npz").read_bytes()
    assert (model.directory / "graph.npz").is_file()  # in the cache, verified

    changed = bytearray(files["graph.npz"])
    changed[-100] ^= 1
    fs.pipe_file(f"{root}/{MODEL}/{directory.name}/graph.npz", bytes(changed))
    (model.directory / "graph.npz").unlink()  # the cached copy gone: fetched again, and refused
    with pytest.raises(ModelIntegrityError, match="does not match its manifest"):
        model.read_files()
    assert not (model.directory / "graph.npz").exists()
