"""Blobs as objects in one S3 bucket (AWS, or MinIO, Ceph, R2, moto through an endpoint)."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import BinaryIO
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .. import deadline
from ..config import ConfigError, Settings
from ..errors import BackendUnavailable, NotFound
from ..records import valid_key
from . import ACCEL_S3, Partial, StoredBlob, checked_key, range_value

#: Tries per call: a refused or reset connection, a 5xx or a throttle is tried again while
#: the request's budget lasts; a compensating call gets one.
ATTEMPTS = 3
#: Per-attempt timeouts come from the request's budget, rounded down to one of these, so a
#: worker keeps a handful of clients (one per rung) rather than one per request.
_RUNGS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_RETRYABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"}


#: What a client is told when this backend cannot answer now.
UNAVAILABLE = "The blob storage (S3) is unavailable; retry later"


class S3Clients:
    """The boto3 clients of one worker process, by (connect, read) timeout.

    boto3 has no per-call deadline: timeouts belong to a client's config. So each attempt
    takes the client whose timeouts fit in what is left of the request's budget; clients
    are made on first use from one session (which holds the parsed service model, the slow
    part of making one) and are thread-safe. None of them retries by itself: `S3Storage`
    decides, against the budget.
    """

    def __init__(
        self,
        make: Callable[[float, float], object],
        connect_timeout: float,
        read_timeout: float,
        probe_timeout: float,
    ):
        self._make = make
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.probe_timeout = probe_timeout
        self._clients: dict[tuple[float, float], object] = {}
        self._lock = threading.Lock()

    @classmethod
    def fixed(cls, client) -> S3Clients:
        """Always `client`, whatever the budget (for tests and tools that bring their own)."""
        clients = cls(lambda connect, read: client, 0, 0, 0)
        clients.get = lambda connect, read: client
        return clients

    def get(self, connect: float, read: float):
        wanted = (connect, read)
        with self._lock:
            client = self._clients.get(wanted)
            if client is None:
                client = self._clients[wanted] = self._make(connect, read)
            return client

    def for_attempt(self):
        """The client for the next attempt; `BackendUnavailable` if the budget is spent."""
        read = _rung(deadline.time_left(self.read_timeout))
        return self.get(min(self.connect_timeout, read), read)

    def probe(self):
        """A client for readiness probes: the short probe timeout."""
        return self.get(self.probe_timeout, self.probe_timeout)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def _rung(seconds: float) -> float:
    fitting = [rung for rung in _RUNGS if rung <= seconds]
    return fitting[-1] if fitting else _RUNGS[0]


class S3Storage:
    """Blobs as objects under `prefix` in one bucket."""

    name = "s3"

    def __init__(self, clients: S3Clients | object, bucket: str, prefix: str = "images/"):
        self.clients = clients if isinstance(clients, S3Clients) else S3Clients.fixed(clients)
        self.bucket = bucket
        self.prefix = prefix
        # Multipart above 8 MiB with at most two parts in flight and in memory: boto3's
        # defaults (10 threads, 10 buffered chunks) grow a worker by >100 MiB on big files.
        self.transfer = TransferConfig(multipart_threshold=8 * 1024 * 1024, max_concurrency=2)
        # Not a constructor argument of boto3's TransferConfig, but an attribute s3transfer
        # reads (its default is 10 buffered 8 MiB parts).
        self.transfer.max_in_memory_upload_chunks = 2
        self._urls = _RecentUrls()

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        session = boto3.session.Session()

        def make(connect: float, read: float):
            return make_s3_client(settings, session, connect, read)

        clients = S3Clients(
            make,
            settings.backend_connect_timeout,
            settings.backend_read_timeout,
            settings.probe_timeout,
        )
        return cls(clients, settings.s3_bucket_name)

    def _object(self, key: str) -> str:
        return self.prefix + checked_key(key)

    def _attempts(self, call: Callable):
        """`call(client)` until it succeeds, it fails for good, or the budget runs out."""
        attempts = 1 if deadline.is_compensating() else ATTEMPTS
        with _s3_errors():
            for attempt in range(1, attempts + 1):
                client = self.clients.for_attempt()
                try:
                    return call(client)
                except ClientError as error:
                    if attempt == attempts or not _retryable(error):
                        raise
                except (BotoCoreError, OSError):
                    if attempt == attempts:
                        raise
                # Exponential back-off, within what is left of the budget.
                time.sleep(min(0.05 * 2**attempt, deadline.time_left(1.0)))
        raise AssertionError("unreachable")

    def create(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""

        def create(client):
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as error:
                if _status(error) != 404:
                    raise
            region = client.meta.region_name
            options = {}
            if region and region != "us-east-1":
                options["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                client.create_bucket(Bucket=self.bucket, **options)
            except ClientError as error:
                if _code(error) == "InvalidBucketName":
                    # A setting to fix, not an outage to wait out.
                    raise ConfigError(
                        f"S3_BUCKET_NAME {self.bucket!r} is not a name the S3 server takes: "
                        "3-63 lowercase letters, digits, dots and hyphens"
                    ) from None
                if _code(error) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._attempts(create)

    def put(self, key: str, stream: BinaryIO, content_type: str) -> None:
        name = self._object(key)

        def put(client):
            stream.seek(0)
            client.upload_fileobj(
                _KeepOpen(stream),
                self.bucket,
                name,
                ExtraArgs={"ContentType": content_type},
                Config=self.transfer,
            )

        self._attempts(put)

    def open(self, key: str, byte_range: tuple[int, int] | None = None) -> BinaryIO:
        options = {"Bucket": self.bucket, "Key": self._object(key)}
        if byte_range is not None:
            # S3 sends only the bytes asked for; HTTP ranges are inclusive.
            options["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"

        def get(client):
            try:
                return client.get_object(**options)
            except ClientError as error:
                if _status(error) == 404:
                    raise NotFound("The image's file is missing") from None
                raise

        return _Body(self._attempts(get)["Body"])

    def accel_path(self, key, byte_range, ttl, content_type, disposition) -> str:
        # nginx's internal location asks the endpoint the URL was signed for, for that range.
        url = urlsplit(self.presigned_url(key, ttl, content_type, disposition))
        return f"{ACCEL_S3}{range_value(byte_range)}/{url.path.lstrip('/')}?{url.query}"

    def presigned_url(
        self, key: str, ttl: int, content_type: str, disposition: str, cache_control: str = ""
    ) -> str:
        # Signing is local (no request to S3) but costs more than the rest of a redirect,
        # so a URL is reused for a tenth of its validity (at most a minute): every URL
        # handed out is still valid for at least 90% of `ttl`.
        wanted = (key, ttl, content_type, disposition, cache_control)
        if url := self._urls.get(wanted):
            return url
        client = self.clients.get(self.clients.connect_timeout, self.clients.read_timeout)
        params = {
            "Bucket": self.bucket,
            "Key": self._object(key),
            "ResponseContentType": content_type,
            "ResponseContentDisposition": disposition,
        }
        if cache_control:
            params["ResponseCacheControl"] = cache_control
        with _s3_errors():
            url = client.generate_presigned_url("get_object", Params=params, ExpiresIn=ttl)
        self._urls.put(wanted, url, fresh_for=min(ttl / 10, 60))
        return url

    def delete(self, key: str) -> None:
        name = self._object(key)
        # S3 answers 204 for a missing key too: deleting what is gone is success.
        self._attempts(lambda client: client.delete_object(Bucket=self.bucket, Key=name))

    def list(self) -> Iterator[StoredBlob]:
        # S3 lists keys in UTF-8 binary order, which for our hex keys is key order.
        client = self.clients.for_attempt()
        with _s3_errors():
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"][len(self.prefix) :]
                    if valid_key(key):
                        yield StoredBlob(key, item["Size"], item["LastModified"])

    def list_partial(self) -> Iterator[Partial]:
        # Multipart uploads that were neither completed nor aborted (a killed worker): S3
        # keeps, and bills, their parts until they are aborted.
        client = self.clients.for_attempt()
        with _s3_errors():
            pages = client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for upload in page.get("Uploads", ()):
                    key = upload["Key"][len(self.prefix) :]
                    if valid_key(key):
                        yield Partial(f"{key}/{upload['UploadId']}", upload["Initiated"])

    def delete_partial(self, ref: str) -> None:
        key, _, upload_id = ref.partition("/")
        name = self._object(key)

        def abort(client):
            try:
                client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            except ClientError as error:
                if _code(error) != "NoSuchUpload":
                    raise

        self._attempts(abort)

    def ping(self, writes: bool = True) -> None:
        # Whether the keys may write is not asked: S3 has no call that says so unwritten.
        with _s3_errors():
            self.clients.probe().head_bucket(Bucket=self.bucket)

    def close(self) -> None:
        self.clients.close()


class _KeepOpen:
    """The upload stream, minus `close()`: s3transfer closes the file it read from once
    an upload ends, and a retry (or the service's next step) still needs it."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def close(self) -> None:
        pass


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


def _status(error: ClientError) -> int | None:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _code(error: ClientError) -> str | None:
    return error.response.get("Error", {}).get("Code")


def _retryable(error: ClientError) -> bool:
    status = _status(error) or 0
    return status >= 500 or status == 429 or _code(error) in _RETRYABLE_CODES


@contextlib.contextmanager
def _s3_errors():
    """Translate botocore's errors: anything left unhandled means S3 cannot serve us now."""
    try:
        yield
    except (BotoCoreError, ClientError) as error:
        raise BackendUnavailable(UNAVAILABLE) from error
    except OSError as error:
        # urllib3/socket errors that escape botocore's wrappers.
        raise BackendUnavailable(UNAVAILABLE) from error


class _Body(io.RawIOBase):
    """An object's bytes as S3 sends them. A connection that fails or stalls past the read
    timeout mid-way raises `BackendUnavailable`, as every other S3 failure does: not
    botocore's own errors, which nothing above this module knows."""

    def __init__(self, body):
        self._body = body

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        with _s3_errors():
            return self._body.read(None if size is None or size < 0 else size)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def make_s3_client(settings: Settings, session, connect_timeout: float, read_timeout: float):
    """A boto3 S3 client with these timeouts and a single attempt (retries are ours)."""
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "total_max_attempts": 1},
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
