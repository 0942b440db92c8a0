"""Blob storage: one small interface, two backends (a local directory and S3).

Every backend translates its driver's errors at this boundary: a missing blob becomes
`NotFound`, anything that means "the store cannot answer now" becomes `BackendUnavailable`.
Keys are made by the service (`new_key`), never from client input.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol

from .errors import BackendUnavailable, NotFound

_KEY = re.compile(r"^[0-9a-f]{32}$")


def new_key() -> str:
    """A fresh, unguessable blob key."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class StoredBlob:
    """A blob as listed by `BlobStorage.list` (for repair and for checks)."""

    key: str
    size: int
    modified: datetime


class BlobStorage(Protocol):
    """Where image bytes live.

    - `put(key, stream, content_type)` stores the whole stream under `key`, atomically: a
      reader sees all of the bytes or no blob.
    - `open(key, byte_range=None)` returns a readable binary file object, of the bytes
      `start <= i < stop` when `byte_range=(start, stop)` is given; `NotFound` if there is
      no blob.
    - `presigned_url(key, ttl, content_type, disposition)` returns a URL a client can GET the
      blob from directly with those response headers, or None if the backend has none.
    - `delete(key)` removes the blob; deleting a missing blob is success.
    - `list()` yields every stored blob.
    - `ping()` raises `BackendUnavailable` unless the store can be written.
    - `close()` releases connections.
    """

    name: str

    def put(self, key: str, stream: BinaryIO, content_type: str) -> None: ...

    def open(self, key: str, byte_range: tuple[int, int] | None = None) -> BinaryIO: ...

    def presigned_url(
        self, key: str, ttl: int, content_type: str, disposition: str
    ) -> str | None: ...

    def delete(self, key: str) -> None: ...

    def list(self) -> Iterator[StoredBlob]: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


def _checked(key: str) -> str:
    # Defence in depth: keys come from `new_key`, but a path must never be built from
    # anything else.
    if not _KEY.match(key):
        raise ValueError(f"not a blob key: {key!r}")
    return key


class FilesystemStorage:
    """Blobs as files under `root`, sharded by the first two characters of the key."""

    name = "filesystem"

    def __init__(self, root: Path):
        self.root = Path(root)

    def create(self) -> None:
        """Create the root directory (idempotent)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BackendUnavailable(f"Cannot create blob directory {self.root}") from error

    def path(self, key: str) -> Path:
        key = _checked(key)
        return self.root / key[:2] / key

    def put(self, key: str, stream: BinaryIO, content_type: str) -> None:
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Write a temporary file beside the target, fsync it, rename it into place and
            # fsync the directory: after a crash the blob is either whole or absent.
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    while chunk := stream.read(1024 * 1024):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            _fsync_dir(target.parent)
        except OSError as error:
            raise BackendUnavailable("Cannot write to the blob directory") from error

    def open(self, key: str, byte_range: tuple[int, int] | None = None) -> BinaryIO:
        try:
            file = open(self.path(key), "rb")  # noqa: SIM115 - the WSGI server closes it
        except FileNotFoundError:
            raise NotFound("The image's file is missing") from None
        except OSError as error:
            raise BackendUnavailable("Cannot read from the blob directory") from error
        # A real file (or a window on one that keeps its fileno) lets gunicorn sendfile().
        return file if byte_range is None else FileRange(file, *byte_range)

    def presigned_url(self, key: str, ttl: int, content_type: str, disposition: str) -> None:
        return None

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as error:
            raise BackendUnavailable("Cannot delete from the blob directory") from error

    def list(self) -> Iterator[StoredBlob]:
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if not shard.is_dir():
                continue
            for path in sorted(shard.iterdir()):
                if not _KEY.match(path.name):
                    continue  # temporary files of writes in progress
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    yield StoredBlob(
                        path.name, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)
                    )

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root) as probe:
                probe.write(b"ok")
        except OSError as error:
            raise BackendUnavailable(f"Cannot write to the blob directory {self.root}") from error

    def close(self) -> None:
        pass


class FileRange(io.RawIOBase):
    """A window `start <= i < stop` on an open file: reads stop at its end, and `fileno()`
    stays available so gunicorn can sendfile() from the current offset."""

    def __init__(self, file: BinaryIO, start: int, stop: int):
        super().__init__()
        self.file = file
        self.file.seek(start)
        self.remaining = stop - start

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.file.fileno()

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[: max(self.remaining, 0)]
        count = self.file.readinto(view) or 0
        self.remaining -= count
        return count

    def close(self) -> None:
        self.file.close()
        super().close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Storage:
    """Blobs as objects under `prefix` in one bucket, through a ready-made boto3 client."""

    name = "s3"

    def __init__(self, client, bucket: str, prefix: str = "images/", probe_client=None):
        from boto3.s3.transfer import TransferConfig

        self.client = client
        # Readiness probes must answer fast, so they get a client without retries.
        self.probe_client = probe_client or client
        self.bucket = bucket
        self.prefix = prefix
        # Multipart above 8 MiB with at most two parts in flight and in memory: boto3's
        # defaults (10 threads, 10 buffered chunks) grow a worker by >100 MiB on big files.
        self.transfer = TransferConfig(multipart_threshold=8 * 1024 * 1024, max_concurrency=2)
        # Not a constructor argument of boto3's TransferConfig, but an attribute s3transfer
        # reads (its default is 10 buffered 8 MiB parts).
        self.transfer.max_in_memory_upload_chunks = 2
        self._urls = _RecentUrls()

    def _object(self, key: str) -> str:
        return self.prefix + _checked(key)

    def create(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""
        with _s3_errors():
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except self._client_error as error:
                if _status(error) != 404:
                    raise
            region = self.client.meta.region_name
            options = {}
            if region and region != "us-east-1":
                options["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                self.client.create_bucket(Bucket=self.bucket, **options)
            except self._client_error as error:
                if _code(error) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put(self, key: str, stream: BinaryIO, content_type: str) -> None:
        with _s3_errors():
            self.client.upload_fileobj(
                stream,
                self.bucket,
                self._object(key),
                ExtraArgs={"ContentType": content_type},
                Config=self.transfer,
            )

    def open(self, key: str, byte_range: tuple[int, int] | None = None) -> BinaryIO:
        options = {}
        if byte_range is not None:
            # S3 sends only the bytes asked for; HTTP ranges are inclusive.
            options["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
        with _s3_errors():
            try:
                response = self.client.get_object(
                    Bucket=self.bucket, Key=self._object(key), **options
                )
            except self._client_error as error:
                if _status(error) == 404:
                    raise NotFound("The image's file is missing") from None
                raise
        return response["Body"]

    def presigned_url(self, key: str, ttl: int, content_type: str, disposition: str) -> str:
        # Signing is local (no request to S3) but costs more than the rest of a redirect,
        # so a URL is reused for a tenth of its validity (at most a minute): every URL
        # handed out is still valid for at least 90% of `ttl`.
        wanted = (key, ttl, content_type, disposition)
        if url := self._urls.get(wanted):
            return url
        with _s3_errors():
            url = self.client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": self._object(key),
                    "ResponseContentType": content_type,
                    "ResponseContentDisposition": disposition,
                },
                ExpiresIn=ttl,
            )
        self._urls.put(wanted, url, fresh_for=min(ttl / 10, 60))
        return url

    def delete(self, key: str) -> None:
        with _s3_errors():
            # S3 answers 204 for a missing key too: deleting what is gone is success.
            self.client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def list(self) -> Iterator[StoredBlob]:
        with _s3_errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"][len(self.prefix) :]
                    if _KEY.match(key):
                        yield StoredBlob(key, item["Size"], item["LastModified"])

    def ping(self) -> None:
        with _s3_errors():
            self.probe_client.head_bucket(Bucket=self.bucket)

    def close(self) -> None:
        self.client.close()
        self.probe_client.close()

    @property
    def _client_error(self):
        return self.client.exceptions.ClientError


class _RecentUrls:
    """A small thread-safe LRU of presigned URLs, each kept for a short while."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._items: OrderedDict[tuple, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, wanted: tuple) -> str | None:
        with self._lock:
            item = self._items.get(wanted)
            if item is None or item[1] < time.monotonic():
                return None
            self._items.move_to_end(wanted)
            return item[0]

    def put(self, wanted: tuple, url: str, fresh_for: float) -> None:
        with self._lock:
            self._items[wanted] = (url, time.monotonic() + fresh_for)
            self._items.move_to_end(wanted)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def _status(error) -> int | None:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _code(error) -> str | None:
    return error.response.get("Error", {}).get("Code")


@contextlib.contextmanager
def _s3_errors():
    """Translate botocore's errors: anything left unhandled means S3 cannot serve us now."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as error:
        raise BackendUnavailable() from error
    except OSError as error:
        # urllib3/socket errors that escape botocore's wrappers.
        raise BackendUnavailable() from error


def make_s3_client(settings, session=None, probe: bool = False):
    """A boto3 S3 client with explicit timeouts and bounded retries; a `probe` client (for
    readiness checks) has the short probe timeout and a single attempt."""
    import boto3
    from botocore.config import Config

    # Clients of one session share its parsed service model (loading it is the slow part).
    session = session or boto3.session.Session()
    connect = settings.probe_timeout if probe else settings.backend_connect_timeout
    read = settings.probe_timeout if probe else settings.backend_read_timeout
    config = Config(
        connect_timeout=connect,
        read_timeout=read,
        retries={"mode": "standard", "max_attempts": 1 if probe else 3},
        # SigV4 everywhere, presigned URLs included (up to 7 days; SigV2 is deprecated).
        signature_version="s3v4",
        # S3-compatible servers (MinIO, moto, Ceph) usually want path-style addressing.
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
    )
    return session.client(
        "s3",
        region_name=settings.aws_region,
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        config=config,
    )


def storage_from_settings(settings) -> BlobStorage:
    """The blob backend the settings choose."""
    if settings.s3_bucket_name:
        import boto3

        session = boto3.session.Session()
        return S3Storage(
            make_s3_client(settings, session),
            settings.s3_bucket_name,
            probe_client=make_s3_client(settings, session, probe=True),
        )
    return FilesystemStorage(settings.data_dir / "blobs")
