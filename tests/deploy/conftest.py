"""Fixtures of the deploy tests: scripts/k8s.py as a module, and what each overlay renders to."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from k8s_objects import K8S, OVERLAYS, PROJECT


@pytest.fixture(scope="session")
def k8s():
    """scripts/k8s.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("deepserve_k8s_script", PROJECT / "scripts" / "k8s.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def rendered(k8s) -> dict[str, list[dict[str, Any]]]:
    """Overlay name -> the objects it renders to."""
    return {name: k8s.build(K8S / "overlays" / name) for name in OVERLAYS}
