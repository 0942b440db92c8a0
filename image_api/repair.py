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

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from .errors import Conflict, NotFound
from .records import ImageRecord, Status
from .repository import scan_all
from .service import ImageService
from .storage import StoredBlob

ORPHAN_BLOB = "orphan_blob"  # a blob no record points to
STALE_PENDING = "stale_pending"  # an upload that never completed
MISSING_BLOB = "missing_blob"  # an active record whose blob is gone
RETIRED_BLOB = "retired_blob"  # a replaced image's old blob, kept for readers, now due
PARTIAL_WRITE = "partial_write"  # a temporary file or unfinished multipart upload


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
    blobs: int = 0
    findings: list[Finding] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


Pair = tuple[str, ImageRecord | None, StoredBlob | None]


def repair(
    service: ImageService,
    grace: timedelta,
    apply: bool = False,
    track: Callable[[Iterable[Pair]], Iterable[Pair]] = iter,
    batch: int = 1000,
) -> Report:
    """Compare records and blobs; with `apply`, delete what is orphaned or stale."""
    now = service.clock()
    cutoff = now - grace
    report = Report(applied=apply, grace_seconds=grace.total_seconds())
    pairs = _merge(scan_all(service.repository, batch), service.storage.list())
    for key, record, blob in track(pairs):
        report.records += record is not None
        report.blobs += blob is not None
        finding = None
        if record is not None and record.status is Status.PENDING:
            if record.uploaded_at <= cutoff:
                finding = Finding(STALE_PENDING, key, record.id)
                if apply:
                    finding.action = _remove_pending(service, record)
        elif record is not None:
            if blob is None and _blob_missing(service, key):
                finding = Finding(MISSING_BLOB, key, record.id)
                if apply:
                    finding.action = _remove_record(service, record)
        elif (until := service.repository.retired_until(key)) is not None:
            if until <= now:
                finding = Finding(RETIRED_BLOB, key)
                if apply:
                    service.storage.delete(key)
                    service.repository.forget_retired(key)
                    finding.action = "deleted blob"
        elif blob.modified <= cutoff and service.repository.find_key(key) is None:
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


def _merge(records: Iterator[ImageRecord], blobs: Iterator[StoredBlob]) -> Iterator[Pair]:
    """Both sorted by key: (key, record or None, blob or None) for every key in either."""
    record, blob = next(records, None), next(blobs, None)
    while record is not None or blob is not None:
        if blob is None or (record is not None and record.key < blob.key):
            yield record.key, record, None
            record = next(records, None)
        elif record is None or blob.key < record.key:
            yield blob.key, None, blob
            blob = next(blobs, None)
        else:
            yield record.key, record, blob
            record, blob = next(records, None), next(blobs, None)


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
