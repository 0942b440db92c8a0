"""Find and fix drift between blobs and records: what crashes and lost writes leave behind.

Records and blobs are both walked in blob-key order, a batch at a time, and merged like two
sorted files, so memory stays flat whatever the number of images. Safe while the service
is serving: anything younger than the grace period is left alone (it may belong to a
request in flight), and every finding is re-checked just before it is acted on. Running it
twice does nothing the second time.

"Older than the grace period" means stamped at or before `now - grace`, with `now` read
from the service's clock: with `grace=0`, everything made before the run is in scope.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from .errors import Conflict, NotFound
from .records import ImageRecord, Status, Variant
from .repository import scan_all, scan_all_variants
from .service import ImageService
from .storage import StoredBlob

ORPHAN_BLOB = "orphan_blob"  # a blob no record points to
STALE_PENDING = "stale_pending"  # an upload that never completed
MISSING_BLOB = "missing_blob"  # an active record whose blob is gone
RETIRED_BLOB = "retired_blob"  # a replaced image's old blob, kept for readers, now due
PARTIAL_WRITE = "partial_write"  # a temporary file or unfinished multipart upload
STALE_VARIANT = "stale_variant"  # a cached variant of an image or a version that is gone
MISSING_VARIANT = "missing_variant"  # a variant's record whose blob is gone


@dataclass
class Finding:
    kind: str
    key: str
    image_id: str | None = None
    action: str = "reported"


@dataclass
class Report:
    applied: bool
    grace_seconds: float
    records: int = 0
    variants: int = 0
    blobs: int = 0
    findings: list[Finding] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


#: `apply` stops, changing nothing, when more than this share of the records would go for
#: their blobs, or of the blobs for their records (two or more of them): such a store is
#: far likelier to be the wrong one (another bucket, DATA_DIR or database in the settings)
#: than to have drifted that far.
_IMPLAUSIBLE_SHARE = 0.5
_IMPLAUSIBLE_COUNT = 2


class Implausible(Exception):
    """What `apply` would delete looks like a mix-up of stores, not drift."""


#: One key, and what uses it: an image's record, a variant's record, a stored blob.
Entry = tuple[str, ImageRecord | None, Variant | None, StoredBlob | None]


def repair(
    service: ImageService,
    grace: timedelta,
    apply: bool = False,
    track: Callable[[Iterable[Entry]], Iterable[Entry]] = iter,
    batch: int = 1000,
    force: bool = False,
) -> Report:
    """Compare records and blobs; with `apply`, delete what is orphaned or stale, after a
    dry run that finds nothing implausible (`Implausible`; `force` skips the check)."""
    now = service.clock()
    if apply and not force:
        reason = implausible(_compare(service, now, grace, False, track, batch))
        if reason is not None:
            raise Implausible(reason)
    return _compare(service, now, grace, apply, track, batch)


def _compare(
    service: ImageService,
    now: datetime,
    grace: timedelta,
    apply: bool,
    track: Callable[[Iterable[Entry]], Iterable[Entry]],
    batch: int,
) -> Report:
    cutoff = now - grace
    report = Report(applied=apply, grace_seconds=grace.total_seconds())
    entries = _merge(
        scan_all(service.repository, batch),
        scan_all_variants(service.repository, batch),
        service.storage.list(),
    )
    for key, record, variant, blob in track(entries):
        report.records += record is not None
        report.variants += variant is not None
        report.blobs += blob is not None
        finding = None
        if record is not None and record.status is Status.PENDING:
            if record.uploaded_at <= cutoff:
                finding = Finding(STALE_PENDING, key, record.id)
                if apply:
                    finding.action = _remove_pending(service, record)
        elif record is not None:
            if blob is None and _blob_missing(service, key) and _still_names(service, record):
                finding = Finding(MISSING_BLOB, key, record.id)
                if apply:
                    finding.action = _remove_record(service, record)
        elif variant is not None:
            if not _of_current_version(service, variant):
                finding = Finding(STALE_VARIANT, key, variant.image_id)
                if apply:
                    service.repository.delete_variant(key)
                    service.storage.delete(key)
                    finding.action = "deleted variant and blob"
            elif blob is None and variant.created_at <= cutoff and _blob_missing(service, key):
                # Rendered again on the next request for it.
                finding = Finding(MISSING_VARIANT, key, variant.image_id)
                if apply:
                    service.repository.delete_variant(key)
                    finding.action = "deleted variant record"
        elif (until := service.repository.retired_until(key)) is not None:
            if until <= now:
                finding = Finding(RETIRED_BLOB, key)
                if apply:
                    service.storage.delete(key)
                    service.repository.forget_retired(key)
                    finding.action = "deleted blob"
        elif blob.modified <= cutoff and not _in_use(service, key):
            finding = Finding(ORPHAN_BLOB, key)
            if apply:
                service.storage.delete(key)
                finding.action = "deleted blob"
        if finding is not None:
            report.findings.append(finding)
    for partial in service.storage.list_partial():
        if partial.started <= cutoff:
            finding = Finding(PARTIAL_WRITE, partial.ref)
            report.findings.append(finding)
            if apply:
                service.storage.delete_partial(partial.ref)
                finding.action = "deleted"
    if apply:
        # Notes of retired blobs that are gone already (deleted, then not forgotten), and
        # idempotency keys past their time.
        while service.sweep_retired(limit=batch):
            pass
        while service.idempotency.purge(limit=batch):
            pass
    return report


def implausible(report: Report) -> str | None:
    """Why the deletions `report` names look like stores mixed up, if they do."""
    missing = sum(finding.kind == MISSING_BLOB for finding in report.findings)
    orphans = sum(finding.kind == ORPHAN_BLOB for finding in report.findings)
    if missing >= _IMPLAUSIBLE_COUNT and missing > report.records * _IMPLAUSIBLE_SHARE:
        return f"{missing} of {report.records} records have no blob"
    if orphans >= _IMPLAUSIBLE_COUNT and orphans > report.blobs * _IMPLAUSIBLE_SHARE:
        return f"{orphans} of {report.blobs} blobs belong to no record"
    return None


def _merge(
    records: Iterator[ImageRecord], variants: Iterator[Variant], blobs: Iterator[StoredBlob]
) -> Iterator[Entry]:
    """All three sorted by key, merged like sorted files: one entry for every key in any."""
    tagged = heapq.merge(
        ((record.key, 0, record) for record in records),
        ((variant.key, 1, variant) for variant in variants),
        ((blob.key, 2, blob) for blob in blobs),
    )
    for key, group in itertools.groupby(tagged, key=lambda item: item[0]):
        found: list = [None, None, None]
        for _, kind, item in group:
            found[kind] = item
        yield key, *found


def _of_current_version(service: ImageService, variant: Variant) -> bool:
    try:
        return service.repository.get(variant.image_id).version == variant.version
    except NotFound:
        return False


def _in_use(service: ImageService, key: str) -> bool:
    """Whether a record or a variant uses `key` now (written since the listing)."""
    return (
        service.repository.find_key(key) is not None
        or service.repository.get_variant(key) is not None
    )


def _still_names(service: ImageService, record: ImageRecord) -> bool:
    """Whether the image still has `record`'s blob: one deleted or replaced since the
    records were listed had its blob removed as it should (a dry run reported it as a
    record whose blob is missing, the alarm for lost data)."""
    try:
        return service.repository.get(record.id).key == record.key
    except NotFound:
        return False


def _blob_missing(service: ImageService, key: str) -> bool:
    try:
        service.storage.open(key).close()
    except NotFound:
        return True
    return False  # written since the listing


def _remove_pending(service: ImageService, record: ImageRecord) -> str:
    try:
        service.repository.delete(record.id, status=Status.PENDING)
    except (NotFound, Conflict):
        return "skipped: no longer pending"
    service.storage.delete(record.key)
    return "deleted record and blob"


def _remove_record(service: ImageService, record: ImageRecord) -> str:
    try:
        current = service.repository.get(record.id)
    except NotFound:
        return "skipped: record already gone"
    if current.key != record.key or not _blob_missing(service, current.key):
        return "skipped: record changed"
    try:
        # Only the version we checked: a replace in the meantime wins.
        service.repository.delete(record.id, expected_version=current.version)
    except (NotFound, Conflict):
        return "skipped: record changed"
    return "deleted record"
