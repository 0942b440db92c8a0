"""The use-cases, and the only place that knows the order of writes and how to undo them.

The blob store and the metadata store share no transaction, so the order of writes is the
contract:

- create: a pending record (invisible to clients), then the blob under a fresh key, then the
  record is made active; if a step fails, what was written is removed, and what a crash
  leaves behind is a pending record or an orphan blob that `repair` sweeps.
- replace: new blob under a new key, then the record only if its version is still the one
  read, then the old blob; if the update fails or loses a race, the new blob is removed and
  the old image is untouched.
- delete: the record, then the blob. A blob left by a crash is garbage, never a record
  pointing at nothing.

A write whose acknowledgement was lost is read back before anything is undone, so a record
never points at a blob this code deleted. Undoing runs under `deadline.compensation()`: one
short attempt inside the request's budget; what it cannot undo, `repair` collects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import BinaryIO
from urllib.parse import urlsplit

from flask import current_app
from werkzeug.datastructures import ETags

from . import capacity, deadline, media, metrics, variants
from .access import EVERYONE, Caller, Keys
from .config import Settings
from .errors import (
    ApiError,
    BackendUnavailable,
    Conflict,
    DecoderBusy,
    MissingFile,
    NotFound,
    PreconditionFailed,
)
from .idempotency import Idempotency, IdempotentWrite
from .pagination import decode_cursor, encode_cursor
from .records import (
    NO_FILTERS,
    Clock,
    Filters,
    ImageRecord,
    Status,
    Variant,
    new_id,
    new_key,
    utc_now,
)
from .repository import Repository
from .signing import UrlSigner
from .storage import BlobStorage

log = logging.getLogger(__name__)

#: How often a DELETE re-reads an image that a concurrent replace keeps changing.
_DELETE_TRIES = 5
#: Unconditional replaces re-read and try again this often when other replaces win.
_REPLACE_TRIES = 5
#: A render does not start with less of the request's budget left than this (or two fifths
#: of REQUEST_TIMEOUT, when that is shorter: with a budget of 2 s, every render was refused),
#: and a finished one is stored within this much more.
_RENDER_AT_LEAST = 2.0
_STORE_RENDER_WITHIN = 2.0


@dataclass(frozen=True)
class Page:
    """One page of the newest-first list."""

    images: list[ImageRecord]
    total: int
    next_cursor: str | None


@dataclass(frozen=True)
class Download:
    """How a client gets an image's bytes: a `redirect` URL to send it to, or else
    `open(byte_range)` for a stream of them (of `start <= i < stop` with a range)."""

    redirect: str | None = None
    open: Callable[[tuple[int, int] | None], BinaryIO] | None = None


@dataclass(frozen=True)
class Preconditions:
    """A request's If-Match and If-None-Match (werkzeug `ETags`; a star matches any image)
    and If-Unmodified-Since, checked against the version it applies to."""

    if_match: ETags | None = None
    if_none_match: ETags | None = None
    if_unmodified_since: datetime | None = None

    @property
    def given(self) -> bool:
        return (
            self.if_match is not None
            or self.if_none_match is not None
            or self.if_unmodified_since is not None
        )

    def check(self, current: ImageRecord) -> None:
        # A download's ETag names the bytes; a metadata ETag the bytes and the version.
        tags = (current.sha256, current.version_tag)
        if self.if_match is not None:
            if not any(map(self.if_match.contains, tags)):
                raise PreconditionFailed()
        # Only without If-Match (RFC 9110 13.2.2), which is the more accurate.
        elif self.if_unmodified_since is not None and not current.current_at(
            self.if_unmodified_since
        ):
            raise PreconditionFailed("The image was modified after If-Unmodified-Since")
        if self.if_none_match is not None and any(map(self.if_none_match.contains_weak, tags)):
            raise PreconditionFailed("The image matches If-None-Match; nothing was changed")


NO_PRECONDITIONS = Preconditions()


class ReadBack(enum.Enum):
    """What reading a record back says about a write whose acknowledgement was lost."""

    LANDED = "landed"  # the record uses the new blob: the write happened
    LOST = "lost"  # it surely does not: the write did not happen
    UNKNOWN = "unknown"  # the repository cannot say: keep the blob, repair decides later


class ImageService:
    """Images as clients see them: bytes in `storage`, metadata in `repository`."""

    def __init__(
        self,
        storage: BlobStorage,
        repository: Repository,
        settings: Settings,
        clock: Clock = utc_now,
        signer: UrlSigner | None = None,
    ):
        self.storage = storage
        self.signer = signer  # signs imageUrl (None: downloads take keys only, or are public)
        self.settings = settings
        self.clock = clock
        self.idempotency = Idempotency(
            repository,
            clock,
            ttl=settings.idempotency_ttl,
            wait=settings.idempotency_wait,
            request_timeout=settings.request_timeout,
        )
        self.keys = Keys(repository, clock)
        self.repository = repository
        self.decode_budget = media.DecodeBudget(settings.decode_memory, settings.decode_wait)
        self._rendering = capacity.KeyedLocks()
        self._render_at_least = min(_RENDER_AT_LEAST, settings.request_timeout * 0.4)
        self._render_slots = capacity.Slots(
            settings.render_concurrency,
            settings.decode_wait,
            self._render_at_least,
            # A render waiting holds a thread too: one always stays for the rest.
            threads=max(settings.gunicorn_threads - 1, 0),
        )
        #: Variants served from the cache and rendered, by this process.
        self.variant_counts: Counter[str] = Counter()

    @property
    def repository(self) -> Repository:
        return self._repository

    @repository.setter
    def repository(self, repository: Repository) -> None:
        # One repository for records and keys, also when a test swaps in a faulty one.
        self._repository = self.idempotency.repository = self.keys.repository = repository

    # --- use-cases ------------------------------------------------------------------------

    def create(
        self,
        upload: media.Upload,
        idempotency_key: str | None = None,
        caller: Caller = EVERYONE,
    ) -> ImageRecord:
        """Validate and store a new image, owned by the caller."""
        with self._prepared(upload) as (upload, info):
            image_id = new_id()

            def find_result(first_id: str):
                try:
                    return self.repository.get(first_id)
                except NotFound:
                    return None

            write = IdempotentWrite(f"create {info.sha256}", image_id, find_result)
            return self.idempotency.run(
                _scoped(idempotency_key, caller),
                write,
                lambda: self._create(image_id, upload, info, caller.owner),
            )

    def get(self, image_id: str, caller: Caller = EVERYONE) -> ImageRecord:
        """The image, if the caller may see it: another owner's is `NotFound`, as if it
        did not exist (no enumeration)."""
        record = self.repository.get(image_id)
        if not caller.sees(record.owner):
            raise NotFound()
        return record

    def list(
        self,
        limit: int,
        cursor: str | None = None,
        filters: Filters = NO_FILTERS,
        caller: Caller = EVERYONE,
    ) -> Page:
        """A page of the images the caller may see, newest first, after the position
        `cursor` names. Only an admin may ask for another owner's (`Forbidden`)."""
        filters = dataclasses.replace(filters, owner=caller.owner_filter(filters.owner))
        after = decode_cursor(cursor) if cursor else None
        # One extra row tells whether another page follows without a second query.
        rows = self.repository.list_page(limit + 1, after, filters)
        images = rows[:limit]
        next_cursor = encode_cursor(images[-1]) if len(rows) > limit else None
        return Page(images=images, total=self.repository.count(filters), next_cursor=next_cursor)

    def replace(
        self,
        image_id: str,
        upload: media.Upload | None,
        preconditions: Preconditions = NO_PRECONDITIONS,
        idempotency_key: str | None = None,
        caller: Caller = EVERYONE,
    ) -> ImageRecord:
        """Replace an image's bytes; the old image stays intact unless this succeeds.

        A missing image is `NotFound` before a missing or bad file is looked at.
        """
        current = self.get(image_id, caller)
        if upload is None:
            raise MissingFile()
        with self._prepared(upload) as (upload, info):
            return self._replace_idempotently(
                current, upload, info, preconditions, _scoped(idempotency_key, caller)
            )

    def _replace_idempotently(self, current, upload, info, preconditions, idempotency_key):
        image_id = current.id

        def replace_once():
            # If-Match is checked here, inside the idempotent part: a retry of a replace
            # that already happened gets the first response, not a 412 against the ETag
            # it changed.
            preconditions.check(current)
            return self._replace(current, upload, info, conditional=preconditions.given)

        def find_result(first: str):
            # `first` names the image and the version the first request would have made
            # (or a later one: an unconditional replace that lost a race tries again).
            first_id, version = first.split("@")
            try:
                found = self.repository.get(first_id)
            except NotFound:
                return None
            wrote = found.version >= int(version) and found.sha256 == info.sha256
            return found if wrote else None

        write = IdempotentWrite(
            f"replace {image_id} {info.sha256}", f"{image_id}@{current.version + 1}", find_result
        )
        return self.idempotency.run(idempotency_key, write, replace_once)

    def strip_stored(self, record: ImageRecord, apply: bool = False) -> int | None:
        """For an image stored with its metadata (before stripping existed, or with
        STRIP_METADATA=false): the bytes stripping it saves, None if there is nothing to
        strip. With `apply`, its stripped bytes become a new version, on the condition
        that no replace came first (rerunning skips what is done: stripping is idempotent).
        """
        with self._source(record) as original:
            upload = media.Upload(original, record.filename)
            with self._prepared(upload, strip=True) as (upload, stored):
                if stored.sha256 == record.sha256:
                    return None
                if apply:
                    unchanged = Preconditions(if_match=ETags([record.sha256]))
                    self._replace_idempotently(record, upload, stored, unchanged, None)
                return record.size - stored.size

    def delete(
        self,
        image_id: str,
        preconditions: Preconditions = NO_PRECONDITIONS,
        caller: Caller = EVERYONE,
    ) -> None:
        """Delete the record, then its blob.

        Without If-Match, whatever version is current is deleted, even while replaces race
        with it; with If-Match, a version that changed is `PreconditionFailed`.
        """
        for _ in range(_DELETE_TRIES):
            current = self.get(image_id, caller)
            preconditions.check(current)
            try:
                self.repository.delete(image_id, expected_version=current.version)
            except Conflict:
                if preconditions.given:
                    raise PreconditionFailed() from None
                continue  # replaced since we read it: delete the new version
            except BackendUnavailable as error:
                # A delete whose acknowledgement was lost may have landed: then it is done.
                if not (error.in_doubt and self._gone(image_id)):
                    raise
            self._discard(current.key)
            self._remove_variants_of(image_id)
            self.sweep_retired()
            return
        raise Conflict("The image kept changing while it was being deleted; retry")

    def download(
        self,
        blob: ImageRecord | Variant,
        disposition: str,
        cache_control: str = "",
        redirect: bool = True,
    ) -> Download:
        """For an image or a variant: a presigned redirect in redirect mode (unless the
        caller says the request must not be redirected) whose answer carries `disposition`
        and `cache_control`, else a way to stream the bytes (opened only when the caller
        asks, so a 304 never touches storage)."""
        if redirect and self.settings.download_mode == "redirect":
            url = self.storage.presigned_url(
                blob.key, self.settings.presign_ttl, blob.content_type, disposition, cache_control
            )
            return Download(redirect=url)
        return Download(open=functools.partial(self.storage.open, blob.key))

    @functools.cached_property
    def redirect_origin(self) -> str | None:
        """In redirect mode, the origin downloads are sent to (the bucket's: a page that
        shows them must allow it); None in the other modes."""
        if self.settings.download_mode != "redirect":
            return None
        url = self.storage.presigned_url("0" * 32, 60, "image/png", "inline")
        if not url:
            return None
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}"

    def accel_path(
        self, blob: ImageRecord | Variant, byte_range: tuple[int, int] | None, disposition: str
    ) -> str:
        """In accel mode: where nginx's internal location serves the bytes from (all of
        them, or `byte_range`)."""
        return self.storage.accel_path(
            blob.key, byte_range, self.settings.presign_ttl, blob.content_type, disposition
        )

    def variant(self, record: ImageRecord, spec: variants.VariantSpec) -> Variant:
        """The variant `spec` of this version of the image: cached, or rendered now, stored
        and recorded. Threads of one worker that ask for the same one at once render it
        once; other workers may render it too, and the first recorded is kept."""
        found = self.repository.find_variant(record.id, record.version, spec.params)
        if found is None:
            with self._rendering.hold(
                f"{record.id}/{record.version}/{spec.params}", queue=self._render_slots.queued
            ):
                found = self.repository.find_variant(
                    record.id, record.version, spec.params
                ) or self._render(record, spec)
        else:
            self.variant_counts["cached"] += 1
            metrics.VARIANTS.labels("cache").inc()
        return found

    def _render(self, record: ImageRecord, spec: variants.VariantSpec) -> Variant:
        """Render, store under a new blob key and record. The key is this render's alone: a
        blob retired (evicted, replaced) is never written again, so deleting it later can
        never take a variant's bytes from under a reader."""
        budget = deadline.current()
        if budget is not None and budget.remaining() < self._render_at_least:
            raise DecoderBusy("Too little of the request's time is left to render; retry")
        with (
            self._render_slots.taken(),
            self._source(record) as source,
            variants.render(source, record.content_type, spec, self.decode_budget) as (
                out,
                rendered,
            ),
        ):
            # A finished render is worth keeping even when rendering spent the request's
            # budget (under load): storing and sending it get a little more.
            deadline.extend(_STORE_RENDER_WITHIN)
            key = new_key()
            self.storage.put(key, out, spec.content_type)
            self.variant_counts["rendered"] += 1
            metrics.VARIANTS.labels("rendered").inc()
            variant = Variant(
                key=key,
                image_id=record.id,
                version=record.version,
                params=spec.params,
                content_type=spec.content_type,
                size=rendered.size,
                width=rendered.width,
                height=rendered.height,
                sha256=rendered.sha256,
                created_at=self.clock(),
            )
            try:
                stored = self.repository.insert_variant(variant)
            except BaseException:
                self._discard(key)
                raise
            if stored.key != key:
                self._discard(key)  # another worker's render was recorded first
                return stored
            # A replace or delete since `record` was read removes the variants it finds
            # after its write; one recorded after it looked is removed here (retired: this
            # request is about to send it).
            if not self._still_current(record):
                self._remove_variants([variant], retire=True)
            else:
                self._evict_beyond_limit(record)
        return variant

    def _evict_beyond_limit(self, record: ImageRecord) -> None:
        """At most MAX_VARIANTS_PER_IMAGE variants per image are kept: the oldest go (retired,
        for requests streaming them), so no client can fill the storage with renders."""
        try:
            found = self.repository.variants_of(record.id)
        except BackendUnavailable:
            return  # the next render looks again
        excess = len(found) - self.settings.max_variants_per_image
        if excess > 0:
            oldest = sorted(found, key=lambda variant: variant.created_at)[:excess]
            self._remove_variants(oldest, retire=True)

    @contextlib.contextmanager
    def _source(self, record: ImageRecord) -> Iterator[BinaryIO]:
        """The image's bytes, seekable (Pillow needs to seek): a file as it is, anything
        else (an S3 stream) copied to a temporary file first."""
        with self.storage.open(record.key) as blob:
            if _seekable(blob):
                yield blob
                return
            with tempfile.TemporaryFile() as copy:
                shutil.copyfileobj(blob, copy, 1024 * 1024)
                copy.seek(0)
                yield copy

    def _still_current(self, record: ImageRecord) -> bool:
        try:
            return self.repository.get(record.id).version == record.version
        except NotFound:
            return False

    def _remove_variants(self, found: list[Variant], retire: bool = False) -> None:
        """Forget variants, then remove their blobs: now, or (`retire`) once readers that
        found them are done."""
        try:
            for variant in found:
                self.repository.delete_variant(variant.key)
                if retire:
                    self._retire(variant.key)
                else:
                    self._discard(variant.key)
        except BackendUnavailable:
            log.warning("could not remove the variants of %s; repair will", found[0].image_id)

    def _remove_variants_of(self, image_id: str, before_version: int | None = None) -> None:
        """After a replace (versions before the new one: retired) or a delete (all: now)."""
        try:
            found = self.repository.variants_of(image_id)
        except BackendUnavailable:
            log.warning("could not list the variants of %s; repair will remove them", image_id)
            return
        if before_version is None:
            self._remove_variants(found)
        else:
            old = [variant for variant in found if variant.version < before_version]
            self._remove_variants(old, retire=True)

    def close(self) -> None:
        """Release the backends' connections."""
        self.repository.close()
        self.storage.close()

    def ping(self) -> dict[str, str]:
        """Check both backends, and that they take writes unless READ_ONLY=true; raise
        `BackendUnavailable` naming the first that fails."""
        for backend in (self.repository, self.storage):
            try:
                # A lock held by a writer waits PROBE_TIMEOUT, not the request's budget.
                with deadline.at_most(self.settings.probe_timeout):
                    backend.ping(writes=not self.settings.read_only)
            except BackendUnavailable as error:
                raise BackendUnavailable(f"The {backend.name} backend is unavailable") from error
        return {"repository": self.repository.name, "storage": self.storage.name}

    # --- the order of writes --------------------------------------------------------------

    def _create(self, image_id: str, upload: media.Upload, info: media.ImageInfo, owner: str):
        # A pending record first, invisible to clients: a crash at any later point leaves a
        # pending record (and perhaps a blob) for `repair`, never a visible record without
        # its blob.
        moment = self.clock()
        pending = ImageRecord(
            id=image_id,
            key=new_key(),
            **_described(info, upload.filename),
            version=1,
            uploaded_at=moment,
            updated_at=moment,
            status=Status.PENDING,
            owner=owner,
        )
        self.repository.insert(pending)
        try:
            self.storage.put(pending.key, upload.stream, info.content_type)
        except BaseException:
            self._abandon(pending)
            raise
        activated_at = self.clock()
        try:
            return self.repository.activate(pending.id, activated_at)
        except BackendUnavailable as error:
            outcome = self._read_back(pending.id, pending.key) if error.in_doubt else None
            if outcome is ReadBack.LANDED:
                return dataclasses.replace(
                    pending, status=Status.ACTIVE, uploaded_at=activated_at, updated_at=activated_at
                )
            self._abandon(pending)
            raise
        except BaseException:
            self._abandon(pending)
            raise

    def _replace(self, current, upload, info, conditional: bool) -> ImageRecord:
        """Store the new bytes, then switch the record to them if it is still `current`.

        A conditional replace that finds another version is `PreconditionFailed`; an
        unconditional one replaces whatever version is current instead (the last writer
        wins), re-reading it a few times if other replaces keep winning the race.
        """
        # The new bytes go under a new key, so the old image stays readable until the
        # record switches over, and a lost race or a failure never touches it.
        key = new_key()
        try:
            self.storage.put(key, upload.stream, info.content_type)
        except BaseException:
            # A failed or interrupted put may have left part of an object (S3 multipart).
            self._discard(key)
            raise
        try:
            for _ in range(_REPLACE_TRIES):
                updated = dataclasses.replace(
                    current,
                    key=key,
                    **_described(info, upload.filename),
                    version=current.version + 1,
                    updated_at=max(self.clock(), current.updated_at),
                )
                try:
                    self.repository.update(updated, expected_version=current.version)
                    break
                except Conflict:
                    if conditional:
                        raise PreconditionFailed() from None
                    current = self.repository.get(current.id)  # replaced meanwhile
            else:
                raise Conflict("The image kept changing while it was being replaced; retry")
        except BackendUnavailable as error:
            outcome = self._read_back(current.id, key) if error.in_doubt else None
            if outcome is not ReadBack.LANDED:
                if outcome is not ReadBack.UNKNOWN:
                    self._discard(key)
                raise
        except BaseException:
            self._discard(key)  # a lost race, the image deleted meanwhile, or a failure
            raise
        self._retire(current.key)
        self._remove_variants_of(updated.id, before_version=updated.version)
        return updated

    def _read_back(self, image_id: str, key: str) -> ReadBack:
        """After a write in doubt: whether the record now uses `key`."""
        try:
            with deadline.compensation():
                record = self.repository.get(image_id)
        except NotFound:
            return ReadBack.LOST
        except BackendUnavailable:
            log.warning("write for %s is in doubt; kept blob %s for repair", image_id, key)
            return ReadBack.UNKNOWN
        return ReadBack.LANDED if record.key == key else ReadBack.LOST

    def _gone(self, image_id: str) -> bool:
        """After a delete in doubt: whether the record is surely gone."""
        try:
            with deadline.compensation():
                self.repository.get(image_id)
        except NotFound:
            return True
        except BackendUnavailable:
            return False
        return False

    def _abandon(self, pending: ImageRecord) -> None:
        """Undo a create that did not complete: the pending record, then its blob."""
        try:
            with deadline.compensation():
                self.repository.delete(pending.id, status=Status.PENDING)
        except (NotFound, Conflict):
            return  # no longer pending (activated after all): its blob must stay
        except BackendUnavailable:
            log.warning("could not remove pending image %s; repair will", pending.id)
            return
        self._discard(pending.key)

    @property
    def retention(self) -> timedelta:
        """How long a replaced blob outlives its record: a reader that read the record just
        before the replace opens the blob within its request budget, and a presigned URL
        stays valid for PRESIGN_TTL."""
        seconds = self.settings.request_timeout
        if self.settings.download_mode == "redirect":
            seconds += self.settings.presign_ttl
        return timedelta(seconds=seconds)

    def _retire(self, key: str) -> None:
        """Delete a replaced blob later, not now: readers get the old bytes or the new ones,
        never an error. Due ones are deleted a few at a time by later writes, and by repair."""
        try:
            self.repository.retire(key, self.clock() + self.retention)
        except BackendUnavailable:
            log.warning("could not note replaced blob %s; repair will collect it", key)
            return
        self.sweep_retired()

    def sweep_retired(self, limit: int = 4) -> int:
        """Delete up to `limit` retired blobs whose time has come; how many went.

        Releases before variants had a blob key per render named a variant's blob by its
        parameters, and stored an evicted variant asked for again under the key it was
        retired under: a blob a variant still uses stays."""
        swept = 0
        try:
            for key in self.repository.due_retired(self.clock(), limit):
                if self.repository.get_variant(key) is None:
                    self.storage.delete(key)
                self.repository.forget_retired(key)
                swept += 1
        except ApiError:
            log.warning("could not delete retired blobs now; later writes or repair will")
        return swept

    def _discard(self, key: str) -> None:
        """Remove a blob no record points to; if that fails too, `repair` will find it."""
        try:
            with deadline.compensation():
                self.storage.delete(key)
        except ApiError:
            log.warning("could not remove orphan blob %s; repair will collect it", key)

    def _inspect(self, upload: media.Upload, digest: bool = True) -> media.ImageInfo:
        return media.inspect(
            upload.stream,
            accepted_formats=self.settings.accepted_formats,
            max_bytes=self.settings.max_upload_bytes,
            max_pixels=self.settings.max_image_pixels,
            max_animation_pixels=self.settings.max_animation_pixels,
            budget=self.decode_budget,
            digest=digest,
        )

    @contextlib.contextmanager
    def _prepared(
        self, upload: media.Upload, strip: bool | None = None
    ) -> Iterator[tuple[media.Upload, media.ImageInfo]]:
        """The upload checked, and as it is stored: without its metadata unless `strip` is
        false (by default STRIP_METADATA; false keeps it byte for byte)."""
        if strip is None:
            strip = self.settings.strip_metadata
        # Stripped bytes are hashed as they are written: the original's hash would be waste.
        info = self._inspect(upload, digest=not strip)
        if not strip:
            yield upload, info
            return
        with media.without_metadata(upload.stream, info) as (stream, stored):
            yield media.Upload(stream, upload.filename), stored


def _seekable(stream) -> bool:
    try:
        return stream.seekable()
    except (AttributeError, OSError, ValueError):
        return False


def _scoped(idempotency_key: str | None, caller: Caller) -> str | None:
    """Idempotency keys are per owner: two owners may pick the same one."""
    return None if idempotency_key is None else f"{caller.owner}/{idempotency_key}"


def _described(info: media.ImageInfo, filename: str | None) -> dict:
    """The record fields an upload's bytes and filename decide."""
    return {
        "filename": media.sanitize_filename(filename, info.format),
        "content_type": info.content_type,
        "size": info.size,
        "width": info.width,
        "height": info.height,
        "sha256": info.sha256,
        "orientation": info.orientation,
        "placeholder": info.placeholder,
    }


#: Where `create_app` keeps the service it built.
EXTENSION = "image_api"


def current_service() -> ImageService:
    """The service `create_app` built for the running app."""
    return current_app.extensions[EXTENSION]
