"""Triton's perf_analyzer and `make bench`'s load generator, interleaved, against one running
server: the same model, concurrency and server, cell after cell, so that the two methods'
figures can be compared on a shared, noisy machine (docs/benchmarks.md, "perf_analyzer").

    make serve &                                     # the shipped config
    .venv/bin/python loadtests/bench/perf_vs_bench.py --target 127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import bench  # noqa: E402 - loadtests/bench/bench.py: its closed-loop generator and payloads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="127.0.0.1:9000")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell (both methods)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)

    payloads = {
        "fraud-autoencoder": bench.infer_request("fraud-autoencoder", "transactions", bench.fraud_rows(1)),
        "digit-classifier": bench.infer_request("digit-classifier", "images", bench.digit_images(1)),
    }
    print(f"{'round':>5} {'model':18s} {'conc':>4} {'method':14s} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "perf.json"
        for round_ in range(1, args.rounds + 1):
            for model, payload in payloads.items():
                for c in args.concurrency:
                    latencies, errors = bench.drive(args.target, payload, c, args.seconds)
                    r = bench.summarize(model, "bench", c, 1, latencies, errors, args.seconds)
                    print(f"{round_:5d} {model:18s} {c:4d} {'make bench':14s} {r.requests_per_s:8.0f} "
                          f"{r.p50_ms:7.2f} {r.p99_ms:7.2f} {errors or ''}", flush=True)
                    subprocess.run([sys.executable, str(PROJECT / "loadtests" / "perf_analyzer.py"), "--target",
                                    args.target, "--models", model, "--concurrency", str(c), "--window-ms",
                                    str(int(args.seconds * 1000)), "--json", str(report)],
                                   check=True, capture_output=True)
                    pa = json.loads(report.read_text())[0]
                    print(f"{round_:5d} {model:18s} {c:4d} {'perf_analyzer':14s} {pa['throughput']:8.0f} "
                          f"{pa['p50_us'] / 1000:7.2f} {pa['p99_us'] / 1000:7.2f} {pa['error'] or ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
