"""Transport security for the gRPC port: TLS or mutual TLS, bearer tokens, groups.

Every secret comes from a file (a Kubernetes Secret mounted as a volume): the settings name
paths, never values, so no certificate key or token travels in the Serve config, the app's
arguments or an environment variable. docs/security.md has the threat model and the setup.

- **TLS** (``tls_cert_file`` + ``tls_key_file``); **mutual TLS** when ``tls_client_ca_file`` is
  set too: clients must present a certificate signed by that CA.
- **Bearer tokens** (``auth_tokens_file``): every call but the health checks carries
  ``authorization: Bearer <token>``; a token grants one or more groups (Triton's "restricted
  protocols", in spirit), and each RPC belongs to exactly one group (:data:`METHOD_GROUPS`).
  No token, or an unknown one: UNAUTHENTICATED. A known token without the RPC's group:
  PERMISSION_DENIED. Checked by :class:`TokenAuthInterceptor` before any servicer runs.

The tokens file holds one token per line, then its groups, comma-separated::

    # token                                     groups
    9c1f0d4e6b0a4f3e8d2c7b6a5f4e3d2c1b0a9f8e  inference
    3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d  inference,metadata,models

Blank lines and ``#`` comments are ignored. Only SHA-256 digests of the tokens are kept in
memory, and a presented token is compared with every known one (constant time, no early
exit). The file is read again when it changes (a rotated Secret), at most every few seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- groups

INFERENCE, METADATA, MODELS = "inference", "metadata", "models"
GROUPS = (INFERENCE, METADATA, MODELS)

_OIP = "/inference.GRPCInferenceService/"
_V1 = "/deepserve.v1."

# Every RPC the server answers, full method name -> the one group allowed to call it. A served
# method missing here is refused to every token (tests/security checks that none is missing).
METHOD_GROUPS: dict[str, str] = {
    # Inference: runs a model.
    _OIP + "ModelInfer": INFERENCE,
    _V1 + "FraudScoring/Score": INFERENCE,
    _V1 + "Classifier/Classify": INFERENCE,
    _V1 + "Generator/Generate": INFERENCE,
    _V1 + "Generator/GenerateStream": INFERENCE,
    _V1 + "Recommender/Recommend": INFERENCE,
    # Metadata: what is served and how it is doing (reflection too, when enabled).
    _OIP + "ServerLive": METADATA,
    _OIP + "ServerReady": METADATA,
    _OIP + "ModelReady": METADATA,
    _OIP + "ServerMetadata": METADATA,
    _OIP + "ModelMetadata": METADATA,
    _OIP + "ModelConfig": METADATA,
    _OIP + "ModelStatistics": METADATA,
    _OIP + "RepositoryIndex": METADATA,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": METADATA,
    "/grpc.health.v1.Health/List": METADATA,  # every model's status by name: not what a probe asks
    # Models: the repository's inventory (versions, digests, providers, batching figures).
    _V1 + "Models/ListModels": MODELS,
}

# Open to every caller: Kubernetes' gRPC probes and load balancers send no token.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case
MIN_TOKEN_CHARS = 16


class SecurityConfigError(ValueError):
    """A TLS or token setting that cannot be used; the message names the setting and path."""


# ---------------------------------------------------------------------------- files


def _setting(name: str) -> str:
    """How a setting is named in messages: its Serve config key and its variable."""
    return f"{name} (DEEPSERVE_{name.upper()})"


def _read(name: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{_setting(name)} = {path}: cannot read it: {exc.strerror or exc}") from None
    if not data.strip():
        raise SecurityConfigError(f"{_setting(name)} = {path}: the file is empty")
    return data


def _pem(name: str, path: str, marker: bytes) -> bytes:
    data = _read(name, path)
    if b"-----BEGIN " not in data or marker not in data:
        raise SecurityConfigError(f"{_setting(name)} = {path}: not a PEM file with a {marker.decode()}")
    return data


def _encrypted_key() -> bytes:
    raise SecurityConfigError("encrypted")


def server_credentials(settings: Any) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' files; None when TLS is off.

    The certificate and key are checked to belong together now (with Python's ssl module), so
    a wrong pair fails the gateway at start rather than every client's handshake later.

    Args:
        settings: a :class:`~deepserve.settings.Settings`.

    Raises:
        SecurityConfigError: a file is missing, unreadable, not PEM, or the key does not match
            the certificate; the message names the setting and the path.
    """
    if not settings.tls_cert_file:
        return None
    cert = _pem("tls_cert_file", settings.tls_cert_file, b"CERTIFICATE")
    key = _pem("tls_key_file", settings.tls_key_file, b"PRIVATE KEY")
    try:
        ssl.create_default_context().load_cert_chain(settings.tls_cert_file, settings.tls_key_file,
                                                     password=_encrypted_key)
    except SecurityConfigError:
        raise SecurityConfigError(f"{_setting('tls_key_file')} = {settings.tls_key_file}: the key is "
                                  "encrypted; give it unencrypted (the Secret protects it)") from None
    except ssl.SSLError as exc:
        raise SecurityConfigError(
            f"{_setting('tls_cert_file')} = {settings.tls_cert_file} and {_setting('tls_key_file')} = "
            f"{settings.tls_key_file} do not form a certificate and its key: {exc.reason or exc}") from None
    client_ca = None
    if settings.tls_client_ca_file:
        client_ca = _pem("tls_client_ca_file", settings.tls_client_ca_file, b"CERTIFICATE")
        try:
            ssl.create_default_context().load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise SecurityConfigError(f"{_setting('tls_client_ca_file')} = {settings.tls_client_ca_file}: "
                                      f"not a CA certificate bundle: {exc.reason or exc}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


# ---------------------------------------------------------------------------- tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def parse_tokens(text: str, source: str = "tokens file") -> list[tuple[bytes, frozenset[str]]]:
    """The ``(sha256 of token, groups)`` pairs of a tokens file. Messages name lines, never tokens.

    Raises:
        SecurityConfigError: a malformed line, an unknown group, a short or repeated token,
            or no token at all.
    """
    entries: list[tuple[bytes, frozenset[str]]] = []
    seen: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise SecurityConfigError(f"{source}, line {number}: expected 'TOKEN GROUP[,GROUP...]'")
        token, groups = fields[0], frozenset(g.strip() for g in fields[1].split(",") if g.strip())
        if len(token) < MIN_TOKEN_CHARS:
            raise SecurityConfigError(f"{source}, line {number}: the token is shorter than {MIN_TOKEN_CHARS} "
                                      "characters (make one with `openssl rand -hex 32`)")
        if not token.isascii() or not token.isprintable():
            raise SecurityConfigError(f"{source}, line {number}: a token is printable ASCII")
        unknown = sorted(groups - set(GROUPS))
        if unknown or not groups:
            raise SecurityConfigError(f"{source}, line {number}: groups must be among {list(GROUPS)}, "
                                      f"got {unknown or 'none'}")
        digest = _digest(token)
        if digest in seen:
            raise SecurityConfigError(f"{source}, line {number}: the same token as line {seen[digest]}")
        seen[digest] = number
        entries.append((digest, groups))
    if not entries:
        raise SecurityConfigError(f"{source}: no tokens")
    return entries


class TokenTable:
    """The known tokens (as digests) and their groups, read from a file and re-read when it changes.

    Args:
        path: the tokens file.
        reload_s: how often, at most, the file is checked for a change (a rotated Secret).
    """

    def __init__(self, path: str, reload_s: float = 5.0):
        self.path = path
        self.reload_s = reload_s
        self._source = f"{_setting('auth_tokens_file')} = {path}"
        self._entries = parse_tokens(_read("auth_tokens_file", path).decode("utf-8", "replace"), self._source)
        self._stamp = self._file_stamp()
        self._next_check = time.monotonic() + reload_s

    def __len__(self) -> int:
        return len(self._entries)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows the symlinks a Secret volume swaps on update
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.reload_s
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            entries = parse_tokens(_read("auth_tokens_file", self.path).decode("utf-8", "replace"), self._source)
        except SecurityConfigError as exc:
            log.error("tokens not reloaded, the previous ones stay in force: %s", exc)
            return
        self._entries = entries
        log.warning("tokens reloaded from %s: %d token(s)", self.path, len(entries))

    def groups(self, token: str) -> frozenset[str] | None:
        """The groups of ``token``; None for an unknown token.

        Compares the token's digest with every known digest, without stopping at a match: the
        time taken does not depend on which token, or how much of one, was guessed.
        """
        self._maybe_reload()
        digest = _digest(token)
        found = None
        for known, groups in self._entries:
            if hmac.compare_digest(digest, known):
                found = groups
        return found


def bearer_token(metadata) -> str | None:
    """The token of the call's single ``authorization: Bearer <token>`` header; None if absent
    or malformed (two headers, another scheme, an empty token)."""
    values = [value for key, value in metadata or () if key == AUTHORIZATION]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


# ---------------------------------------------------------------------------- interceptor


class _RefusalLog:
    """Logs refusals (method, peer, outcome; never the token) at most once per ``interval_s``,
    with a count of those left out: a flood of bad calls must not flood the log."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self._last = -float("inf")
        self._left_out = 0

    def __call__(self, method: str, peer: str, outcome: str) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._left_out += 1
            return
        more = f" ({self._left_out} more refused since the last line)" if self._left_out else ""
        log.warning("refused %s from %s: %s%s", method, peer, outcome, more)
        self._last, self._left_out = now, 0


def _refusal(handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, message: str,
             record: _RefusalLog) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only refuses. The request is not parsed:
    an unauthenticated caller's bytes never reach a protobuf decoder or a servicer."""

    async def refuse(request_or_iterator, context):
        record(method, context.peer(), code.name)
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when its bearer token's groups include the method's group
    (:data:`METHOD_GROUPS`); health checks (:data:`OPEN_METHODS`) always pass.

    Args:
        tokens: the known tokens.
        log_interval_s: at most one refusal line per this many seconds.
    """

    def __init__(self, tokens: TokenTable, log_interval_s: float = 1.0):
        self.tokens = tokens
        self.record = _RefusalLog(log_interval_s)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in OPEN_METHODS:
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            code, message = grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required (authorization: Bearer <token>)"
        else:
            groups = self.tokens.groups(token)
            group = METHOD_GROUPS.get(method)
            if groups is None:
                code, message = grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
            elif group is not None and group in groups:
                return await continuation(handler_call_details)
            elif group is None:
                code, message = grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to any group"
            else:
                code, message = grpc.StatusCode.PERMISSION_DENIED, f"the token's groups do not include '{group}'"
        handler = await continuation(handler_call_details)
        if handler is None:  # not a served method: UNIMPLEMENTED, as without the interceptor
            return None
        if METHOD_GROUPS.get(method) is None and token is not None:
            log.error("%s is served but belongs to no group: refused to every token", method)
        return _refusal(handler, method, code, message, self.record)


# ---------------------------------------------------------------------------- the server's part


@dataclass(frozen=True)
class ServerSecurity:
    """What the gRPC server needs: its port's credentials and its interceptors.

    The default is today's plaintext server without authentication.
    """

    credentials: grpc.ServerCredentials | None = None
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = field(default=())
    summary: str = "plaintext, no authentication"

    @classmethod
    def from_settings(cls, settings: Any) -> "ServerSecurity":
        """Read and check every file the settings name.

        Raises:
            SecurityConfigError: a file cannot be used; the message names the setting and path.
        """
        credentials = server_credentials(settings)
        interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
        parts = ["plaintext" if credentials is None else
                 "mutual TLS" if settings.tls_client_ca_file else "TLS"]
        if settings.auth_tokens_file:
            tokens = TokenTable(settings.auth_tokens_file)
            interceptors = (TokenAuthInterceptor(tokens),)
            parts.append(f"bearer tokens ({len(tokens)})")
        else:
            parts.append("no authentication")
        return cls(credentials, interceptors, ", ".join(parts))
