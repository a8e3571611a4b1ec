"""Graph recommender at scale and on real networks: build time, peak memory, served latency
and recall@10 against the heuristics.

For each size (users; mean degree 20, so 10 edges per user), one child process builds the
clustered synthetic graph's recommender into a scratch repository (peak RSS is that
process's), then another loads it as a serving replica does (verified ONNX + sidecar,
:class:`deepserve.runtime.RecommenderRuntime`) and times one-request runs: the candidate
generation, pair features and ONNX scoring a gRPC request pays, without the transport.
recall@10 comes from the build's own evaluation (through the same runtime, on a seeded
sample of 2,000 warm and 2,000 cold users). The real networks of
:mod:`deepserve.models.graph.collection` go the same way (``make graph-collection`` fetches
them). The "2-hop ceiling" is the build's warm recall@10 of an oracle that ranks first every
held-out neighbour sharing a neighbour with the user
(:func:`deepserve.models.graph.evaluation.two_hop_ceiling`): no ranking of the 2-hop walk,
where the heuristics' and most of the model's candidates come from, can beat it.

    make bench-recommender        # 5k, 50k and 200k users, then every collection graph
    python -m loadtests.bench.recommender --users 5000 --graph hep-th
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = (5_000, 50_000, 200_000)
REQUESTS = 1_000


def build_one(target: str, repo: Path, seed: int) -> dict:
    """Child process: build and report wall time and this process's peak RSS."""
    from deepserve.models import graph
    from deepserve.models.graph import collection

    if target.isdigit():
        opts = graph.GraphBuildOptions(
            synthetic=graph.SyntheticGraphConfig(num_users=int(target), triadic_closure=graph.CLUSTERED),
            companion=None, max_eval_queries=2_000)
    else:
        opts = graph.GraphBuildOptions(edges=collection.path_of(target), max_eval_queries=2_000)
    started = time.perf_counter()
    directory = graph.build(repo, seed, opts)
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"directory": str(directory), "build_s": seconds, "peak_rss_mib": peak_mib}


def serve_one(repo: Path, seed: int) -> dict:
    """Child process: load as a replica does and time single requests (warm and cold users)."""
    from deepserve.repository import ModelRepository
    from deepserve.runtime import runtime_for

    model, data = ModelRepository(repo).load("graph-recommender")
    runtime = runtime_for(model.manifest)
    runtime.files = model.read_files()
    sidecar_mib = sum(len(b) for b in runtime.files.values()) / 2**20
    started = time.perf_counter()
    runtime.load(data, intra_op_threads=1)
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(seed)
    n = runtime.num_users
    index = runtime.index
    times = []
    for i in range(REQUESTS):
        # Requests carry external ids (a real network's users are not 0..N-1).
        if i % 5 == 4:  # one request in five: a new user with 5 neighbours
            inputs = {"user": np.array([-1]), "neighbors": runtime.to_ids(rng.choice(n, size=(1, 5), replace=False)),
                      "exclude_known": np.array([True])}
        else:
            u = int(rng.integers(n))
            while index.degree[u] == 0:
                u = int(rng.integers(n))
            inputs = {"user": runtime.to_ids(np.array([u])), "neighbors": np.full((1, 1), -1),
                      "exclude_known": np.array([True])}
        inputs = runtime.graph_inputs(inputs["user"], inputs["neighbors"], inputs["exclude_known"])
        t = time.perf_counter()
        runtime.run(inputs)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    m = model.manifest.metrics
    return {"load_s": load_s, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "recall_at_10": m["recall_at_10"], "cold_recall_at_10": m.get("cold_recall_at_10"),
            "adamic_adar_recall_at_10": m["adamic_adar_recall_at_10"],
            "cold_adamic_adar_recall_at_10": m.get("cold_adamic_adar_recall_at_10"),
            "popularity_recall_at_10": m["popularity_recall_at_10"],
            "average_clustering": m["average_clustering"],
            "users": model.manifest.training_data["num_users"],
            "edges": model.manifest.training_data["num_edges"],
            "two_hop_ceiling": m["two_hop_ceiling_recall_at_10"],
            "cold_two_hop_ceiling": m.get("cold_two_hop_ceiling_recall_at_10"),
            "sidecar_mib": sidecar_mib}


def _child(what: str, target: str, repo: Path, seed: int) -> dict:
    cmd = [sys.executable, "-m", "loadtests.bench.recommender", f"--{what}", target,
           "--repo", str(repo), "--seed", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} of {target} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from deepserve.models.graph.collection import GRAPHS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, action="append",
                        help="synthetic graph sizes (default 5k, 50k, 200k)")
    parser.add_argument("--graph", action="append", choices=sorted(GRAPHS),
                        help="real networks (default: all; with --users alone, none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument("--serve", metavar="TARGET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        print(json.dumps(build_one(args.build, args.repo, args.seed)))
        return
    if args.serve:
        print(json.dumps(serve_one(args.repo, args.seed)))
        return
    targets = [str(u) for u in args.users or ([] if args.graph else SIZES)]
    targets += args.graph or ([] if args.users else list(GRAPHS))
    print("| graph | users | edges | clustering | build | peak RSS | sidecar | load | p50 | p99 "
          "| recall@10 warm (AA, popularity; 2-hop ceiling) | recall@10 cold (AA; 2-hop ceiling) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for target in targets:
        with tempfile.TemporaryDirectory(prefix="bench-recommender-") as tmp:
            repo = Path(tmp)
            built = _child("build", target, repo, args.seed)
            s = _child("serve", target, repo, args.seed)
        name = "synthetic, clustered" if target.isdigit() else target
        print(f"| {name} | {s['users']:,} | {s['edges']:,} | {s['average_clustering']:.2f} "
              f"| {built['build_s'] / 60:.1f} min | {built['peak_rss_mib'] / 1024:.2f} GiB | {s['sidecar_mib']:.0f} MiB "
              f"| {s['load_s']:.1f} s | {s['p50_ms']:.1f} ms | {s['p99_ms']:.1f} ms "
              f"| {s['recall_at_10']:.3f} ({s['adamic_adar_recall_at_10']:.3f}, {s['popularity_recall_at_10']:.3f}; "
              f"{s['two_hop_ceiling']:.3f}) "
              f"| {s['cold_recall_at_10']:.3f} ({s['cold_adamic_adar_recall_at_10']:.3f}; "
              f"{s['cold_two_hop_ceiling']:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
