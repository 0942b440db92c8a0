"""One time budget per request (REQUEST_TIMEOUT): a stalled backend gives a JSON 503 with
Retry-After well before gunicorn's or nginx's timeouts, and nothing is lost."""

from __future__ import annotations

import io
import sqlite3
from datetime import timedelta

import pytest

from image_api import deadline
from image_api.config import ConfigError, Settings
from image_api.errors import BackendUnavailable
from image_api.records import new_id
from image_api.repair import repair
from image_api.repository import scan_all
from tests import faultproxy
from tests.helpers import FAKE_AWS, TEST_SECRET, ImagesClient, exact_match, make_image, timed

BUDGET = {"REQUEST_TIMEOUT": "2"}
#: Generous slack over the 2 s budget: what is checked is "bounded by the budget", not speed.
WITHIN = 5.0


def assert_unavailable_in_time(call):
    response, seconds = timed(call)
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.get_json()["code"] == "backend_unavailable"
    assert int(response.headers["Retry-After"]) > 0
    assert seconds < WITHIN, f"took {seconds:.1f} s"
    return response


# --- the budget itself ---------------------------------------------------------------------


class Ticks:
    """A monotonic clock that moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_calls_get_what_is_left_of_the_budget_and_nothing_once_it_is_spent():
    ticks = Ticks()
    with deadline.budget(10, monotonic=ticks):
        # 1 s of the 10 is kept back for compensations.
        assert deadline.time_left(30) == 9
        assert deadline.time_left(3) == 3
        ticks.now += 6
        assert deadline.time_left(30) == 3
        ticks.now += 3
        with pytest.raises(BackendUnavailable) as spent:
            deadline.time_left(30)
        assert spent.value.in_doubt is False  # nothing was sent
        with deadline.compensation():
            # An undo gets one short attempt out of the reserve.
            assert deadline.time_left(30) == deadline.COMPENSATION_TIMEOUT
            assert deadline.is_compensating()
        assert not deadline.is_compensating()
    assert deadline.current() is None
    assert deadline.time_left(30) == 30  # outside a request: the configured timeout


def test_at_most_caps_the_calls_in_its_block_by_the_budget_too():
    ticks = Ticks()
    with deadline.budget(10, monotonic=ticks):
        with deadline.at_most(0.25):
            assert deadline.time_left(30) == 0.25
        assert deadline.time_left(30) == 9  # the request's own budget, as it was
        ticks.now += 8.9  # 0.1 s left before the reserve
        with deadline.at_most(0.25):
            assert deadline.time_left(30) == pytest.approx(0.1)
            ticks.now += 0.1
            with pytest.raises(BackendUnavailable):
                deadline.time_left(30)
    with deadline.at_most(0.25):  # outside a request: at most that too
        assert 0.2 < deadline.time_left(30) <= 0.25
    assert deadline.current() is None


def test_budget_must_be_below_gunicorns_timeout():
    assert Settings.from_mapping({"REQUEST_TIMEOUT": "59"}).request_timeout == 59
    for value in ("60", "61"):
        with pytest.raises(ConfigError, match=r"REQUEST_TIMEOUT .* GUNICORN_TIMEOUT"):
            Settings.from_mapping({"REQUEST_TIMEOUT": value})
    with pytest.raises(ConfigError, match="REQUEST_TIMEOUT"):
        Settings.from_mapping({"REQUEST_TIMEOUT": "10", "GUNICORN_TIMEOUT": "10"})


def test_the_budget_ends_with_the_request(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), **BUDGET})
    seen = []
    app.before_request(lambda: seen.append(deadline.current()))
    assert app.test_client().get("/healthz").status_code == 200
    assert seen and seen[0] is not None
    assert deadline.current() is None


# --- S3 that accepts connections and never answers -----------------------------------------


@pytest.fixture
def s3_app(make_app, tmp_path, proxy):
    app = make_app(
        {
            "DATA_DIR": str(tmp_path),
            "S3_BUCKET_NAME": f"budget-{new_id()}",
            "S3_ENDPOINT_URL": proxy.url,
            **FAKE_AWS,
            **BUDGET,
        }
    )
    app.extensions["image_api"].storage.create()
    return app


@pytest.mark.parametrize("operation", ["upload", "replace", "download", "delete"])
def test_stalled_s3_gives_503_within_the_budget_and_loses_nothing(s3_app, proxy, clock, operation):
    client, service = s3_app.test_client(), s3_app.extensions["image_api"]
    original = make_image(color="red")
    created = client.post("/api/images/upload", data={"image": (io.BytesIO(original), "a.png")})
    image_id = created.get_json()["image"]["_id"]

    proxy.mode = faultproxy.STALL
    if operation == "upload":
        assert_unavailable_in_time(lambda: ImagesClient(client).upload())
    elif operation == "replace":
        assert_unavailable_in_time(lambda: ImagesClient(client).replace(image_id))
    elif operation == "download":
        assert_unavailable_in_time(lambda: client.get(f"/api/images/{image_id}/download"))
    else:
        # The record goes first, so the image is gone for clients; the blob that S3 could
        # not delete in time is left for repair.
        response, seconds = timed(lambda: client.delete(f"/api/images/{image_id}"))
        assert response.status_code == 200 and seconds < WITHIN
    proxy.mode = faultproxy.PASS

    if operation == "delete":
        assert client.get(f"/api/images/{image_id}").status_code == 404
    else:
        assert client.get(f"/api/images/{image_id}/download").data == original
        listing = client.get("/api/images").get_json()
        assert [image["_id"] for image in listing["images"]] == [image_id]
    clock.advance(timedelta(days=1))
    repair(service, timedelta(0), apply=True)
    assert exact_match(service)


# --- a repository that stalls --------------------------------------------------------------


@pytest.fixture
def stalled_mongodb(stalled_server):
    return f"mongodb://{stalled_server}/images?directConnection=true"


ID = "0123456789abcdef01234567"
ENDPOINTS = {
    "upload": lambda client: ImagesClient(client).upload(),
    "list": lambda client: client.get("/api/images"),
    "get": lambda client: client.get(f"/api/images/{ID}"),
    "replace": lambda client: ImagesClient(client).replace(ID),
    "delete": lambda client: client.delete(f"/api/images/{ID}"),
    "download": lambda client: client.get(f"/api/images/{ID}/download"),
    "readyz": lambda client: client.get("/readyz"),
}


#: Every keyed route stalls at its first read, the key's: one read, one write and the
#: probe (which needs no key) stand for them all.
@pytest.mark.parametrize("endpoint", ["upload", "download", "readyz"])
def test_stalled_mongodb_gives_503_within_the_budget(make_app, tmp_path, stalled_mongodb, endpoint):
    # Timeouts as configured in production: only the budget keeps the request short.
    app = make_app(
        {
            "DATA_DIR": str(tmp_path),
            "MONGODB_URL": stalled_mongodb,
            "SECRET_KEY": TEST_SECRET,
            **BUDGET,
        }
    )
    # Checking the key is the request's first read of MongoDB: it runs on the budget too.
    client = app.test_client(key=SOME_KEY)
    assert_unavailable_in_time(lambda: ENDPOINTS[endpoint](client))
    assert list(app.extensions["image_api"].storage.list()) == []


#: Well-formed, so the service must look it up.
SOME_KEY = "iak_000000000000_someone"

WRITES = {
    "upload": lambda client, image_id: ImagesClient(client).upload(),
    "replace": lambda client, image_id: ImagesClient(client).replace(image_id),
    "delete": lambda client, image_id: client.delete(f"/api/images/{image_id}"),
}


@pytest.mark.parametrize("write", WRITES)
def test_locked_sqlite_gives_503_within_the_budget_and_reads_go_on(make_app, tmp_path, write):
    # SQLite's busy timeout (5 s) is longer than the budget: the budget wins. In WAL mode a
    # writer holding the lock does not block readers.
    app = make_app({"DATA_DIR": str(tmp_path), **BUDGET})
    client = app.test_client()
    original = make_image(color="red")
    created = client.post("/api/images/upload", data={"image": (io.BytesIO(original), "a.png")})
    image_id = created.get_json()["image"]["_id"]
    locker = sqlite3.connect(tmp_path / "images.sqlite3", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        assert_unavailable_in_time(lambda: WRITES[write](client, image_id))
        assert client.get(f"/api/images/{image_id}").status_code == 200
        assert client.get("/api/images").get_json()["total"] == 1
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert client.get(f"/api/images/{image_id}/download").data == original
    [record] = scan_all(app.extensions["image_api"].repository)
    assert [blob.key for blob in app.extensions["image_api"].storage.list()] == [record.key]
