"""Worker processes that end with the process that started them, kill -9 included, and report
their progress to it as they go, and a thread that reads ahead: data.py prepare's tokenizing
workers (shards.py).

    run_in_workers(work, items, workers, setup, setup_args, progress) -> {item: work's result}
    read_ahead(items) -> the same items, made on a thread of their own

Each worker runs setup(*setup_args) once, then work(item, progress) for the items it is given;
the counts it passes to progress reach the caller's `progress`, summed, every UPDATE_SECONDS.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import multiprocessing.forkserver
import os
import queue
import signal
import threading
import time
from typing import Callable, Hashable, Iterator, TypeVar

UPDATE_SECONDS = 0.2         # how often a worker reports its progress
WATCH_SECONDS = 1.0          # how often a worker checks that the process it works for runs
PR_SET_PDEATHSIG = 1         # prctl(2): the signal this process gets when its parent ends
READ_AHEAD_ITEMS = 2         # items read_ahead holds ready: each a corpus chunk of a few MiB

Item = TypeVar("Item", bound=Hashable)
Result = TypeVar("Result")
Progress = Callable[..., None]  # counts of what was just done, summed position by position

_updates: list = []  # in a worker: the queue its progress goes to


def cpu_cores() -> int:
    """The cores this process may run on (all of them where the OS cannot say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _die_with(owner: int) -> None:
    """End this worker process when process `owner` ends, kill -9 included. The worker's
    parent is the forkserver, which ends when the last copy of its "alive" pipe closes: with
    the worker's copy closed, it ends with `owner`, and Linux's parent-death signal kills the
    worker at once. A thread also polls `owner`, every WATCH_SECONDS and first right away:
    the one way on other systems, and on Linux the way out where the forkserver outlives
    `owner` (a child forked from `owner` holds the pipe too) or ended before the signal was
    asked for."""
    server = multiprocessing.forkserver._forkserver
    if getattr(server, "_forkserver_alive_fd", None) is not None:  # a worker starts no process
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    with contextlib.suppress(AttributeError, OSError):  # no prctl: not Linux
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        # PermissionError: the pid is another user's process now, so `owner` ended
        with contextlib.suppress(ProcessLookupError, PermissionError):
            while True:
                os.kill(owner, 0)
                time.sleep(WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _start(owner: int, updates: multiprocessing.Queue, setup: Callable[..., None],
           setup_args: tuple) -> None:
    _die_with(owner)
    _updates.append(updates)
    setup(*setup_args)


def _run(work: Callable[[Item, Progress], Result], item: Item) -> Result:
    """work(item, progress) in a worker: its progress goes to the queue every UPDATE_SECONDS
    at most, and once more when it ends."""
    sums, sent_at = [], time.monotonic()

    def send() -> None:
        nonlocal sent_at
        if sums:
            _updates[0].put(tuple(sums))
            sums.clear()
        sent_at = time.monotonic()

    def progress(*done: int) -> None:
        sums[:] = [total + part for total, part in zip(sums or [0] * len(done), done)]
        if time.monotonic() - sent_at >= UPDATE_SECONDS:
            send()

    try:
        return work(item, progress)
    finally:
        send()


def run_in_workers(work: Callable[[Item, Progress], Result], items: list[Item], workers: int,
                   setup: Callable[..., None], setup_args: tuple,
                   progress: Progress) -> dict[Item, Result]:
    """work(item, progress) for every item in `workers` processes (forkserver: a clean,
    single-threaded start whatever this process holds), in the order given; -> each item's
    result. `work` and `setup` are module-level functions (they are pickled). A worker's error
    stops the others at once and is raised here."""
    context = multiprocessing.get_context("forkserver")
    updates = context.Queue()
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start,
        initargs=(os.getpid(), updates, setup, setup_args))

    def show_progress() -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                progress(*updates.get_nowait())

    try:
        futures = {pool.submit(_run, work, item): item for item in items}
        pending = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(
                pending, UPDATE_SECONDS, concurrent.futures.FIRST_COMPLETED)
            show_progress()
            for future in done:
                future.result()  # a worker's error ends the run here
    except BaseException:
        for process in list(pool._processes.values()):  # the pool's own API waits for them
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)  # the workers' last updates are in the queue once they exit
    show_progress()
    return {item: future.result() for future, item in futures.items()}


def read_ahead(items: Iterator[Item], depth: int = READ_AHEAD_ITEMS) -> Iterator[Item]:
    """`items`, made on a thread of their own up to `depth` ahead of their use: reading and
    decompressing (which release the GIL) overlap the work done on the items before. An error
    in making one is raised here, where that item was due; stopping early stops the thread."""
    ready: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def hand_over(entry: tuple) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                ready.put(entry, timeout=0.1)
                return True
        return False

    def make() -> None:
        try:
            for item in items:
                if not hand_over((item, None)):
                    return
            hand_over((end, None))
        except BaseException as err:  # raised where the consumer takes the next item
            hand_over((end, err))

    thread = threading.Thread(target=make, daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()
        if hasattr(items, "close"):  # its own cleanup (open files), now that no thread runs it
            items.close()
