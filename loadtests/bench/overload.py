"""Overload: a gateway offered four times what it can serve, with the shipped admission bounds.

For each workload (one fraud transaction, computed inline on the gateway's event loop; one
digit image, batched, behind a small ``max_queued``):

1. **Unloaded latency**: one call at a time (p50/p99).
2. **Capacity**: closed loop at rising concurrency; the best requests/s is the capacity.
3. **Overload**: open loop at ``--factor`` (4) times that capacity for ``--duration`` seconds:
   calls are sent on a fixed schedule whatever the answers, from several processes, over
   raw bytes (no client-side protobuf), without retries (each refusal is seen and counted).
4. **Afterwards**: the time until ``ServerReady`` and a real call answer again.

What it reports, and the targets (docs/reliability.md): offered and admitted rates; the
admitted calls' p50/p99 against the unloaded p99 (target: at most 2x); the refusals
(RESOURCE_EXHAUSTED: how many, their p50/p99, target < 50 ms, and how many carry the
``grpc-retry-pushback-ms`` hint); every other status code (target: none: no
DEADLINE_EXCEEDED pile-up, no CANCELLED); the load generator's CPU use, and whether it kept
to its schedule (on two cores it competes with the server: the offered rate printed is the
rate actually sent).

    make overload              # or: python loadtests/bench/overload.py --repo model-repository
    python loadtests/bench/overload.py --target 127.0.0.1:9000   # an already running server

Started here, it serves twice in turn: without the admission front (grpc.aio alone on the port)
and with it (nginx in front of the workers, ``--front-in-flight`` calls per worker and method
group). The closed loop tries concurrencies from 2: beyond the front's bound a closed loop
measures how fast refusals come back, not what the gateway serves.

Prints the figures; writes reports/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (  # noqa: E402 - the shared closed loop, payloads and server
    METHOD, PROJECT, Server, digit_images, drive, fraud_rows, free_port, infer_request)

PUSHBACK = "grpc-retry-pushback-ms"  # the retry hint DeepServe's refusals carry


@dataclass(frozen=True)
class Workload:
    name: str
    payload: bytes  # one serialized ModelInferRequest (the closed loop of bench.py sends the same)
    method: str = METHOD


def fraud_workload(model: str = "fraud-autoencoder") -> Workload:
    """One transaction: the fraud model runs inline, on the gateway's event loop."""
    return Workload("fraud-1", infer_request(model, "transactions", fraud_rows(1)))


def classify_workload(model: str = "digit-classifier") -> Workload:
    """One 8x8 image: batched, computed in a worker thread, behind the model's ``max_queued``."""
    return Workload("digit-1", infer_request(model, "images", digit_images(1)))


# ---------------------------------------------------------------------------- open loop


def _open_loop_process(target: str, method: str, payload: bytes, rate: float, duration: float, timeout: float,
                       channels: int, barrier, out) -> None:
    """One generator process: ``rate`` calls/s, evenly spaced, for ``duration`` seconds."""
    import grpc

    async def run():
        # Retries off: every refusal reaches this code (the retry policy's behaviour is the
        # faults-under-load test's business).
        options = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 64 << 20)]
        chans = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
        for c in chans:
            await asyncio.wait_for(c.channel_ready(), 30)
        calls = [c.unary_unary(method) for c in chans]
        ok: list[float] = []
        refused: list[float] = []  # RESOURCE_EXHAUSTED (those with the hint are counted apart)
        other: dict[str, list[float]] = {}
        details: dict[str, str] = {}
        hinted = [0]
        pushback_ms: list[int] = []
        in_flight = [0, 0]  # now, highest
        tasks = set()

        async def one(call) -> None:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
            t0 = time.perf_counter()
            try:
                await call(payload, timeout=timeout)
                ok.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as e:
                seconds = time.perf_counter() - t0
                code = e.code().name
                if code == "RESOURCE_EXHAUSTED":
                    refused.append(seconds)
                    hint = dict(e.trailing_metadata() or ()).get(PUSHBACK)
                    if hint is not None:
                        hinted[0] += 1
                        if len(pushback_ms) < 10_000:
                            pushback_ms.append(int(hint))
                else:
                    other.setdefault(code, []).append(seconds)
                    details.setdefault(code, e.details() or "")
            finally:
                in_flight[0] -= 1

        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        cpu0, start = time.process_time(), time.perf_counter()
        end, issued, late = start + duration, 0, 0.0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            due = int((now - start) * rate)
            if due > issued:
                late = max(late, now - (start + (issued + 1) / rate))  # how far behind schedule
            while issued < due:
                task = asyncio.ensure_future(one(calls[issued % len(calls)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                issued += 1
            await asyncio.sleep(0.0005)
        sent_s = time.perf_counter() - start
        if tasks:
            await asyncio.wait(tasks)  # every call ends by its deadline at the latest
        cpu = time.process_time() - cpu0
        drained_s = time.perf_counter() - start
        for c in chans:
            await c.close()
        out.put({"issued": issued, "sent_s": sent_s, "drained_s": drained_s, "cpu_s": cpu, "late_s": late,
                 "ok": ok, "refused": refused, "other": other, "details": details,
                 "hinted": hinted[0], "pushback_ms": pushback_ms, "max_in_flight": in_flight[1]})

    asyncio.run(run())


def _ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1000, 2) if seconds else float("nan")


@dataclass
class OpenLoop:
    """What an open-loop run offered and what came back."""

    target_rate: float
    offered_rate: float  # calls actually sent per second
    duration_s: float
    processes: int
    sent: int
    ok: int
    admitted_rate: float
    admitted_p50_ms: float
    admitted_p99_ms: float
    refused: int  # RESOURCE_EXHAUSTED
    refused_p50_ms: float
    refused_p99_ms: float
    refused_with_hint: int
    pushback_ms_p50: float
    other_codes: dict = field(default_factory=dict)  # every other status: count
    other_details: dict = field(default_factory=dict)  # one message per other status
    slowest_ms: float = 0.0
    max_in_flight: int = 0  # highest count of calls one generator process had waiting
    behind_schedule_ms: float = 0.0  # how late the generator sent its latest call, at worst
    loadgen_cpu_percent: float = 0.0  # of one core, all generator processes together

    def line(self) -> str:
        others = ", ".join(f"{k} {v}" for k, v in self.other_codes.items()) or "none"
        return (f"offered {self.offered_rate:,.0f}/s (target {self.target_rate:,.0f}/s), admitted "
                f"{self.admitted_rate:,.0f}/s p50 {self.admitted_p50_ms} ms p99 {self.admitted_p99_ms} ms; "
                f"RESOURCE_EXHAUSTED {self.refused:,} (with hint {self.refused_with_hint:,}) p50 "
                f"{self.refused_p50_ms} ms p99 {self.refused_p99_ms} ms; "
                f"other codes: {others}; slowest {self.slowest_ms:.0f} ms; generator CPU "
                f"{self.loadgen_cpu_percent:.0f}% of a core, at worst {self.behind_schedule_ms:.0f} ms behind")


def open_loop(target: str, workload: Workload, rate: float, duration: float, processes: int = 2,
              timeout: float = 2.0, channels: int = 4) -> OpenLoop:
    """Send ``workload`` at ``rate`` calls/s for ``duration`` seconds, whatever the answers.

    Args:
        processes: generator processes (spawned); the rate is split between them.
        timeout: each call's deadline (a call the server holds longer ends DEADLINE_EXCEEDED).
        channels: connections per process, used in turn.
    """
    ctx = mp.get_context("spawn")
    out, barrier = ctx.Queue(), ctx.Barrier(processes)
    procs = [ctx.Process(target=_open_loop_process, daemon=True,
                         args=(target, workload.method, workload.payload, rate / processes, duration, timeout,
                               channels, barrier, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    parts = [out.get(timeout=duration + timeout + 120) for _ in procs]
    for p in procs:
        p.join()
    ok = [s for p in parts for s in p["ok"]]
    refused = [s for p in parts for s in p["refused"]]
    other: dict[str, list[float]] = {}
    details: dict[str, str] = {}
    for p in parts:
        for code, seconds in p["other"].items():
            other.setdefault(code, []).extend(seconds)
        details.update(p["details"])
    sent_s = max(p["sent_s"] for p in parts)
    every = ok + refused + [s for v in other.values() for s in v]
    pushback = [ms for p in parts for ms in p["pushback_ms"]]
    return OpenLoop(
        target_rate=rate, offered_rate=sum(p["issued"] for p in parts) / sent_s, duration_s=round(sent_s, 2),
        processes=processes, sent=sum(p["issued"] for p in parts), ok=len(ok), admitted_rate=len(ok) / sent_s,
        admitted_p50_ms=_ms(ok, 50), admitted_p99_ms=_ms(ok, 99), refused=len(refused),
        refused_p50_ms=_ms(refused, 50), refused_p99_ms=_ms(refused, 99),
        refused_with_hint=sum(p["hinted"] for p in parts),
        pushback_ms_p50=float(np.median(pushback)) if pushback else float("nan"),
        other_codes={k: len(v) for k, v in sorted(other.items())}, other_details=details,
        slowest_ms=round(max(every) * 1000, 1) if every else float("nan"),
        max_in_flight=max(p["max_in_flight"] for p in parts),
        behind_schedule_ms=round(max(p["late_s"] for p in parts) * 1000, 1),
        loadgen_cpu_percent=round(100 * sum(p["cpu_s"] for p in parts) / max(p["drained_s"] for p in parts), 1),
    )


# ---------------------------------------------------------------------------- closed loop


@dataclass
class Capacity:
    unloaded_p50_ms: float
    unloaded_p99_ms: float
    requests_per_s: float  # the best closed-loop rate: the capacity
    at_concurrency: int
    by_concurrency: dict = field(default_factory=dict)  # concurrency -> req/s
    errors: dict = field(default_factory=dict)


def capacity(target: str, workload: Workload, duration: float, concurrencies=(2, 4, 8, 32, 64)) -> Capacity:
    """Unloaded p50/p99 (one call at a time), then closed-loop req/s at each concurrency."""
    latencies, errors = drive(target, workload.payload, 1, duration, processes=1)
    unloaded = [float(x) for x in latencies]
    rates = {}
    for c in concurrencies:
        latencies, err = drive(target, workload.payload, c, duration)
        rates[c] = len(latencies) / duration
        for k, v in err.items():
            errors[k] = errors.get(k, 0) + v
    best = max(rates, key=rates.get)
    return Capacity(_ms(unloaded, 50), _ms(unloaded, 99), round(rates[best], 1), best,
                    {c: round(r, 1) for c, r in rates.items()}, errors)


# ---------------------------------------------------------------------------- afterwards


def recovery(target: str, workload: Workload, timeout: float = 30.0) -> float:
    """Seconds until ``ServerReady`` says true and a ``workload`` call answers OK."""
    import grpc

    from deepserve.proto import inference_pb2 as oip
    from deepserve.proto import inference_pb2_grpc as oip_grpc

    started = time.perf_counter()
    with grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as channel:
        ready = oip_grpc.GRPCInferenceServiceStub(channel).ServerReady
        call = channel.unary_unary(workload.method)
        while time.perf_counter() - started < timeout:
            try:
                if ready(oip.ServerReadyRequest(), timeout=1.0).ready:
                    call(workload.payload, timeout=1.0)
                    return time.perf_counter() - started
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{target} did not answer {workload.name} within {timeout:.0f} s after the overload")


@dataclass
class Report:
    workload: str
    capacity: Capacity
    overload: OpenLoop
    recovered_s: float

    def figures(self) -> dict[str, object]:
        """The figures docs/reliability.md records, by name."""
        c, o = self.capacity, self.overload
        return {
            "capacity req/s": c.requests_per_s,
            "unloaded p50 ms": c.unloaded_p50_ms,
            "unloaded p99 ms": c.unloaded_p99_ms,
            "offered req/s": round(o.offered_rate),
            "offered x capacity": round(o.offered_rate / c.requests_per_s, 2),
            "admitted req/s": round(o.admitted_rate),
            "admitted p50 ms": o.admitted_p50_ms,
            "admitted p99 ms": o.admitted_p99_ms,
            "admitted p99 / unloaded p99": round(o.admitted_p99_ms / c.unloaded_p99_ms, 2),
            "RESOURCE_EXHAUSTED": o.refused,
            "RESOURCE_EXHAUSTED with retry hint": o.refused_with_hint,
            "RESOURCE_EXHAUSTED p50 ms": o.refused_p50_ms,
            "RESOURCE_EXHAUSTED p99 ms": o.refused_p99_ms,
            "retry hint p50 ms": o.pushback_ms_p50,
            "other status codes": o.other_codes,
            "slowest call ms": o.slowest_ms,
            "load generator CPU % of a core": o.loadgen_cpu_percent,
            "recovered (ready and answering) s": round(self.recovered_s, 2),
        }


def measure(target: str, workload: Workload, factor: float = 4.0, duration: float = 5.0,
            closed_loop_s: float = 3.0, processes: int = 2, timeout: float = 2.0,
            concurrencies=(2, 4, 8, 32, 64)) -> Report:
    """Capacity, then ``factor`` times it open loop, then the time to recover."""
    cap = capacity(target, workload, closed_loop_s, concurrencies)
    over = open_loop(target, workload, factor * cap.requests_per_s, duration, processes, timeout)
    return Report(workload.name, cap, over, recovery(target, workload))


# ---------------------------------------------------------------------------- the run


def serve_config(tmp: Path, max_queued: int) -> Path:
    """The shipped deploy/serve_config.yaml, digit-classifier's queue cut to ``max_queued``
    (the admission settings are the shipped defaults: none is set there)."""
    import yaml

    config = yaml.safe_load((PROJECT / "deploy" / "serve_config.yaml").read_text())
    models = config["applications"][0]["args"]["models"]
    models["digit-classifier"]["batching"]["max_queued"] = max_queued
    path = tmp / "serve_config_overload.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=PROJECT / "model-repository")
    p.add_argument("--target", help="an already running server (default: start `deepserve serve` here)")
    p.add_argument("--front", choices=["both", "on", "off"], default="both",
                   help="servers started here: with the admission front, without it, or one of each in turn")
    p.add_argument("--front-in-flight", type=int, default=2,
                   help="the front's bound per gateway worker and method group (default 2)")
    p.add_argument("--factor", type=float, default=4.0, help="offered load, times the capacity (default 4)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of overload per workload (default 5)")
    p.add_argument("--processes", type=int, default=2, help="open-loop generator processes (default 2)")
    p.add_argument("--max-queued", type=int, default=16, help="digit-classifier's max_queued (default 16)")
    p.add_argument("--workloads", nargs="+", default=["fraud-1", "digit-1"], choices=["fraud-1", "digit-1"])
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=(os.cpu_count() or 1) >= 2,
                   help="the generator on the last core, the server started here on the others (default on "
                        "with 2 cores or more): otherwise the generator's own lag on busy cores is in every "
                        "latency it measures")
    p.add_argument("--out", type=Path, default=PROJECT / "reports" / "overload.json")
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    server_prefix: list[str] = []
    pinned = ""
    if args.pin and len(cpus) >= 2:  # this process and the generators it spawns (they inherit it)
        os.sched_setaffinity(0, {cpus[-1]})
        server_prefix = ["taskset", "-c", ",".join(map(str, cpus[:-1]))]
        pinned = f"; generator on core {cpus[-1]}, the server started here on {cpus[:-1]}"

    workloads = {"fraud-1": fraud_workload, "digit-1": classify_workload}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}{pinned}"
    print(f"Overload at {args.factor:g}x capacity, {args.duration:g} s per workload; {machine}", flush=True)
    reports: list[tuple[str, Report]] = []

    def run(label: str, target: str) -> None:
        for name in args.workloads:
            print(f"{label}: {name}", flush=True)
            report = measure(target, workloads[name](), args.factor, args.duration, processes=args.processes)
            reports.append((label, report))
            c = report.capacity
            print(f"  unloaded p50 {c.unloaded_p50_ms} ms p99 {c.unloaded_p99_ms} ms; capacity "
                  f"{c.requests_per_s:,.0f} req/s (closed loop, c={c.at_concurrency}; {c.by_concurrency})")
            print(f"  overload: {report.overload.line()}")
            print(f"  ready and answering {report.recovered_s:.2f} s after the overload", flush=True)

    if args.target is not None:
        run(args.target, args.target)
    else:
        fronts = {"both": [False, True], "on": [True], "off": [False]}[args.front]
        with tempfile.TemporaryDirectory() as tmp:
            for front in fronts:
                port = free_port()
                cmd = [sys.executable, "-m", "deepserve.cli", "serve", "--repo", str(args.repo), "--port", str(port),
                       "--metrics-port", str(free_port()), "--config", str(serve_config(Path(tmp), args.max_queued)),
                       "--models", "fraud-autoencoder", "digit-classifier"]
                env = {"DEEPSERVE_ADMISSION_FRONT": "1" if front else "0",
                       "DEEPSERVE_FRONT_IN_FLIGHT": str(args.front_in_flight)}
                label = f"admission front ({args.front_in_flight} per worker)" if front else "no front"
                with Server("deepserve", server_prefix + cmd, port, env) as server:
                    run(label, server.target)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "factor": args.factor, "duration_s": args.duration,
                                    "reports": [{"server": label, "workload": r.workload, "figures": r.figures(),
                                                 "capacity": asdict(r.capacity), "overload": asdict(r.overload)}
                                                for label, r in reports]}, indent=2, default=float) + "\n")
    print()
    for label, r in reports:
        print(f"| {label} | {r.workload} | " + " | ".join(f"{k}: {v}" for k, v in r.figures().items()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
