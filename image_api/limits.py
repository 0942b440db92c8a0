"""Rate limits: per API key (per client address when anonymous, and apart from that per
client address and image for signed URLs), one budget for reads and one for writes across
all endpoints, over a moving window.

Checked by one before-request hook. Windows live in memory (per gunicorn worker: a deque
of hit times per client, O(1) a hit) unless RATE_LIMIT_STORAGE_URI names a Redis shared by
all workers and machines, reached through the `limits` library (a sorted set per client,
updated by one Lua script). If Redis is down, requests are served without limits and a
warning is logged (at most once a minute), never a 500 or a traceback.

Not Flask-Limiter, which the issue named: under gunicorn it took 40% of a metadata GET's
throughput (its per-request resolution of route, blueprint and application limits), and
the in-memory store of `limits` costs O(limit) a hit and starts a thread every 10 ms;
`make bench` measures what this costs instead.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque

from flask import Flask, Request, g
from limits import RateLimitItem, parse_many, storage, strategies

from . import metrics
from .api.openapi import Operation
from .config import Settings
from .errors import RateLimited
from .middleware import queue_headers

log = logging.getLogger(__name__)

WRITES = {"POST", "PUT", "DELETE", "PATCH"}
#: How often a store that is down is reported.
_WARN_EVERY = 60.0


def client_key(req: Request) -> str:
    """Whose budget a request spends: its API key's, else its client address (which
    PROXY_HOPS alone decides: with 0, X-Forwarded-For changes nothing).

    A download by a valid signed URL spends a budget of the address's own for that image:
    any web page can make its visitors' browsers send requests without a key (or with a
    made-up signature, or with a signed URL of an image of its own) by the thousand, and
    those must not use up what the `<img>` of the signed URLs they were given need."""
    key = g.get("api_key")
    if key is not None:
        return f"key:{key.id}"
    if g.get("signed_url"):
        return f"signed:{req.remote_addr}:{req.view_args['image_id']}"
    return f"address:{req.remote_addr}"


class MemoryWindows:
    """Moving windows in this process: per client and limit, the times of its hits in the
    last window (at most `amount` of them), oldest first."""

    #: Windows idle this long (or longer than their own length) are dropped, at most this
    #: often, so that clients who came once do not stay in memory.
    SWEEP_EVERY = 60.0

    base_exceptions = ()  # nothing to be unavailable

    def __init__(self):
        self._hits: dict[tuple, deque] = {}
        self._lock = threading.Lock()
        self._swept_at = time.monotonic()

    def hit(self, limit: RateLimitItem, budget: str, key: str) -> tuple[bool, float, int]:
        """Spend one hit if the window has room: (allowed, when it has room again, left)."""
        now, window = time.time(), limit.get_expiry()
        with self._lock:
            times = self._hits.setdefault((budget, key, limit), deque())
            while times and times[0] <= now - window:
                times.popleft()
            allowed = len(times) < limit.amount
            if allowed:
                times.append(now)
            reset_at = times[0] + window if times else now
            remaining = limit.amount - len(times)
            if time.monotonic() - self._swept_at >= self.SWEEP_EVERY:
                self._sweep(now)
        return allowed, reset_at, remaining

    def _sweep(self, now: float) -> None:
        self._swept_at = time.monotonic()
        for name, times in list(self._hits.items()):
            if not times or times[-1] <= now - name[2].get_expiry():
                del self._hits[name]


class RedisWindows:
    """Moving windows in Redis, through the `limits` library."""

    def __init__(self, uri: str):
        # A Redis that stalls must not hold requests: give up fast and serve unlimited.
        self.store = storage.storage_from_string(
            uri, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        self.base_exceptions = self.store.base_exceptions
        self.strategy = strategies.MovingWindowRateLimiter(self.store)

    def hit(self, limit: RateLimitItem, budget: str, key: str) -> tuple[bool, float, int]:
        allowed = self.strategy.hit(limit, budget, key)
        reset_at, remaining = self.strategy.get_window_stats(limit, budget, key)
        return allowed, reset_at, remaining


class RateLimits:
    """The read and write budgets of every client, in one store."""

    def __init__(self, settings: Settings):
        uri = settings.rate_limit_storage_uri
        # Exact over any window, not per calendar minute (where twice the limit fits across
        # a boundary).
        self.windows = MemoryWindows() if uri == "memory://" else RedisWindows(uri)
        self.budgets = {
            "read": parse_many(settings.rate_limit_read),
            "write": parse_many(settings.rate_limit_write),
        }
        self._warned_at = -_WARN_EVERY

    def check(self, req: Request, operation: Operation | None) -> None:
        """Spend one request of the caller's budget, or raise `RateLimited` (429).
        Preflights, and operations declared unlimited (the probes: they must answer
        whatever the load) spend nothing."""
        if req.method == "OPTIONS" or operation is None or not operation.limited:
            return
        budget = "write" if req.method in WRITES else "read"
        key = client_key(req)
        try:
            # Every limit of the budget (`60/minute;1000/hour`) is spent; the one with the
            # least room left speaks for the response's headers.
            states = [
                (limit, *self.windows.hit(limit, budget, key)) for limit in self.budgets[budget]
            ]
        except self.windows.base_exceptions as error:
            self._unavailable(error)
            return
        refused = [state for state in states if not state[1]]
        limit, _, reset_at, remaining = min(refused or states, key=lambda state: state[3])
        if refused:
            metrics.RATE_LIMITED.labels(budget).inc()
            raise RateLimited(
                f"Rate limit exceeded ({limit}); retry after Retry-After seconds",
                headers=self._headers(limit, remaining, reset_at, refused=True),
            )
        # Sent with whatever the request is answered with, error or not.
        queue_headers(req.environ, self._headers(limit, remaining, reset_at, refused=False))

    @staticmethod
    def _headers(limit: RateLimitItem, remaining: int, reset_at: float, refused: bool) -> dict:
        """The IETF RateLimit fields, in seconds from now (at most the window), and on a
        refusal Retry-After."""
        reset = min(max(math.ceil(reset_at - time.time()), 0), limit.get_expiry())
        headers = {
            "RateLimit-Limit": str(limit.amount),
            "RateLimit-Remaining": str(max(remaining, 0)),
            "RateLimit-Reset": str(reset),
        }
        if refused:
            headers["Retry-After"] = str(max(reset, 1))
        return headers

    def _unavailable(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning("Rate limit storage unavailable, serving without limits: %r", error)


def init_app(app: Flask, settings: Settings) -> RateLimits:
    """The rate limits of every route but the probes; the API's hooks check them (after
    authentication, so that the key is known) and add their headers."""
    return RateLimits(settings)
