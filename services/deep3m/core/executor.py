"""One bounded thread-pool map for every blockwise loop in the package.

Work is submitted lazily so at most ``in_flight`` items (default ``2 * workers``)
are alive at once: memory stays bounded however long the input is. Results come
back in completion order, tagged with the input index. The first exception
cancels what has not started, waits for what is running, and propagates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    *,
    in_flight: int | None = None,
    stop: threading.Event | None = None,
    thread_name_prefix: str = "deep3m",
) -> Iterator[tuple[int, R]]:
    """Yield ``(index, fn(item))`` in completion order, at most ``in_flight`` pending.

    With ``workers <= 1`` everything runs inline, in order, on the caller's thread
    (no pool: the serial path a debugger can step through). ``stop``, when set,
    ends the map early without error: nothing more is submitted and pending items
    are cancelled; the caller decides whether that is a failure.
    """
    if workers <= 1:
        for index, item in enumerate(items):
            if stop is not None and stop.is_set():
                return
            yield index, fn(item)
        return
    limit = max(1, in_flight if in_flight is not None else 2 * workers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name_prefix)
    pending: dict[Future[R], int] = {}
    source = iter(enumerate(items))
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < limit:
                if stop is not None and stop.is_set():
                    exhausted = True
                    break
                nxt = next(source, None)
                if nxt is None:
                    exhausted = True
                    break
                pending[pool.submit(fn, nxt[1])] = nxt[0]
            if not pending:
                return
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                index = pending.pop(future)
                yield index, future.result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
