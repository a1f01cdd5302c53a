"""Micro-batching for the HTTP service: concurrent requests share one model call."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# (N, H, W, C) uint8 images at the model input size in, one result per image out, in order.
SolveArrays = Callable[[np.ndarray], list]


class _Job:
    """One request's images, answered when every one of them has been through the model."""

    __slots__ = ("images", "future", "results", "taken")

    def __init__(self, images: np.ndarray, future: asyncio.Future):
        self.images, self.future = images, future
        self.results: list = [None] * len(images)
        self.taken = 0  # images handed to model calls so far


class MicroBatcher:
    """Coalesces the images of concurrent requests into one onnxruntime call.

    Requests queue their images and await a future. One worker thread takes up to
    ``max_images`` queued images and runs one batched inference, while the next requests
    queue up behind it. A lone request therefore goes straight through, with no waiting
    window; under load, the per-call cost of the model is shared by the whole batch, so
    throughput rises instead of latency. ``max_images=1`` turns it off.

    Single-image requests go first, and a large batch is split across calls, so a single
    solve waits for at most the one call in progress (of at most ``max_images`` images),
    however many batches are queued.
    """

    def __init__(self, solve_arrays: SolveArrays, max_images: int):
        self._solve_arrays = solve_arrays
        self.max_images = max(1, int(max_images))
        self._single: deque[_Job] = deque()
        self._bulk: deque[_Job] = deque()
        self._worker: asyncio.Task | None = None
        # One thread: batches run one after another, and each uses every intra-op thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captcha_lit_solve")

    async def solve(self, images: np.ndarray) -> list:
        future = asyncio.get_running_loop().create_future()
        (self._single if len(images) == 1 else self._bulk).append(_Job(images, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[_Job, int, int]]:
        """(job, start, stop) slices for the next call: single solves first, then batches in order."""
        taken, room = [], self.max_images
        for queue in (self._single, self._bulk):
            while queue and room:
                job = queue[0]
                if job.future.done():  # cancelled: the request ran out of time or its client left
                    queue.popleft()
                    continue
                start = job.taken
                stop = min(len(job.images), start + room)
                taken.append((job, start, stop))
                job.taken, room = stop, room - (stop - start)
                if stop == len(job.images):
                    queue.popleft()
        return taken

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._single or self._bulk:
            taken = self._take()
            if not taken:
                continue
            images = np.concatenate([job.images[start:stop] for job, start, stop in taken])
            try:
                results = await loop.run_in_executor(self._executor, self._solve_arrays, images)
            except Exception as exc:  # noqa: BLE001 - every waiting request must hear about it
                for job, _, _ in taken:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            offset = 0
            for job, start, stop in taken:
                job.results[start:stop] = results[offset:offset + stop - start]
                offset += stop - start
                if stop == len(job.images) and not job.future.done():  # the client may have gone away
                    job.future.set_result(job.results)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
