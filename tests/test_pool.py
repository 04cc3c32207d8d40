"""pool.py: read_ahead gives the items in order, made on a thread of their own, raises an error
where its item was due, and stops its thread when the reader stops early; run_in_workers sums
the workers' progress and returns each item's result (its process handling: test_shards.py)."""
import threading

import pytest

from pool import read_ahead, run_in_workers
from utils import UserError


def test_read_ahead_gives_every_item_in_order_made_on_another_thread():
    makers = []

    def items():
        for number in range(50):
            makers.append(threading.current_thread())
            yield number

    assert list(read_ahead(items())) == list(range(50))
    assert threading.current_thread() not in makers


def test_an_error_in_making_an_item_is_raised_where_that_item_was_due():
    def items():
        yield 1
        yield 2
        raise UserError("text.txt is not valid UTF-8")

    got = []
    with pytest.raises(UserError, match="not valid UTF-8"):
        for item in read_ahead(items()):
            got.append(item)
    assert got == [1, 2]


def test_stopping_early_stops_the_thread_and_closes_the_items():
    closed = threading.Event()

    def items():
        try:
            number = 0
            while True:
                yield number
                number += 1
        finally:
            closed.set()

    threads_before = threading.active_count()
    for item in read_ahead(items(), depth=2):
        if item == 3:
            break
    assert closed.is_set() and threading.active_count() == threads_before


def no_setup() -> None:
    pass


def square_with_progress(number: int, progress) -> int:
    progress(1, number)
    return number * number


def test_run_in_workers_returns_each_result_and_sums_the_progress():
    totals = [0, 0]

    def progress(items: int, numbers: int) -> None:
        totals[0] += items
        totals[1] += numbers

    results = run_in_workers(square_with_progress, list(range(10)), 2, no_setup, (), progress)
    assert results == {number: number * number for number in range(10)}
    assert totals == [10, sum(range(10))]
