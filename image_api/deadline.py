"""One time budget per request, shared by every backend call the request makes.

gunicorn's gthread workers do not time out a request, nginx gives up after 60 s, and a
backend that accepts connections and never answers would otherwise hold a request for
every retry of every call. So each request gets `REQUEST_TIMEOUT` seconds up to its
first response byte; each backend attempt takes its timeouts from what is left, and no new
attempt starts once it is spent.

A slice of the budget (`reserve`) is kept back for compensations: when a write fails, the
call that undoes the part already written (a blob delete, say) gets one short attempt
inside the budget, and what it cannot undo is left for `repair`.

The budget lives in a context variable: the request's thread sets it, the backends read
it, and code outside a request (the CLI) has none and uses the configured timeouts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from .errors import BackendUnavailable

#: The longest a compensating call may take, budget permitting.
COMPENSATION_TIMEOUT = 1.0


@dataclass
class Deadline:
    """A point in monotonic time, with part of the time before it kept for compensations."""

    expires: float
    reserve: float
    monotonic: Callable[[], float] = field(default=time.monotonic, repr=False)
    compensating: bool = False

    @classmethod
    def after(cls, seconds: float, monotonic: Callable[[], float] = time.monotonic) -> Deadline:
        return cls(monotonic() + seconds, reserve=min(1.0, seconds / 5), monotonic=monotonic)

    def remaining(self) -> float:
        """Seconds left for the next call (the reserve excluded, unless compensating)."""
        left = self.expires - self.monotonic()
        if self.compensating:
            return min(left, COMPENSATION_TIMEOUT)
        return left - self.reserve


_current: ContextVar[Deadline | None] = ContextVar("image_api_deadline", default=None)


def current() -> Deadline | None:
    return _current.get()


def start(seconds: float, monotonic: Callable[[], float] = time.monotonic) -> object:
    """Start a budget of `seconds` (replacing any outer one); `stop(token)` ends it."""
    return _current.set(Deadline.after(seconds, monotonic))


def stop(token) -> None:
    _current.reset(token)


@contextlib.contextmanager
def budget(seconds: float, monotonic: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """Run the block under a budget of `seconds`."""
    token = start(seconds, monotonic)
    try:
        yield
    finally:
        stop(token)


@contextlib.contextmanager
def compensation() -> Iterator[None]:
    """Calls in this block undo a failed write: one short attempt, out of the reserve."""
    deadline = _current.get()
    if deadline is None:
        yield
        return
    token = _current.set(
        Deadline(deadline.expires, deadline.reserve, deadline.monotonic, compensating=True)
    )
    try:
        yield
    finally:
        _current.reset(token)


@contextlib.contextmanager
def at_most(seconds: float) -> Iterator[None]:
    """Calls in this block take at most `seconds` of the budget (or of the configured
    timeouts, outside a request): for a write done by the way, which must not hold up the
    request it serves."""
    outer = _current.get()
    monotonic = outer.monotonic if outer is not None else time.monotonic
    expires = monotonic() + seconds
    if outer is not None:
        expires = min(expires, outer.expires - outer.reserve)
    token = _current.set(Deadline(expires, 0.0, monotonic))
    try:
        yield
    finally:
        _current.reset(token)


def extend(seconds: float) -> None:
    """Give the current budget at least `seconds` more (work that finished late, such as a
    render under load, is kept and sent rather than thrown away)."""
    deadline = _current.get()
    if deadline is not None:
        deadline.expires = max(deadline.expires, deadline.monotonic() + deadline.reserve + seconds)


def is_compensating() -> bool:
    deadline = _current.get()
    return deadline is not None and deadline.compensating


def time_left(configured: float) -> float:
    """The timeout for the next backend attempt: `configured`, capped by the budget.

    Raises `BackendUnavailable` (nothing was sent) once the budget is spent.
    """
    deadline = _current.get()
    if deadline is None:
        return configured
    left = deadline.remaining()
    if left <= 0.01:
        raise BackendUnavailable("The request's time budget is spent", in_doubt=False)
    return min(configured, left)
