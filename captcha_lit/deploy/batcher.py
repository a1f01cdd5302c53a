"""Micro-batching for the HTTP service: concurrent requests share one model call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

# (label, encoded image) pairs in, one result dict per image out, in the same order.
SolveImages = Callable[[list[tuple[str, bytes]]], list[dict]]


class MicroBatcher:
    """Coalesces the images of concurrent requests into one onnxruntime call.

    Requests queue their images and await a future. One worker thread takes everything
    queued (up to ``max_images``), decodes it and runs one batched inference, while the
    next requests queue up behind it. A lone request therefore goes straight through,
    with no waiting window; under load, the per-call cost of the model is shared by the
    whole batch, so throughput rises instead of latency. ``max_images=1`` turns it off.
    """

    def __init__(self, solve_images: SolveImages, max_images: int):
        self._solve_images = solve_images
        self.max_images = max(1, int(max_images))
        self._pending: list[tuple[list[tuple[str, bytes]], asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        # One thread: batches run one after another, and each uses every intra-op thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="captcha_lit_solve")

    async def solve(self, items: list[tuple[str, bytes]]) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((items, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[list[tuple[str, bytes]], asyncio.Future]]:
        taken, count = [], 0
        while self._pending and (not taken or count + len(self._pending[0][0]) <= self.max_images):
            items, future = self._pending.pop(0)
            taken.append((items, future))
            count += len(items)
        return taken

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            taken = self._take()
            flat = [item for items, _ in taken for item in items]
            try:
                results = await loop.run_in_executor(self._executor, self._solve_images, flat)
            except Exception as exc:  # noqa: BLE001 - every waiting request must hear about it
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for items, future in taken:
                if not future.done():  # the client may have gone away
                    future.set_result(results[start:start + len(items)])
                start += len(items)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
