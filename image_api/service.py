"""The use-cases, and the only place that knows the order of writes and how to undo them.

S3 and MongoDB share no transaction, so the order of writes is the contract:

- create: a pending record (invisible to clients), then the blob under a fresh key, then the
  record is made active; if a step fails, what was written is removed, and what a crash
  leaves behind is a pending record or an orphan blob that `repair` sweeps.
- replace: new blob under a new key, then the record only if its version is still the one
  read, then the old blob; if the update fails or loses a race, the new blob is removed and
  the old image is untouched.
- delete: the record, then the blob. A blob left by a crash is garbage, never a record
  pointing at nothing.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

from . import media
from .config import Settings
from .errors import (
    ApiError,
    BackendUnavailable,
    BadRequest,
    Conflict,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    NotFound,
    PreconditionFailed,
)
from .repository import NO_FILTERS, Cursor, Filters, ImageRecord, Repository, new_id
from .storage import BlobStorage, new_key

log = logging.getLogger(__name__)


def now() -> datetime:
    """The current UTC time at millisecond precision, which every backend keeps exactly."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class Page:
    """One page of the newest-first list."""

    images: list[ImageRecord]
    total: int
    next_cursor: str | None


def encode_cursor(record: ImageRecord) -> str:
    raw = f"{record.uploaded_at.isoformat()}|{record.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> Cursor:
    """The position a cursor token names; `BadRequest` if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        moment, image_id = raw.split("|")
        uploaded_at = datetime.fromisoformat(moment)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("Malformed cursor") from None
    if uploaded_at.tzinfo is None or len(image_id) != 24:
        raise BadRequest("Malformed cursor")
    return uploaded_at, image_id


class ImageService:
    """Images as clients see them: bytes in `storage`, metadata in `repository`."""

    def __init__(self, storage: BlobStorage, repository: Repository, settings: Settings):
        self.storage = storage
        self.repository = repository
        self.settings = settings

    # --- use-cases ------------------------------------------------------------------------

    def create(
        self, stream: BinaryIO, filename: str | None, idempotency_key: str | None = None
    ) -> ImageRecord:
        """Validate and store a new image."""
        info = self._inspect(stream)
        return self._once(
            idempotency_key,
            f"create {info.sha256}",
            lambda: self._create(stream, filename, info),
        )

    def get(self, image_id: str) -> ImageRecord:
        return self.repository.get(image_id)

    def list(self, limit: int, cursor: str | None = None, filters: Filters = NO_FILTERS) -> Page:
        """A page of images, newest first, after the position `cursor` names."""
        after = decode_cursor(cursor) if cursor else None
        # One extra row tells whether another page follows without a second query.
        rows = self.repository.list_page(limit + 1, after, filters)
        images = rows[:limit]
        next_cursor = encode_cursor(images[-1]) if len(rows) > limit else None
        return Page(images=images, total=self.repository.count(filters), next_cursor=next_cursor)

    def replace(
        self,
        image_id: str,
        stream: BinaryIO,
        filename: str | None,
        if_match: Container[str] | None = None,
        idempotency_key: str | None = None,
    ) -> ImageRecord:
        """Replace an image's bytes; the old image stays intact unless this succeeds."""
        info = self._inspect(stream)

        def replace_once():
            # If-Match is checked inside: a retry of a replace that already happened gets
            # the first response, not a 412 against the ETag it changed.
            current = self._current(image_id, if_match)
            return self._replace(current, stream, filename, info, if_match is not None)

        return self._once(idempotency_key, f"replace {image_id} {info.sha256}", replace_once)

    def delete(self, image_id: str, if_match: Container[str] | None = None) -> None:
        """Delete the record, then its blob."""
        current = self._current(image_id, if_match)
        try:
            self.repository.delete(image_id, expected_version=current.version)
        except Conflict:
            if if_match is not None:
                raise PreconditionFailed() from None
            raise
        except BackendUnavailable as error:
            # A delete whose acknowledgement was lost may have landed: then it is done.
            if not (error.in_doubt and self._gone(image_id)):
                raise
        self._discard(current.key)

    def open_blob(self, record: ImageRecord, byte_range: tuple[int, int] | None = None) -> BinaryIO:
        """A readable stream of an image's bytes (of `start <= i < stop` with a range)."""
        return self.storage.open(record.key, byte_range)

    def download_url(self, record: ImageRecord, disposition: str) -> str | None:
        """A short-lived URL the client can fetch the bytes from directly, if the storage
        has one (S3 presigning), carrying the right Content-Type and Content-Disposition."""
        return self.storage.presigned_url(
            record.key, self.settings.presign_ttl, record.content_type, disposition
        )

    def close(self) -> None:
        """Release the backends' connections."""
        self.repository.close()
        self.storage.close()

    def ping(self) -> dict[str, str]:
        """Check both backends; raise `BackendUnavailable` naming the first that fails."""
        for backend in (self.repository, self.storage):
            try:
                backend.ping()
            except BackendUnavailable as error:
                raise BackendUnavailable(f"The {backend.name} backend is unavailable") from error
        return {"repository": self.repository.name, "storage": self.storage.name}

    # --- the order of writes --------------------------------------------------------------

    def _create(self, stream: BinaryIO, filename: str | None, info: media.ImageInfo):
        # A pending record first, invisible to clients: a crash at any later point leaves a
        # pending record (and perhaps a blob) for `repair`, never a visible record without
        # its blob.
        moment = now()
        pending = ImageRecord(
            id=new_id(),
            key=new_key(),
            **_described(info, filename),
            version=1,
            uploaded_at=moment,
            updated_at=moment,
            status="pending",
        )
        self.repository.insert(pending)
        try:
            self.storage.put(pending.key, stream, info.content_type)
        except BaseException:
            self._abandon(pending)
            raise
        try:
            return self.repository.activate(pending.id, now())
        except BackendUnavailable as error:
            landed = self._read_back(pending.id, pending.key) if error.in_doubt else False
            if landed:
                return landed
            self._abandon(pending)
            raise
        except BaseException:
            self._abandon(pending)
            raise

    def _replace(self, current, stream, filename, info, conditional: bool) -> ImageRecord:
        # The new bytes go under a new key, so the old image stays readable until the
        # record switches over, and a lost race or a failure never touches it.
        updated = dataclasses.replace(
            current,
            key=new_key(),
            **_described(info, filename),
            version=current.version + 1,
            updated_at=max(now(), current.updated_at),
        )
        try:
            self.storage.put(updated.key, stream, info.content_type)
        except BaseException:
            # A failed or interrupted put may have left part of an object (S3 multipart).
            self._discard(updated.key)
            raise
        try:
            self.repository.update(updated, expected_version=current.version)
        except BackendUnavailable as error:
            landed = self._read_back(updated.id, updated.key) if error.in_doubt else False
            if not landed:
                if landed is False:
                    self._discard(updated.key)
                raise
        except Conflict:
            self._discard(updated.key)
            if conditional:
                raise PreconditionFailed() from None
            raise
        except BaseException:
            self._discard(updated.key)
            raise
        self._discard(current.key)
        return updated

    def _read_back(self, image_id: str, key: str) -> ImageRecord | bool | None:
        """After a write in doubt: the active record if it now uses `key`, False if it
        surely does not, None if the repository cannot say (then keep the blob: `repair`
        decides later)."""
        try:
            record = self.repository.get(image_id)
        except NotFound:
            return False
        except BackendUnavailable:
            log.warning("write for %s is in doubt; kept blob %s for repair", image_id, key)
            return None
        return record if record.key == key else False

    def _gone(self, image_id: str) -> bool:
        """After a delete in doubt: whether the record is surely gone."""
        try:
            self.repository.get(image_id)
        except NotFound:
            return True
        except BackendUnavailable:
            return False
        return False

    def _abandon(self, pending: ImageRecord) -> None:
        """Undo a create that did not complete: the pending record, then its blob."""
        try:
            self.repository.delete(pending.id, status="pending")
        except (NotFound, Conflict):
            return  # no longer pending (activated after all): its blob must stay
        except BackendUnavailable:
            log.warning("could not remove pending image %s; repair will", pending.id)
            return
        self._discard(pending.key)

    def _discard(self, key: str) -> None:
        """Remove a blob no record points to; if that fails too, `repair` will find it."""
        try:
            self.storage.delete(key)
        except ApiError:
            log.warning("could not remove orphan blob %s; repair will collect it", key)

    def _current(self, image_id: str, if_match: Container[str] | None) -> ImageRecord:
        current = self.repository.get(image_id)
        if if_match is not None and current.sha256 not in if_match:
            raise PreconditionFailed()
        return current

    def _inspect(self, stream: BinaryIO) -> media.ImageInfo:
        return media.inspect(
            stream,
            accepted_formats=self.settings.accepted_formats,
            max_bytes=self.settings.max_upload_bytes,
            max_pixels=self.settings.max_image_pixels,
        )

    # --- idempotency keys -----------------------------------------------------------------

    def _once(
        self, key: str | None, fingerprint: str, action: Callable[[], ImageRecord]
    ) -> ImageRecord:
        """Run `action` once per idempotency key; a retry with the same request gets the
        first result, a different request with the same key gets `IdempotencyKeyReused`."""
        if not key:
            return action()
        ttl = timedelta(seconds=self.settings.idempotency_ttl)
        deadline = time.monotonic() + self.settings.idempotency_wait
        while (claim := self.repository.claim(key, fingerprint, now() + ttl)) is not None:
            if claim.fingerprint != fingerprint:
                raise IdempotencyKeyReused()
            if claim.response is not None:
                return record_from_json(claim.response)
            if time.monotonic() > deadline:
                raise IdempotencyInProgress()
            time.sleep(0.05)  # the first request is still running
        try:
            record = action()
        except BaseException:
            self._forget_key(key)
            raise
        self.repository.finish(key, record_to_json(record))
        return record

    def _forget_key(self, key: str) -> None:
        try:
            self.repository.release(key)
        except BackendUnavailable:
            log.warning("could not release idempotency key %r; it expires by itself", key)


def _described(info: media.ImageInfo, filename: str | None) -> dict:
    """The record fields an upload's bytes and filename decide."""
    return {
        "filename": media.sanitize_filename(filename, info.format),
        "content_type": info.content_type,
        "size": info.size,
        "width": info.width,
        "height": info.height,
        "sha256": info.sha256,
    }


def record_to_json(record: ImageRecord) -> dict:
    values = dataclasses.asdict(record)
    values["uploaded_at"] = record.uploaded_at.isoformat()
    values["updated_at"] = record.updated_at.isoformat()
    return values


def record_from_json(values: dict) -> ImageRecord:
    return ImageRecord(
        **{
            **values,
            "uploaded_at": datetime.fromisoformat(values["uploaded_at"]),
            "updated_at": datetime.fromisoformat(values["updated_at"]),
        }
    )
