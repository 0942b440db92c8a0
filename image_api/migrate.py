"""Growing out of the embedded default: copy everything from the blob directory + SQLite
to S3 + MongoDB.

What is copied: API keys (their hashes: the same secrets work), every active image's blob
and record, every cached variant's blob and record, and the idempotency keys still live.
Pending uploads (none while the service is READ_ONLY) and replaced blobs awaiting deletion
are left behind. Every blob is read back from the target and its sha256 checked against
its record before the record is written.

Resumable: for each item the blob goes first and the record last, and an item whose record
is in the target already is skipped; a crash leaves at most a blob without its record,
which the rerun writes again under the same key. Run it while the service is read-only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from .config import ConfigError, Settings
from .errors import Conflict, NotFound
from .records import Clock, ImageRecord, Status, Variant
from .repository import Repository, repository_from_settings, scan_all, scan_all_variants
from .storage import BlobStorage, storage_from_settings

_CHUNK = 1024 * 1024


class MigrationError(RuntimeError):
    """A blob whose bytes do not match its record: nothing is written for it."""


@dataclass
class Report:
    dry_run: bool
    keys: int = 0
    images: int = 0
    variants: int = 0
    idempotency_keys: int = 0
    bytes: int = 0
    skipped: int = 0  # already in the target (a rerun)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Backends:
    storage: BlobStorage
    repository: Repository


def target_backends(
    settings: Settings,
    bucket: str,
    mongodb_url: str,
    s3_endpoint_url: str | None = None,
    aws_region: str | None = None,
) -> Backends:
    """S3 + MongoDB as the service would use them with these values in `settings`'s
    place, checked as its own settings are: `ConfigError` for a value it would refuse."""
    from pymongo.errors import ConfigurationError

    # An empty value (an unset shell variable) reads as unset: the target would be the
    # embedded default, the source itself, and the copy a success that copied nothing.
    for option, value in (("--to-s3", bucket), ("--to-mongodb", mongodb_url)):
        if not value.strip():
            raise ConfigError(f"{option} is empty: name the bucket and the MongoDB URL")
    try:
        checked = Settings.from_mapping(
            {
                "S3_BUCKET_NAME": bucket,
                "S3_ENDPOINT_URL": s3_endpoint_url or settings.s3_endpoint_url or "",
                "AWS_REGION": aws_region or settings.aws_region or "",
                "MONGODB_URL": mongodb_url,
                "SECRET_KEY": "x" * 48,  # required with MongoDB; copying signs nothing
            }
        )
        target = dataclasses.replace(
            settings,
            s3_bucket_name=checked.s3_bucket_name,
            s3_endpoint_url=checked.s3_endpoint_url,
            aws_region=checked.aws_region,
            mongodb_url=checked.mongodb_url,
        )
        return Backends(storage_from_settings(target), repository_from_settings(target))
    except (ValueError, ConfigurationError) as error:
        # pymongo's InvalidURI is a ConfigurationError: a URL without a host, say.
        raise ConfigError(str(error)) from error


def items(source: Backends) -> Iterator[ImageRecord | Variant]:
    """What holds a blob, images first."""
    for record in scan_all(source.repository):
        if record.status is Status.ACTIVE:
            yield record
    yield from scan_all_variants(source.repository)


def migrate(
    source: Backends,
    target: Backends,
    clock: Clock,
    dry_run: bool = False,
    track: Callable[[Iterable], Iterable] = iter,
) -> Report:
    report = Report(dry_run=dry_run)
    if not dry_run:
        target.storage.create()
        target.repository.create()
    for key in source.repository.list_api_keys():
        if target.repository.get_api_key(key.id) is not None:
            report.skipped += 1
            continue
        report.keys += 1
        if not dry_run:
            try:
                target.repository.insert_api_key(key)
            except Conflict:
                report.problems.append(f"API key {key.name!r}: another key has its name")
    for item in track(items(source)):
        if _copied(target.repository, item):
            report.skipped += 1
            continue
        kind = "variants" if isinstance(item, Variant) else "images"
        setattr(report, kind, getattr(report, kind) + 1)
        report.bytes += item.size
        if dry_run:
            continue
        try:
            _copy_blob(source.storage, target.storage, item)
        except MigrationError as error:
            report.problems.append(str(error))
            continue
        _write_record(target.repository, item)
    now = clock()
    after = None
    while claims := source.repository.scan_claims(after, 1000):
        after = claims[-1].key
        for claim in claims:
            if claim.expires_at <= now:
                continue
            report.idempotency_keys += 1
            if dry_run:
                continue
            if (
                target.repository.claim(
                    claim.key, claim.fingerprint, claim.resource, now, claim.expires_at
                )
                is None
                and claim.response is not None
            ):
                target.repository.finish(claim.key, claim.response)
    return report


def _copied(repository: Repository, item: ImageRecord | Variant) -> bool:
    if isinstance(item, Variant):
        return repository.get_variant(item.key) is not None
    return repository.find_key(item.key) is not None


def _write_record(repository: Repository, item: ImageRecord | Variant) -> None:
    if isinstance(item, Variant):
        repository.insert_variant(item)
        return
    repository.insert(item)


def _copy_blob(source: BlobStorage, target: BlobStorage, item: ImageRecord | Variant) -> None:
    """The blob, checked against its record's sha256 before it is written (from a temporary
    copy: S3 rewinds a stream to retry) and after, as the target returns it."""
    what = f"{'variant' if isinstance(item, Variant) else 'image'} {item.key}"
    with tempfile.TemporaryFile() as copy:
        try:
            with source.open(item.key) as blob:
                sha256 = _copy(blob, copy)
        except NotFound:
            raise MigrationError(f"{what}: its blob is missing (run flask repair)") from None
        if sha256 != item.sha256:
            raise MigrationError(f"{what}: its blob does not match its sha256; not copied")
        copy.seek(0)
        target.put(item.key, copy, item.content_type)
    with target.open(item.key) as landed:
        if _copy(landed, None) != item.sha256:
            target.delete(item.key)
            raise MigrationError(f"{what}: the copy in the target does not match; not copied")


def _copy(stream: BinaryIO, out: BinaryIO | None) -> str:
    """Read `stream` to its end (into `out`, if given); its sha256."""
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        if out is not None:
            out.write(chunk)
    return digest.hexdigest()
