"""Diffusion throughput with and without cross-request (step-level) batching.

Two DeepServe servers run side by side, serving only ``digit-diffusion`` from the same
repository: one with step batching (requests share every network evaluation), one with
``batching.enabled: false`` (one request at a time, its own images still batched). The
load alternates between them in short slices, so drift on a shared machine hits both
alike. Each request asks the Open Inference Protocol for one image of a class (default
options: 20 DDIM steps with classifier-free guidance, i.e. two network rows per image).

    make bench-generation       # or: python loadtests/bench/generation.py --repo model-repository

Prints images/s at each concurrency and the ratios; writes reports/bench_generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import PROJECT, Server, drive, free_port  # noqa: E402 - the shared load generator

MODEL = "digit-diffusion"


def request_bytes(count: int, steps: int) -> bytes:
    from deepserve.codec import dict_to_parameters
    from deepserve.proto import inference_pb2 as oip

    labels = np.arange(count, dtype="<i8") % 10
    request = oip.ModelInferRequest(
        model_name=MODEL,
        inputs=[oip.ModelInferRequest.InferInputTensor(name="label", datatype="INT64", shape=[count])],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="images")],
        raw_input_contents=[labels.tobytes()],
    )
    dict_to_parameters({"steps": steps}, request.parameters)
    return request.SerializeToString()


def config(tmp: Path, batching: bool, placement: str) -> Path:
    base = yaml.safe_load((PROJECT / "deploy" / "serve_config.yaml").read_text())
    app = base["applications"][0]
    entry = app["args"]["models"][MODEL]
    entry["placement"] = placement
    entry["batching"]["enabled"] = batching
    for d in list(app["deployments"]):
        if d["name"] == MODEL:
            if placement == "gateway":  # no deployment of its own
                app["deployments"].remove(d)
            else:  # hold the replica count still: this measures batching, not scaling
                d.pop("autoscaling_config", None)
                d["num_replicas"] = 1
    path = tmp / f"serve_config_{'batched' if batching else 'unbatched'}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def server(name: str, repo: Path, config_path: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "deepserve.cli", "serve", "--repo", str(repo), "--port", str(port),
           "--metrics-port", str(free_port()), "--config", str(config_path), "--models", MODEL]
    return Server(name, cmd, port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=PROJECT / "model-repository")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--count", type=int, default=1, help="images per request (default 1)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps per request (default 20)")
    p.add_argument("--rounds", type=int, default=4, help="slices per server and concurrency")
    p.add_argument("--slice", type=float, default=4.0, help="seconds per slice")
    p.add_argument("--placement", choices=("gateway", "deployment"), default="deployment",
                   help="where the diffusion session runs (default: as deploy/serve_config.yaml)")
    p.add_argument("--out", type=Path, default=PROJECT / "reports" / "bench_generation.json")
    args = p.parse_args(argv)
    if not (args.repo / MODEL).is_dir():
        print(f"no {MODEL} in {args.repo}: run `make models` first", file=sys.stderr)
        return 2

    payload = request_bytes(args.count, args.steps)
    images: dict[tuple[str, int], int] = {}
    latencies: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {
            "batched": server("batched", args.repo, config(Path(tmp), True, args.placement)),
            "unbatched": server("unbatched", args.repo, config(Path(tmp), False, args.placement)),
        }
        for s in servers.values():
            s.__enter__()
        try:
            print(f"{MODEL}: {args.count} image(s)/request, {args.steps} steps, placement {args.placement}; "
                  f"{args.rounds} x {args.slice:.0f} s slices per cell, servers alternating", flush=True)
            for c in args.concurrency:
                for _ in range(args.rounds):
                    for name, s in servers.items():
                        lat, errors = drive(s.target, payload, c, args.slice, warmup=1.0, processes=1)
                        if errors:
                            print(f"  {name} c={c}: errors {errors}", flush=True)
                        images[name, c] = images.get((name, c), 0) + len(lat) * args.count
                        latencies.setdefault((name, c), []).extend(lat.tolist())
                line = ", ".join(f"{n} {images[n, c] / (args.rounds * args.slice):.1f}" for n in servers)
                print(f"  c={c}: {line} images/s", flush=True)
        finally:
            for s in servers.values():
                s.__exit__()

    seconds = args.rounds * args.slice
    rows = []
    for (name, c), n in sorted(images.items()):
        lat = np.array(latencies[name, c]) * 1000
        rows.append({"server": name, "concurrency": c, "images_per_s": n / seconds,
                     "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                     "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None})
    rate = {(r["server"], r["concurrency"]): r["images_per_s"] for r in rows}
    lo, hi = min(args.concurrency), max(args.concurrency)
    ratios = {
        f"batched_c{hi}_over_c{lo}": rate["batched", hi] / rate["batched", lo],
        f"unbatched_c{hi}_over_c{lo}": rate["unbatched", hi] / rate["unbatched", lo],
        f"batched_over_unbatched_c{hi}": rate["batched", hi] / rate["unbatched", hi],
    }
    print("\n| server | concurrency | images/s | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['concurrency']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    target = ratios[f"batched_c{hi}_over_c{lo}"]
    print(f"target: step batching at c{hi} >= 4x c{lo}: {'met' if target >= 4 else 'NOT met'} ({target:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "results": rows, "ratios": ratios,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
