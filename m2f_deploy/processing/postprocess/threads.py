"""The threads post-processing may use: one pool per processor, and the one rule for when work is split.

The rule: work runs on the calling thread unless the processor was given ``threads > 1`` *and* the step handles at
least :data:`PARALLEL_MIN` values; such a step is cut into one share per thread (numpy's loops and BLAS release
the GIL), or, for a matrix product (counted by its output values), handed whole to BLAS, whose own threads do one
large product about twice as fast as we can in blocks (:func:`.resample.product`). Otherwise BLAS never starts
threads of its own: products are handed to it in blocks small enough that OpenBLAS keeps them on the calling
thread. Waking BLAS' pool is worse than it looks: its workers busy-wait after each product, and on a small
machine the numpy code that follows runs about half as fast.

So with ``threads=1`` (the default) the fast post-processing uses exactly the thread that calls it: safe for a
server that runs one worker process per core (the reference path, :mod:`.reference`, ignores threads: its products
are numpy's, on BLAS' threads when large). A pool is started on first use, lives as long as its processor
(:meth:`Workers.close`), and is started again in a forked child (threads do not survive a fork).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

PARALLEL_MIN = 1 << 22
"""Values (float32: 16 MiB) a step must handle before it is split across threads. It is the size at which the
leaders of large bounds were split before (measured then, on 2 cores); the other splits (resizing in strips, large
products) now follow it too: each of them handles far more on the inputs where threads pay (e.g. semantic
segmentation of noise), and far less where the work is a few milliseconds anyway."""


def check_threads(threads: object, error: type[Exception] = ValueError) -> int:
    """``threads`` as a thread count (``None``: 1), or ``error``: the one check of every ``threads`` option
    (processor, :class:`~m2f_deploy.runtime.Segmenter`, CLIs). 0 is refused, not read as "a library's default":
    leave the option out for that."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise error(f"threads must be a positive whole number or None, got {threads!r}")
    return 1 if threads is None else threads


class Workers:
    """Up to ``threads`` threads for post-processing (``None``: 1); see the module docstring for when they run."""

    def __init__(self, threads: int | None = None):
        self.threads = check_threads(threads)
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()  # two threads first using one processor must not each start a pool

    def __repr__(self) -> str:
        return f"Workers(threads={self.threads})"

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:  # a pool is not copied or pickled: the copy starts its own on first use
        return {"threads": self.threads, "_pool": None, "_pid": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def shares(self, n: int, values: int) -> list[slice]:
        """``range(n)`` cut into one contiguous share per thread when ``values`` (the step's size) reaches
        :data:`PARALLEL_MIN`, else one share."""
        parts = min(self.threads, n) if values >= PARALLEL_MIN else 1
        if parts <= 1:
            return [slice(0, n)]
        return [slice(i * n // parts, (i + 1) * n // parts) for i in range(parts)]

    def run(self, tasks: Sequence[Callable[[], None]]) -> None:
        """Run ``tasks`` to the end, on the pool when there are several and more than one thread; raises what a
        task raised."""
        if len(tasks) <= 1 or self.threads <= 1:
            for task in tasks:
                task()
            return
        pool = self._started()
        futures = [pool.submit(task) for task in tasks]
        wait(futures)  # all of them: a task still running could write into arrays after the caller saw the error
        for done in futures:
            done.result()

    def close(self) -> None:
        """Stop the pool's threads (a later call starts a new pool)."""
        pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.shutdown(wait=True)

    def _started(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():  # none yet, or inherited through a fork: threadless
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="m2f-postprocess")
                self._pid = os.getpid()
            return self._pool


SERIAL = Workers(1)
"""No threads: what the post-processes use when they are given none."""
