"""The model repository: version lookup and the sha256 check that refuses changed files."""

from __future__ import annotations

import shutil

import pytest

from deepserve.errors import ModelIntegrityError, ModelNotFound
from deepserve.repository import ModelRepository


@pytest.fixture
def repo_copy(repository, tmp_path):
    """A private copy of the built digit classifier, safe to tamper with."""
    src = repository.get("digit-classifier").directory
    shutil.copytree(src, tmp_path / "digit-classifier" / "1")
    return ModelRepository(tmp_path)


def test_load_verifies_and_returns_the_checked_bytes(repo_copy):
    model, data = repo_copy.load("digit-classifier")
    assert data == model.model_path.read_bytes()
    assert model.manifest.version == "1" and model.manifest.kind == "classifier"


def test_one_changed_byte_is_refused_with_the_file_named(repo_copy):
    model = repo_copy.get("digit-classifier")
    data = bytearray(model.model_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.model_path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError) as info:
        repo_copy.load("digit-classifier")
    assert str(model.model_path) in str(info.value)
    assert "sha256" in str(info.value)


def test_missing_model_file_is_refused(repo_copy):
    model = repo_copy.get("digit-classifier")
    model.model_path.unlink()
    with pytest.raises(ModelIntegrityError, match="cannot be read"):
        repo_copy.load("digit-classifier")


def test_latest_version_is_numeric_and_unknown_names_are_not_found(repo_copy, tmp_path):
    for version in ("2", "10"):
        shutil.copytree(tmp_path / "digit-classifier" / "1", tmp_path / "digit-classifier" / version)
    assert repo_copy.versions("digit-classifier") == ["1", "2", "10"]
    assert repo_copy.get("digit-classifier").manifest.version == "1"  # copied manifest says 1
    assert repo_copy.get("digit-classifier").directory.name == "10"
    with pytest.raises(ModelNotFound, match="no-such-model"):
        repo_copy.get("no-such-model")
    with pytest.raises(ModelNotFound, match="versions: 1, 2, 10"):
        repo_copy.get("digit-classifier", "7")


def test_a_model_file_that_resolves_outside_its_version_is_refused(repo_copy, tmp_path):
    model = repo_copy.get("digit-classifier")
    outside = tmp_path / "elsewhere.onnx"
    model.model_path.rename(outside)
    model.model_path.symlink_to(outside)  # the right bytes, but not this version's file
    with pytest.raises(ModelIntegrityError, match="not inside its version folder"):
        repo_copy.load("digit-classifier")
