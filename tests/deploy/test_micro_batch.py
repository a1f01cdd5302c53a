"""The server's micro-batcher: concurrent requests share one model call and get their own results."""

from __future__ import annotations

import asyncio
import threading
import time

from captcha_lit.deploy.batcher import MicroBatcher


def _recording_solver(calls: list[list[str]], delay: float = 0.02, fail_on: str | None = None):
    def solve_images(items):
        labels = [label for label, _ in items]
        calls.append(labels)
        assert threading.current_thread() is not threading.main_thread()  # off the event loop
        time.sleep(delay)
        if fail_on in labels:
            raise RuntimeError(f"model failed on {fail_on}")
        return [{"text": label.upper(), "size": len(data)} for label, data in items]

    return solve_images


def test_requests_queued_together_share_a_call_up_to_the_cap():
    calls: list[list[str]] = []

    async def run():
        batcher = MicroBatcher(_recording_solver(calls), max_images=8)
        try:
            return await asyncio.gather(*(batcher.solve([(f"r{i}", b"x" * i)]) for i in range(10)))
        finally:
            batcher.close()

    results = asyncio.run(run())
    assert [len(c) for c in calls] == [8, 2]
    assert [r[0] for r in results] == [{"text": f"R{i}", "size": i} for i in range(10)]


def test_a_lone_request_goes_straight_through():
    calls: list[list[str]] = []

    async def run():
        batcher = MicroBatcher(_recording_solver(calls, delay=0.0), max_images=64)
        try:
            out = []
            for i in range(3):
                out.append(await batcher.solve([(f"a{i}", b"")]))
            return out
        finally:
            batcher.close()

    assert [r[0]["text"] for r in asyncio.run(run())] == ["A0", "A1", "A2"]
    assert calls == [["a0"], ["a1"], ["a2"]]


def test_multi_image_requests_stay_whole_and_in_order():
    calls: list[list[str]] = []

    async def run():
        batcher = MicroBatcher(_recording_solver(calls), max_images=4)
        try:
            return await asyncio.gather(
                batcher.solve([("x0", b""), ("x1", b""), ("x2", b"")]),
                batcher.solve([("y0", b""), ("y1", b"")]),
                batcher.solve([(f"z{i}", b"") for i in range(6)]),  # over the cap: goes alone
            )
        finally:
            batcher.close()

    xs, ys, zs = asyncio.run(run())
    assert [r["text"] for r in xs] == ["X0", "X1", "X2"]
    assert [r["text"] for r in ys] == ["Y0", "Y1"]
    assert [r["text"] for r in zs] == [f"Z{i}" for i in range(6)]
    assert calls == [["x0", "x1", "x2"], ["y0", "y1"], [f"z{i}" for i in range(6)]]


def test_a_failing_call_fails_its_requests_and_the_batcher_keeps_serving():
    calls: list[list[str]] = []

    async def run():
        batcher = MicroBatcher(_recording_solver(calls, fail_on="bad"), max_images=2)
        try:
            first = await asyncio.gather(batcher.solve([("bad", b"")]), batcher.solve([("ok1", b"")]),
                                         batcher.solve([("ok2", b"")]), return_exceptions=True)
            later = await batcher.solve([("ok3", b"")])
            return first, later
        finally:
            batcher.close()

    (bad, same_call, other_call), later = asyncio.run(run())
    assert isinstance(bad, RuntimeError) and "model failed on bad" in str(bad)
    assert isinstance(same_call, RuntimeError)  # shared the failing call
    assert other_call == [{"text": "OK2", "size": 0}]
    assert later == [{"text": "OK3", "size": 0}]
