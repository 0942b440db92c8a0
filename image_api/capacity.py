"""What one worker takes on at once: the renders it runs, and the threads they hold.

A gunicorn worker has GUNICORN_THREADS threads. A render is CPU-bound, and a request that
waits for one holds its thread as the render does; both are bounded here so that a thread
always stays for other requests (health checks, downloads).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from . import deadline, metrics
from .errors import DecoderBusy

_BUSY = "The server is busy rendering variants; retry shortly"


class KeyedLocks:
    """One lock per key, alive while anyone holds or waits for it: threads that work on
    the same key take turns, others do not wait for them."""

    def __init__(self):
        self._locks: dict[str, list] = {}  # key: [lock, holders and waiters]
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(
        self,
        key: str,
        queue: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> Iterator[None]:
        """Hold `key`'s lock; a thread that finds it taken waits inside `queue()`, which
        may refuse it a place."""
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(blocking=False):
                budget = deadline.current()
                timeout = -1 if budget is None else max(budget.remaining(), 0)
                with queue():
                    if not entry[0].acquire(timeout=timeout):
                        raise DecoderBusy(
                            "Another request is rendering this variant; retry shortly"
                        )
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[key]


class Slots:
    """At most `count` renders at once in this process: CPU-bound work on every thread would
    leave none for other requests (a health check waited 15 s behind ten renders). Others
    wait up to `wait` seconds (and the request's budget), then get `DecoderBusy`.

    A waiting render holds its thread as a running one does (with every thread rendering or
    waiting, a health check waited 7 s), and so does a request waiting for another's render
    of the same variant (`queued`): all of them together occupy at most `threads`, and the
    rest get `DecoderBusy` at once."""

    def __init__(self, count: int, wait: float, keep: float = 0.0, threads: int = 1):
        self._free = threading.BoundedSemaphore(count)
        self.wait = wait
        self.keep = keep  # of the request's budget, left for the work the slot is for
        self.threads = threads
        self.busy = 0  # threads rendering or waiting
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def taken(self) -> Iterator[None]:
        with self.queued():
            if not self._free.acquire(blocking=False):
                metrics.DECODE_WAITS.inc()
                if not self._free.acquire(timeout=self._wait()):
                    metrics.DECODE_REFUSALS.inc()
                    raise DecoderBusy(_BUSY)
            try:
                yield
            finally:
                self._free.release()

    def _wait(self) -> float:
        """How long to wait for a slot: `wait`, within the request's budget."""
        if (budget := deadline.current()) is None:
            return self.wait
        return max(min(self.wait, budget.remaining() - self.keep), 0)

    @contextlib.contextmanager
    def queued(self) -> Iterator[None]:
        """One of the `threads` a render may occupy; `DecoderBusy` when none is left."""
        with self._lock:
            if self.busy >= self.threads:
                metrics.DECODE_REFUSALS.inc()
                raise DecoderBusy(_BUSY)
            self.busy += 1
        try:
            yield
        finally:
            with self._lock:
                self.busy -= 1
