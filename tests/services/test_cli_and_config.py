"""The CLI against the running service, and the Serve config as shipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from deepserve.app import build_app
from deepserve.models import fraud

PROJECT = Path(__file__).resolve().parents[2]
CONFIG = PROJECT / "deploy" / "serve_config.yaml"


def _cli(*args):
    done = subprocess.run([sys.executable, "-m", "deepserve.cli", *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_classify_command(server):
    out = _cli("classify", "--digit", "3", "--target", server)
    assert out.startswith("sklearn digit") and ": 3 (" in out and "digit-classifier v1" in out


def test_score_command(server, tmp_path):
    x, label, _ = fraud.generate_transactions(0, fraud.SyntheticConfig(n_rows=2000))
    rows = list(range(5)) + [int(i) for i in (label == 1).nonzero()[0][:3]]
    path = tmp_path / "transactions.csv"
    fraud.write_csv(path, x[rows], label[rows])
    out = _cli("score", str(path), "--target", server)
    lines = out.splitlines()
    assert lines[0].startswith("fraud-autoencoder v1: 8 transaction(s)")
    assert len(lines) == 9 and all("score" in line and "top:" in line for line in lines[1:])
    assert sum("FRAUD" in line for line in lines[-3:]) >= 2  # the fraud rows, mostly


def test_shipped_serve_config_is_valid_and_builds(repository):
    config = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` would check
    app_config = config["applications"][0]
    assert app_config["import_path"] == "deepserve.app:build_app"
    args = {**app_config["args"], "repository": str(repository.root)}
    app = build_app(args, app_config["deployments"])
    assert app is not None


def test_generate_command_writes_pngs(server, tmp_path):
    out = _cli("generate", "--label", "7", "--count", "2", "--seed", "5", "--steps", "8", "--out", str(tmp_path),
               "--target", server)
    assert out.startswith("digit-diffusion v1: 2 image(s), seed 5, 8 step(s), sampler ddim")
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["digit-diffusion-seed5-0-label7.png", "digit-diffusion-seed5-1-label7.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)


def test_recommend_command_warm_and_cold(server):
    warm = _cli("recommend", "--user", "42", "-k", "3", "--target", server).splitlines()
    assert warm[0] == "graph-recommender v1: top 3 for user 42" and len(warm) == 4
    cold = _cli("recommend", "--neighbors", "3", "17", "256", "--target", server).splitlines()
    assert cold[0].endswith("for a new user (cold start from its neighbours)") and len(cold) == 11


def test_client_command_errors_are_one_line(server):
    done = subprocess.run([sys.executable, "-m", "deepserve.cli", "recommend", "--user", "1", "-k", "500",
                           "--target", server], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("deepserve recommend: INVALID_ARGUMENT: k: expected")
    assert "Traceback" not in done.stderr


def test_model_options_are_checked_at_deploy_time(repository):
    import pytest

    def build(models=None, **args):
        return build_app({"repository": str(repository.root), "models": models or {"digit-diffusion": {}}, **args})

    for bad, message in [
        ({"intra_op_threads": 0}, "models.digit-diffusion.intra_op_threads: Input should be greater than or equal to 1 (got 0)"),
        ({"placement": "gpu"}, "models.digit-diffusion.placement: Input should be 'gateway' or 'deployment' (got 'gpu')"),
        ({"speed": "fast"}, "models.digit-diffusion.speed: unknown option (got 'fast')"),
        ({"batching": {"max_batch_size": 0}}, "models.digit-diffusion.batching.max_batch_size: Input should be greater"),
        ({"batching": {"max_queued": -1}}, "models.digit-diffusion.batching.max_queued: Input should be greater"),
        ({"batching": {"max_batch": 8}}, "models.digit-diffusion.batching.max_batch: unknown option"),
        ({"batching": {"max_wait_s": "soon"}}, "models.digit-diffusion.batching.max_wait_s: Input should be a valid number"),
        ({"sha256": "abc"}, "models.digit-diffusion.sha256: a sha256 digest is 64 lowercase hex digits"),
        ({"sha256": {"v1": "0" * 64}}, "models.digit-diffusion.sha256: pinned versions are integers"),
        ({"versions": {"latest": 0}}, "models.digit-diffusion.versions.latest: Input should be greater than or equal to 1"),
        ({"versions": {"latest": 2, "all": True}}, "models.digit-diffusion.versions: choose one of latest, specific, all"),
        ({"versions": {"newest": 2}}, "models.digit-diffusion.versions.newest: unknown option"),
        ({"versions": {"specific": [99]}}, "models.digit-diffusion: versions [99] are not in the repository"),
        ({"route": {"default": 99}}, "models.digit-diffusion: the route names version(s) ['99']"),
        ({"route": {"canary": {"version": 1, "weight": 1.5}}}, "models.digit-diffusion.route.canary.weight: Input should be less than 1"),
        ({"route": {"default": 1, "shadow": {"version": 1}}}, "models.digit-diffusion.route: the shadow is the default version"),
    ]:
        with pytest.raises(ValueError) as failed:
            build({"digit-diffusion": bad})
        assert str(failed.value).startswith("invalid Serve config: " + message), str(failed.value)
    with pytest.raises(ValueError, match=r"args\.grpc_prot: unknown option"):
        build(grpc_prot=9000)
    with pytest.raises(ValueError, match=r"args\.max_rows_per_request: Input should be greater than or equal to 1"):
        build(max_rows_per_request=0)


def test_a_pinned_digest_refuses_a_swapped_model(repository):
    """A manifest and file rewritten together pass the sha256 check; a digest pinned in the
    Serve config does not."""
    import pytest

    from deepserve.errors import ModelIntegrityError

    actual = repository.get("fraud-autoencoder").manifest.sha256
    assert build_app({"repository": str(repository.root), "models": {"fraud-autoencoder": {"sha256": actual}}})
    with pytest.raises(ModelIntegrityError, match="the Serve config pins " + "0" * 64):
        build_app({"repository": str(repository.root), "models": {"fraud-autoencoder": {"sha256": "0" * 64}}})
    # Pinned per version: a version the mapping does not name is never loaded.
    version = repository.latest_version("fraud-autoencoder")
    pinned = {"repository": str(repository.root)}
    assert build_app({**pinned, "models": {"fraud-autoencoder": {"sha256": {version: actual}}}})
    with pytest.raises(ModelIntegrityError, match=f"version {version} is not pinned in the Serve config"):
        build_app({**pinned, "models": {"fraud-autoencoder": {"sha256": {str(int(version) + 1): actual}}}})


def test_a_closed_pipe_ends_the_listing_quietly(repository):
    """`deepserve models | head -1`: the reader leaves early; no traceback, the shell's status."""
    listing = subprocess.Popen([sys.executable, "-m", "deepserve.cli", "models", "--repo", str(repository.root)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    listing.stdout.close()  # the reader is gone before the first line
    _, err = listing.communicate(timeout=60)
    assert listing.returncode == 141, err.decode()[-2000:]
    assert err == b""
