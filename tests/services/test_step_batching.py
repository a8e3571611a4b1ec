"""StepBatcher in-process with the real diffusion model: requests share session runs step by
step, joining and leaving at step boundaries, without changing each other's images."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deepserve.batching import BatchingConfig
from deepserve.errors import DeadlineExceeded, Overloaded
from deepserve.generation import StepBatcher, generate_now
from deepserve.runtime import GenerationProgress, GenerationResult, runtime_for


@pytest.fixture(scope="module")
def diffusion(repository):
    model, data = repository.load("digit-diffusion")
    runtime = runtime_for(model.manifest)
    runtime.load(data)
    return runtime


def _request(runtime, label=3, count=2, seed=1, steps=10, sampler="ddim", guidance=None, progress=True):
    return runtime.request(np.full(count, label), seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                           progress=progress)


async def _collect(batcher, request, timeout=60.0):
    return [event async for event in batcher.generate(request, timeout)]


def test_batched_requests_equal_their_solo_runs(diffusion):
    requests = [
        _request(diffusion, label=1, seed=1, steps=10),
        _request(diffusion, label=2, count=3, seed=2, steps=25),
        _request(diffusion, label=3, seed=3, steps=7, sampler="ddpm"),
        _request(diffusion, label=-1, seed=4, steps=10),  # unconditional: one row per image
        _request(diffusion, label=5, seed=5, steps=10, guidance=1.0),
    ]

    async def main():
        batcher = StepBatcher(diffusion, BatchingConfig(max_batch_size=512))
        results = await asyncio.gather(*(_collect(batcher, r) for r in requests))
        return batcher, results

    batcher, results = asyncio.run(main())
    for request, events in zip(requests, results):
        assert [type(e) for e in events] == [GenerationProgress] * request.steps + [GenerationResult]
        solo = generate_now(diffusion, request)
        assert events[-1].images.tobytes() == solo.images.tobytes()
    # Every step of the 25-step request ran with others for the first 10 steps.
    assert batcher.largest == len(requests)
    assert batcher.job_steps == sum(r.steps for r in requests)
    assert batcher.steps_run == 25


def test_late_request_joins_the_running_batch(diffusion):
    async def main():
        batcher = StepBatcher(diffusion, BatchingConfig(max_batch_size=512))
        first = asyncio.ensure_future(_collect(batcher, _request(diffusion, steps=40)))
        while batcher.steps_run < 5:
            await asyncio.sleep(0.001)
        joined_at = batcher.steps_run
        late = await _collect(batcher, _request(diffusion, label=7, seed=9, steps=10))
        await first
        return batcher, joined_at, late

    batcher, joined_at, late = asyncio.run(main())
    assert late[-1].images.shape == (2, 1, 8, 8)
    # The late request's 10 steps ran inside the first one's 40: no extra runs.
    assert batcher.steps_run == 40 and joined_at < 30
    assert batcher.largest == 2


def test_row_budget_and_disabled_batching_hold_requests_back(diffusion):
    async def run(config):
        batcher = StepBatcher(diffusion, config)
        # Guided: 2 images x 2 rows = 4 rows each.
        await asyncio.gather(*(_collect(batcher, _request(diffusion, seed=s, steps=5)) for s in range(4)))
        return batcher

    budget = asyncio.run(run(BatchingConfig(max_batch_size=8)))
    assert budget.largest == 2 and budget.steps_run == 10
    off = asyncio.run(run(BatchingConfig(max_batch_size=512, enabled=False)))
    assert off.largest == 1 and off.steps_run == 20


def test_closing_a_stream_drops_its_job_at_the_next_step(diffusion):
    async def main():
        batcher = StepBatcher(diffusion, BatchingConfig(max_batch_size=512))
        other = asyncio.ensure_future(_collect(batcher, _request(diffusion, label=4, steps=30)))
        stream = batcher.generate(_request(diffusion, steps=1000), 60.0)
        for _ in range(3):
            await stream.__anext__()
        await stream.aclose()
        events = await other
        await asyncio.sleep(0.05)
        return batcher, events

    batcher, events = asyncio.run(main())
    assert isinstance(events[-1], GenerationResult)
    assert batcher.job_steps < 30 + 10  # the closed job stopped after its 3rd or 4th step
    assert (asyncio.run(batcher.info()))["in_flight"] == 0


def test_deadline_and_queue_limit(diffusion):
    async def main():
        batcher = StepBatcher(diffusion, BatchingConfig(max_batch_size=512, max_queued=1))
        slow = batcher.generate(_request(diffusion, count=64, steps=1000, sampler="ddpm"), 0.2)
        with pytest.raises(DeadlineExceeded):
            async for _ in slow:
                pass
        running = batcher.generate(_request(diffusion, steps=200), 30.0)
        await running.__anext__()
        with pytest.raises(Overloaded):
            await _collect(batcher, _request(diffusion, steps=5))
        await running.aclose()

    asyncio.run(main())


def test_progress_can_be_left_out(diffusion):
    async def main():
        batcher = StepBatcher(diffusion)
        return await _collect(batcher, _request(diffusion, steps=12, progress=False))

    events = asyncio.run(main())
    assert len(events) == 1 and isinstance(events[0], GenerationResult)
