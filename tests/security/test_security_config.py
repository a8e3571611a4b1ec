"""The security configuration without a server: every RPC in a group, the tokens file, the
settings' files checked at start (messages name the setting and path), the refusal log, and
the command line's options."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from types import SimpleNamespace

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from pydantic import ValidationError

from deepserve import cli, security
from deepserve.grpc_server import SERVICE_NAMES, _reflection_pool
from deepserve.security import (
    GROUPS,
    METHOD_GROUPS,
    OPEN_METHODS,
    SecurityConfigError,
    ServerSecurity,
    TokenAuthInterceptor,
    TokenTable,
    bearer_token,
    parse_tokens,
)
from deepserve.settings import Settings
from pki import make_material

pytestmark = pytest.mark.timeout(30)

TOKEN = "a" * 32
OTHER = "b" * 32


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_material(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------------------- groups


def _served_methods() -> set[str]:
    """Every method of every service the server registers, from the protos themselves."""
    pool = _reflection_pool()
    services = [pool.FindServiceByName(name) for name in (*SERVICE_NAMES, "grpc.health.v1.Health")]
    services.append(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])
    return {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}


def test_every_served_rpc_is_in_exactly_one_group_or_open_to_probes():
    served = _served_methods()
    assert served == set(METHOD_GROUPS) | OPEN_METHODS, served ^ (set(METHOD_GROUPS) | OPEN_METHODS)
    assert not set(METHOD_GROUPS) & OPEN_METHODS
    assert set(METHOD_GROUPS.values()) == set(GROUPS)
    assert OPEN_METHODS == {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}


def _intercept(interceptor, method: str, metadata=()):
    async def continuation(details):
        return grpc.unary_unary_rpc_method_handler(lambda request, context: "served")

    details = SimpleNamespace(method=method, invocation_metadata=metadata)
    return asyncio.run(interceptor.intercept_service(continuation, details))


def test_a_served_method_outside_every_group_is_refused_to_every_token(tmp_path, caplog):
    """Fail closed: an RPC added without a group is refused, and the log says so."""
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN} inference,metadata,models\n")
    interceptor = TokenAuthInterceptor(TokenTable(str(path)))
    allowed = _intercept(interceptor, "/deepserve.v1.FraudScoring/Score", (("authorization", f"Bearer {TOKEN}"),))
    assert allowed.unary_unary(None, None) == "served"
    with caplog.at_level(logging.ERROR, logger="deepserve.security"):
        refused = _intercept(interceptor, "/deepserve.v1.New/Thing", (("authorization", f"Bearer {TOKEN}"),))
    assert refused.unary_unary.__name__ == "refuse" and "belongs to no group" in caplog.text
    assert TOKEN not in caplog.text


# ---------------------------------------------------------------------------- tokens


def test_a_tokens_file_maps_tokens_to_groups():
    text = f"# comment\n\n{TOKEN}  inference # trailing comment\n{OTHER} metadata,models\n"
    entries = parse_tokens(text)
    assert [groups for _, groups in entries] == [{"inference"}, {"metadata", "models"}]
    assert all(len(digest) == 32 for digest, _ in entries)  # sha256 digests, not the tokens


@pytest.mark.parametrize("text, message", [
    (f"{TOKEN}\n", "line 1: expected 'TOKEN GROUP"),
    (f"{TOKEN} inference extra\n", "line 1: expected"),
    ("tiny0123 inference\n", "line 1: the token is shorter than 16"),
    (f"{TOKEN} inference,admin\n", "line 1: groups must be among ['inference', 'metadata', 'models'], got ['admin']"),
    (f"{TOKEN} inference\n{TOKEN} metadata\n", "line 2: the same token as line 1"),
    ("# nothing\n\n", "no tokens"),
])
def test_a_bad_tokens_file_is_refused_by_line_never_showing_a_token(text, message):
    with pytest.raises(SecurityConfigError) as refused:
        parse_tokens(text, "tokens")
    assert message in str(refused.value)
    assert TOKEN not in str(refused.value) and "tiny0123" not in str(refused.value)


def test_a_token_is_known_whole_or_not_at_all(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN} inference\n{OTHER} metadata,models\n")
    table = TokenTable(str(path))
    assert table.groups(TOKEN) == {"inference"} and table.groups(OTHER) == {"metadata", "models"}
    for guess in (TOKEN[:-1], TOKEN + "a", "", TOKEN.upper()):
        assert table.groups(guess) is None


def test_a_changed_tokens_file_is_read_again_and_a_broken_one_ignored(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN} inference\n")
    table = TokenTable(str(path), reload_s=0.0)
    path.write_text(f"{OTHER} inference,metadata\n")  # a rotated Secret
    assert table.groups(TOKEN) is None and table.groups(OTHER) == {"inference", "metadata"}
    with caplog.at_level(logging.ERROR, logger="deepserve.security"):
        path.write_text(f"{TOKEN} nonsense\n")
        assert table.groups(OTHER) == {"inference", "metadata"}  # the previous tokens stay
    assert "not reloaded" in caplog.text and TOKEN not in caplog.text


@pytest.mark.parametrize("metadata, token", [
    ((("authorization", f"Bearer {TOKEN}"),), TOKEN),
    ((("authorization", f"bearer  {TOKEN} "),), TOKEN),
    ((("other", "x"), ("authorization", f"Bearer {TOKEN}")), TOKEN),
    ((), None),
    ((("authorization", f"Basic {TOKEN}"),), None),
    ((("authorization", "Bearer "),), None),
    ((("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {OTHER}")), None),
])
def test_bearer_token(metadata, token):
    assert bearer_token(metadata) == token


def test_refusals_are_logged_at_most_once_per_interval(monkeypatch, caplog):
    now = [100.0]
    monkeypatch.setattr(security.time, "monotonic", lambda: now[0])
    record = security._RefusalLog(interval_s=1.0)
    with caplog.at_level(logging.WARNING, logger="deepserve.security"):
        for _ in range(5):
            record("/inference.GRPCInferenceService/ModelInfer", "ipv4:10.0.0.1:5000", "UNAUTHENTICATED")
        now[0] += 1.5
        record("/inference.GRPCInferenceService/ModelInfer", "ipv4:10.0.0.1:5000", "UNAUTHENTICATED")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused /inference.GRPCInferenceService/ModelInfer from ipv4:10.0.0.1:5000: UNAUTHENTICATED",
        "refused /inference.GRPCInferenceService/ModelInfer from ipv4:10.0.0.1:5000: UNAUTHENTICATED "
        "(4 more refused since the last line)",
    ]


# ---------------------------------------------------------------------------- settings and files


def _settings(material, **changes) -> Settings:
    values = dict(tls_cert_file=str(material.server_cert), tls_key_file=str(material.server_key),
                  tls_client_ca_file=str(material.ca), auth_tokens_file=str(material.tokens))
    return Settings(**{**values, **changes})


def test_the_settings_turn_each_layer_on(material):
    assert ServerSecurity.from_settings(Settings()).summary == "plaintext, no authentication"
    assert ServerSecurity.from_settings(Settings()).interceptors == ()
    full = ServerSecurity.from_settings(_settings(material))
    assert full.summary == "mutual TLS, bearer tokens (3)" and full.credentials is not None
    assert ServerSecurity.from_settings(_settings(material, tls_client_ca_file="", auth_tokens_file="")).summary \
        == "TLS, no authentication"
    assert Settings().reflection is False


@pytest.mark.parametrize("setting", ["tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file"])
def test_a_missing_or_unreadable_file_fails_at_start_naming_setting_and_path(material, tmp_path, setting):
    for path in (tmp_path / "absent.pem", tmp_path):  # no such file; a directory
        with pytest.raises(SecurityConfigError) as refused:
            ServerSecurity.from_settings(_settings(material, **{setting: str(path)}))
        assert f"{setting} (DEEPSERVE_{setting.upper()}) = {path}: cannot read it" in str(refused.value)


def test_a_certificate_and_a_key_that_do_not_belong_together_fail_at_start(material):
    with pytest.raises(SecurityConfigError, match="do not form a certificate and its key"):
        ServerSecurity.from_settings(_settings(material, tls_key_file=str(material.client_key)))
    with pytest.raises(SecurityConfigError, match="tls_cert_file .* not a PEM file with a CERTIFICATE"):
        ServerSecurity.from_settings(_settings(material, tls_cert_file=str(material.tokens)))


def test_tls_settings_that_only_make_sense_together(material):
    with pytest.raises(ValidationError, match="tls_cert_file .* and tls_key_file .* go together"):
        Settings(tls_cert_file=str(material.server_cert))
    with pytest.raises(ValidationError, match="tls_client_ca_file .* needs tls_cert_file"):
        Settings(tls_client_ca_file=str(material.ca))


# ---------------------------------------------------------------------------- command line


def test_the_commands_take_the_tls_and_token_options(monkeypatch, tmp_path):
    args = cli.parser().parse_args(["serve", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca",
                                    "ca.pem", "--auth-tokens-file", "tokens", "--reflection", "--health-port", "9001"])
    for option, setting in cli.SERVE_SECURITY_OPTIONS.items():
        assert getattr(args, option) is not None and setting in Settings.model_fields
    assert args.reflection and args.health_port == 9001
    monkeypatch.setenv("DEEPSERVE_TOKEN", TOKEN)
    for command in (["score", "x.csv"], ["classify", "--digit", "1"], ["generate"], ["recommend", "--user", "1"]):
        args = cli.parser().parse_args([*command, "--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
        assert args.token == TOKEN and str(args.tls_ca) == "ca.pem" and not args.tls


def test_serve_refuses_a_missing_certificate_before_starting_ray(repository, tmp_path):
    missing = tmp_path / "server.pem"
    done = subprocess.run(
        [sys.executable, "-m", "deepserve.cli", "serve", "--repo", str(repository.root), "--models",
         "fraud-autoencoder", "--tls-cert", str(missing), "--tls-key", str(missing)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"tls_cert_file (DEEPSERVE_TLS_CERT_FILE) = {missing}: cannot read it" in done.stderr
