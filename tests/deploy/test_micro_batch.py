"""The server's micro-batcher: concurrent requests share one model call and get their own results,
and a single solve never waits behind more than one call, however many batches are queued."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from captcha_lit.deploy.batcher import MicroBatcher


def _images(*labels: int) -> np.ndarray:
    """One 1x1 'image' per label, whose single pixel is the label: the solver echoes it back."""
    return np.asarray(labels, dtype=np.uint8).reshape(len(labels), 1, 1, 1)


def _recording_solver(calls: list[list[int]], delay: float = 0.02, fail_on: int | None = None):
    def solve_arrays(images: np.ndarray) -> list[int]:
        labels = [int(v) for v in images.reshape(len(images))]
        calls.append(labels)
        assert threading.current_thread() is not threading.main_thread()  # off the event loop
        time.sleep(delay)
        if fail_on in labels:
            raise RuntimeError(f"model failed on {fail_on}")
        return [label * 10 for label in labels]

    return solve_arrays


def test_requests_queued_together_share_a_call_up_to_the_cap():
    calls: list[list[int]] = []

    async def run():
        batcher = MicroBatcher(_recording_solver(calls), max_images=8)
        try:
            return await asyncio.gather(*(batcher.solve(_images(i)) for i in range(10)))
        finally:
            batcher.close()

    results = asyncio.run(run())
    assert [len(c) for c in calls] == [8, 2]
    assert results == [[10 * i] for i in range(10)]


def test_a_lone_request_goes_straight_through():
    calls: list[list[int]] = []

    async def run():
        batcher = MicroBatcher(_recording_solver(calls, delay=0.0), max_images=64)
        try:
            return [await batcher.solve(_images(i)) for i in range(3)]
        finally:
            batcher.close()

    assert asyncio.run(run()) == [[0], [10], [20]]
    assert calls == [[0], [1], [2]]


def test_batches_are_split_at_the_cap_and_answered_whole_and_in_order():
    calls: list[list[int]] = []

    async def run():
        batcher = MicroBatcher(_recording_solver(calls), max_images=4)
        try:
            return await asyncio.gather(batcher.solve(_images(1, 2, 3)), batcher.solve(_images(4, 5)),
                                        batcher.solve(_images(*range(10, 16))))
        finally:
            batcher.close()

    xs, ys, zs = asyncio.run(run())
    assert xs == [10, 20, 30] and ys == [40, 50] and zs == [10 * i for i in range(10, 16)]
    assert calls == [[1, 2, 3, 4], [5, 10, 11, 12], [13, 14, 15]]


def test_a_single_solve_overtakes_queued_batches():
    """Five queued 4-image batches and then one single solve: the single goes into the very next call."""
    calls: list[list[int]] = []

    async def run():
        batcher = MicroBatcher(_recording_solver(calls), max_images=4)
        try:
            batches = [asyncio.ensure_future(batcher.solve(_images(*range(10 * b, 10 * b + 4)))) for b in range(1, 6)]
            await asyncio.sleep(0.005)  # the first batch is in the model now
            single = await batcher.solve(_images(7))
            single_done_after = sum(1 for b in batches if b.done())
            await asyncio.gather(*batches)
            return single, single_done_after
        finally:
            batcher.close()

    single, batches_done_before_single = asyncio.run(run())
    assert single == [70]
    assert calls[1][0] == 7  # the call right after the one in progress
    assert batches_done_before_single <= 1


def test_a_cancelled_request_is_not_run():
    calls: list[list[int]] = []

    async def run():
        batcher = MicroBatcher(_recording_solver(calls), max_images=1)
        try:
            first = asyncio.ensure_future(batcher.solve(_images(1)))
            await asyncio.sleep(0)
            gone = asyncio.ensure_future(batcher.solve(_images(2)))
            await asyncio.sleep(0.005)
            gone.cancel()  # e.g. its request ran out of time
            return await first, await batcher.solve(_images(3))
        finally:
            batcher.close()

    assert asyncio.run(run()) == ([10], [30])
    assert calls == [[1], [3]]


def test_a_failing_call_fails_its_requests_and_the_batcher_keeps_serving():
    calls: list[list[int]] = []

    async def run():
        batcher = MicroBatcher(_recording_solver(calls, fail_on=9), max_images=2)
        try:
            first = await asyncio.gather(batcher.solve(_images(9)), batcher.solve(_images(1)),
                                         batcher.solve(_images(2)), return_exceptions=True)
            later = await batcher.solve(_images(3))
            return first, later
        finally:
            batcher.close()

    (bad, same_call, other_call), later = asyncio.run(run())
    assert isinstance(bad, RuntimeError) and "model failed on 9" in str(bad)
    assert isinstance(same_call, RuntimeError)  # shared the failing call
    assert other_call == [20]
    assert later == [30]
