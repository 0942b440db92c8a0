"""Blob storage: where image bytes live. One contract, one module per backend.

Every backend translates its driver's errors at this boundary: a missing blob becomes
`NotFound`, anything that means "the store cannot answer now" becomes `BackendUnavailable`.
Keys are made by the service (`records.new_key`), never from client input; each backend
refuses any other key with `ValueError` before it touches a path or an object name.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Protocol

from ..config import Settings
from ..records import valid_key


@dataclass(frozen=True)
class StoredBlob:
    """A blob as listed by `BlobStorage.list` (for repair and for checks)."""

    key: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class Partial:
    """What an interrupted write left: a temporary file, an unfinished multipart upload.
    `ref` names it to `delete_partial`."""

    ref: str
    started: datetime


class BlobStorage(Protocol):
    """Where image bytes live.

    - `put(key, stream, content_type)` stores the whole stream under `key`, atomically: a
      reader sees all of the bytes or no blob.
    - `open(key, byte_range=None)` returns a readable binary file object, of the bytes
      `start <= i < stop` when `byte_range=(start, stop)` is given; `NotFound` if there is
      no blob.
    - `presigned_url(key, ttl, content_type, disposition, cache_control="")` returns a URL a
      client can GET the blob from directly with those response headers, or None if the
      backend has none.
    - `accel_path(key, byte_range, ttl, content_type, disposition)` returns the path of
      nginx's internal location that serves the blob, all of it or `byte_range` (for
      X-Accel-Redirect; see deploy/nginx.conf).
    - `delete(key)` removes the blob; deleting a missing blob is success.
    - `list()` yields every stored blob in key order (repair merges it with the records).
    - `list_partial()` yields what interrupted writes left (never a reader's business);
      `delete_partial(ref)` removes one (removing one already gone is success).
    - `create()` makes the directory or bucket (idempotent); `ping()` raises
      `BackendUnavailable` unless the store answers; `close()` releases connections.
    """

    name: str

    def create(self) -> None: ...

    def put(self, key: str, stream: BinaryIO, content_type: str) -> None: ...

    def open(self, key: str, byte_range: tuple[int, int] | None = None) -> BinaryIO: ...

    def presigned_url(
        self, key: str, ttl: int, content_type: str, disposition: str, cache_control: str = ""
    ) -> str | None: ...

    def accel_path(
        self,
        key: str,
        byte_range: tuple[int, int] | None,
        ttl: int,
        content_type: str,
        disposition: str,
    ) -> str: ...

    def delete(self, key: str) -> None: ...

    def list(self) -> Iterator[StoredBlob]: ...

    def list_partial(self) -> Iterator[Partial]: ...

    def delete_partial(self, ref: str) -> None: ...

    def ping(self, writes: bool = True) -> None:
        """Raise `BackendUnavailable` unless the store answers (and, with `writes`, takes
        writes)."""

    def close(self) -> None: ...


#: nginx's internal locations for X-Accel-Redirect (DOWNLOAD_MODE=accel), by what they send:
#: the service decides the range (or none), nginx sends it. Blob files by their path under
#: the blob directory (`ranged` honours the client's Range, `whole` ignores it); S3 objects
#: by a presigned URL's path and query, after the range to ask for (`bytes=0-9` or `-`).
ACCEL_FILES = {True: "/_accel/ranged/", False: "/_accel/whole/"}
ACCEL_S3 = "/_accel/s3/"


def range_value(byte_range: tuple[int, int] | None) -> str:
    """A Range header's value for `(start, stop)`; `-` for none."""
    return "-" if byte_range is None else f"bytes={byte_range[0]}-{byte_range[1] - 1}"


def checked_key(key: str) -> str:
    """`key` if the service could have made it; a path or object name is never built from
    anything else."""
    if not valid_key(key):
        raise ValueError(f"not a blob key: {key!r}")
    return key


def storage_from_settings(settings: Settings) -> BlobStorage:
    """The blob backend the settings choose: S3 when a bucket is named, else a directory."""
    # Imported here, the one place that chooses: the embedded default never loads boto3.
    if settings.blob_backend == "s3":
        from .s3 import S3Storage

        return S3Storage.from_settings(settings)
    from .filesystem import FilesystemStorage

    return FilesystemStorage(settings.blob_dir, settings.blob_file_mode)
