"""`routerkit.serve.batching.DynamicBatcher` on its own: grouping, waiting, items run alone, failures, limits."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from routerkit.serve.batching import BatcherClosedError, DynamicBatcher, QueueFullError


class Recorder:
    """A ``run_batch`` that records the batches it got and doubles every item (and fails on ``"bad"``)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[object]] = []
        self.threads: set[str] = set()
        self.delay = delay

    def __call__(self, items: list[object]) -> list[object]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        if "bad" in items:
            raise ValueError("bad item")
        return [2 * item for item in items]  # type: ignore[operator]


def test_concurrent_submissions_are_grouped_up_to_max_batch_and_answered_in_order() -> None:
    recorder = Recorder()

    async def main() -> list[object]:
        batcher = DynamicBatcher(recorder, max_batch=4, max_wait_ms=50)
        try:
            return list(await asyncio.gather(*(batcher.submit(i) for i in range(10))))
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == [2 * i for i in range(10)]
    assert [len(b) for b in recorder.batches] == [4, 4, 2]
    assert [x for b in recorder.batches for x in b] == list(range(10))  # first come, first served
    assert all(name.startswith("routerkit-batch") for name in recorder.threads)  # the model runs off the event loop


def test_max_wait_bounds_how_long_a_batch_waits_for_company() -> None:
    async def main(wait_ms: float, gap_s: float) -> list[int]:
        recorder = Recorder()
        batcher = DynamicBatcher(recorder, max_batch=8, max_wait_ms=wait_ms)

        async def late() -> object:
            await asyncio.sleep(gap_s)
            return await batcher.submit(2)

        try:
            await asyncio.gather(batcher.submit(1), late())
        finally:
            await batcher.stop()
        return [len(b) for b in recorder.batches]

    assert asyncio.run(main(wait_ms=0, gap_s=0.05)) == [1, 1]  # 0 ms: only what is waiting already
    assert asyncio.run(main(wait_ms=10, gap_s=0.15)) == [1, 1]  # the second came too late
    assert asyncio.run(main(wait_ms=400, gap_s=0.02)) == [2]  # it came in time


def test_items_that_may_not_share_a_batch_run_alone() -> None:
    recorder = Recorder()

    async def main() -> list[object]:
        batcher = DynamicBatcher(recorder, max_batch=8, max_wait_ms=50, batchable=lambda item: item != 100)
        try:
            return list(await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 100, 3, 4))))
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == [2, 4, 200, 6, 8]
    assert recorder.batches == [[1, 2], [100], [3, 4]]


def test_a_failing_item_fails_alone_and_its_batch_is_still_answered() -> None:
    recorder = Recorder()
    sizes: list[int] = []

    async def main() -> list[object]:
        batcher = DynamicBatcher(recorder, max_batch=8, max_wait_ms=50, on_batch=sizes.append)
        try:
            return list(await asyncio.gather(*(batcher.submit(i) for i in (1, "bad", 3)), return_exceptions=True))
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad item"
    assert recorder.batches == [[1, "bad", 3], [1], ["bad"], [3]]  # the batch, then each item alone
    assert sizes == [3, 1, 1, 1]


def test_a_full_queue_refuses_and_stop_fails_what_waits() -> None:
    recorder = Recorder(delay=0.3)

    async def main() -> tuple[list[object], object]:
        batcher = DynamicBatcher(recorder, max_batch=1, max_wait_ms=0, max_queue=2)
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)  # the worker runs item 1 (0.3 s)
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0.01)
        assert batcher.pending == 2
        with pytest.raises(QueueFullError, match="at most 2 inputs waiting"):
            await batcher.submit(4)
        await batcher.stop()
        with pytest.raises(BatcherClosedError):
            await batcher.submit(5)
        results = await asyncio.gather(*waiting, return_exceptions=True)
        return results, await first

    results, first = asyncio.run(main())
    assert first == 2  # the batch that was running finished
    assert all(isinstance(r, BatcherClosedError) for r in results)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_batch >= 1"):
        DynamicBatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms >= 0"):
        DynamicBatcher(Recorder(), max_wait_ms=-1)
    with pytest.raises(ValueError, match="max_queue >= 1"):
        DynamicBatcher(Recorder(), max_queue=0)
