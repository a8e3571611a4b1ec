"""What one Open Inference Protocol request costs in DeepServe's own code, without gRPC.

The servicer, the dataplane and the fraud model's session, in one process with no network:
microseconds per request for parse → ``ModelInfer`` → serialize, for the session's run alone,
and for protobuf's parse and serialize alone; then the functions that take the time
(cProfile). The rest of a served request's CPU is gRPC's (grpc.aio), which every Python
server pays (docs/benchmarks.md, "Where the time goes").

    .venv/bin/python loadtests/bench/request_cost.py [--rows 1] [--requests 20000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import PROJECT, fraud_rows, infer_request  # noqa: E402 - the benchmark's payloads


class _Context:
    """What the servicer asks of a gRPC call's context."""

    def set_trailing_metadata(self, metadata) -> None:
        pass

    def time_remaining(self) -> float:
        return 10.0

    async def abort(self, code, message) -> None:
        raise RuntimeError(f"{code}: {message}")


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=PROJECT / "model-repository")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--outputs", nargs="*", default=[], help="ask for these outputs only (default: all)")
    p.add_argument("--profile", action="store_true", help="print the 20 functions that take the most time")
    args = p.parse_args(argv)

    from deepserve import metrics

    metrics.for_gateway_worker()  # recording on, as in a gateway worker
    from deepserve.batching import BatchingConfig
    from deepserve.dataplane import DataPlane, ServedModel
    from deepserve.grpc_server import InferenceServicer
    from deepserve.loading import backend_for, load_runtime
    from deepserve.proto import inference_pb2 as oip
    from deepserve.repository import ModelRepository

    repo = ModelRepository(args.repo)
    entry = {"version": repo.latest_version("fraud-autoencoder"), "sha256": None, "intra_op_threads": 1,
             "batching": {"max_batch_size": 64, "max_wait_s": 0.0, "max_queued": 2048}}
    runtime = load_runtime(str(repo.root), "fraud-autoencoder", entry, 4096, "gateway")
    model = ServedModel(runtime=runtime, backend=backend_for(runtime, entry["batching"]), ready=True,
                        batching=BatchingConfig.from_dict(entry["batching"]))
    servicer = InferenceServicer(DataPlane([model]), "bench")
    rows = fraud_rows(args.rows)
    raw = infer_request("fraud-autoencoder", "transactions", rows, tuple(args.outputs))
    context = _Context()

    async def serve_all(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            response = await servicer.ModelInfer(oip.ModelInferRequest.FromString(raw), context)
            response.SerializeToString()
        return (time.perf_counter() - started) / n * 1e6

    await serve_all(500)  # warm-up
    served = await serve_all(args.requests)
    feeds = {"transactions": rows}
    started = time.perf_counter()
    for _ in range(args.requests):
        runtime.session.run(None, feeds)
    run = (time.perf_counter() - started) / args.requests * 1e6
    response = await servicer.ModelInfer(oip.ModelInferRequest.FromString(raw), context)
    started = time.perf_counter()
    for _ in range(args.requests):
        oip.ModelInferRequest.FromString(raw)
        response.SerializeToString()
    wire = (time.perf_counter() - started) / args.requests * 1e6
    print(f"fraud, {args.rows} row(s) per request, outputs {args.outputs or 'all'}: "
          f"{len(raw):,} bytes in, {response.ByteSize():,} out")
    print(f"  parse + ModelInfer + serialize   {served:7.1f} µs/request")
    print(f"  of which session.run (alone)     {run:7.1f} µs")
    print(f"  of which protobuf parse+serialize {wire:6.1f} µs")
    print(f"  DeepServe's own code             {served - run - wire:7.1f} µs")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await serve_all(args.requests)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
