"""Find and fix drift between blobs and records: what crashes and lost writes leave behind.

Safe while the service is serving: records are listed before blobs, anything younger than
the grace period is left alone (it may belong to a request in flight), and every finding is
re-checked just before it is acted on. Running it twice does nothing the second time.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import click
from flask import current_app
from flask.cli import with_appcontext

from .errors import Conflict, NotFound
from .repository import ImageRecord
from .service import ImageService, now

ORPHAN_BLOB = "orphan_blob"  # a blob no record points to
STALE_PENDING = "stale_pending"  # an upload that never completed
MISSING_BLOB = "missing_blob"  # an active record whose blob is gone


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


def repair(
    service: ImageService,
    grace: timedelta,
    apply: bool = False,
    track: Callable[[Iterable], Iterable] = iter,
) -> Report:
    """Compare records and blobs; with `apply`, delete what is orphaned or stale."""
    cutoff = now() - grace
    report = Report(applied=apply, grace_seconds=grace.total_seconds())
    # Records first: a blob written after this snapshot is younger than the cutoff.
    records = list(service.repository.all())
    blobs = {blob.key: blob for blob in track(service.storage.list())}
    report.records, report.blobs = len(records), len(blobs)
    referenced = {record.key for record in records}

    for record in track(records):
        if record.status == "pending":
            if record.uploaded_at < cutoff:
                finding = Finding(STALE_PENDING, record.key, record.id)
                report.findings.append(finding)
                if apply:
                    finding.action = _remove_pending(service, record)
        elif record.key not in blobs and _blob_missing(service, record.key):
            finding = Finding(MISSING_BLOB, record.key, record.id)
            report.findings.append(finding)
            if apply:
                finding.action = _remove_record(service, record)

    for key, blob in sorted(blobs.items()):
        if key not in referenced and blob.modified < cutoff:
            finding = Finding(ORPHAN_BLOB, key)
            report.findings.append(finding)
            if apply:
                service.storage.delete(key)
                finding.action = "deleted blob"
    return report


def _blob_missing(service: ImageService, key: str) -> bool:
    try:
        service.storage.open(key).close()
    except NotFound:
        return True
    return False  # written since the listing


def _remove_pending(service: ImageService, record: ImageRecord) -> str:
    try:
        service.repository.delete(record.id, status="pending")
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


@click.command("repair")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=3600,
    show_default=True,
    help="Leave blobs and pending uploads younger than this many seconds alone.",
)
@click.option("--apply", is_flag=True, help="Fix what is found (default: report only).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@with_appcontext
def repair_command(grace: float, apply: bool, as_json: bool):
    """Find orphan blobs, stale pending uploads and records whose blob is missing."""
    service: ImageService = current_app.extensions["image_api"]
    show_progress = not as_json and sys.stderr.isatty()

    def track(items):
        if not show_progress:
            yield from items
            return
        with click.progressbar(list(items), label="checking", file=sys.stderr) as bar:
            yield from bar

    report = repair(service, timedelta(seconds=grace), apply=apply, track=track)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    mode = "applied" if apply else "dry run: nothing changed (use --apply to fix)"
    click.echo(f"Checked {report.records} records and {report.blobs} blobs; {mode}.")
    for finding in report.findings:
        image = f" image {finding.image_id}" if finding.image_id else ""
        click.echo(f"{finding.kind}: key {finding.key}{image}: {finding.action}")
    if not report.findings:
        click.echo("Blobs and records match.")
