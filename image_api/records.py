"""The records the service keeps, the ids and keys that name them, and the clock that
stamps them."""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

#: Where the service reads the time: `utc_now` in production, a fake one in tests.
Clock = Callable[[], datetime]

#: What an image id looks like (a lower-case ObjectId): routes match only these.
ID_PATTERN = "[0-9a-f]{24}"
_ID = re.compile(ID_PATTERN)
_KEY = re.compile(r"[0-9a-f]{32}")


def utc_now() -> datetime:
    """The current UTC time at millisecond precision, which every backend keeps exactly."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def new_id() -> str:
    """A fresh image id: 96 random bits as 24 hex digits (a valid ObjectId for MongoDB).

    Not a generated ObjectId, whose timestamp and per-process counter let anyone who knows
    one id guess its neighbours (and count other owners' uploads).
    """
    return secrets.token_hex(12)


def valid_id(image_id: object) -> bool:
    """Whether `image_id` is an id this service makes (lower-case ObjectId hex)."""
    return isinstance(image_id, str) and _ID.fullmatch(image_id) is not None


def new_key() -> str:
    """A fresh, unguessable blob key."""
    return secrets.token_hex(16)


def valid_key(key: object) -> bool:
    """Whether `key` is a blob key this service makes."""
    return isinstance(key, str) and _KEY.fullmatch(key) is not None


class Status(StrEnum):
    """`PENDING` from the insert until the blob is written, then `ACTIVE`. Clients see only
    active records; a pending one left by a crash is swept by `repair`."""

    PENDING = "pending"
    ACTIVE = "active"


@dataclass(frozen=True)
class ImageRecord:
    """One image's metadata. `key` names its blob in storage."""

    id: str
    key: str
    filename: str
    content_type: str
    size: int
    width: int
    height: int
    sha256: str
    version: int
    uploaded_at: datetime
    updated_at: datetime
    status: Status = Status.ACTIVE
    # Who it belongs to: the owner of the key that uploaded it. Images stored before owners
    # existed belong to the first admin key's owner.
    owner: str = "admin"
    # The EXIF orientation the stored bytes keep (width and height are as displayed), and
    # the average colour to paint before the image arrives (None: unknown or transparent).
    orientation: int = 1
    placeholder: str | None = None

    @property
    def version_tag(self) -> str:
        """What names this version of the image (its metadata's ETag, before any expiry of
        the signed URLs in it): the bytes' sha256 and the version number, which tells apart
        replaces with the same bytes."""
        return f"{self.sha256}.{self.version}"

    def current_at(self, date: datetime) -> bool:
        """Whether a copy dated `date` (an HTTP date: whole seconds) is surely this version.

        Two versions replaced within one second share a Last-Modified, so a date within the
        second of a replace cannot tell them apart: only a date from the next whole second
        on proves the copy current. The first version has no predecessor to be confused
        with: its own Last-Modified is enough.
        """
        if self.version == 1:
            return date >= self.updated_at.replace(microsecond=0)
        return date >= _whole_seconds_after(self.updated_at)

    def to_json(self) -> dict:
        """Plain JSON types, for storing a response to replay."""
        values = dataclasses.asdict(self)
        values["uploaded_at"] = self.uploaded_at.isoformat()
        values["updated_at"] = self.updated_at.isoformat()
        values["status"] = str(self.status)
        return values

    @classmethod
    def from_json(cls, values: dict) -> ImageRecord:
        return cls(
            **{
                **values,
                "uploaded_at": datetime.fromisoformat(values["uploaded_at"]),
                "updated_at": datetime.fromisoformat(values["updated_at"]),
                "status": Status(values.get("status", Status.ACTIVE)),
            }
        )


@dataclass(frozen=True)
class Variant:
    """A rendered variant of one version of an image (resized, re-encoded), cached in the
    blob storage under `key` (new for every render), and found by the image id, its version
    and the normalised `params`, so every worker finds the same variant for one request."""

    key: str
    image_id: str
    version: int
    params: str
    content_type: str
    size: int
    width: int
    height: int
    sha256: str
    created_at: datetime


#: A variant's field names, in order (the backends' column and document names).
VARIANT_FIELDS = tuple(field.name for field in dataclasses.fields(Variant))

#: The record's field names, in order (the backends' column and document names).
RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(ImageRecord))

#: A position in the newest-first order: (uploaded_at, id) of the last item seen.
Cursor = tuple[datetime, str]


@dataclass(frozen=True)
class Filters:
    """Which active records a list or count covers."""

    content_type: str | None = None
    uploaded_after: datetime | None = None  # inclusive
    uploaded_before: datetime | None = None  # exclusive
    owner: str | None = None  # None: every owner's


NO_FILTERS = Filters()


@dataclass(frozen=True)
class Claim:
    """An idempotency key as stored: who used it for what, and the response once known.

    `resource` names the image the first request writes, so that a retry can find its
    result even if the first request could not record it.
    """

    key: str
    fingerprint: str
    resource: str | None
    response: dict | None  # None while the first request is still running
    expires_at: datetime


def _whole_seconds_after(moment: datetime) -> datetime:
    """The first whole second at or after `moment`.

    HTTP dates have one-second resolution: two versions replaced within one second share a
    Last-Modified. A date validator proves a client's copy current only if it is no earlier
    than this (RFC 9110 8.8.2.2), so If-Modified-Since and If-Range dates are compared with
    it, not with the truncated date sent.
    """
    whole = moment.replace(microsecond=0)
    return whole if whole == moment else whole + timedelta(seconds=1)
