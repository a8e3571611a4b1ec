"""A real multi-node Ray cluster on one machine: each node in its own network namespace.

Every node is a "host" with its own address on a private bridge: its own loopback, its own
port 9000 and 8080, its own raylet. The test process stays in the root namespace, with one
address on the bridge, and sends traffic only to the addresses assigned here. Killing a node
kills every process in its namespace (raylet, agents, replicas), which is what losing a
machine looks like to the rest of the cluster and to clients: connections reset, the GCS
stops hearing from the raylet.

Needs root and ``ip`` (iproute2); :func:`unavailable` says why not where it cannot run.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
RAY_PORT = 6379
GRPC_PORT = 9000
METRICS_PORT = 8080
# Node loss is noticed by the GCS's health checks of each raylet; Ray's defaults (every 3 s,
# 5 misses) leave a dead node's replicas in the routing tables for ~15 s. The same settings
# are in the Kubernetes manifests (docs/deploy.md: what they cost).
HEALTH_CHECK_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"dsprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _free_subnet() -> str:
    """A /24 in 10.231.0.0/16 that no route of this machine touches."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for third in range(os.getpid() % 200, 256):
        prefix = f"10.231.{third}"
        if prefix + "." not in routes:
            return prefix
    raise RuntimeError("no free 10.231.x.0/24 subnet")


@dataclass
class Node:
    name: str
    netns: str
    address: str
    head: bool


class NetnsCluster:
    """Namespaces on a bridge, and Ray nodes started in them.

    Args:
        workdir: a short path (Ray's Unix sockets live under it) for Ray's temp dir,
            the auth token and logs.
        names: node names; the first is the head.
        env: extra environment for every process started in a namespace.
    """

    def __init__(self, workdir: Path, names: tuple[str, ...] = ("head", "worker"), env: dict[str, str] | None = None):
        self.workdir = workdir
        self.tag = f"{os.getpid() % 100000}"
        self.bridge = f"dsbr{self.tag}"
        self.prefix = _free_subnet()
        self.host_address = f"{self.prefix}.254"  # this (root) namespace, on the bridge
        self.nodes = {
            name: Node(name, f"ds{self.tag}-{name}", f"{self.prefix}.{i + 1}", head=i == 0)
            for i, name in enumerate(names)
        }
        self.token = workdir / "ray-token"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            "RAY_AUTH_MODE": "token",  # Ray 2.60: a node joins only with the cluster's token
            "RAY_AUTH_TOKEN_PATH": str(self.token),
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            **HEALTH_CHECK_ENV,
            **(env or {}),
        }
        self.processes: list[subprocess.Popen] = []
        self._made: list[tuple[str, ...]] = []  # what to undo, newest last

    # ------------------------------------------------------------------ network

    def create(self) -> "NetnsCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token.write_text(secrets.token_hex(32))
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", "del", self.bridge))
        _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node in self.nodes.values():
            _ip("netns", "add", node.netns)
            self._made.append(("netns", "del", node.netns))
            veth = f"dsv{self.tag}{node.name[0]}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("addr", "add", f"{node.address}/24", "dev", "eth0", netns=node.netns)
            _ip("link", "set", "eth0", "up", netns=node.netns)
            _ip("link", "set", "lo", "up", netns=node.netns)
        return self

    def destroy(self) -> None:
        for node in self.nodes.values():
            self.kill(node.name)
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for undo in reversed(self._made):
            subprocess.run(["ip", *undo], capture_output=True)
        self._made.clear()

    # ------------------------------------------------------------------ processes

    def command(self, node: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.nodes[node].netns, *args]

    def run(self, node: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(node, *args), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, node: str, *args: str, log: str) -> subprocess.Popen:
        """A long-running process in ``node``'s namespace, output to ``workdir/log``."""
        out = open(self.workdir / log, "ab")
        process = subprocess.Popen(self.command(node, *args), env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def start_ray(self, node: str, resources: dict[str, float]) -> float:
        """``ray start`` on ``node`` (the head, or a worker joining it); seconds it took."""
        n = self.nodes[node]
        common = ["--node-ip-address", n.address, "--num-cpus", "2", "--resources", json.dumps(resources),
                  "--object-store-memory", str(100 * 1024 * 1024), "--metrics-export-port", str(METRICS_PORT),
                  "--disable-usage-stats"]
        if n.head:
            args = ["--head", "--port", str(RAY_PORT), "--include-dashboard", "false",
                    "--temp-dir", str(self.workdir / "ray")]
        else:
            args = ["--address", self.ray_address]
        started = time.monotonic()
        done = self.run(node, str(VENV_BIN / "ray"), "start", *args, *common)
        if done.returncode != 0:
            raise RuntimeError(f"ray start on {node} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return time.monotonic() - started

    @property
    def ray_address(self) -> str:
        head = next(n for n in self.nodes.values() if n.head)
        return f"{head.address}:{RAY_PORT}"

    def kill(self, node: str) -> int:
        """SIGKILL every process in ``node``'s namespace: the machine is gone. Returns how many."""
        pids = subprocess.run(["ip", "netns", "pids", self.nodes[node].netns], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def python(self, code: str, timeout: float = 60) -> object:
        """Run ``code`` in a driver on the head connected to the cluster; the JSON it prints last."""
        script = ("import json, ray\nray.init(address=%r, namespace='deepserve', log_to_driver=False)\n%s"
                  % (self.ray_address, code))
        done = self.run("head", sys.executable, "-c", script, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"driver failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def replicas(self) -> dict[str, dict[str, int]]:
        """Running replicas per deployment of the app, and where they run ({node IP: count})."""
        # ray.util.state needs the dashboard, which these nodes do not run: ask the GCS.
        return self.python(
            "import ray._private.state as state\n"
            "out = {}\n"
            "for a in state.actors().values():\n"
            "    if a['State'] == 'ALIVE' and a['ActorClassName'].startswith('ServeReplica:deepserve:'):\n"
            "        where = out.setdefault(a['ActorClassName'].split(':')[2], {})\n"
            "        ip = a['Address']['IPAddress']\n"
            "        where[ip] = where.get(ip, 0) + 1\n"
            "print(json.dumps(out))\n"
        )
