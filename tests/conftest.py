"""Shared fixtures: apps on both backend pairs, moto (in-process and over HTTP), clients
that upload images, and the CLI runner."""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

import mongomock
import pytest
from flask.testing import FlaskClient
from moto import mock_aws

from image_api import create_app, deadline
from image_api.records import new_id
from image_api.repository.mongodb import MongoRepository
from image_api.repository.sqlite import SqliteRepository
from tests import contract, faultproxy
from tests.helpers import (
    FAKE_AWS,
    MONGO_URL,
    TEST_SECRET,
    FakeClock,
    ImagesClient,
    Service,
    one_s3_attempt,
)


@pytest.fixture(autouse=True)
def _no_budget_left_behind():
    """A request's time budget ends with it: one left in the test's context would make
    later backend calls fail with "budget spent" (it happened with nested requests)."""
    yield
    assert deadline.current() is None, "a request's time budget outlived the request"


@pytest.fixture(scope="session", autouse=True)
def _watch_contract():
    contract.watch()
    yield
    contract.unwatch()


@pytest.fixture(autouse=True)
def _contract():
    """Every request a test makes in-process is held to the app's OpenAPI document
    (`tests.contract`): an undocumented status, header, parameter or body fails the test."""
    contract.problems.clear()
    yield
    problems, contract.problems[:] = list(contract.problems), []
    assert not problems, "responses outside the OpenAPI document:\n" + "\n".join(problems)


@pytest.fixture(autouse=True)
def _no_ambient_aws(monkeypatch):
    """Keep the developer's AWS profile and endpoints away from every test."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture(scope="session", autouse=True)
def _aws_models_parsed_once():
    """Every cloud app makes its own boto3 session, as each worker process does, and each
    session's loader parses botocore's S3 model files again: most of a cloud test's set-up.
    Let every loader share one cache of parsed files (keyed by what was asked for; every
    session here searches the same paths). Sessions and clients stay one per app."""
    import botocore.session

    create_loader, parsed = botocore.session.create_loader, {}

    def sharing_loader(*args, **kwargs):
        loader = create_loader(*args, **kwargs)
        loader._cache = parsed  # what botocore.loaders.instance_cache reads and fills
        return loader

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(botocore.session, "create_loader", sharing_loader)
        yield


@pytest.fixture(scope="session")
def moto_server():
    """A real moto S3 server on a free loopback port: boto3 talks to it over a socket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def one_attempt():
    """For the whole test, S3 calls get one attempt and no back-off (`one_s3_attempt`)."""
    with one_s3_attempt():
        yield


@pytest.fixture
def embedded_env(tmp_path):
    return {"DATA_DIR": str(tmp_path / "data")}


@pytest.fixture
def cloud_env(tmp_path):
    """S3 + MongoDB settings; the fixture that uses them supplies moto and mongomock."""
    return {
        "DATA_DIR": str(tmp_path / "data"),
        "S3_BUCKET_NAME": "images",
        "MONGODB_URL": MONGO_URL,
        "SECRET_KEY": TEST_SECRET,
        **FAKE_AWS,
    }


def admin_key(app) -> str | None:
    """The secret of the admin key the app made at its first start, if it did."""
    path = app.extensions["image_api"].settings.data_dir / "admin-key"
    return path.read_text().strip() if path.exists() else None


class ClosingClient(FlaskClient):
    """A test client that, like a WSGI server, closes every response (and its open file).

    It sends the app's admin key unless given another (`app.test_client(key="iak_...")`)
    or none (`key=None`); a request's own Authorization header wins."""

    def __init__(self, *args, key: str | bool | None = True, **kwargs):
        super().__init__(*args, **kwargs)
        if key is True:
            key = admin_key(self.application)
        if key:
            self.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"

    def open(self, *args, **kwargs):
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


@pytest.fixture
def clock():
    """The service's clock in tests: it moves only by a millisecond per reading, or when a
    test advances it."""
    return FakeClock()


#: Tests make far more requests a minute than a client may: limits are tested on their own.
UNLIMITED = {"RATE_LIMIT_READ": "1000000/minute", "RATE_LIMIT_WRITE": "1000000/minute"}


def build_app(env, clock):
    """create_app on `env`, then `init` (bucket, tables, indexes) as an operator would."""
    app = create_app({**UNLIMITED, **env}, clock)
    app.config["TESTING"] = True
    app.test_client_class = ClosingClient
    runner = app.test_cli_runner()
    result = runner.invoke(args=["init"])
    assert result.exit_code == 0, result.output
    return app


@pytest.fixture
def make_app(clock):
    """Build apps from explicit settings (no `init`), closing their backends afterwards."""
    apps = []

    def make(env):
        app = create_app({**UNLIMITED, **env}, clock)
        app.test_client_class = ClosingClient
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["image_api"].close()


@pytest.fixture(params=["embedded", "cloud"])
def app(request, embedded_env, cloud_env, clock):
    """The app on each backend pair: directory + SQLite, and S3 (moto) + MongoDB (mongomock)."""
    if request.param == "embedded":
        app = build_app(embedded_env, clock)
        yield app
    else:
        with mock_aws(), mongomock.patch(servers=(("mongo.test", 27017),)):
            app = build_app(cloud_env, clock)
            yield app
    app.extensions["image_api"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def service(app):
    return app.extensions["image_api"]


@pytest.fixture
def images(client):
    """Uploads and replaces through `client`: `images.upload(...)`, `images.create(...)`,
    `images.replace(image_id, ...)` (see `tests.helpers.ImagesClient`)."""
    return ImagesClient(client)


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def proxy(moto_server):
    """A fault-injecting proxy in front of the moto server (`proxy.mode` = PASS, STALL...)."""
    parts = urlsplit(moto_server)
    proxy = faultproxy.FaultProxy((parts.hostname, parts.port))
    yield proxy
    proxy.close()


@pytest.fixture
def running(tmp_path):
    """The service under gunicorn, one worker, on the embedded default (`Service`)."""
    service = Service(tmp_path / "data", {"WEB_CONCURRENCY": "1"})
    service.start()
    yield service
    service.stop()


@pytest.fixture
def stalled_server():
    """A TCP server that accepts connections and never answers: "127.0.0.1:port"."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.fixture(params=["sqlite", "mongomock", "mongodb"])
def repository(request, tmp_path):
    """Every metadata backend, empty and created (twice: creation is idempotent): the
    repository contract suite runs on each."""
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
