"""The repository contract, run against every metadata backend."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime, timedelta

import mongomock
import pytest

from image_api.errors import Conflict, NotFound
from image_api.repository import (
    ImageRecord,
    MongoRepository,
    SqliteRepository,
    new_id,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def make_record(uploaded_at: datetime = T0, **changes) -> ImageRecord:
    values = dict(
        id=new_id(),
        key="ab" * 16,
        filename="cat é.png",
        content_type="image/png",
        size=123,
        width=4,
        height=3,
        sha256="0" * 64,
        version=1,
        uploaded_at=uploaded_at,
        updated_at=uploaded_at,
    )
    values.update(changes)
    return ImageRecord(**values)


@pytest.fixture(params=["sqlite", "mongomock", "mongodb"])
def repository(request, tmp_path):
    if request.param == "sqlite":
        repo = SqliteRepository(tmp_path / "images.sqlite3")
    elif request.param == "mongomock":
        repo = MongoRepository(mongomock.MongoClient(tz_aware=True)["test"])
    else:
        url = os.environ.get("TEST_MONGODB_URL")
        if not url:
            pytest.skip("TEST_MONGODB_URL is not set")
        from pymongo import MongoClient

        client = MongoClient(url, serverSelectionTimeoutMS=3000, tz_aware=True)
        database = client[f"image_api_test_{new_id()}"]
        repo = MongoRepository(database)
        request.addfinalizer(lambda: client.drop_database(database.name))
    repo.create()
    repo.create()  # idempotent
    return repo


def test_insert_then_get_returns_the_same_record(repository):
    record = make_record()
    repository.insert(record)
    assert repository.get(record.id) == record


def test_get_missing_or_malformed_id_is_not_found(repository):
    for image_id in (new_id(), "nope", "", "z" * 24, "../../etc/passwd"):
        with pytest.raises(NotFound):
            repository.get(image_id)


def test_list_is_newest_first_with_ties_broken_by_id(repository):
    older = make_record(T0)
    same_a, same_b = sorted(
        [make_record(T0 + timedelta(seconds=1)), make_record(T0 + timedelta(seconds=1))],
        key=lambda r: r.id,
    )
    newest = make_record(T0 + timedelta(seconds=2))
    for record in (same_a, older, newest, same_b):
        repository.insert(record)
    assert [r.id for r in repository.list_page(10)] == [newest.id, same_b.id, same_a.id, older.id]
    assert repository.count() == 4


def test_list_page_after_a_cursor_continues_without_gaps_or_repeats(repository):
    records = [make_record(T0 + timedelta(milliseconds=i // 2)) for i in range(7)]
    for record in records:
        repository.insert(record)
    seen, after = [], None
    while page := repository.list_page(3, after):
        seen += page
        after = (page[-1].uploaded_at, page[-1].id)
    expected = sorted(records, key=lambda r: (r.uploaded_at, r.id), reverse=True)
    assert seen == expected


def test_update_applies_only_on_the_expected_version(repository):
    record = make_record()
    repository.insert(record)
    changed = dataclasses.replace(record, key="cd" * 16, version=2, size=999)
    assert repository.update(changed, expected_version=1) == changed
    assert repository.get(record.id) == changed
    stale = dataclasses.replace(record, key="ef" * 16, version=2)
    with pytest.raises(Conflict):
        repository.update(stale, expected_version=1)
    assert repository.get(record.id) == changed


def test_update_of_a_missing_record_is_not_found(repository):
    with pytest.raises(NotFound):
        repository.update(make_record(), expected_version=1)


def test_delete_returns_the_record_and_removes_it(repository):
    record = make_record()
    repository.insert(record)
    assert repository.delete(record.id) == record
    with pytest.raises(NotFound):
        repository.get(record.id)
    with pytest.raises(NotFound):
        repository.delete(record.id)
    assert repository.count() == 0


def test_all_yields_every_record(repository):
    records = [make_record() for _ in range(3)]
    for record in records:
        repository.insert(record)
    assert sorted(repository.all(), key=lambda r: r.id) == sorted(records, key=lambda r: r.id)


def test_ping_answers(repository):
    repository.ping()
