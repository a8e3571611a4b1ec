"""Sends fuzz cases over real gRPC, judges every answer, and checks the server afterwards.

The oracle, per request (:func:`judge`):
- the status code is never INTERNAL or UNKNOWN, and is one a served method may give
  (:data:`ALLOWED`);
- an error's details hold no traceback, Python class, source file or internal path;
- the server answers before the client's deadline (a long deadline expiring is a hang);
- an OK answer parses as the method's response;
- where the case knows its answer (``Case.expect``), the code is one of those
  (RESOURCE_EXHAUSTED is always acceptable: admission control may refuse anything).

After a run (:func:`check_server`): the server is ready, health says SERVING for it and every
model, no Serve replica restarted or was replaced, and the gateway's memory is back near
its baseline.
"""

from __future__ import annotations

import base64
import json
import math
import re
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, example, given, seed, settings

from deepserve.proto import deepserve_pb2 as v1
from deepserve.proto import inference_pb2 as oip
from strategies import MODELS, Case

MAX_DETAILS = 4096  # an error message longer than this echoes the request back at its sender

ALLOWED = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED",
                     "UNAVAILABLE", "FAILED_PRECONDITION"})

_OIP = "/inference.GRPCInferenceService/"
METHODS: dict[tuple[str, str], tuple[str, type, bool]] = {  # (api, method) -> (path, response, streams)
    **{("oip", m): (_OIP + m, getattr(oip, f"{m}Response"), False)
       for m in ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer",
                 "ModelConfig", "ModelStatistics", "RepositoryIndex")},
    ("v1", "Score"): ("/deepserve.v1.FraudScoring/Score", v1.ScoreResponse, False),
    ("v1", "Classify"): ("/deepserve.v1.Classifier/Classify", v1.ClassifyResponse, False),
    ("v1", "Generate"): ("/deepserve.v1.Generator/Generate", v1.GenerateResponse, False),
    ("v1", "GenerateStream"): ("/deepserve.v1.Generator/GenerateStream", v1.GenerateEvent, True),
    ("v1", "Recommend"): ("/deepserve.v1.Recommender/Recommend", v1.RecommendResponse, False),
    ("v1", "ListModels"): ("/deepserve.v1.Models/ListModels", v1.ListModelsResponse, False),
    ("health", "Check"): ("/grpc.health.v1.Health/Check", health_pb2.HealthCheckResponse, False),
}

# What a client must never read in an error: tracebacks, source lines, Python class reprs,
# gRPC's wrappers around unhandled exceptions, absolute paths.
LEAK = re.compile(
    r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+|<class '|\w\.py\b|site-packages"
    r"|Exception calling application|Unexpected <|(?<![\w.~])/(?:[\w.-]+/)+[\w.-]+"
)


@dataclass
class Outcome:
    case: Case
    code: str
    details: str
    seconds: float
    problems: list[str]
    payload_size: int
    payload: bytes | None = None  # kept only for failures small enough to replay

    def signature(self) -> tuple:
        """Failures that are the same bug: the same code, problems and message shape (quoted
        names and numbers aside); an expectation mismatch also by category."""
        shape = re.sub(r"\d+", "#", re.sub(r"'[^']*'", "'…'", self.details))[:120]
        kinds = tuple(p.split(":")[0] for p in self.problems)
        return self.code, kinds, shape, "" if "oracle" in kinds else self.case.category


def judge(case: Case, code: str, details: str, seconds: float, payload: bytes, response_problem: str = "") -> list[str]:
    """Every way this answer breaks the oracle (empty: it is fine)."""
    problems = []
    if code in ("INTERNAL", "UNKNOWN"):
        problems.append(f"oracle: {code}")
    elif code not in ALLOWED:
        problems.append(f"oracle: {code} is not a status this RPC should give")
    text = payload.decode("utf-8", "replace")
    for match in LEAK.finditer(details):
        if match.group(0) not in text:  # an echo of the request's own text is not a leak
            problems.append(f"oracle: details leak internals ({match.group(0)!r})")
            break
    if code == "DEADLINE_EXCEEDED" and case.category != "deadline" and seconds >= 0.95 * case.timeout:
        problems.append(f"oracle: hung (no answer within the client's {case.timeout:g} s)")
    if response_problem:
        problems.append(f"oracle: {response_problem}")
    if "metadata size exceeds" in details:  # the client's own RESOURCE_EXHAUSTED: the trailer was too big
        problems.append("expected: an error the client can read (its details echo the request unbounded and "
                        "overflow the client's metadata limit)")
    elif len(details) > MAX_DETAILS:
        problems.append(f"expected: details under {MAX_DETAILS} bytes, got {len(details)} (the request echoed unbounded)")
    if (not problems and case.expect is not None and code not in case.expect and code != "RESOURCE_EXHAUSTED"):
        problems.append(f"expected: {'/'.join(sorted(case.expect))}")
    return problems


class Fuzzer:
    """Sends cases with bounded concurrency over one channel and keeps the figures.

    Args:
        target: ``host:port`` of the gateway.
        concurrency: requests in flight at once (the generator waits beyond it).
    """

    def __init__(self, target: str, concurrency: int = 4):
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
            ("grpc.enable_retries", 0),  # the server's own answers, not a retry's
        ])
        self.concurrency = concurrency
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="fuzz")
        self.slots = threading.BoundedSemaphore(concurrency * 2)
        self.lock = threading.Lock()
        self.calls: dict[str, object] = {}
        self.by_api: Counter = Counter()
        self.by_category: Counter = Counter()
        self.by_method: Counter = Counter()
        self.by_model: Counter = Counter()
        self.codes: Counter = Counter()
        self.codes_by_category: dict[str, Counter] = defaultdict(Counter)
        self.failures: dict[tuple, list[Outcome]] = {}
        self.failure_counts: Counter = Counter()
        self.failure_rpcs: dict[tuple, set[str]] = defaultdict(set)
        self.slowest: list[tuple[float, str]] = []
        self.seconds_by_category: dict[str, float] = defaultdict(float)
        self.harness_errors: list[str] = []
        self.started = time.perf_counter()

    # ------------------------------------------------------------------ sending

    def _callable(self, case: Case):
        path, _, streams = METHODS[(case.api, case.method)]
        key = path
        if key not in self.calls:
            # No serializers: requests go as the bytes given, answers come back as bytes.
            self.calls[key] = self.channel.unary_stream(path) if streams else self.channel.unary_unary(path)
        return self.calls[key]

    def send(self, case: Case) -> Outcome:
        """Send one case and judge the answer (synchronously)."""
        path, response_type, streams = METHODS[(case.api, case.method)]
        payload = case.payload()
        started = time.perf_counter()
        code, details, response_problem = "OK", "", ""
        try:
            call = self._callable(case)
            if streams:
                answers = list(call(payload, timeout=case.timeout))
            else:
                answers = [call(payload, timeout=case.timeout)]
            response_problem = _check_response(case, response_type, answers)
        except grpc.RpcError as error:
            code, details = error.code().name, error.details() or ""
        seconds = time.perf_counter() - started
        problems = judge(case, code, details, seconds, payload, response_problem)
        return Outcome(case, code, details, seconds, problems, len(payload),
                       payload if problems and len(payload) <= 4096 else None)

    def submit(self, case: Case) -> None:
        """Send ``case`` in the background (blocks while ``2 * concurrency`` are pending)."""
        self.slots.acquire()
        future = self.pool.submit(self._send_and_record, case)
        future.add_done_callback(lambda _: self.slots.release())

    def _send_and_record(self, case: Case) -> None:
        try:
            self.record(self.send(case))
        except Exception as exc:  # noqa: BLE001 - a harness bug must show, not vanish in a thread
            with self.lock:
                self.harness_errors.append(f"{type(exc).__name__}: {exc} while sending {case.describe(300)}")

    def record(self, outcome: Outcome) -> None:
        case = outcome.case
        with self.lock:
            self.by_api[case.api] += 1
            self.by_category[case.category] += 1
            self.by_method[f"{case.api}.{case.method}"] += 1
            if case.model in MODELS:
                self.by_model[case.model] += 1
            self.codes[outcome.code] += 1
            self.codes_by_category[case.category][outcome.code] += 1
            self.seconds_by_category[case.category] = max(self.seconds_by_category[case.category], outcome.seconds)
            if case.category != "deadline":
                self.slowest.append((outcome.seconds, f"{outcome.code} {case.describe(240)}"))
                self.slowest = sorted(self.slowest, reverse=True)[:8]
            if outcome.problems:
                key = outcome.signature()
                self.failure_counts[key] += 1
                examples = self.failures.setdefault(key, [])
                self.failure_rpcs[key].add(f"{case.api}.{case.method} [{case.category}]")
                seen = {(o.case.method, o.case.category) for o in examples}
                if len(examples) < 2 or (len(examples) < 5 and (case.method, case.category) not in seen):
                    examples.append(outcome)  # a few, from as many RPCs and categories as possible

    def drain(self) -> None:
        """Wait for every request sent."""
        self.pool.shutdown(wait=True)
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="fuzz")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.channel.close()

    # ------------------------------------------------------------------ figures

    @property
    def sent(self) -> int:
        return sum(self.codes.values())

    @property
    def internal_or_unknown(self) -> int:
        return self.codes["INTERNAL"] + self.codes["UNKNOWN"]

    def oracle_failures(self) -> dict[tuple, int]:
        return {k: n for k, n in self.failure_counts.items() if "oracle" in k[1]}

    def expectation_failures(self) -> dict[tuple, int]:
        return {k: n for k, n in self.failure_counts.items() if k not in self.oracle_failures()}

    def figures(self) -> dict[str, object]:
        return {
            "requests": self.sent,
            "seconds": round(time.perf_counter() - self.started, 1),
            "by_api": dict(self.by_api),
            "by_category": dict(sorted(self.by_category.items())),
            "by_method": dict(sorted(self.by_method.items())),
            "by_model": dict(sorted(self.by_model.items())),
            "status_codes": dict(self.codes.most_common()),
            "internal_or_unknown": self.internal_or_unknown,
            "oracle_violations": sum(self.oracle_failures().values()),
            "expectation_mismatches": sum(self.expectation_failures().values()),
        }

    def report(self) -> str:
        """The run's figures and every distinct failure with up to three reproducers."""
        f = self.figures()
        lines = [
            f"requests sent: {f['requests']} in {f['seconds']} s (concurrency {self.concurrency})",
            f"  by API: {_counts(self.by_api)}",
            f"  by method: {_counts(self.by_method)}",
            f"  by model: {_counts(self.by_model)}",
            "  by category (status codes):",
            *(f"    {c:<20} {n:>6}  {_counts(self.codes_by_category[c])}  (slowest {self.seconds_by_category[c]:.2f} s)"
              for c, n in sorted(self.by_category.items())),
            f"status codes: {_counts(self.codes)}",
            f"INTERNAL or UNKNOWN: {f['internal_or_unknown']}",
            f"oracle violations: {f['oracle_violations']} ({len(self.oracle_failures())} distinct)",
            f"expectation mismatches: {f['expectation_mismatches']} ({len(self.expectation_failures())} distinct)",
            "slowest answers:",
            *(f"  {s:6.2f} s  {d}" for s, d in self.slowest[:5]),
        ]
        for title, found in (("ORACLE VIOLATIONS", self.oracle_failures()),
                             ("EXPECTATION MISMATCHES", self.expectation_failures())):
            if not found:
                continue
            lines.append(f"{title}:")
            for key, count in sorted(found.items(), key=lambda kv: -kv[1]):
                first = self.failures[key][0]
                lines.append(f"  [{count}x] {first.code}: {first.details[:200]!r} | {'; '.join(first.problems)}")
                lines.append(f"    in: {', '.join(sorted(self.failure_rpcs[key]))}")
                for outcome in self.failures[key]:
                    lines.append(f"      e.g. {outcome.case.describe(500)}")
        if self.harness_errors:
            lines.append(f"HARNESS ERRORS ({len(self.harness_errors)}):")
            lines += [f"  {e}" for e in self.harness_errors[:10]]
        return "\n".join(lines)

    def write_failures(self, path: Path) -> None:
        """Every distinct failure as JSON, with the request's bytes (base64) where small: replay
        one with ``channel.unary_unary(path)(base64.b64decode(request))``."""
        out = []
        for key, outcomes in self.failures.items():
            for o in outcomes:
                path_, _, _ = METHODS[(o.case.api, o.case.method)]
                out.append({"count": self.failure_counts[key], "method": path_, "category": o.case.category,
                            "code": o.code, "details": o.details, "problems": o.problems,
                            "request": o.case.describe(2000), "seconds": round(o.seconds, 3),
                            "request_base64": base64.b64encode(o.payload).decode() if o.payload else None})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common())


def _check_response(case: Case, response_type: type, answers: list[bytes]) -> str:
    try:
        messages = [response_type.FromString(a) for a in answers]
    except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
        return f"OK with an unparsable response ({type(exc).__name__})"
    if case.method == "GenerateStream":
        results = [m for m in messages if m.WhichOneof("event") == "result"]
        if len(results) != 1 or messages[-1].WhichOneof("event") != "result":
            return f"a stream that ended OK with {len(results)} results"
    if case.method == "ModelInfer" and len(messages[0].outputs) != len(messages[0].raw_output_contents):
        return "a ModelInfer answer whose outputs and raw contents differ in number"
    return ""


# ---------------------------------------------------------------------------- running strategies


def run(fuzzer: Fuzzer, categories: dict, total: int, *, rounds: int = 1, base_seed: int | None = None,
        only: set[str] | None = None) -> None:
    """Draw about ``total`` cases over the categories (by weight, at least 3 each), plus each
    category's pinned cases, and send them.

    Each category runs as its own hypothesis test, ``rounds`` times in turn (so that every kind
    of request, valid ones included, is in flight throughout the run). With ``base_seed``
    None the runs are derandomized; otherwise each round has its own seed.
    """
    chosen = {n: c for n, c in categories.items() if not only or n in only}
    weights = sum(c.weight for c in chosen.values())
    quota = {n: max(3, math.ceil(total * c.weight / weights)) for n, c in chosen.items()}
    for r in range(rounds):
        for name, category in chosen.items():
            count = quota[name] // rounds + (1 if r < quota[name] % rounds else 0)
            _draw_and_send(fuzzer, category.strategy, count, None if base_seed is None else base_seed * 1000 + r,
                           category.pinned if r == 0 else [])
    fuzzer.drain()


def _draw_and_send(fuzzer: Fuzzer, strategy, count: int, round_seed: int | None, pinned: list[Case]) -> None:
    @settings(max_examples=max(count, 1), derandomize=round_seed is None, database=None, deadline=None,
              phases=[Phase.explicit] + ([Phase.generate] if count else []),
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(strategy)
    def fuzz(case):
        fuzzer.submit(case)

    for case in pinned:
        fuzz = example(case)(fuzz)
    if round_seed is not None:
        fuzz = seed(round_seed)(fuzz)
    fuzz()


def shrink(fuzzer: Fuzzer, strategy, count: int) -> None:
    """Send synchronously and fail on the first bad answer: hypothesis then shrinks it to a
    minimal reproducer (for investigating one category, not for the figures)."""
    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(case):
        outcome = fuzzer.send(case)
        assert not outcome.problems, f"{outcome.code} {outcome.details!r} {outcome.problems}"

    fuzz()


# ---------------------------------------------------------------------------- the server's state


@dataclass
class ServerState:
    gateway_pids: tuple[int, ...]  # the gateway replica's, then its worker processes'
    model_pids: dict[str, int]
    replicas: dict[str, tuple[str, int, int]]  # Serve replica actor id -> (name, pid, restarts)
    rss_kib: int
    peak_kib: int
    deployments: dict[str, str] = field(default_factory=dict)  # name -> Serve status


def gateway_status() -> dict:
    from ray import serve

    return serve.get_app_handle("deepserve").status.remote().result(timeout_s=30)


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process on this machine, in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def capture() -> ServerState:
    """The gateway's pids and memory (its replica and worker processes, added up), the
    deployment-placed models' pids, and every Serve replica."""
    from ray import serve

    status = gateway_status()
    pids = (status["pid"], *(w["pid"] for w in status["workers"]))
    rss, peak = (sum(values) for values in zip(*(memory_kib(pid) for pid in pids)))
    replicas = {}
    try:  # Ray's actor table: replicas that died and were replaced show as new actor ids
        from ray._private import state

        for actor_id, info in state.actors().items():
            if info.get("ActorClassName", "").startswith("ServeReplica:deepserve:") and info.get("State") == "ALIVE":
                replicas[actor_id] = (info.get("Name", ""), info.get("Pid", 0), info.get("NumRestarts", 0))
    except Exception:  # noqa: BLE001 - private API: the pids below still tell restarts
        pass
    deployments = {name: str(d.status) for name, d in serve.status().applications["deepserve"].deployments.items()}
    return ServerState(pids, {n: m["pid"] for n, m in status["models"].items() if "pid" in m}, replicas, rss, peak,
                       deployments)


def wait_ready(target: str, timeout: float = 60.0) -> bool:
    """Poll ServerReady until it says true (the server may still be recovering from a test before)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        ready = channel.unary_unary(_OIP + "ServerReady", oip.ServerReadyRequest.SerializeToString,
                                    oip.ServerReadyResponse.FromString)
        while time.monotonic() < deadline:
            try:
                if ready(oip.ServerReadyRequest(), timeout=5).ready:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


def check_server(target: str, before: ServerState, rss_margin_kib: int, settle_s: float = 30.0) -> tuple[dict, list[str]]:
    """After a run: ready, health SERVING, the same replicas, and memory back near the baseline.

    Returns:
        (figures, problems): problems is empty when all holds.
    """
    problems = []
    with grpc.insecure_channel(target) as channel:
        ready = channel.unary_unary(_OIP + "ServerReady", oip.ServerReadyRequest.SerializeToString,
                                    oip.ServerReadyResponse.FromString)(oip.ServerReadyRequest(), timeout=10).ready
        check = channel.unary_unary("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest.SerializeToString,
                                    health_pb2.HealthCheckResponse.FromString)
        health = {s or "(server)": health_pb2.HealthCheckResponse.ServingStatus.Name(
            check(health_pb2.HealthCheckRequest(service=s), timeout=10).status) for s in ("",) + MODELS}
    if not ready:
        problems.append("ServerReady is false after the run")
    not_serving = {s: h for s, h in health.items() if h != "SERVING"}
    if not_serving:
        problems.append(f"health is not SERVING: {not_serving}")

    # Memory: the gateway frees what the run took (within the margin) once its requests are done.
    deadline = time.monotonic() + settle_s
    after = capture()
    while after.rss_kib > before.rss_kib + rss_margin_kib and time.monotonic() < deadline:
        time.sleep(0.5)
        after = capture()
    restarts = 0
    if after.gateway_pids != before.gateway_pids:
        restarts += 1
        problems.append(f"the gateway or a worker restarted (pids {before.gateway_pids} -> {after.gateway_pids})")
    for name, pid in before.model_pids.items():
        if after.model_pids.get(name) != pid:
            restarts += 1
            problems.append(f"model {name}'s replica restarted (pid {pid} -> {after.model_pids.get(name)})")
    gone = set(before.replicas) - set(after.replicas)
    new = set(after.replicas) - set(before.replicas)
    restarted = [a for a in set(before.replicas) & set(after.replicas) if after.replicas[a][2] != before.replicas[a][2]]
    if gone or new or restarted:
        restarts = max(restarts, len(gone) + len(restarted))
        problems.append(f"Serve replicas changed: gone {[before.replicas[a][0] for a in gone]}, "
                        f"new {[after.replicas[a][0] for a in new]}, restarted {restarted}")
    unhealthy = {n: s for n, s in after.deployments.items() if "HEALTHY" not in s}
    if unhealthy:
        problems.append(f"Serve deployments not healthy: {unhealthy}")
    if after.rss_kib > before.rss_kib + rss_margin_kib:
        problems.append(f"gateway RSS {after.rss_kib >> 10} MiB is over its baseline {before.rss_kib >> 10} MiB "
                        f"+ {rss_margin_kib >> 10} MiB")
    figures = {
        "ready_after": ready,
        "health_after": health,
        "replica_restarts": restarts,
        "replicas_watched": len(before.replicas) or 1 + len(before.model_pids),
        "gateway_rss_mib_before": round(before.rss_kib / 1024, 1),
        "gateway_rss_mib_after": round(after.rss_kib / 1024, 1),
        "gateway_rss_mib_peak": round(after.peak_kib / 1024, 1),
        "gateway_rss_margin_mib": rss_margin_kib >> 10,
    }
    return figures, problems
