"""MQExecutor under asyncio: ``loop.run_in_executor`` and ``asyncio.wrap_future``.

Each test runs its coroutine with ``asyncio.run`` (no pytest-asyncio), bounded by
``asyncio.wait_for`` so that a hang fails the test instead of stalling the run.
"""
from __future__ import annotations

import asyncio
import os

import pytest

from .helpers import Gate, gated_identity, pool, raise_value_error, sleep_return, square

pytestmark = pytest.mark.timeout(60)

#: seconds any one coroutine of these tests may take
ASYNC_TIMEOUT = 30.0


def run(coro):
    """asyncio.run(coro), failing with TimeoutError after ASYNC_TIMEOUT seconds."""
    return asyncio.run(asyncio.wait_for(coro, ASYNC_TIMEOUT))


def pid_and_square(x):
    return os.getpid(), x * x


def test_run_in_executor_single_and_gather():
    with pool() as ex:
        async def main():
            loop = asyncio.get_running_loop()
            one = await loop.run_in_executor(ex, square, 7)
            # 300 tasks: more than a 16 KB kernel queue holds, so the backlog works too
            many = await asyncio.gather(*(loop.run_in_executor(ex, pid_and_square, i)
                                          for i in range(300)))
            return one, many

        one, many = run(main())
    assert one == 49
    assert [sq for _, sq in many] == [i * i for i in range(300)]
    assert os.getpid() not in {pid for pid, _ in many}  # ran in worker processes


def test_run_in_executor_lambda_and_closure():
    offset = 1000

    def closure(x):
        return x + offset

    with pool() as ex:
        async def main():
            loop = asyncio.get_running_loop()
            return await asyncio.gather(loop.run_in_executor(ex, lambda a, b: a * b, 6, 7),
                                        loop.run_in_executor(ex, closure, 5))

        assert run(main()) == [42, 1005]


def test_wrap_future_gather():
    with pool() as ex:
        async def main():
            futs = [asyncio.wrap_future(ex.submit(square, i)) for i in range(250)]
            return await asyncio.gather(*futs)

        assert run(main()) == [i * i for i in range(250)]


def test_exceptions_propagate():
    with pool() as ex:
        async def main():
            loop = asyncio.get_running_loop()
            with pytest.raises(ValueError, match="from run_in_executor"):
                await loop.run_in_executor(ex, raise_value_error, "from run_in_executor")
            with pytest.raises(ValueError, match="from wrap_future"):
                await asyncio.wrap_future(ex.submit(raise_value_error, "from wrap_future"))
            results = await asyncio.gather(
                loop.run_in_executor(ex, square, 3),
                loop.run_in_executor(ex, raise_value_error, "in gather"),
                asyncio.wrap_future(ex.submit(square, 4)),
                return_exceptions=True)
            return results

        ok1, err, ok2 = run(main())
    assert (ok1, ok2) == (9, 16)
    assert isinstance(err, ValueError) and str(err) == "in gather"


def test_cancelled_awaiters_leave_the_pool_working(tmp_path):
    """Cancel asyncio tasks awaiting running tasks (their MQFuture cannot be
    cancelled any more) and tasks still waiting in the backlog (their MQFuture
    is cancelled): the pool goes on serving and shuts down cleanly."""
    gate = Gate(tmp_path)
    with pool(max_workers=2) as ex:
        try:
            async def main():
                # Enough gated tasks to fill both workers, the kernel queue and
                # the in-process backlog.
                mq_futures = [ex.submit(gated_identity, gate.path, i) for i in range(400)]
                waiters = [asyncio.ensure_future(asyncio.wrap_future(f))
                           for f in mq_futures]
                await asyncio.sleep(0.2)
                for w in waiters[::2]:
                    w.cancel()
                outcome = await asyncio.gather(*waiters[::2], return_exceptions=True)
                assert all(isinstance(o, asyncio.CancelledError) for o in outcome)
                gate.open()
                kept = await asyncio.gather(*waiters[1::2])
                assert kept == list(range(1, 400, 2))
                # Futures whose task was still waiting in this process were
                # cancelled through wrap_future; the others ran to completion.
                cancelled = sum(f.cancelled() for f in mq_futures[::2])
                finished = [f.result() for f in mq_futures[::2] if not f.cancelled()]
                assert cancelled + len(finished) == 200
                assert finished == sorted(finished)
                assert cancelled > 0  # some were in the backlog
                loop = asyncio.get_running_loop()
                return await asyncio.gather(*(loop.run_in_executor(ex, square, i)
                                              for i in range(20)))

            assert run(main()) == [i * i for i in range(20)]
        finally:
            gate.open()


def test_wait_for_timeout_does_not_break_the_pool():
    with pool() as ex:
        async def main():
            loop = asyncio.get_running_loop()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(loop.run_in_executor(ex, sleep_return, 1.0, "late"),
                                       0.1)
            return await loop.run_in_executor(ex, square, 12)

        assert run(main()) == 144
        assert ex.submit(square, 5).result(timeout=30) == 25

