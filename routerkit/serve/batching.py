"""Dynamic batching: concurrent requests grouped into one model call, answered one by one.

`DynamicBatcher` holds an ``asyncio.Queue`` of submitted items and one worker task. The worker
takes the first waiting item, then keeps taking items until it holds ``max_batch`` of them or
``max_wait_ms`` have passed since it took the first (items already waiting are taken at once,
without waiting), and hands the batch to ``run_batch`` in a one-thread executor, so the event
loop keeps accepting requests while the model runs (torch releases the GIL). Each submitter's
future gets its own result. An item that ``batchable`` refuses (an input to tile) is run alone:
it ends the batch being gathered and starts the next one.

A batch whose ``run_batch`` raises is run again item by item, so that one bad item fails alone
and the others of its batch are still answered. A full queue refuses new items (`QueueFullError`);
stopping the batcher fails the items still waiting (`BatcherClosedError`).

Example:
    >>> import asyncio
    >>> async def main() -> list[int]:
    ...     batcher = DynamicBatcher(lambda items: [2 * i for i in items], max_batch=8, max_wait_ms=5)
    ...     try:
    ...         return list(await asyncio.gather(*(batcher.submit(i) for i in range(4))))
    ...     finally:
    ...         await batcher.stop()
    >>> asyncio.run(main())
    [0, 2, 4, 6]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["BatcherClosedError", "DynamicBatcher", "QueueFullError"]

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(RuntimeError):
    """The batcher's queue holds ``max_queue`` items already (the server is overloaded)."""


class BatcherClosedError(RuntimeError):
    """The batcher was stopped before the item was run."""


@dataclass
class _Job(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    batchable: bool = True


@dataclass
class _Worker(Generic[T, R]):
    """The queue and worker task of one event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Job[T, R] | None]
    task: asyncio.Task[None] | None = None
    held: list[_Job[T, R]] = field(default_factory=list)


class DynamicBatcher(Generic[T, R]):
    """Group concurrent `submit` calls into batches for one ``run_batch`` call each.

    Args:
        run_batch: Runs a batch of items, returns one result per item in order (called in a worker thread).
        max_batch: Most items per batch.
        max_wait_ms: Longest wait (milliseconds) for more items after the first of a batch (0: only those waiting).
        batchable: Whether an item may share a batch (default: every item); others run alone.
        on_batch: Called (in the worker thread) with the size of each batch before it runs.
        max_queue: Most items waiting; `submit` raises `QueueFullError` beyond.

    Raises:
        ValueError: ``max_batch < 1``, ``max_wait_ms < 0`` or ``max_queue < 1``.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        max_batch: int = 32,
        max_wait_ms: float = 10.0,
        batchable: Callable[[T], bool] | None = None,
        on_batch: Callable[[int], None] | None = None,
        max_queue: int = 1024,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"Expected max_batch >= 1 but got {max_batch}.")
        if max_wait_ms < 0:
            raise ValueError(f"Expected max_wait_ms >= 0 but got {max_wait_ms}.")
        if max_queue < 1:
            raise ValueError(f"Expected max_queue >= 1 but got {max_queue}.")
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait_ms = float(max_wait_ms)
        self.batchable = batchable
        self.on_batch = on_batch
        self.max_queue = int(max_queue)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="routerkit-batch")
        self._worker: _Worker[T, R] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Items waiting for a batch (not counting the batch running)."""
        worker = self._worker
        return 0 if worker is None else worker.queue.qsize() + len(worker.held)

    def start(self) -> None:
        """Start the worker task on the running event loop (`submit` does it too when needed).

        Raises:
            RuntimeError: No running event loop.
        """
        loop = asyncio.get_running_loop()
        worker = self._worker
        if worker is not None and worker.loop is loop and worker.task is not None and not worker.task.done():
            return
        self._closed = False
        queue: asyncio.Queue[_Job[T, R] | None] = asyncio.Queue()
        worker = _Worker(loop, queue)
        worker.task = loop.create_task(self._work(worker), name="routerkit-batcher")
        self._worker = worker

    async def stop(self) -> None:
        """Stop the worker after the batch it runs; items still waiting fail with `BatcherClosedError`."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None and worker.task is not None and worker.loop is asyncio.get_running_loop():
            self._fail_waiting(worker)
            worker.queue.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await worker.task
            self._fail_waiting(worker)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="routerkit-batch")

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result.

        Raises:
            QueueFullError: ``max_queue`` items wait already.
            BatcherClosedError: The batcher was stopped before the item ran.
            Exception: Whatever ``run_batch`` raised for this item (run alone).
        """
        if self._closed:
            raise BatcherClosedError("The server is shutting down: the request was not routed.")
        self.start()
        worker = self._worker
        assert worker is not None
        if self.pending >= self.max_queue:
            raise QueueFullError(
                f"Expected at most {self.max_queue} inputs waiting for the model but {self.pending} wait already; retry later."
            )
        future: asyncio.Future[R] = worker.loop.create_future()
        batchable = True if self.batchable is None else bool(self.batchable(item))
        worker.queue.put_nowait(_Job(item, future, batchable))
        return await future

    # -------------------------------------------------------------------------- the worker

    async def _next(self, worker: _Worker[T, R], timeout: float | None) -> _Job[T, R] | None:
        """The next job (a held one first); ``None`` for the stop signal. Raises ``TimeoutError`` after ``timeout`` s."""
        if worker.held:
            return worker.held.pop(0)
        if not worker.queue.empty():
            return worker.queue.get_nowait()
        if timeout is None:
            return await worker.queue.get()
        if timeout <= 0:
            raise TimeoutError
        return await asyncio.wait_for(worker.queue.get(), timeout)

    async def _work(self, worker: _Worker[T, R]) -> None:
        loop = worker.loop
        while True:
            first = await self._next(worker, None)
            if first is None:
                return
            batch = [first]
            stop = False
            if first.batchable:
                deadline = loop.time() + self.max_wait_ms / 1000.0
                while len(batch) < self.max_batch:
                    try:
                        job = await self._next(worker, deadline - loop.time())
                    except TimeoutError:
                        break
                    if job is None:
                        stop = True
                        break
                    if not job.batchable:
                        worker.held.append(job)  # runs alone, next
                        break
                    batch.append(job)
            live = [job for job in batch if not job.future.done()]  # a cancelled request (client gone) is dropped
            if live:
                await self._run(live)
            if stop:
                return

    async def _run(self, batch: list[_Job[T, R]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._call, [job.item for job in batch])
        except Exception as err:
            if len(batch) == 1:
                _settle(batch[0], error=err)
                return
            for job in batch:  # find the item that failed: the others are still answered
                await self._run([job])
            return
        if len(results) != len(batch):
            error = RuntimeError(f"run_batch returned {len(results)} results for a batch of {len(batch)} items.")
            for job in batch:
                _settle(job, error=error)
            return
        for job, result in zip(batch, results, strict=True):
            _settle(job, result=result)

    def _call(self, items: list[T]) -> Sequence[R]:
        if self.on_batch is not None:
            self.on_batch(len(items))
        return self.run_batch(items)

    def _fail_waiting(self, worker: _Worker[T, R]) -> None:
        jobs = list(worker.held)
        worker.held.clear()
        while not worker.queue.empty():
            job = worker.queue.get_nowait()
            if job is not None:
                jobs.append(job)
        for job in jobs:
            _settle(job, error=BatcherClosedError("The server is shutting down: the request was not routed."))


def _settle(job: _Job[T, R], result: R | None = None, error: BaseException | None = None) -> None:
    if job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(result)  # type: ignore[arg-type]
