"""Triton's perf_analyzer against every served model, and its table.

    python loadtests/perf_analyzer.py --target 127.0.0.1:9000            # make perf-analyzer
    python loadtests/perf_analyzer.py --target HOST:PORT --quick         # a few seconds a model

perf_analyzer is Triton's own load generator (C++). It reads each model's configuration
(Triton's ``ModelConfig`` extension) to build its requests, sends them over the Open
Inference Protocol from a closed loop of ``--concurrency`` in-flight requests, and reads the
server's side of the time (queue, compute) from ``ModelStatistics``. It comes in the
``tritonclient==2.50.0`` wheel (newer wheels need glibc 2.38), which ``make perf-analyzer``
installs into ``.venv-perf`` with the CUDA runtime library it links against (no GPU needed).

Inputs it cannot invent: the generators' ``label`` must be a digit and the recommender's
ids must be users of its graph, so those models get ``--input-data`` JSON with valid
values; the others take perf_analyzer's random data. Exit status: 0 when every model was
measured without an error, 1 otherwise, 2 when perf_analyzer is missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

PROJECT = Path(__file__).resolve().parents[1]
VENV = PROJECT / ".venv-perf"
PERF_ANALYZER = VENV / "bin" / "perf_analyzer"


def environment() -> dict[str, str]:
    """perf_analyzer's environment: libcudart.so.12 from pip's nvidia-cuda-runtime-cu12."""
    libs = sorted(VENV.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    env = dict(os.environ)
    if libs:
        env["LD_LIBRARY_PATH"] = ":".join([str(libs[0]), env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    return env


def unavailable() -> str | None:
    """Why perf_analyzer cannot run here (None when it can)."""
    if not PERF_ANALYZER.exists():
        return f"{PERF_ANALYZER} is missing: run `make perf-analyzer-install`"
    done = subprocess.run([str(PERF_ANALYZER), "--version"], env=environment(), capture_output=True, text=True)
    if done.returncode != 0:  # typically a missing shared library (libb64, libcudart)
        return f"perf_analyzer does not start: {(done.stderr or done.stdout).strip()[:300]}"
    return None


def input_data(kind: str, count: int = 16) -> dict | None:
    """perf_analyzer's --input-data JSON for models whose inputs must be valid values."""
    if kind in ("gan", "diffusion"):
        return {"data": [{"label": {"content": [i % 10], "shape": [1]}} for i in range(count)]}
    if kind == "recommender":
        return {"data": [{"user": {"content": [i * 37 % 1000], "shape": [1]},
                          "neighbors": {"content": [-1], "shape": [1, 1]},
                          "exclude_known": {"content": [True], "shape": [1]}} for i in range(count)]}
    return None  # random data fits (transactions, pixels)


@dataclass
class Result:
    model: str
    concurrency: int
    throughput: float  # inferences per second
    p50_us: float
    p99_us: float
    server_queue_us: float
    server_compute_us: float
    error: str = ""


def served(target: str) -> dict[str, str]:
    """Served models and their kinds (ListModels)."""
    from deepserve.client import DeepServeClient

    with DeepServeClient(target) as client:
        return {m.name: m.kind for m in client.list_models().models}


def measure(target: str, model: str, kind: str, concurrency: int, window_ms: int, workdir: Path) -> Result:
    report = workdir / f"{model}.csv"
    cmd = [str(PERF_ANALYZER), "-m", model, "-i", "grpc", "-u", target,
           "--concurrency-range", str(concurrency), "--measurement-interval", str(window_ms),
           # A shared 2-core machine rarely gives three windows within perf_analyzer's default
           # 10% of each other; the figures are averages over the windows either way. Stability
           # is judged on throughput and mean latency: with --percentile 99 it was judged on the
           # p99 of one-second windows, which a busy machine rarely repeats. The report has p99.
           "--stability-percentage", "50", "--max-trials", "10", "-f", str(report)]
    data = input_data(kind)
    if data is not None:
        path = workdir / f"{model}.json"
        path.write_text(json.dumps(data))
        cmd += ["--input-data", str(path)]
    done = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or not report.exists():
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        return Result(model, concurrency, 0.0, 0, 0, 0, 0, error=" | ".join(lines[-3:]) or f"exit {done.returncode}")
    with open(report, newline="") as f:
        row = next(csv.DictReader(f))
    return Result(
        model, concurrency, float(row["Inferences/Second"]), float(row["p50 latency"]), float(row["p99 latency"]),
        float(row.get("Server Queue", 0) or 0), float(row.get("Server Compute Infer", 0) or 0))


def print_table(results: list[Result]) -> None:
    print(f"{'model':26s} {'conc':>4s} {'infer/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'srv queue ms':>12s} {'srv compute ms':>14s}")
    for r in results:
        if r.error:
            print(f"{r.model:26s} {r.concurrency:4d}  ERROR: {r.error}")
        else:
            print(f"{r.model:26s} {r.concurrency:4d} {r.throughput:9.1f} {r.p50_us / 1000:8.2f} {r.p99_us / 1000:8.2f} "
                  f"{r.server_queue_us / 1000:12.3f} {r.server_compute_us / 1000:14.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=f"127.0.0.1:{os.environ.get('DEEPSERVE_GRPC_PORT', '9000')}")
    p.add_argument("--models", nargs="+", help="default: every served model")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="in-flight requests (default 1 8)")
    p.add_argument("--window-ms", type=int, default=3000, help="measurement window (default 3000)")
    p.add_argument("--quick", action="store_true", help="concurrency 1 and 1 s windows: a smoke run")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    why = unavailable()
    if why:
        print(f"perf_analyzer unavailable: {why}", file=sys.stderr)
        return 2
    if args.quick:
        args.concurrency, args.window_ms = [1], 1000
    try:
        kinds = served(args.target)
    except grpc.RpcError as exc:
        print(f"error: {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    models = args.models or sorted(kinds)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for model in models:
            for concurrency in args.concurrency:
                results.append(measure(args.target, model, kinds.get(model, ""), concurrency, args.window_ms,
                                       Path(workdir)))
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps([vars(r) for r in results], indent=2) + "\n")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
