"""asyncckpt._parallel: the pool runner and the lowest-failure rule shared by runs and spans."""

from __future__ import annotations

import threading

import pytest

from asyncckpt._parallel import Failures, run_each
from asyncckpt.errors import CorruptedCheckpointError


def test_the_lowest_blob_then_offset_wins_whatever_the_order() -> None:
    failures = Failures(10)
    late = CorruptedCheckpointError("late", blob=7)
    low_far = CorruptedCheckpointError("far", blob=3, offset=900)
    low_near = CorruptedCheckpointError("near", blob=3, offset=20)
    for exc in (late, low_far, low_near):
        failures.add(9, exc)
    assert failures.lowest == 3
    with pytest.raises(CorruptedCheckpointError) as caught:
        failures.raise_lowest()
    assert caught.value is low_near


def test_an_error_without_a_blob_counts_where_it_was_found() -> None:
    failures = Failures(10)
    failures.add(5, CorruptedCheckpointError("no blob field"))
    assert failures.lowest == 5
    with pytest.raises(CorruptedCheckpointError, match="no blob field"):
        failures.raise_lowest()


def test_no_failure_raises_nothing() -> None:
    failures = Failures(4)
    failures.raise_lowest()
    assert failures.lowest == 4


@pytest.mark.parametrize("threads", [1, 3])
def test_run_each_runs_every_item_once(threads: int) -> None:
    seen: list[int] = []
    names: set[str] = set()
    lock = threading.Lock()

    def work(item: int) -> None:
        with lock:
            seen.append(item)
            names.add(threading.current_thread().name)

    run_each(work, list(range(20)), threads, "test-pool")
    assert sorted(seen) == list(range(20))
    if threads == 1:
        assert names == {threading.current_thread().name}
    else:
        assert all(name.startswith("test-pool") for name in names)


def test_run_each_raises_what_work_raised() -> None:
    def work(item: int) -> None:
        if item == 2:
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        run_each(work, [0, 1, 2, 3], 2, "test-pool")


def test_submit_or_run_runs_the_work_here_when_the_pool_takes_no_more() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from asyncckpt._parallel import submit_or_run

    pool = ThreadPoolExecutor(1)
    assert submit_or_run(pool, pow, 2, 10).result() == 1024
    pool.shutdown()  # as at interpreter exit: submit raises RuntimeError
    assert submit_or_run(pool, pow, 3, 3).result() == 27
