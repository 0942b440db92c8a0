"""The use-cases, and the only place that knows the order of writes and how to undo them.

S3 and MongoDB share no transaction, so the order of writes is the contract:

- create: blob under a fresh key, then the record; if the record cannot be written, the blob
  is removed.
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from . import media
from .config import Settings
from .errors import ApiError, BackendUnavailable, BadRequest, NotFound
from .repository import Cursor, ImageRecord, Repository, new_id
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

    def _inspect(self, stream: BinaryIO) -> media.ImageInfo:
        return media.inspect(
            stream,
            accepted_formats=self.settings.accepted_formats,
            max_bytes=self.settings.max_upload_bytes,
            max_pixels=self.settings.max_image_pixels,
        )

    def _store(self, stream: BinaryIO, info: media.ImageInfo) -> str:
        key = new_key()
        try:
            self.storage.put(key, stream, info.content_type)
        except BaseException:
            # A failed or interrupted put may have left part of an object (S3 multipart).
            self._discard(key)
            raise
        return key

    def _discard(self, key: str) -> None:
        """Remove a blob no record points to; if that fails too, `repair` will find it."""
        try:
            self.storage.delete(key)
        except ApiError:
            log.warning("could not remove orphan blob %s; repair will collect it", key)

    def _commit(self, write: Callable[[], object], image_id: str, key: str) -> None:
        """Run the metadata write that makes blob `key` live for `image_id`.

        If it surely failed, the blob is removed. A write whose acknowledgement was lost
        (timeout, dropped connection) may still have landed: then the record is read back,
        and if it points at `key` the write succeeded; if that cannot be told, the blob is
        kept (an orphan `repair` collects) so that no record ever points at a deleted blob.
        """
        try:
            write()
        except BackendUnavailable as error:
            landed = self._points_at(image_id, key) if error.in_doubt else False
            if landed:
                log.warning("metadata write for %s landed despite an error; kept", image_id)
                return
            if landed is None:
                log.warning("metadata write for %s is in doubt; kept blob %s", image_id, key)
            else:
                self._discard(key)
            raise
        except BaseException:
            self._discard(key)
            raise

    def _points_at(self, image_id: str, key: str) -> bool | None:
        """Whether the stored record uses blob `key`; None if the repository cannot say."""
        try:
            return self.repository.get(image_id).key == key
        except NotFound:
            return False
        except BackendUnavailable:
            return None

    def create(self, stream: BinaryIO, filename: str | None) -> ImageRecord:
        """Validate and store a new image."""
        info = self._inspect(stream)
        key = self._store(stream, info)
        moment = now()
        record = ImageRecord(
            id=new_id(),
            key=key,
            filename=media.sanitize_filename(filename, info.format),
            content_type=info.content_type,
            size=info.size,
            width=info.width,
            height=info.height,
            sha256=info.sha256,
            version=1,
            uploaded_at=moment,
            updated_at=moment,
        )
        self._commit(lambda: self.repository.insert(record), record.id, key)
        return record

    def get(self, image_id: str) -> ImageRecord:
        return self.repository.get(image_id)

    def list(self, limit: int, cursor: str | None = None) -> Page:
        """A page of images, newest first, after the position `cursor` names."""
        after = decode_cursor(cursor) if cursor else None
        # One extra row tells whether another page follows without a second query.
        rows = self.repository.list_page(limit + 1, after)
        images = rows[:limit]
        next_cursor = encode_cursor(images[-1]) if len(rows) > limit else None
        return Page(images=images, total=self.repository.count(), next_cursor=next_cursor)

    def replace(self, image_id: str, stream: BinaryIO, filename: str | None) -> ImageRecord:
        """Replace an image's bytes; the old image stays intact unless this succeeds."""
        current = self.repository.get(image_id)
        info = self._inspect(stream)
        key = self._store(stream, info)
        updated = dataclasses.replace(
            current,
            key=key,
            filename=media.sanitize_filename(filename, info.format),
            content_type=info.content_type,
            size=info.size,
            width=info.width,
            height=info.height,
            sha256=info.sha256,
            version=current.version + 1,
            updated_at=max(now(), current.updated_at),
        )
        self._commit(
            lambda: self.repository.update(updated, expected_version=current.version),
            image_id,
            key,
        )
        self._discard(current.key)
        return updated

    def delete(self, image_id: str) -> None:
        """Delete the record, then its blob."""
        record = self.repository.delete(image_id)
        self._discard(record.key)

    def open(self, image_id: str) -> tuple[ImageRecord, BinaryIO]:
        """An image's record and a readable stream of its bytes."""
        record = self.repository.get(image_id)
        return record, self.storage.open(record.key)

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
