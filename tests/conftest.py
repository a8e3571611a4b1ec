"""Session fixtures shared by every test: the built model repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deepserve.repository import ModelRepository, default_root

PROJECT = Path(__file__).resolve().parent.parent
REQUIRED_MODELS = ("fraud-autoencoder", "digit-classifier", "digit-classifier-robust")


@pytest.fixture(scope="session")
def repository() -> ModelRepository:
    """The real model repository (``make models`` builds it); built here when absent."""
    repo = ModelRepository(default_root())
    missing = [m for m in REQUIRED_MODELS if not repo.versions(m)]
    if missing:
        cmd = [sys.executable, "-m", "deepserve.cli", "build", "--repo", str(repo.root)]
        for name in missing:
            cmd += ["--only", name]
        subprocess.run(cmd, check=True, cwd=PROJECT)
    return repo
