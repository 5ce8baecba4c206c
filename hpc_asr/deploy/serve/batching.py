"""Dynamic batching: concurrent requests' feature matrices become one padded model run.

Whatever queued while the model ran forms the next batch, so batches grow with the load and a
lone request never waits; ``max_wait_ms`` > 0 also holds the first item that long for company
(more batching, more latency at low load). A batch closes at ``max_batch``
items or when the next would push the padded size past ``max_batch_frames``. The run (model +
decoding) happens on one worker thread, so the event loop keeps accepting and the decoders, which
are not thread-safe, are only ever called from that thread. Offline requests and the streams'
partial/final decodes share the queue, so they batch together. An item is anything with a length
in input frames: a feature matrix, or a chunked stream's ``ChunkJob`` (its windows), which the run
(``Backend.run_items``) sorts by kind. A full queue refuses (503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hpc_asr.deploy.serve.limits import Rejected

__all__ = ["Batcher"]


class Batcher:
    """``await submit(feats)`` -> ``run([feats, ...])[i]`` for that item, run in batches."""

    def __init__(self, run: Callable[[list[np.ndarray]], list[Any]], max_batch: int, max_batch_frames: int,
                 max_wait_ms: float, max_queue: int, on_batch: Callable[[int], None] | None = None):
        self.run, self.max_batch, self.max_batch_frames = run, max_batch, max_batch_frames
        self.max_wait_s, self.on_batch = max_wait_ms / 1000, on_batch
        self.queue: asyncio.Queue = asyncio.Queue(max_queue)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None
        self._pending = None  # the item that did not fit the last batch: first of the next

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.pool.shutdown(wait=True)

    async def submit(self, feats: np.ndarray) -> Any:
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((feats, fut))
        except asyncio.QueueFull:
            raise Rejected(503, "busy", f"{self.queue.maxsize} requests already wait for the model "
                           "(serve.max_queue): retry later") from None
        return await fut

    async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        batch = [self._pending if self._pending is not None else await self.queue.get()]
        self._pending = None
        longest = len(batch[0][0])
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
            if max(longest, len(item[0])) * (len(batch) + 1) > self.max_batch_frames:
                self._pending = item  # starts the next batch
                break
            longest = max(longest, len(item[0]))
            batch.append(item)
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [b for b in await self._collect() if not b[1].cancelled()]  # a client that left
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self.pool, self.run, [f for f, _ in batch])
            except Exception as e:  # the model failing must reach every waiter, not kill the worker
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)
