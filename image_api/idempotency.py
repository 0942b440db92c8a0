"""Idempotency keys: claim a key, run the request once, record its result, replay it.

A client retrying a POST or PUT with the same `Idempotency-Key` and the same bytes gets the
first request's result; the same key with other bytes is refused. The repository holds the
keys, so this works across workers and restarts.

If the first request could not record its result (the repository failed at that moment),
its claim stays "in progress". Every request ends within its time budget, so a claim older
than that budget belongs to a request that is over: the retry then looks for the image the
claim names (`resource`) and, if the first request's write is there, replays it; if not,
it runs the request again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from . import deadline
from .errors import BackendUnavailable, IdempotencyInProgress, IdempotencyKeyReused
from .records import Claim, Clock, ImageRecord

log = logging.getLogger(__name__)

_POLL = 0.05  # seconds between looks at a key whose first request is still running


@dataclass(frozen=True)
class IdempotentWrite:
    """What an idempotent write is and how to find its result without its response.

    `fingerprint` identifies the request (a reused key with another one is refused);
    `resource` is the image it writes; `find_result(resource)` returns the image the first
    request (which wrote `resource`) left, or None if it left nothing.
    """

    fingerprint: str
    resource: str
    find_result: Callable[[str], ImageRecord | None]


class Idempotency:
    """Runs requests at most once per key, against the repository's key store."""

    def __init__(
        self,
        repository,
        clock: Clock,
        ttl: float,
        wait: float,
        request_timeout: float,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.repository = repository
        self.clock = clock
        self.ttl = timedelta(seconds=ttl)
        self.wait = wait
        # A claim older than this belongs to a request that has ended, one way or another.
        self.abandoned_after = timedelta(seconds=request_timeout + 1)
        self.sleep = sleep

    def run(self, key: str | None, write: IdempotentWrite, action: Callable[[], ImageRecord]):
        """`action()` once per key; a retry of the same request gets the first result."""
        if not key:
            return action()
        waited = 0.0
        while (claim := self._claim(key, write)) is not None:
            if claim.fingerprint != write.fingerprint:
                raise IdempotencyKeyReused()
            if claim.response is not None:
                return ImageRecord.from_json(claim.response)
            if self._abandoned(claim):
                found = write.find_result(claim.resource) if claim.resource else None
                if found is not None:
                    self._finish(key, found)
                    return found
                self.repository.release(key)
                continue
            budget = deadline.current()
            if waited >= (self.wait if budget is None else min(self.wait, budget.remaining())):
                raise IdempotencyInProgress()
            self.sleep(_POLL)  # the first request is still running
            waited += _POLL
        try:
            record = action()
        except BaseException:
            self._release(key)
            raise
        self._finish(key, record)
        self.purge()
        return record

    def purge(self, limit: int = 16) -> int:
        """Delete up to `limit` expired keys (each new key pays for a few old ones, so the
        store does not grow with every key ever used)."""
        try:
            return self.repository.purge_expired_keys(self.clock(), limit)
        except BackendUnavailable:
            log.warning("could not delete expired idempotency keys now")
            return 0

    def _claim(self, key: str, write: IdempotentWrite) -> Claim | None:
        now = self.clock()
        return self.repository.claim(key, write.fingerprint, write.resource, now, now + self.ttl)

    def _abandoned(self, claim: Claim) -> bool:
        claimed_at = claim.expires_at - self.ttl
        return self.clock() - claimed_at > self.abandoned_after

    def _finish(self, key: str, record: ImageRecord) -> None:
        # The write succeeded: failing to note it must not turn it into an error. A retry
        # finds the result through the claim's resource once this request is over.
        try:
            self.repository.finish(key, record.to_json())
        except BackendUnavailable:
            log.warning("could not record the result of idempotency key %r", key)

    def _release(self, key: str) -> None:
        try:
            self.repository.release(key)
        except BackendUnavailable:
            log.warning("could not release idempotency key %r; it expires by itself", key)
