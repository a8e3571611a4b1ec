"""The admission front: nginx on the gRPC port, in front of a gateway's worker processes.

A grpc.aio server cannot refuse faster than its event loop turns: under four times its
capacity, calls pile up in gRPC core's queue, where no Python code sees them, and end
``CANCELLED`` or ``DEADLINE_EXCEEDED`` seconds later (docs/reliability.md, "Overload:
findings"). With ``admission_front`` on, nginx (C, event-driven) holds the port instead and
forwards each call to a worker over a unix socket, with a bound on the calls each gRPC method
group has in flight behind it. A call beyond the bound is answered at once, in nginx, with
``RESOURCE_EXHAUSTED`` and the ``grpc-retry-pushback-ms`` hint, before any worker sees it;
the workers' own admission (rows in flight, each model's ``max_queued``, the loop-lag bound)
still decides about the calls that pass.

The front also carries what the workers' gRPC server did on the port: TLS and mutual TLS
(the same settings), the connection age (``keepalive_time``), the message limit, the
health-only port. Draining is the workers' (new calls get UNAVAILABLE, the ones in flight
finish), the front closing the port after them. Tokens are checked by the workers, as before:
nginx forwards every header.

Every refusal is written, one line with its gRPC path, to a log the replica reads once a
second (:meth:`Front.refusals`) into ``deepserve_front_refused_total``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("deepserve")

# The gRPC paths each bound covers. Every group has a bound of its own, so that a flood of one
# (say generation calls, which take seconds) cannot take the others' places; health checks
# have none: a probe must get through an overload.
GROUPS: dict[str, tuple[str, ...]] = {
    "infer": ("/inference.GRPCInferenceService/ModelInfer",),
    "score": ("/deepserve.v1.FraudScoring/",),
    "classify": ("/deepserve.v1.Classifier/",),
    "generate": ("/deepserve.v1.Generator/",),
    "recommend": ("/deepserve.v1.Recommender/",),
}
UNBOUNDED = ("/grpc.health.v1.Health/",)
PUSHBACK_MS = 50  # the retry hint of a refusal: the workers' shortest (Admission.retry_after_s: 50 ms to 1 s)
REFUSED_LOG = "front-refused.log"  # in the workdir: one line (the gRPC path) per refusal, read by Front.refusals
START_S = 10.0


@dataclass(frozen=True)
class FrontConfig:
    """What the front needs to know, from the settings and the replica."""

    host: str
    port: int
    upstreams: tuple[str, ...]  # unix socket paths of the workers
    workdir: str
    in_flight: int  # per group, for the whole gateway
    max_message_bytes: int
    connection_age_s: float
    timeout_s: float  # the longest a call may take (default_timeout_s): nginx's upstream timeouts
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    health_port: int | None = None
    health_upstreams: tuple[str, ...] = ()  # the workers' health-only sockets (with health_port)

    @classmethod
    def from_settings(cls, settings, port: int, workdir: str, sockets: list[str], health_port: int | None,
                      health_sockets: list[str]) -> "FrontConfig":
        """The front of a gateway whose workers listen on ``sockets`` (``front_in_flight`` each)."""
        return cls(host=settings.grpc_host, port=port, upstreams=tuple(sockets), workdir=workdir,
                   in_flight=settings.front_in_flight * len(sockets), max_message_bytes=settings.max_message_bytes,
                   connection_age_s=settings.max_connection_age_s, timeout_s=settings.default_timeout_s,
                   tls_cert_file=settings.tls_cert_file, tls_key_file=settings.tls_key_file,
                   tls_client_ca_file=settings.tls_client_ca_file, health_port=health_port,
                   health_upstreams=tuple(health_sockets))

    def render(self) -> str:
        """The nginx configuration."""
        listen_opts = " ssl" if self.tls_cert_file else ""
        tls = ""
        if self.tls_cert_file:
            tls = (f"        ssl_certificate {self.tls_cert_file};\n"
                   f"        ssl_certificate_key {self.tls_key_file};\n"
                   "        ssl_protocols TLSv1.2 TLSv1.3;\n")
            if self.tls_client_ca_file:
                tls += (f"        ssl_client_certificate {self.tls_client_ca_file};\n"
                        "        ssl_verify_client on;\n")
        zones = "".join(f"    limit_conn_zone $server_port zone={g}:1m;\n" for g in GROUPS)
        bounded = "".join(
            f"        location {path} {{\n"
            f"            limit_conn {group} {self.in_flight};\n"
            "            grpc_pass grpc://workers;\n"
            "        }\n" for group, paths in GROUPS.items() for path in paths)
        unbounded = "".join(f"        location {path} {{ grpc_pass grpc://workers; }}\n" for path in UNBOUNDED)
        errors = _status_location("@overloaded", 8, "the gateway is at its bound of calls in flight "
                                  "(admission_front); retry after the hinted delay", PUSHBACK_MS,
                                  f"access_log {self.workdir}/{REFUSED_LOG} refusal buffer=64k flush=1s;")
        errors += _status_location("@too_large", 8, f"the message is larger than the server's limit of "
                                   f"{self.max_message_bytes} bytes (max_message_bytes)")
        errors += _status_location("@unavailable", 14, "no gateway worker answered; retry shortly")
        errors += _status_location("@no_certificate", 16, "mutual TLS: the client sent no valid certificate")
        errors += _status_location("@bad_request", 3, "the admission front refused a malformed request "
                                   "(such as a repeated authorization header)")
        health = ""
        if self.health_port is not None:
            health = (
                "    upstream health {\n"
                + "".join(f"        server unix:{path};\n" for path in self.health_upstreams) +
                "    }\n"
                "    server {\n"
                f"        listen {_listen(self.host, self.health_port)} http2;\n"
                + "".join(f"        location {path} {{ grpc_pass grpc://health; }}\n" for path in UNBOUNDED) +
                _status_location("/", 12, "only grpc.health.v1 is served on this port") +
                "    }\n")
        # One process, no master: it dies with the replica (PR_SET_PDEATHSIG, see _launcher),
        # which a master's workers would not (they outlive a killed master, holding the port).
        # It runs as the replica's user, who owns the workers' sockets.
        return (
            "daemon off;\n"
            "master_process off;\n"
            f"pid {self.workdir}/front.pid;\n"
            "error_log stderr warn;\n"
            "events { worker_connections 8192; }\n"
            "http {\n"
            "    access_log off;\n"
            # Its files in the replica's directory: nginx may run as a user that cannot write
            # the package's own (/var/lib/nginx).
            + "".join(f"    {kind}_temp_path {self.workdir}/front-{kind};\n"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")) +
            "    log_format refusal '$uri';\n"
            "    limit_conn_status 429;\n"
            "    limit_conn_log_level info;\n"
            f"    client_max_body_size {self.max_message_bytes + 5};\n"  # + the gRPC frame header
            "    client_body_buffer_size 1m;\n"
            "    keepalive_requests 4294967295;\n"
            "    keepalive_timeout 300s;\n"
            f"    keepalive_time {max(int(self.connection_age_s), 1)}s;\n"
            "    http2_max_concurrent_streams 1024;\n"
            f"    grpc_read_timeout {int(self.timeout_s) + 5}s;\n"
            f"    grpc_send_timeout {int(self.timeout_s) + 5}s;\n"
            "    grpc_buffer_size 64k;\n"
            f"{zones}"
            "    upstream workers {\n"
            + "".join(f"        server unix:{path};\n" for path in self.upstreams) +
            "        keepalive 64;\n"
            "        keepalive_requests 4294967295;\n"
            "        keepalive_timeout 300s;\n"
            "    }\n"
            "    server {\n"
            f"        listen {_listen(self.host, self.port)}{listen_opts} http2;\n"
            f"{tls}"
            "        error_page 429 = @overloaded;\n"
            "        error_page 413 = @too_large;\n"
            "        error_page 502 503 504 = @unavailable;\n"
            "        error_page 495 496 = @no_certificate;\n"
            "        error_page 400 = @bad_request;\n"
            f"{bounded}{unbounded}"
            "        location / { grpc_pass grpc://workers; }\n"
            f"{errors}"
            "    }\n"
            f"{health}"
            "}\n")


def _listen(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _status_location(location: str, code: int, message: str, pushback_ms: int | None = None,
                     extra: str = "") -> str:
    """A location (``@name`` for an error page, or a path) answering a gRPC status in headers
    alone (a trailers-only response)."""
    hint = f"            add_header grpc-retry-pushback-ms {pushback_ms} always;\n" if pushback_ms else ""
    return (f"        location {location} {{\n"
            + (f"            {extra}\n" if extra else "") +
            "            default_type application/grpc;\n"
            f"            add_header grpc-status {code} always;\n"
            f"            add_header grpc-message \"{message}\" always;\n"
            f"{hint}"
            "            return 204;\n"
            "        }\n")


def find_binary(name: str) -> str:
    """The nginx executable: ``name`` on PATH, or in /usr/sbin (Debian's nginx-light)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError(f"admission_front is on but {name!r} (front_binary, DEEPSERVE_FRONT_BINARY) was not "
                           "found: install nginx (Debian: apt-get install nginx-light) or turn admission_front off")
    return found


class Front:
    """The nginx process (one: no master, see :meth:`FrontConfig.render`) serving the gateway's port."""

    def __init__(self, config: FrontConfig, binary: str):
        self.config = config
        self.binary = binary
        self.path = Path(config.workdir) / "front.conf"
        self.path.write_text(config.render())
        self.refused_log = Path(config.workdir) / REFUSED_LOG
        self._read = 0  # bytes of the refusal log already counted
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.down_since: float | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> None:
        """Have nginx test the configuration (certificate files included); raises with its words."""
        done = subprocess.run([self.binary, "-t", "-q", "-c", str(self.path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"admission front: nginx refused its configuration: {done.stderr.strip()}")

    async def start(self, timeout: float = START_S) -> None:
        """Start nginx and wait until the port takes connections; raises with nginx's reason
        (a port held by another process, most often) if it exits first."""
        _raise_open_files(2 * 8192)  # a client and an upstream connection per call; nginx inherits it
        self.process = subprocess.Popen([*_launcher(), self.binary, "-c", str(self.path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                reason = self.process.stderr.read().strip().splitlines()
                raise RuntimeError(f"admission front (nginx) exited with code {self.process.returncode}: "
                                   f"{reason[-1] if reason else 'no reason given'}")
            if _accepts(self.config.host, self.config.port):
                self.down_since = None
                asyncio.get_running_loop().run_in_executor(None, _forward, self.process)
                return
            await asyncio.sleep(0.02)
        self.kill()
        raise RuntimeError(f"admission front (nginx) did not listen on port {self.config.port} within {timeout:g} s")

    def refusals(self) -> dict[str, int]:
        """Calls refused since the last call, by gRPC method (the last part of the path)."""
        try:
            with open(self.refused_log, "rb") as f:
                f.seek(self._read)
                data = f.read()
        except FileNotFoundError:
            return {}
        end = data.rfind(b"\n") + 1  # a line nginx is still writing waits for the next read
        self._read += end
        # Keep the file small: nginx appends (O_APPEND) after the cut; the few lines written
        # between this read and the cut, once every 64 MiB of refusals, go uncounted.
        if self._read > 64 << 20:
            os.truncate(self.refused_log, 0)
            self._read = 0
        return dict(collections.Counter(line.rsplit("/", 1)[-1] for line in data[:end].decode().splitlines()))

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """Close the port. The replica calls it once its workers have drained: while they drain,
        the front carries their answers to the calls in flight, and new calls get UNAVAILABLE
        from the workers' closed sockets, as from a draining gateway without a front."""
        if self.alive:
            self.process.terminate()
            try:
                self.process.wait(2.0)
            except subprocess.TimeoutExpired:
                self.kill()


def _raise_open_files(wanted: int) -> None:
    """Raise this process's soft limit on open files towards ``wanted`` (within the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _launcher() -> list[str]:
    """What nginx is started through (each execs the next, keeping the process): ``setpriv
    --pdeathsig KILL``, so that the kernel kills it when the replica dies, however it dies; and,
    where allowed (root), ``nice -n -5``, so that it runs ahead of the workers: a refusal must
    stay fast while they keep every core busy. (Not a ``preexec_fn``: forking a process whose
    gRPC threads are running, to run Python in the child, can deadlock.)"""
    launcher = []
    setpriv = shutil.which("setpriv")
    if setpriv:
        launcher += [setpriv, "--pdeathsig", "KILL"]
    else:
        log.warning("admission front: setpriv (util-linux) not found: nginx will outlive a replica that is killed")
    if os.geteuid() == 0 and shutil.which("nice"):
        launcher += [shutil.which("nice"), "-n", "-5"]
    return launcher


def _accepts(host: str, port: int) -> bool:
    address = host.strip("[]")
    if address in ("0.0.0.0", ""):
        address = "127.0.0.1"
    elif address == "::":
        address = "::1"
    try:
        with socket.create_connection((address, port), timeout=0.2):
            return True
    except OSError:
        return False


def _forward(process: subprocess.Popen) -> None:
    """nginx's error log (stderr) into the replica's log, line by line, until it exits."""
    for line in process.stderr:
        log.warning("admission front: %s", line.rstrip())
