"""Headless load test with SLO checks: Locust's library API, in this one process.

    python loadtests/run.py --host 127.0.0.1:9000 --users 8 --spawn-rate 8 --duration 20 \\
        --user MixUser --out reports/loadtest --slo-p99-ms 50 --slo-error-rate 0.01 --slo-min-rps 200

Writes ``<out>_stats.csv`` (one row per request name, then the total) and
``<out>_summary.json`` (with the answering nodes and a per-second timeline), prints a table
and each SLO with its measured value.

Exit status: 0 when every SLO given is met; 1 when one is missed (or nothing was measured);
2 for bad arguments, or when the server does not answer ``ServerReady`` at start or serves
none of the user class's models.

One process drives the load (gevent: one core at most). For more load than one core can
generate, run the same locustfile with Locust's CLI and ``--processes N``.
"""

from __future__ import annotations

import locust  # first: importing locust monkey-patches the standard library with gevent

import argparse
import csv
import datetime
import json
import logging
import os
import platform
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import gevent
import grpc
import numpy as np
from locust.env import Environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
import locustfile  # noqa: E402  (after the monkey-patching, and it sets grpc up for gevent)

from deepserve.proto import deepserve_pb2 as v1  # noqa: E402
from deepserve.proto import inference_pb2 as oip  # noqa: E402

TOTAL = "Total"
BAD_USAGE = 2


def user_classes() -> dict[str, type[locustfile.GrpcUser]]:
    return {
        name: obj for name, obj in vars(locustfile).items()
        if isinstance(obj, type) and issubclass(obj, locustfile.GrpcUser) and not obj.abstract
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1:9000",
                   help="gRPC target: host:port, or several gateways as ipv4:A:9000,B:9000, or dns:///name:9000")
    p.add_argument("--users", type=int, default=8, help="concurrent users (default 8)")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: all at once)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    p.add_argument("--user", default="MixUser", choices=sorted(user_classes()), help="user class (default MixUser)")
    p.add_argument("--out", type=Path, default=Path("reports/loadtest"), help="report path prefix")
    p.add_argument("--wait", default="0", help="think time between a user's calls: S or MIN-MAX seconds (default 0)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-call deadline, seconds (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of payloads and users' choices (default 0)")
    p.add_argument("--wait-for-ready", action="store_true",
                   help="calls wait for a connection until their deadline instead of failing at once while no "
                        "gateway answers (rides out a gateway restart)")
    p.add_argument("--ready-timeout", type=float, default=5.0, help="seconds to wait for ServerReady at start")
    p.add_argument("--slo-p99-ms", type=float, help="SLO: p99 latency of all requests at most this, ms")
    p.add_argument("--slo-error-rate", type=float, help="SLO: failed/all requests at most this (0..1)")
    p.add_argument("--slo-min-rps", type=float, help="SLO: requests per second at least this")
    p.add_argument("-v", "--verbose", action="store_true", help="Locust's own log at INFO")
    args = p.parse_args(argv)
    args.spawn_rate = args.spawn_rate or float(args.users)
    if args.host.startswith(("http://", "https://")) or ":" not in args.host:
        p.error(f"--host {args.host!r}: want a gRPC target (host:port, ipv4:A:port,B:port, dns:///name:port)")
    for name in ("users", "spawn_rate", "duration", "timeout", "ready_timeout"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    for name in ("slo_p99_ms", "slo_error_rate", "slo_min_rps"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    os.environ.update(DEEPSERVE_LOADTEST_WAIT=args.wait, DEEPSERVE_LOADTEST_TIMEOUT=str(args.timeout),
                      DEEPSERVE_LOADTEST_SEED=str(args.seed),
                      DEEPSERVE_LOADTEST_WAIT_FOR_READY="1" if args.wait_for_ready else "0")
    try:
        locustfile.Settings.from_env()
    except ValueError as e:
        p.error(f"--wait: {e}")
    return args


def served_models(host: str, timeout: float) -> set[str]:
    """The models the server lists, once it says it is ready.

    Raises:
        ConnectionError: no ready server at ``host`` within ``timeout`` seconds.
    """
    stubs = locustfile.Stubs.open(host)
    try:
        if not stubs.inference.ServerReady(oip.ServerReadyRequest(), timeout=timeout, wait_for_ready=True).ready:
            raise ConnectionError(f"{host} answers but is not ready (ServerReady: false)")
        return {m.name for m in stubs.models.ListModels(v1.ListModelsRequest(), timeout=timeout).models}
    except grpc.RpcError as e:
        raise ConnectionError(f"{host} unreachable: {e.code().name}: {e.details()}") from None
    finally:
        stubs.channel.close()


# ---------------------------------------------------------------------------- measuring


class Timings:
    """Every response time, by request name, at full resolution.

    Locust's own statistics keep response times rounded to whole milliseconds (coarser above
    100 ms); at the 1-10 ms these models answer in, that distorts p50/p99. Counts, failures
    and error messages come from Locust's statistics; percentiles from here.
    """

    def __init__(self):
        self.ms: dict[str, list[float]] = defaultdict(list)

    def on_request(self, name, response_time, **_) -> None:
        self.ms[name].append(response_time)


class Timeline:
    """Calls per wall-clock second: answered, failed, and by the node that answered (the
    ``deepserve-node`` trailing metadata). Shows a lost node's calls moving to the others,
    and when failures stopped."""

    def __init__(self):
        self.seconds: dict[int, dict] = {}

    def on_request(self, exception=None, context=None, **_) -> None:
        context = context or {}
        second = self.seconds.setdefault(context.get("second", int(time.time())),
                                         {"ok": 0, "failed": 0, "nodes": defaultdict(int)})
        second["failed" if exception else "ok"] += 1
        if context.get("node"):
            second["nodes"][context["node"]] += 1

    def json(self) -> list[dict]:
        return [{"t": t, "ok": s["ok"], "failed": s["failed"], "nodes": dict(s["nodes"])}
                for t, s in sorted(self.seconds.items())]

    def nodes(self) -> dict[str, int]:
        total: dict[str, int] = defaultdict(int)
        for s in self.seconds.values():
            for node, n in s["nodes"].items():
                total[node] += n
        return dict(sorted(total.items()))


@dataclass
class Row:
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else float("nan")

    @classmethod
    def of(cls, name: str, requests: int, failures: int, ms: list[float], elapsed: float) -> "Row":
        if ms:
            p50, p95, p99 = np.percentile(ms, [50, 95, 99])
            mean, top = float(np.mean(ms)), float(np.max(ms))
        else:
            p50 = p95 = p99 = mean = top = float("nan")
        return cls(name, requests, failures, requests / elapsed, float(p50), float(p95), float(p99), mean, top)

    def json(self) -> dict:
        d = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in vars(self).items()}
        d["error_rate"] = round(self.error_rate, 6) if self.requests else None
        return d


@dataclass
class Slo:
    name: str
    target: float
    measured: float
    unit: str
    at_least: bool  # True: measured >= target passes; False: measured <= target passes

    @property
    def passed(self) -> bool:  # NaN (nothing measured) never passes
        return self.measured >= self.target if self.at_least else self.measured <= self.target

    def line(self) -> str:
        op = ">=" if self.at_least else "<="
        return (f"  {'PASS' if self.passed else 'FAIL'}  {self.name:<11} measured {self.measured:.4g}{self.unit}"
                f"  (SLO {op} {self.target:g}{self.unit})")


def check_slos(args: argparse.Namespace, total: Row) -> list[Slo]:
    slos = []
    if args.slo_p99_ms is not None:
        slos.append(Slo("p99", args.slo_p99_ms, total.p99_ms, " ms", at_least=False))
    if args.slo_error_rate is not None:
        slos.append(Slo("error rate", args.slo_error_rate, total.error_rate, "", at_least=False))
    if args.slo_min_rps is not None:
        slos.append(Slo("throughput", args.slo_min_rps, total.rps, " req/s", at_least=True))
    return slos


@dataclass
class Run:
    env: Environment
    timings: Timings
    timeline: Timeline
    elapsed_s: float
    cpu_s: float  # CPU time this process (the load generator) used meanwhile


def run(args: argparse.Namespace, user_class: type[locustfile.GrpcUser]) -> Run:
    """Run ``args.users`` users of ``user_class`` for ``args.duration`` seconds."""
    locustfile.prepare([user_class], args.seed)  # before the clock starts
    env = Environment(user_classes=[user_class], host=args.host, stop_timeout=args.timeout)
    timings, timeline = Timings(), Timeline()
    env.events.request.add_listener(timings.on_request)
    env.events.request.add_listener(timeline.on_request)
    runner = env.create_local_runner()
    start, cpu = time.perf_counter(), time.process_time()
    runner.start(args.users, spawn_rate=args.spawn_rate)
    gevent.sleep(args.duration)
    runner.quit()  # users finish the call in flight (stop_timeout), then stop
    return Run(env, timings, timeline, time.perf_counter() - start, time.process_time() - cpu)


def report(result: Run) -> list[Row]:
    env, timings, elapsed = result.env, result.timings, result.elapsed_s
    rows = []
    for (name, _), entry in sorted(env.stats.entries.items()):
        rows.append(Row.of(name, entry.num_requests, entry.num_failures, timings.ms[name], elapsed))
    every = [t for ms in timings.ms.values() for t in ms]
    rows.append(Row.of(TOTAL, env.stats.total.num_requests, env.stats.total.num_failures, every, elapsed))
    return rows


def errors(env: Environment) -> list[dict]:
    """Locust's error table, with numbers in messages masked so that, e.g., deadline messages
    naming the time left group together. Most frequent first."""
    grouped: dict[tuple[str, str], dict] = {}
    for e in env.stats.errors.values():
        message = re.sub(r"(?<![A-Za-z_])\d+(\.\d+)?(e-?\d+)?", "#", str(e.error))
        row = grouped.setdefault((e.name, message), {"name": e.name, "error": message, "occurrences": 0,
                                                      "example": str(e.error)})
        row["occurrences"] += e.occurrences
    return sorted(grouped.values(), key=lambda r: -r["occurrences"])


def print_table(rows: list[Row]) -> None:
    width = max(len(r.name) for r in rows)
    print(f"{'name':<{width}}  {'requests':>8}  {'fails':>6}  {'req/s':>8}  {'p50 ms':>7}  {'p95 ms':>7}  {'p99 ms':>7}  {'max ms':>7}")
    for r in rows:
        if r.name == TOTAL:
            print("-" * (width + 66))
        print(f"{r.name:<{width}}  {r.requests:>8}  {r.failures:>6}  {r.rps:>8.1f}  {r.p50_ms:>7.2f}  "
              f"{r.p95_ms:>7.2f}  {r.p99_ms:>7.2f}  {r.max_ms:>7.1f}")


def write_reports(out: Path, summary: dict, rows: list[Row]) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    stats_csv = out.with_name(out.name + "_stats.csv")
    with open(stats_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].json()))
        writer.writeheader()
        writer.writerows(r.json() for r in rows)
    summary_json = out.with_name(out.name + "_summary.json")
    summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    return stats_csv, summary_json


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    user_class = user_classes()[args.user]
    try:
        served = served_models(args.host, args.ready_timeout)
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_USAGE
    workloads = locustfile.served_workloads(user_class, served)
    skipped = sorted(w.name for w in user_class.workloads if w not in workloads)
    if not workloads:
        print(f"error: {args.host} serves none of the models {args.user} needs "
              f"({sorted({w.model for w in user_class.workloads})}); it serves {sorted(served)}", file=sys.stderr)
        return BAD_USAGE

    print(f"{args.user} x {args.users} users for {args.duration:g} s against {args.host}"
          + (f" (skipped, model not served: {', '.join(skipped)})" if skipped else ""))
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = run(args, user_class)
    rows = report(result)
    total = rows[-1]
    slos = check_slos(args, total)
    passed = total.requests > 0 and all(s.passed for s in slos)

    summary = {
        "host": args.host, "user_class": args.user, "users": args.users, "spawn_rate": args.spawn_rate,
        "duration_s": args.duration, "elapsed_s": round(result.elapsed_s, 3), "wait": args.wait, "seed": args.seed,
        "wait_for_ready": args.wait_for_ready,
        "started_at": started_at,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        # Near 100% (one core), the load generator rather than the server limits the throughput.
        "loadgen_cpu_percent": round(100 * result.cpu_s / result.elapsed_s, 1),
        "workloads": [{"name": w.name, "model": w.model, "weight": weight} for w, weight in workloads.items()],
        "skipped_workloads": skipped,
        "requests": {r.name: r.json() for r in rows if r.name != TOTAL},
        "total": total.json(),
        "errors": errors(result.env),
        "nodes": result.timeline.nodes(),  # answers by the node whose gateway gave them
        "timeline": result.timeline.json(),
        "slos": [{"name": s.name, "target": s.target, "measured": round(s.measured, 6), "passed": s.passed}
                 for s in slos],
        "passed": passed,
    }
    stats_csv, summary_json = write_reports(args.out, summary, rows)

    print_table(rows)
    print(f"load generator CPU: {summary['loadgen_cpu_percent']:.0f}% of one core")
    if summary["nodes"]:
        print("answered by: " + ", ".join(f"{node} {n}" for node, n in summary["nodes"].items()))
    for e in summary["errors"]:
        print(f"  error  {e['name']}: {e['error']}  x{e['occurrences']}")
    if total.requests == 0:
        print("FAIL: no request completed")
    if slos:
        print("SLOs:")
        for s in slos:
            print(s.line())
    print(f"reports: {stats_csv}  {summary_json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
