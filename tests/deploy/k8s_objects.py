"""Paths and small accessors for the Kubernetes objects under deploy/k8s/ (the deploy tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
