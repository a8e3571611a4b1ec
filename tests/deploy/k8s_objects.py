"""Paths, fixtures and small accessors for the Kubernetes objects under deploy/k8s/ (the
deploy tests import the fixtures from here: a second conftest.py would shadow the one in
tests/, whose names other test modules import as ``conftest``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(__file__).resolve().parents[2]
K8S = PROJECT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# CRD schemas live beside the project in CI (../shared/schemas); a fresh clone has none.
SCHEMAS = PROJECT.parent / "shared" / "schemas"


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def groups(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name -> group spec; the head group is ``head``."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def workers(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: g for name, g in groups(rayservice).items() if name != "head"}


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """KubeRay's Ray container: the first of the pod."""
    return group["template"]["spec"]["containers"][0]


def env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


@pytest.fixture(scope="session")
def k8s():
    """scripts/k8s.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("deepserve_k8s_script", PROJECT / "scripts" / "k8s.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def rendered(k8s) -> dict[str, list[dict[str, Any]]]:
    """Overlay name -> the objects it renders to."""
    return {name: k8s.build(K8S / "overlays" / name) for name in OVERLAYS}
