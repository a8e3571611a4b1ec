"""deploy/k8s/'s generated files are current, and scripts/k8s.py renders what kustomize renders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from k8s_objects import K8S, OVERLAYS, PROJECT, k8s, rendered  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(120)

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed: no cross-check")


def _key(obj):
    return obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def kubectl_kustomize(directory) -> list[dict]:
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return sorted((d for d in yaml.safe_load_all(result.stdout) if d), key=_key)


# ---------------------------------------------------------------------------- drift


def test_generated_files_match_the_serve_config():
    result = subprocess.run([sys.executable, str(PROJECT / "scripts" / "k8s.py"), "generate", "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_names_a_stale_file_and_generate_fixes_it(k8s, tmp_path, monkeypatch, capsys):
    shutil.copytree(PROJECT / "deploy", tmp_path / "deploy", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(k8s, "REPO", tmp_path)
    monkeypatch.setattr(k8s, "SERVE_CONFIG", tmp_path / "deploy" / "serve_config.yaml")
    monkeypatch.setattr(k8s, "K8S", tmp_path / "deploy" / "k8s")
    monkeypatch.setattr(k8s, "GPU_FRACTIONS", tmp_path / "deploy" / "k8s" / "overlays" / "gpu" / "gpu-fractions.yaml")
    config = yaml.safe_load(k8s.SERVE_CONFIG.read_text())
    config["applications"][0]["args"]["max_rows_per_request"] = 1234
    k8s.SERVE_CONFIG.write_text(yaml.safe_dump(config, sort_keys=False))

    assert k8s.generate(check=True) == 1
    err = capsys.readouterr().err
    assert "stale: deploy/k8s/base/serve-config.patch.yaml" in err
    assert "stale: deploy/k8s/overlays/gpu/serve-config.patch.yaml" in err
    assert "+        max_rows_per_request: 1234" in err  # the diff shows the change
    assert k8s.generate(check=False) == 0
    assert k8s.generate(check=True) == 0
    assert "max_rows_per_request: 1234" in (k8s.K8S / "base" / "serve-config.patch.yaml").read_text()


def test_gpu_shares_only_for_models_placed_deployment(k8s):
    with pytest.raises(SystemExit, match="placed in the gateway"):
        k8s.serve_config({"fraud-autoencoder": 0.5})
    with pytest.raises(SystemExit, match="not a model"):
        k8s.serve_config({"no-such-model": 0.5})
    with pytest.raises(SystemExit, match="positive number"):
        k8s.serve_config({"digit-diffusion": 0})


# ---------------------------------------------------------------------------- the renderer


def _kustomization(directory, text, files=None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(text)
    for name, content in (files or {}).items():
        (directory / name).write_text(content)
    return directory


CONFIG_MAP = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {x: '1'}\n"


@pytest.mark.parametrize("text, message", [
    ("resources: [cm.yaml]\nnamePrefix: x-\n", r"\['namePrefix'\] not implemented"),
    ("resources: [cm.yaml]\npatches:\n- path: p.yaml\n", "exactly `path` and `target`"),
    ("resources: [cm.yaml]\npatches:\n- path: p.yaml\n  target: {kind: ConfigMap, labelSelector: a=b}\n",
     "target fields"),
    ("resources: [cm.yaml]\npatches:\n- path: p.yaml\n  target: {kind: Secret}\n", "matches no resource"),
    ("resources: [cm.yaml]\npatches:\n- path: smp.yaml\n  target: {kind: ConfigMap}\n", "not a list of JSON 6902"),
    ("resources: [cm.yaml, cm.yaml]\n", "appears twice"),
    ("resources: [https://example.com/x.yaml]\n", "remote resources"),
    ("resources: [/etc/cm.yaml]\n", "relative paths only"),
    ("resources: [cm.yaml]\npatches:\n- path: bad.yaml\n  target: {kind: ConfigMap}\n", "bad.yaml"),
])
def test_renderer_refuses_what_it_does_not_implement(k8s, tmp_path, text, message):
    directory = _kustomization(tmp_path / "k", text, {
        "cm.yaml": CONFIG_MAP,
        "p.yaml": "- {op: replace, path: /data/x, value: '2'}\n",
        "smp.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {x: '2'}\n",
        "bad.yaml": "- {op: replace, path: /data/missing/y, value: '2'}\n",
    })
    with pytest.raises(k8s.KustomizeError, match=message):
        k8s.build(directory)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(k8s, rendered, overlay):
    assert sorted(rendered[overlay], key=_key) == kubectl_kustomize(K8S / "overlays" / overlay)


@needs_kubectl
def test_images_rule_matches_kubectl_kustomize(k8s, tmp_path):
    """A site overlay that points the images at a registry, as docs/deploy.md shows."""
    site = tmp_path / "site"
    directory = _kustomization(site, (
        f"resources: [{os.path.relpath(K8S / 'overlays' / 'gpu', site)}]\n"
        "images:\n"
        "- {name: deepserve, newName: registry.example.com/ml/deepserve}\n"
    ))
    ours = sorted(k8s.build(directory), key=_key)
    assert ours == kubectl_kustomize(directory)
    text = k8s.render(directory)
    assert "image: registry.example.com/ml/deepserve:0.1.0\n" in text
    assert "image: registry.example.com/ml/deepserve:0.1.0-gpu\n" in text
    assert "image: deepserve:" not in text


def test_render_is_yaml_of_the_objects(k8s, rendered):
    docs = [d for d in yaml.safe_load_all(k8s.render(K8S / "overlays" / "gpu")) if d]
    assert docs == rendered["gpu"]
    assert "serveConfigV2: |" in k8s.render(K8S / "overlays" / "cpu")  # readable, not one escaped line
