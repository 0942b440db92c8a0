"""Metadata: image records, their variants, retired blobs, API keys and idempotency keys.
One contract, one module per backend.

Every backend translates its driver's errors at this boundary: a missing or malformed id is
`NotFound`, a lost optimistic-concurrency race is `Conflict`, and anything that means "the
database cannot answer now" is `BackendUnavailable` (with `in_doubt=False` when the write
surely did not happen).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Protocol

from ..access import ApiKey
from ..config import Settings
from ..records import NO_FILTERS, Claim, Cursor, Filters, ImageRecord, Status, Variant


class Repository(Protocol):
    """Where image metadata lives.

    Records:
    - `insert(record)` stores a new record (pending or active).
    - `get(image_id)` returns the active record; `NotFound` if absent, pending or malformed.
    - `activate(image_id, moment)` makes a pending record active, stamped `moment`;
      `NotFound` if there is no such pending record.
    - `list_page(limit, after, filters)` returns up to `limit` active records newest first
      (by `uploaded_at`, then id), strictly after the cursor `after` when given;
      `count(filters)` counts them.
    - `update(record, expected_version)` replaces the active record only if its version is
      still `expected_version`: `Conflict` if it changed, `NotFound` if it is gone.
    - `delete(image_id, expected_version=None, status=ACTIVE)` removes a record in that
      status (and at that version, when given) and returns it; `NotFound` / `Conflict`.
    - `scan(after_key, limit)` returns up to `limit` records of any status in blob-key
      order, after `after_key` (repair walks them in batches beside the blobs);
      `find_key(key)` returns the record of any status using blob `key`, or None.

    Retired blobs (the previous bytes of a replaced image, kept for readers that read the
    record before the replace, and for presigned URLs already handed out):
    - `retire(key, delete_after)` notes a blob to delete at or after that moment;
      `retired_until(key)` returns that moment or None; `due_retired(now, limit)` returns up
      to `limit` keys due at `now`; `forget_retired(key)` drops the note (once deleted).

    Variants (rendered, cached copies of one version of an image; see `variants`), each
    under a blob key of its own render and found by what it shows (image id, version,
    params: one variant each):
    - `insert_variant(variant)` stores one and returns it, or returns the variant already
      stored for the same image, version and params (another worker's render came first).
    - `find_variant(image_id, version, params)` returns it or None; `get_variant(key)`
      returns the variant using blob `key` or None; `variants_of(image_id)` returns all of
      an image's, of any version; `delete_variant(key)` forgets one (a missing one is
      success).
    - `scan_variants(after_key, limit)` returns up to `limit` in key order (for repair).

    Idempotency keys:
    - `claim(key, fingerprint, resource, now, expires_at)` stores a new key and returns
      None, or returns the `Claim` already stored and live at `now`.
    - `finish(key, response)` records the response; `release(key)` forgets a key whose
      request failed (a retry may run it again); a finished key is kept until it expires.
    - `purge_expired_keys(now, limit)` deletes up to `limit` keys expired at `now` and
      says how many went; `scan_claims(after_key, limit)` returns up to `limit` keys in key
      order (for a migration).

    API keys (never their secrets; see `access`):
    - `insert_api_key(key)` stores a new key; `Conflict` if its id or name is taken.
    - `get_api_key(key_id)` returns the key (revoked ones too) or None; `list_api_keys()`
      returns every key by name.
    - `revoke_api_key(name, moment)` marks the active key of that name revoked and returns
      it; `NotFound` if there is none. `touch_api_key(key_id, moment)` notes a use.

    Housekeeping: `create()` makes or upgrades tables and indexes (idempotent, safe when
    many processes start at once); `ping()` checks the database answers; `close()` releases
    connections.
    """

    name: str

    def create(self) -> None: ...

    def insert(self, record: ImageRecord) -> None: ...

    def get(self, image_id: str) -> ImageRecord: ...

    def activate(self, image_id: str, moment: datetime) -> ImageRecord: ...

    def list_page(
        self, limit: int, after: Cursor | None = None, filters: Filters = NO_FILTERS
    ) -> list[ImageRecord]: ...

    def count(self, filters: Filters = NO_FILTERS) -> int: ...

    def update(self, record: ImageRecord, expected_version: int) -> ImageRecord: ...

    def delete(
        self, image_id: str, expected_version: int | None = None, status: Status = Status.ACTIVE
    ) -> ImageRecord: ...

    def scan(self, after_key: str | None, limit: int) -> list[ImageRecord]: ...

    def find_key(self, key: str) -> ImageRecord | None: ...

    def retire(self, key: str, delete_after: datetime) -> None: ...

    def retired_until(self, key: str) -> datetime | None: ...

    def due_retired(self, now: datetime, limit: int) -> list[str]: ...

    def forget_retired(self, key: str) -> None: ...

    def insert_variant(self, variant: Variant) -> Variant: ...

    def find_variant(self, image_id: str, version: int, params: str) -> Variant | None: ...

    def get_variant(self, key: str) -> Variant | None: ...

    def variants_of(self, image_id: str) -> list[Variant]: ...

    def delete_variant(self, key: str) -> None: ...

    def scan_variants(self, after_key: str | None, limit: int) -> list[Variant]: ...

    def claim(
        self,
        key: str,
        fingerprint: str,
        resource: str | None,
        now: datetime,
        expires_at: datetime,
    ) -> Claim | None: ...

    def purge_expired_keys(self, now: datetime, limit: int) -> int: ...

    def scan_claims(self, after_key: str | None, limit: int) -> list[Claim]: ...

    def finish(self, key: str, response: dict) -> None: ...

    def release(self, key: str) -> None: ...

    def insert_api_key(self, key: ApiKey) -> None: ...

    def get_api_key(self, key_id: str) -> ApiKey | None: ...

    def list_api_keys(self) -> list[ApiKey]: ...

    def revoke_api_key(self, name: str, moment: datetime) -> ApiKey: ...

    def touch_api_key(self, key_id: str, moment: datetime) -> None: ...

    def ping(self, writes: bool = True) -> None:
        """Raise `BackendUnavailable` unless the store answers (and, with `writes`, takes
        writes)."""

    def close(self) -> None: ...


def scan_all(repository: Repository, batch: int = 1000) -> Iterator[ImageRecord]:
    """Every record in blob-key order, fetched `batch` at a time."""
    after = None
    while rows := repository.scan(after, batch):
        yield from rows
        after = rows[-1].key


def scan_all_variants(repository: Repository, batch: int = 1000) -> Iterator[Variant]:
    """Every variant in key order, fetched `batch` at a time."""
    after = None
    while rows := repository.scan_variants(after, batch):
        yield from rows
        after = rows[-1].key


def repository_from_settings(settings: Settings) -> Repository:
    """The metadata backend the settings choose: MongoDB when a URL is given, else SQLite."""
    # Imported here, the one place that chooses: the embedded default never loads pymongo's
    # network stack.
    if settings.metadata_backend == "mongodb":
        from .mongodb import MongoRepository

        return MongoRepository.from_settings(settings)
    from .sqlite import SqliteRepository

    return SqliteRepository(settings.sqlite_path)
