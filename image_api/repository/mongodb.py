"""Metadata in MongoDB (the engine to scale out on)."""

from __future__ import annotations

import contextlib
import dataclasses
from datetime import UTC, datetime

import pymongo
from bson import ObjectId
from pymongo import ReturnDocument, WriteConcern
from pymongo.errors import (
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from .. import deadline
from ..access import ADMIN_OWNER, ApiKey, Scope
from ..config import Settings
from ..errors import BackendUnavailable, Conflict, NotFound
from ..records import (
    NO_FILTERS,
    RECORD_FIELDS,
    VARIANT_FIELDS,
    Claim,
    Cursor,
    Filters,
    ImageRecord,
    Status,
    Variant,
    valid_id,
)

_NEWEST_FIRST = [("uploaded_at", -1), ("_id", -1)]
_INDEXES = {
    "images_newest_first": [("status", 1), *_NEWEST_FIRST],
    "images_by_type": [("status", 1), ("content_type", 1), *_NEWEST_FIRST],
    "images_by_key": [("key", 1)],
    "images_by_owner": [("owner", 1), ("status", 1), *_NEWEST_FIRST],
}


#: What a client is told when this backend cannot answer now.
UNAVAILABLE = "The metadata store (MongoDB) is unavailable; retry later"


def _to_document(record: ImageRecord) -> dict:
    document = dataclasses.asdict(record)
    document["_id"] = ObjectId(document.pop("id"))
    document["status"] = str(record.status)
    return document


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


_LATER_FIELDS = ("id", "owner", "orientation", "placeholder")


def _from_document(document: dict) -> ImageRecord:
    values = {name: document[name] for name in RECORD_FIELDS if name not in _LATER_FIELDS}
    # Documents stored before these fields existed: read with their defaults.
    values["owner"] = document.get("owner", ADMIN_OWNER)
    values["orientation"] = document.get("orientation", 1)
    values["placeholder"] = document.get("placeholder")
    values["id"] = str(document["_id"])
    values["uploaded_at"] = _aware(values["uploaded_at"])
    values["updated_at"] = _aware(values["updated_at"])
    values["status"] = Status(values["status"])
    return ImageRecord(**values)


def _claim_from_document(document: dict) -> Claim:
    return Claim(
        key=document["_id"],
        fingerprint=document["fingerprint"],
        resource=document.get("resource"),
        response=document["response"],
        expires_at=_aware(document["expires_at"]),
    )


def _variant_from_document(document: dict) -> Variant:
    values = {name: document[name] for name in VARIANT_FIELDS if name != "key"}
    values["created_at"] = _aware(values["created_at"])
    return Variant(key=document["_id"], **values)


def _key_from_document(document: dict) -> ApiKey:
    return ApiKey(
        id=document["_id"],
        name=document["name"],
        owner=document["owner"],
        scopes=tuple(Scope(scope) for scope in document["scopes"]),
        secret_hash=document["secret_hash"],
        created_at=_aware(document["created_at"]),
        last_used_at=document.get("last_used_at") and _aware(document["last_used_at"]),
        revoked_at=document.get("revoked_at") and _aware(document["revoked_at"]),
    )


def _query(filters: Filters) -> tuple[dict, str]:
    """The query for active records matching `filters`, and the index that covers it."""
    query: dict = {"status": "active"}
    index = "images_newest_first"
    if filters.content_type:
        query["content_type"] = filters.content_type
        index = "images_by_type"
    if filters.owner is not None:
        query["owner"] = filters.owner
        index = "images_by_owner"
    moment = {}
    if filters.uploaded_after:
        moment["$gte"] = filters.uploaded_after
    if filters.uploaded_before:
        moment["$lt"] = filters.uploaded_before
    if moment:
        query["uploaded_at"] = moment
    return query, index


@contextlib.contextmanager
def _mongo_errors(limit: float):
    """Translate pymongo's errors, and bound the operation by `limit` seconds and the
    request's budget (`pymongo.timeout` covers server selection, retries and round trips)."""
    timeout = deadline.time_left(limit)
    try:
        with pymongo.timeout(timeout):
            yield
    except DuplicateKeyError as error:
        raise Conflict() from error
    except ServerSelectionTimeoutError as error:
        # No server was reachable, so the operation was never sent.
        raise BackendUnavailable(UNAVAILABLE, in_doubt=False) from error
    except PyMongoError as error:
        # AutoReconnect, NetworkTimeout, write concern errors...: the write may have landed.
        raise BackendUnavailable(UNAVAILABLE) from error


class MongoRepository:
    """Metadata in MongoDB collections, through a ready-made database handle.

    MongoDB keeps datetimes to the millisecond; the service makes its timestamps at that
    precision so every backend returns what it was given.
    """

    name = "mongodb"

    def __init__(
        self,
        database,
        write_concern: str | int = "majority",
        probe_timeout: float = 2.0,
        operation_timeout: float = 13.0,
    ):
        self.database = database
        self.probe_timeout = probe_timeout
        # The longest one operation may take, retries included (within a request's budget).
        self.operation_timeout = operation_timeout
        self._indexed = False
        concern = WriteConcern(w=write_concern)
        self.images = database.get_collection("images", write_concern=concern)
        self.keys = database.get_collection("idempotency_keys", write_concern=concern)
        self.retired = database.get_collection("retired_blobs", write_concern=concern)
        self.api_keys = database.get_collection("api_keys", write_concern=concern)
        self.variants = database.get_collection("variants", write_concern=concern)

    @classmethod
    def from_settings(cls, settings: Settings) -> MongoRepository:
        """A client with explicit timeouts; the database is named in the URL, else NAME."""
        timeout_ms = int(settings.backend_connect_timeout * 1000)
        # pymongo.MongoClient looked up at call time, so mongomock.patch can stand in for it.
        client = pymongo.MongoClient(
            settings.mongodb_url,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            socketTimeoutMS=int(settings.backend_read_timeout * 1000),
            tz_aware=True,
            appname=settings.name,
        )
        concern = settings.mongodb_write_concern
        return cls(
            client.get_default_database(default=settings.name),
            int(concern) if concern.isdigit() else concern,
            probe_timeout=settings.probe_timeout,
            operation_timeout=settings.backend_connect_timeout + settings.backend_read_timeout,
        )

    def _errors(self):
        if not self._indexed:
            # Indexes (the keys' TTL among them) are made once per process before the first
            # operation, not only by `flask init`: create_index is idempotent, cheap when
            # the index exists, and safe when several workers race to make it.
            self.create()
        return _mongo_errors(self.operation_timeout)

    def create(self) -> None:
        with _mongo_errors(self.operation_timeout):
            for name, keys in _INDEXES.items():
                self.images.create_index(keys, name=name)
            # MongoDB deletes expired keys itself (within about a minute); `claim` also
            # treats an expired key as free, so the exact moment does not matter.
            self.keys.create_index("expires_at", expireAfterSeconds=0, name="keys_expire")
            self.retired.create_index("delete_after", name="retired_blobs_due")
            self.api_keys.create_index("name", unique=True, name="api_keys_by_name")
            # Each render has a blob key of its own (a retired one is never used again); a
            # variant is found by what it shows, one per image, version and params.
            self.variants.create_index(
                [("image_id", 1), ("version", 1), ("params", 1)],
                unique=True,
                name="variants_by_spec",
            )
            if "variants_by_image" in self.variants.index_information():
                # The index an older release kept, which variants_by_spec now covers; two
                # processes starting at once may both drop it.
                with contextlib.suppress(OperationFailure):
                    self.variants.drop_index("variants_by_image")
            # Images stored before owners existed belong to the first admin key's owner.
            self.images.update_many({"owner": {"$exists": False}}, {"$set": {"owner": ADMIN_OWNER}})
        self._indexed = True

    def insert(self, record: ImageRecord) -> None:
        with self._errors():
            self.images.insert_one(_to_document(record))

    def _find(self, image_id: str, status: Status) -> ImageRecord:
        if not valid_id(image_id):
            raise NotFound()
        with self._errors():
            document = self.images.find_one({"_id": ObjectId(image_id), "status": str(status)})
        if document is None:
            raise NotFound()
        return _from_document(document)

    def get(self, image_id: str) -> ImageRecord:
        return self._find(image_id, Status.ACTIVE)

    def activate(self, image_id: str, moment: datetime) -> ImageRecord:
        if not valid_id(image_id):
            raise NotFound()
        with self._errors():
            document = self.images.find_one_and_update(
                {"_id": ObjectId(image_id), "status": "pending"},
                {"$set": {"status": "active", "uploaded_at": moment, "updated_at": moment}},
                return_document=ReturnDocument.AFTER,
            )
        if document is None:
            raise NotFound()
        return _from_document(document)

    def list_page(
        self, limit: int, after: Cursor | None = None, filters: Filters = NO_FILTERS
    ) -> list[ImageRecord]:
        query, index = _query(filters)
        if after is not None:
            moment, last_id = after[0], ObjectId(after[1])
            query["$or"] = [
                {"uploaded_at": {"$lt": moment}},
                {"uploaded_at": moment, "_id": {"$lt": last_id}},
            ]
        with self._errors():
            found = self.images.find(query).sort(_NEWEST_FIRST).hint(index).limit(limit)
            return [_from_document(document) for document in found]

    def count(self, filters: Filters = NO_FILTERS) -> int:
        # Every filter is a prefix of one of the two list indexes, so with the hint the
        # count is a COUNT_SCAN of index keys (no document is fetched): its cost grows with
        # the number of matching images, not with the collection.
        query, index = _query(filters)
        with self._errors():
            return self.images.count_documents(query, hint=index)

    def update(self, record: ImageRecord, expected_version: int) -> ImageRecord:
        document = _to_document(record)
        with self._errors():
            result = self.images.replace_one(
                {"_id": document["_id"], "version": expected_version, "status": "active"},
                document,
            )
        if result.matched_count == 1:
            return record
        self.get(record.id)  # raises NotFound if it is gone
        raise Conflict()

    def delete(
        self, image_id: str, expected_version: int | None = None, status: Status = Status.ACTIVE
    ) -> ImageRecord:
        if not valid_id(image_id):
            raise NotFound()
        query: dict = {"_id": ObjectId(image_id), "status": str(status)}
        if expected_version is not None:
            query["version"] = expected_version
        with self._errors():
            document = self.images.find_one_and_delete(query)
        if document is not None:
            return _from_document(document)
        self._find(image_id, status)  # raises NotFound if it is gone
        raise Conflict()

    def scan(self, after_key: str | None, limit: int) -> list[ImageRecord]:
        query = {"key": {"$gt": after_key}} if after_key else {}
        with self._errors():
            found = self.images.find(query).sort("key", 1).hint("images_by_key").limit(limit)
            return [_from_document(document) for document in found]

    def find_key(self, key: str) -> ImageRecord | None:
        with self._errors():
            document = self.images.find_one({"key": key})
        return None if document is None else _from_document(document)

    def retire(self, key: str, delete_after: datetime) -> None:
        with self._errors():
            self.retired.update_one(
                {"_id": key}, {"$set": {"delete_after": delete_after}}, upsert=True
            )

    def retired_until(self, key: str) -> datetime | None:
        with self._errors():
            document = self.retired.find_one({"_id": key})
        return None if document is None else _aware(document["delete_after"])

    def due_retired(self, now: datetime, limit: int) -> list[str]:
        with self._errors():
            found = self.retired.find({"delete_after": {"$lte": now}}).sort("delete_after", 1)
            return [document["_id"] for document in found.limit(limit)]

    def forget_retired(self, key: str) -> None:
        with self._errors():
            self.retired.delete_one({"_id": key})

    def insert_variant(self, variant: Variant) -> Variant:
        document = dataclasses.asdict(variant)
        document["_id"] = document.pop("key")
        with self._errors():
            try:
                self.variants.insert_one(document)
                return variant
            except DuplicateKeyError:
                pass
        # Another worker's render of the same variant came first: it stays. (The same
        # variant again, a migration's rerun, is found the same way: its params are its.)
        found = self.find_variant(variant.image_id, variant.version, variant.params)
        return found or variant

    def find_variant(self, image_id: str, version: int, params: str) -> Variant | None:
        with self._errors():
            document = self.variants.find_one(
                {"image_id": image_id, "version": version, "params": params}
            )
        return None if document is None else _variant_from_document(document)

    def get_variant(self, key: str) -> Variant | None:
        with self._errors():
            document = self.variants.find_one({"_id": key})
        return None if document is None else _variant_from_document(document)

    def variants_of(self, image_id: str) -> list[Variant]:
        with self._errors():
            found = self.variants.find({"image_id": image_id}).sort("_id", 1)
            return [_variant_from_document(document) for document in found]

    def delete_variant(self, key: str) -> None:
        with self._errors():
            self.variants.delete_one({"_id": key})

    def scan_variants(self, after_key: str | None, limit: int) -> list[Variant]:
        query = {"_id": {"$gt": after_key}} if after_key else {}
        with self._errors():
            found = self.variants.find(query).sort("_id", 1).limit(limit)
            return [_variant_from_document(document) for document in found]

    def claim(
        self,
        key: str,
        fingerprint: str,
        resource: str | None,
        now: datetime,
        expires_at: datetime,
    ) -> Claim | None:
        fresh = {
            "fingerprint": fingerprint,
            "resource": resource,
            "response": None,
            "expires_at": expires_at,
        }
        with self._errors():
            try:
                # Matches an expired key (taken over) or none (inserted by the upsert); a
                # live key makes the upsert collide on _id instead.
                self.keys.update_one(
                    {"_id": key, "expires_at": {"$lte": now}}, {"$set": fresh}, upsert=True
                )
                return None
            except DuplicateKeyError:
                pass
            document = self.keys.find_one({"_id": key})
        if document is None:  # released in between: try again
            return self.claim(key, fingerprint, resource, now, expires_at)
        return _claim_from_document(document)

    def scan_claims(self, after_key: str | None, limit: int) -> list[Claim]:
        query = {"_id": {"$gt": after_key}} if after_key else {}
        with self._errors():
            found = self.keys.find(query).sort("_id", 1).limit(limit)
            return [_claim_from_document(document) for document in found]

    def purge_expired_keys(self, now: datetime, limit: int) -> int:
        # The TTL index deletes them within a minute or so; this makes it happen now.
        with self._errors():
            found = self.keys.find({"expires_at": {"$lte": now}}, {"_id": 1}).limit(limit)
            keys = [document["_id"] for document in found]
            if keys:
                self.keys.delete_many({"_id": {"$in": keys}, "expires_at": {"$lte": now}})
        return len(keys)

    def finish(self, key: str, response: dict) -> None:
        with self._errors():
            self.keys.update_one({"_id": key}, {"$set": {"response": response}})

    def release(self, key: str) -> None:
        with self._errors():
            self.keys.delete_one({"_id": key, "response": None})

    def insert_api_key(self, key: ApiKey) -> None:
        document = dataclasses.asdict(key)
        document["_id"] = document.pop("id")
        document["scopes"] = [str(scope) for scope in key.scopes]
        with self._errors():
            self.api_keys.insert_one(document)  # DuplicateKeyError -> Conflict

    def get_api_key(self, key_id: str) -> ApiKey | None:
        with self._errors():
            document = self.api_keys.find_one({"_id": key_id})
        return None if document is None else _key_from_document(document)

    def list_api_keys(self) -> list[ApiKey]:
        with self._errors():
            return [_key_from_document(d) for d in self.api_keys.find().sort("name", 1)]

    def revoke_api_key(self, name: str, moment: datetime) -> ApiKey:
        with self._errors():
            document = self.api_keys.find_one_and_update(
                {"name": name, "revoked_at": None},
                {"$set": {"revoked_at": moment}},
                return_document=ReturnDocument.AFTER,
            )
        if document is None:
            raise NotFound(f"No active API key named {name!r}")
        return _key_from_document(document)

    def touch_api_key(self, key_id: str, moment: datetime) -> None:
        with self._errors():
            self.api_keys.update_one({"_id": key_id}, {"$set": {"last_used_at": moment}})

    def ping(self, writes: bool = True) -> None:
        # pymongo.timeout bounds the whole call, server selection included. The command
        # goes to the primary (the default read preference), the one that takes writes.
        with _mongo_errors(self.probe_timeout):
            self.database.command("ping")

    def close(self) -> None:
        self.database.client.close()
