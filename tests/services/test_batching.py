"""BatchingBackend on a real ONNX Runtime session: merging, splitting, deadlines, overload."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deepserve.batching import BatchingBackend, BatchingConfig
from deepserve.errors import DeadlineExceeded, Overloaded
from deepserve.runtime import runtime_for


@pytest.fixture(scope="module")
def runtime(repository):
    model, data = repository.load("digit-classifier")
    rt = runtime_for(model.manifest)
    rt.load(data)
    return rt


def _images(n, seed):
    return {"images": np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)}


def test_concurrent_requests_share_runs_and_get_their_own_rows(runtime):
    backend = BatchingBackend(runtime, BatchingConfig(max_batch_size=16, threaded=True))
    requests = [_images(n, seed) for seed, n in enumerate([1, 3, 2, 5, 1, 4, 2, 7])]

    async def main():
        return await asyncio.gather(*(backend.infer(r, timeout=10) for r in requests))

    results = asyncio.run(main())
    for request, (result, _) in zip(requests, results):
        want = runtime.run(request)
        np.testing.assert_allclose(result["probabilities"], want["probabilities"], rtol=1e-5, atol=1e-6)
    assert backend.stats.requests == len(requests)
    assert backend.stats.runs < len(requests)  # some runs carried several requests
    assert backend.stats.rows == sum(len(r["images"]) for r in requests)
    # Each request's share of its run: the shares add up to the runs, exactly.
    timings = [timing for _, timing in results]
    assert sum(t.executions for t in timings) == pytest.approx(backend.stats.runs)
    assert all(t.compute_s > 0 and t.queue_s >= 0 and t.batch_rows >= 1 for t in timings)


def test_inline_models_compute_each_request_as_it_comes(runtime):
    backend = BatchingBackend(runtime, BatchingConfig(threaded=False))
    requests = [_images(n, seed) for seed, n in enumerate([1, 3, 2])]

    async def main():
        return await asyncio.gather(*(backend.infer(r, timeout=10) for r in requests))

    for request, (result, timing) in zip(requests, asyncio.run(main())):
        np.testing.assert_allclose(result["probabilities"], runtime.run(request)["probabilities"], rtol=1e-6)
        assert timing.executions == 1.0 and timing.queue_s == 0.0 and timing.batch_rows == len(request["images"])
    assert backend.stats.runs == 3 and backend.stats.largest == 1


def test_inline_or_threaded_is_chosen_by_measured_batch_cost(runtime):
    # The 8x8 CNN takes about a millisecond for 64 images on this machine, microseconds for one.
    assert BatchingBackend(runtime, BatchingConfig(max_batch_size=1024)).threaded
    assert BatchingBackend(runtime, BatchingConfig(max_batch_size=1, threaded=None)).threaded is (
        runtime.time_run(1) >= 0.0005)


def test_disabled_batching_runs_one_request_at_a_time(runtime):
    backend = BatchingBackend(runtime, BatchingConfig(enabled=False, threaded=True))

    async def main():
        await asyncio.gather(*(backend.infer(_images(2, i), timeout=10) for i in range(6)))

    asyncio.run(main())
    assert backend.stats.runs == 6 and backend.stats.largest == 1


def test_full_queue_is_overloaded(runtime):
    backend = BatchingBackend(runtime, BatchingConfig(max_queued=3, threaded=True))

    async def main():
        return await asyncio.gather(*(backend.infer(_images(1, i), timeout=10) for i in range(8)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(refused) == 5 and all("overloaded" in str(r) for r in refused)
    assert sum(isinstance(r, tuple) for r in results) == 3


def test_deadline_while_queued(runtime):
    backend = BatchingBackend(runtime, BatchingConfig(max_wait_s=0.2, max_batch_size=64))

    async def main():
        return await asyncio.gather(backend.infer(_images(1, 0), timeout=0.01),
                                    backend.infer(_images(1, 1), timeout=5), return_exceptions=True)

    short, long = asyncio.run(main())
    assert isinstance(short, DeadlineExceeded) and "deadline" in str(short)
    assert isinstance(long, tuple) and backend.stats.requests == 1  # the expired one never ran


def test_batching_options_are_checked():
    with pytest.raises(ValueError, match="max_batch"):
        BatchingConfig.from_dict({"max_batch": 8})
