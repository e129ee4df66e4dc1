"""Dynamic batching: one small asyncio scheduler per model.

Requests that can share a generate call (same rag, k, max_new_tokens, temperature) are grouped
until the batch is full or its first request has waited `max_wait`; the batch then runs in a
worker thread, one at a time per model, while new requests queue. Under load the queue grows
during a generate call and the next batch forms at once, so batches grow with the load.
The queue is bounded: a full one refuses at once (the caller answers 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable

log = logging.getLogger("aimlqa.server")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class Stopped(Exception):
    """The server is shutting down; waiting requests are refused."""


@dataclass(eq=False)
class Job:
    item: Hashable  # what the work function answers: a question, or (model, question)
    key: Hashable
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None  # when its batch began


# (items, key) -> one result per item: a value, or an exception for that item alone
Work = Callable[[list[str], Hashable], list]


class Batcher:
    def __init__(self, work: Work, max_batch_size: int = 8, max_wait_s: float = 0.01, queue_size: int = 256,
                 on_batch: Callable[[int, float], None] | None = None, on_depth: Callable[[int], None] | None = None):
        self.work = work
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.on_depth = on_depth or (lambda depth: None)
        self._waiting: deque[Job] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: list[Job] = []
        self._batch_s = 1.0  # running mean of a batch's time, for Retry-After

    @property
    def depth(self) -> int:
        return sum(1 for j in self._waiting if not j.future.done())

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in [*self._waiting, *self._running]:
            if not job.future.done():
                job.future.set_exception(Stopped("the server is shutting down"))
        self._waiting.clear()

    def submit(self, item, key: Hashable) -> Job:
        """Queue an item (a question); its job's future resolves to the result. Raises QueueFull at once."""
        self._prune()
        if len(self._waiting) >= self.queue_size:
            raise QueueFull(self.retry_after())
        job = Job(item, key, asyncio.get_running_loop().create_future())
        self._waiting.append(job)
        self.on_depth(len(self._waiting))
        self._wake.set()
        return job

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained by one batch's worth: a hint, 1..60."""
        batches_ahead = len(self._waiting) / self.max_batch_size
        return max(1, min(60, math.ceil(self._batch_s * batches_ahead)))

    def _prune(self) -> None:
        """Drop requests whose caller gave up (timed out, disconnected) before their batch began."""
        if any(j.future.done() for j in self._waiting):
            self._waiting = deque(j for j in self._waiting if not j.future.done())
            self.on_depth(len(self._waiting))

    def _compatible(self, key: Hashable) -> int:
        return sum(1 for j in self._waiting if j.key == key)

    def _take(self, key: Hashable) -> list[Job]:
        batch, rest = [], deque()
        for job in self._waiting:
            (batch if job.key == key and len(batch) < self.max_batch_size else rest).append(job)
        self._waiting = rest
        self.on_depth(len(rest))
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._run(batch)
            except Exception as exc:  # a bug here must not stop the scheduler: fail this batch, keep serving
                log.error("the batch scheduler failed", exc_info=exc)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    async def _next_batch(self) -> list[Job]:
        """The oldest request and those compatible with it, once the batch is full or it has waited max_wait."""
        while True:
            self._prune()
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self._waiting[0]
            deadline = first.enqueued + self.max_wait_s
            while self._compatible(first.key) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
                self._prune()
            batch = self._take(first.key)
            if batch:
                return batch

    async def _run(self, batch: list[Job]) -> None:
        t0 = time.monotonic()
        for job in batch:
            job.started = t0
        self._running = batch
        try:
            results = await asyncio.to_thread(self.work, [j.item for j in batch], batch[0].key)
            if len(results) != len(batch):
                raise RuntimeError(f"the model returned {len(results)} answers for {len(batch)} questions")
        except Exception as exc:
            if len(batch) > 1:  # re-run alone, so only the request that causes a failure fails
                log.warning("a batch of %d failed (%s); answering its requests one by one", len(batch), exc)
                for job in batch:
                    if not job.future.done():
                        await self._run([job])
                return
            results = [exc]
        finally:
            self._running = []
        seconds = time.monotonic() - t0
        self._batch_s = 0.8 * self._batch_s + 0.2 * seconds
        self.on_batch(len(batch), seconds)
        for job, result in zip(batch, results):
            if job.future.done():  # its caller gave up while it ran
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
