"""What one Open Inference Protocol request costs in DeepServe's own code, without gRPC.

The servicer, the dataplane and a model's session, in one process with no network:
microseconds per request for parse → ``ModelInfer`` → serialize, for the session's run alone,
and for protobuf's parse and serialize alone; then the functions that take the time
(cProfile). The rest of a served request's CPU is gRPC's (grpc.aio), which every Python
server pays (docs/benchmarks.md, "Where the time goes").

``--concurrency N`` keeps N requests in flight (batching can merge them), and ``--no-batching``
runs one request per session run: what batching saves where gRPC costs nothing.

    .venv/bin/python loadtests/bench/request_cost.py [--rows 1] [--requests 20000] [--profile]
    .venv/bin/python loadtests/bench/request_cost.py --model digit-classifier --concurrency 64 [--no-batching]
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
from bench import PROJECT, digit_images, fraud_rows, infer_request  # noqa: E402 - the benchmark's payloads


class _Context:
    """What the servicer asks of a gRPC call's context."""

    def set_trailing_metadata(self, metadata) -> None:
        pass

    def time_remaining(self) -> float:
        return 10.0

    def invocation_metadata(self):
        return ()

    async def abort(self, code, message) -> None:
        raise RuntimeError(f"{code}: {message}")


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=PROJECT / "model-repository")
    p.add_argument("--model", default="fraud-autoencoder", choices=["fraud-autoencoder", "digit-classifier"])
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    p.add_argument("--no-batching", action="store_true", help="one request per session run")
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
    # The shipped config's batching (deploy/serve_config.yaml), or none.
    batching = {"max_batch_size": 64, "max_wait_s": 0.0, "max_queued": 2048, "enabled": not args.no_batching}
    entry = {"intra_op_threads": 1, "batching": batching}
    runtime = load_runtime(str(repo.root), args.model, repo.latest_version(args.model), entry, 4096, "gateway")
    model = ServedModel(runtime=runtime, backend=backend_for(runtime, batching), ready=True,
                        batching=BatchingConfig.from_dict(batching))
    servicer = InferenceServicer(DataPlane([model]), "bench")
    if args.model == "fraud-autoencoder":
        input_name, rows = "transactions", fraud_rows(args.rows)
    else:
        input_name, rows = "images", digit_images(args.rows)
    raw = infer_request(args.model, input_name, rows, tuple(args.outputs))
    context = _Context()

    async def one() -> None:
        response = await servicer.ModelInfer(oip.ModelInferRequest.FromString(raw), context)
        response.SerializeToString()

    async def serve_all(n: int) -> float:
        started = time.perf_counter()
        if args.concurrency == 1:  # no tasks: what they cost is not the server's
            for _ in range(n):
                await one()
            return (time.perf_counter() - started) / n * 1e6
        for _ in range(n // args.concurrency):
            await asyncio.gather(*(one() for _ in range(args.concurrency)))
        return (time.perf_counter() - started) / (n // args.concurrency * args.concurrency) * 1e6

    await serve_all(500)  # warm-up
    served = await serve_all(args.requests)
    feeds = {input_name: rows}
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
    print(f"{args.model}, {args.rows} row(s) per request, outputs {args.outputs or 'all'}, concurrency "
          f"{args.concurrency}, batching {'off' if args.no_batching else 'on'} (runs {'threaded' if model.backend.threaded else 'inline'}): "
          f"{len(raw):,} bytes in, {response.ByteSize():,} out; batches of {model.backend.stats.requests / max(model.backend.stats.runs, 1):.1f} on average")
    print(f"  parse + ModelInfer + serialize   {served:7.1f} µs/request")
    print(f"  one session.run of this request  {run:7.1f} µs (alone, in this thread)")
    print(f"  of which protobuf parse+serialize {wire:6.1f} µs")
    if args.concurrency == 1:
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
