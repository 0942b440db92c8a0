"""API keys: the repository contract, every endpoint's answer to every kind of key, the
keys CLI, and the first admin key made once however many processes start at once."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from image_api.access import Scope, key_from_secret, new_key
from image_api.errors import Conflict, NotFound
from image_api.records import utc_now
from image_api.repository.sqlite import SqliteRepository
from image_api.signing import UrlSigner
from tests.helpers import ROOT, ImagesClient, image_form, make_image

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

# --- the repository contract ------------------------------------------------------------------


def test_keys_are_stored_found_listed_and_revoked(repository):
    key, secret = new_key("ci", "alice", [Scope.WRITE], T0)
    repository.insert_api_key(key)
    found = repository.get_api_key(key.id)
    assert found == key and secret not in repr(found)
    assert found.grants(Scope.READ) and found.grants(Scope.WRITE)
    assert not found.grants(Scope.ADMIN)
    assert repository.get_api_key("000000000000") is None

    other, _ = new_key("admin", "admin", [Scope.ADMIN], T0)
    repository.insert_api_key(other)
    assert [k.name for k in repository.list_api_keys()] == ["admin", "ci"]

    repository.touch_api_key(key.id, T0 + timedelta(minutes=5))
    assert repository.get_api_key(key.id).last_used_at == T0 + timedelta(minutes=5)

    revoked = repository.revoke_api_key("ci", T0 + timedelta(hours=1))
    assert revoked.revoked_at == T0 + timedelta(hours=1)
    assert repository.get_api_key(key.id).revoked_at == T0 + timedelta(hours=1)
    with pytest.raises(NotFound):
        repository.revoke_api_key("ci", T0)  # already revoked
    with pytest.raises(NotFound):
        repository.revoke_api_key("nobody", T0)


def test_a_key_name_is_unique(repository):
    repository.insert_api_key(new_key("ci", "alice", [Scope.READ], T0)[0])
    with pytest.raises(Conflict):
        repository.insert_api_key(new_key("ci", "bob", [Scope.READ], T0)[0])


def test_only_a_hash_of_the_secret_is_stored(tmp_path):
    store = SqliteRepository(tmp_path / "images.sqlite3")
    store.create()
    key, secret = new_key("ci", "alice", [Scope.READ], T0)
    store.insert_api_key(key)
    token = secret.split("_", 2)[2]
    assert token.encode() not in (tmp_path / "images.sqlite3").read_bytes()
    assert key.matches(token) and not key.matches(token[:-1] + "x")


# --- every endpoint, every kind of key ----------------------------------------------------------

ENDPOINTS = {
    "upload": ("write", lambda c, i: c.post("/api/images/upload", data=image_form())),
    "list": ("read", lambda c, i: c.get("/api/images")),
    "get": ("read", lambda c, i: c.get(f"/api/images/{i}")),
    "download": ("read", lambda c, i: c.get(f"/api/images/{i}/download")),
    "head": ("read", lambda c, i: c.head(f"/api/images/{i}/download")),
    "replace": ("write", lambda c, i: c.put(f"/api/images/{i}", data=image_form())),
    "delete": ("write", lambda c, i: c.delete(f"/api/images/{i}")),
}


@pytest.fixture
def keyed(app):
    """The app, one image, and secrets of its owner's keys: read-only, write, admin,
    revoked. (Other owners: the ownership tests below.)"""
    service = app.extensions["image_api"]
    image_id = ImagesClient(app.test_client()).create()["_id"]  # the admin key's owner's
    secrets = {
        scope: service.keys.create(f"{scope}-key", "admin", [scope])[1]
        for scope in ("read", "write", "admin")
    }
    secrets["revoked"] = service.keys.create("old", "admin", ["admin"])[1]
    service.repository.revoke_api_key("old", service.clock())
    return app, image_id, secrets


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_the_auth_matrix(keyed, endpoint):
    app, image_id, secrets = keyed
    needs, call = ENDPOINTS[endpoint]
    malformed = ["nonsense", "iak_short_x", "iak_000000000000_" + "x" * 43]
    for presented in [None, *malformed, secrets["revoked"]]:
        response = call(app.test_client(key=presented), image_id)
        assert response.status_code == 401, (presented, response.get_data())
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        if endpoint != "head":
            assert response.get_json()["code"] == "unauthorized"
    wrong_token = secrets["write"][:-4] + "abcd"
    assert call(app.test_client(key=wrong_token), image_id).status_code == 401
    read_only = call(app.test_client(key=secrets["read"]), image_id)
    assert read_only.status_code == (403 if needs == "write" else 200)
    if needs == "write":
        assert read_only.get_json()["code"] == "forbidden"
    for scope in ("write", "admin"):
        target = ImagesClient(app.test_client()).create()["_id"]  # a delete takes its own
        response = call(app.test_client(key=secrets[scope]), target)
        assert response.status_code in (200, 201), response.get_data()


def test_a_revoked_key_is_refused_at_once_here_and_within_a_second_elsewhere(keyed, clock):
    app, _, secrets = keyed
    keys = app.extensions["image_api"].keys
    seconds = [0.0]
    keys.monotonic = lambda: seconds[0]  # the reread window's clock, moved by hand
    reader, writer = (app.test_client(key=secrets[name]) for name in ("read", "write"))
    assert reader.get("/api/images").status_code == writer.get("/api/images").status_code == 200
    keys.revoke("write-key")  # in this process (the CLI's way): refused at once
    assert writer.get("/api/images").status_code == 401
    keys.repository.revoke_api_key("read-key", clock())  # as another process would
    seconds[0] += keys.REREAD_AFTER - 0.001
    assert reader.get("/api/images").status_code == 200  # read within the last second
    seconds[0] += 0.001
    assert reader.get("/api/images").status_code == 401


def test_x_api_key_works_and_other_schemes_are_refused(keyed):
    app, _, secrets = keyed
    client = app.test_client(key=None)
    assert client.get("/api/images", headers={"X-API-Key": secrets["read"]}).status_code == 200
    basic = client.get("/api/images", headers={"Authorization": f"Basic {secrets['read']}"})
    assert basic.status_code == 401 and "Bearer" in basic.get_json()["message"]
    # Two different keys: one bad credential is not rescued by another, and a request
    # does not act as whichever of two good keys the service happens to read first.
    both = {"Authorization": "Bearer nonsense", "X-API-Key": secrets["read"]}
    assert client.get("/api/images", headers=both).status_code == 401
    two = {"Authorization": f"Bearer {secrets['write']}", "X-API-Key": secrets["read"]}
    refused = client.get("/api/images", headers=two)
    assert refused.status_code == 401 and "different keys" in refused.get_json()["message"]
    same = {"Authorization": f"Bearer {secrets['read']}", "X-API-Key": secrets["read"]}
    assert client.get("/api/images", headers=same).status_code == 200


def test_probes_and_the_description_need_no_key(app):
    client = app.test_client(key=None)
    for path in ("/healthz", "/readyz", "/api/openapi.json", "/api/docs"):
        assert client.get(path).status_code == 200, path
    assert client.options("/api/images").status_code == 200  # a CORS preflight has no key


def test_last_used_is_written_at_most_once_a_minute(keyed, clock):
    app, _, secrets = keyed
    store = app.extensions["image_api"].repository
    client = app.test_client(key=secrets["read"])
    key_id = secrets["read"].split("_")[1]
    assert store.get_api_key(key_id).last_used_at is None
    client.get("/api/images")
    first = store.get_api_key(key_id).last_used_at
    assert first is not None
    clock.advance(timedelta(seconds=30))
    client.get("/api/images")
    assert store.get_api_key(key_id).last_used_at == first
    clock.advance(timedelta(seconds=31))
    client.get("/api/images")
    assert store.get_api_key(key_id).last_used_at > first


def test_auth_off_serves_without_a_key_and_warns(make_app, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="image_api"):
        app = make_app({"DATA_DIR": str(tmp_path), "AUTH": "off"})
    assert "AUTH=off" in caplog.text
    assert app.test_client(key=None).get("/api/images").status_code == 200
    assert not (tmp_path / "admin-key").exists()


# --- the keys CLI ---------------------------------------------------------------------------


def test_keys_create_list_and_revoke(app, runner):
    created = runner.invoke(
        args=["keys", "create", "--name", "ci", "--owner", "bob", "--scope", "write"]
    )
    assert created.exit_code == 0, created.output
    secret = created.output.strip().splitlines()[-1]
    assert secret.startswith("iak_")
    client = app.test_client(key=secret)
    assert client.post("/api/images/upload", data=image_form()).status_code == 201

    listed = runner.invoke(args=["keys", "list"])
    assert listed.exit_code == 0
    line = next(line for line in listed.output.splitlines() if line.startswith("ci\t"))
    assert "owner=bob" in line and "scopes=write" in line and "active" in line
    assert "last_used=20" in line  # used once above
    assert secret not in listed.output and secret.split("_", 2)[2] not in listed.output

    again = runner.invoke(args=["keys", "create", "--name", "ci", "--owner", "x"])
    assert again.exit_code != 0 and "named 'ci' exists" in again.output

    revoked = runner.invoke(args=["keys", "revoke", "ci"])
    assert revoked.exit_code == 0
    assert client.get("/api/images").status_code == 401
    assert "revoked" in runner.invoke(args=["keys", "list"]).output
    assert runner.invoke(args=["keys", "revoke", "ci"]).exit_code != 0
    reused = runner.invoke(args=["keys", "create", "--name", "ci", "--owner", "bob"])
    assert reused.exit_code != 0 and "a revoked key keeps its name" in reused.output


@pytest.mark.parametrize(
    ("owner", "problem"),
    [
        ("", "printable"),
        ("x" * 201, "printable"),
        ("tab\there", "printable"),
        ("   ", "spaces"),
        ("bob\u00a0", "printable"),  # not trimmed into owner "bob" without a word
    ],
)
def test_keys_need_an_owner_the_api_can_name(runner, owner, problem):
    created = runner.invoke(args=["keys", "create", "--name", "k", "--owner", owner])
    assert created.exit_code != 0 and problem in created.output


def test_a_name_typed_composed_or_decomposed_is_one_name(runner):
    """café typed as one code point or as e and a combining accent names one key, for
    create and revoke alike."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert runner.invoke(args=["keys", "create", "--name", composed, "--owner", "o"]).exit_code == 0
    twin = runner.invoke(args=["keys", "create", "--name", decomposed, "--owner", "o"])
    assert twin.exit_code != 0 and "exists" in twin.output
    assert runner.invoke(args=["keys", "revoke", decomposed]).exit_code == 0
    assert "revoked" in runner.invoke(args=["keys", "list"]).output


def test_init_shows_the_admin_secret_until_it_is_used_and_never_a_revoked_one(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path)})
    runner = app.test_cli_runner()
    secret = (tmp_path / "admin-key").read_text().strip()
    assert secret in runner.invoke(args=["init"]).output  # a newcomer can curl at once
    assert app.test_client().get("/api/images").status_code == 200
    shown = runner.invoke(args=["init"]).output
    assert secret not in shown and str(tmp_path / "admin-key") in shown
    runner.invoke(args=["keys", "revoke", "admin"])
    shown = runner.invoke(args=["init"]).output
    assert secret not in shown and "revoked" in shown


def test_only_http_whitespace_surrounds_a_key(keyed):
    app, _, secrets = keyed
    client = app.test_client(key=None)
    for headers in (
        {"Authorization": f"Bearer {secrets['read']} \t"},
        {"X-API-Key": f"{secrets['read']} "},
    ):
        assert client.get("/api/images", headers=headers).status_code == 200
    for headers in (
        {"Authorization": f"Bearer {secrets['read']}\xa0"},
        {"X-API-Key": f"{secrets['read']}\xa0"},
    ):
        assert client.get("/api/images", headers=headers).status_code == 401


# --- the first admin key ----------------------------------------------------------------------

_START = """
import sys, time
from image_api import create_app
start = float(sys.argv[2])
while time.time() < start:
    pass
app = create_app({"DATA_DIR": sys.argv[1]})
print(app.extensions["image_api"].signer.sign("/api/images/x/download", 1))
"""


def test_the_first_admin_key_is_made_once_however_many_processes_start(tmp_path):
    """Like gunicorn workers and `flask` commands starting at once on a new DATA_DIR: one
    key in the repository, one secret in the file, and it works; and one secret key for
    signed URLs, which every process signs with."""
    import time

    data = tmp_path / "data"
    start = time.time() + 2  # every process waits for the same moment, then builds the app
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _START, str(data), str(start)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    outputs, logs = zip(*(process.communicate(timeout=60) for process in processes), strict=True)
    assert [process.returncode for process in processes] == [0] * 6, logs

    secret = (data / "admin-key").read_text().strip()
    assert oct((data / "admin-key").stat().st_mode & 0o777) == "0o600"
    keys = SqliteRepository(data / "images.sqlite3").list_api_keys()
    assert [(k.name, k.owner, k.scopes) for k in keys] == [("admin", "admin", (Scope.ADMIN,))]
    assert keys[0].matches(secret.split("_", 2)[2])
    signing_secret = (data / "secret-key").read_text().strip()
    assert oct((data / "secret-key").stat().st_mode & 0o777) == "0o600"
    assert len(signing_secret) >= 64
    signed = UrlSigner(signing_secret, 3600, utc_now).sign("/api/images/x/download", 1)
    assert set(outputs) == {signed + "\n"}
    files = sorted(p.name for p in data.iterdir())
    assert files == ["admin-key", "blobs", *_sqlite_files(data), "secret-key"]
    assert all(secret not in log and signing_secret not in log for log in logs)


def _sqlite_files(data):
    return sorted(p.name for p in data.iterdir() if p.name.startswith("images.sqlite3"))


def test_a_start_that_died_after_writing_the_secret_is_finished_by_the_next(tmp_path, make_app):
    data = tmp_path / "data"
    data.mkdir()
    _, secret = new_key("admin", "admin", [Scope.ADMIN], T0)
    (data / "admin-key").write_text(secret + "\n")
    app = make_app({"DATA_DIR": str(data)})
    assert app.test_client(key=secret).get("/api/images").status_code == 200
    [stored] = app.extensions["image_api"].repository.list_api_keys()
    expected = key_from_secret(secret, "admin", "admin", ["admin"], stored.created_at)
    assert (stored.id, stored.secret_hash, stored.scopes) == (
        expected.id,
        expected.secret_hash,
        expected.scopes,
    )


# --- browsers: CORS and security headers ----------------------------------------------------

APP_ORIGIN = "https://app.example.com"


@pytest.fixture
def cors_app(make_app, tmp_path):
    return make_app(
        {"DATA_DIR": str(tmp_path), "CORS_ORIGINS": f"{APP_ORIGIN}, http://localhost:3000"}
    )


def test_a_preflight_allows_every_condition_the_api_reads(cors_app):
    """Writes take If-Unmodified-Since, reads If-Modified-Since and If-Range: a browser
    sending them from another origin is allowed to."""
    client = cors_app.test_client(key=None)
    asked = {"if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range"}
    response = client.options(
        "/api/images/upload",
        headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": ", ".join(sorted(asked)),
        },
    )
    allowed = {
        h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")
    }
    assert allowed == asked


def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(cors_app):
    client = cors_app.test_client(key=None)
    response = client.options(
        "/api/images/upload",
        headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, idempotency-key, x-evil",
        },
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    allowed = {
        h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")
    }
    assert allowed == {"authorization", "idempotency-key"}  # not x-evil
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "PATCH" not in response.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in response.headers


def test_other_origins_get_no_cors_headers(cors_app):
    client = cors_app.test_client()
    for origin in ("https://evil.example.com", "https://app.example.com.evil.com", "null"):
        preflight = client.options(
            "/api/images", headers={"Origin": origin, "Access-Control-Request-Method": "GET"}
        )
        actual = client.get("/api/images", headers={"Origin": origin})
        for response in (preflight, actual):
            names = [h.lower() for h in response.headers.keys()]  # noqa: SIM118 (pairs otherwise)
            assert not any(name.startswith("access-control-") for name in names)
    assert "Access-Control-Allow-Origin" not in client.get("/api/images").headers


def test_an_allowed_origin_may_read_the_headers_it_needs(cors_app):
    client = cors_app.test_client()
    created = client.post("/api/images/upload", data=image_form(), headers={"Origin": APP_ORIGIN})
    assert created.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    exposed = {h.strip() for h in created.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"ETag", "Location", "Link", "Content-Disposition", "Retry-After"} <= exposed
    assert {"Content-Range", "X-Request-ID"} <= exposed
    assert {"RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} <= exposed
    assert "Origin" in created.headers["Vary"]
    # Vary: Origin on every response, so a cache never hands one origin's answer to another.
    assert "Origin" in client.get("/api/images").headers["Vary"]


def test_without_cors_origins_nobody_gets_cors_headers(app):
    response = app.test_client().get("/api/images", headers={"Origin": APP_ORIGIN})
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Vary" not in response.headers


def test_cors_origins_must_be_origins(make_app, tmp_path):
    from image_api.config import ConfigError

    for bad in ("app.example.com", "https://app.example.com/path", "ftp://x.com", "*"):
        with pytest.raises(ConfigError, match="CORS_ORIGINS"):
            make_app({"DATA_DIR": str(tmp_path), "CORS_ORIGINS": bad})


def test_every_response_carries_the_security_headers(app):
    client = app.test_client()
    image = ImagesClient(client).create()
    responses = {
        "json": client.get("/api/images"),
        "error": client.get("/api/images/" + "0" * 24),
        "unauthorized": app.test_client(key=None).get("/api/images"),
        "download": client.get(f"/api/images/{image['_id']}/download"),
        "docs": client.get("/api/docs"),
        "probe": client.get("/healthz"),
    }
    for name, response in responses.items():
        assert response.headers["X-Content-Type-Options"] == "nosniff", name
        assert response.headers["Referrer-Policy"] == "no-referrer", name
    for name in ("json", "error", "unauthorized", "probe"):
        assert responses[name].headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert "sandbox" in responses["download"].headers["Content-Security-Policy"]
    assert "script-src 'self'" in responses["docs"].headers["Content-Security-Policy"]


# --- owners -----------------------------------------------------------------------------------


@pytest.fixture
def owners(app):
    """Write keys of owners alice (two keys: rotation) and bob, and an admin."""
    service = app.extensions["image_api"]

    def client(name, owner, scope="write"):
        return app.test_client(key=service.keys.create(name, owner, [scope])[1])

    return {
        "alice": client("alice-1", "alice"),
        "alice2": client("alice-2", "alice"),
        "bob": client("bob-1", "bob"),
        "admin": app.test_client(),
    }


def test_an_owner_sees_only_their_images_and_others_are_not_found(owners):
    alice, bob = owners["alice"], owners["bob"]
    image = ImagesClient(alice).create()
    assert image["owner"] == "alice"
    url = f"/api/images/{image['_id']}"
    for request in (
        lambda: bob.get(url),
        lambda: bob.get(url + "/download"),
        lambda: bob.head(url + "/download"),
        lambda: bob.put(url, data=image_form()),
        lambda: bob.delete(url),
    ):
        response = request()
        assert response.status_code == 404  # as if it did not exist: no enumeration
    assert bob.get("/api/images").get_json()["total"] == 0
    listed = alice.get("/api/images").get_json()
    assert [i["_id"] for i in listed["images"]] == [image["_id"]] and listed["total"] == 1
    # Another key of the same owner (a rotation) sees and changes the same images.
    assert owners["alice2"].put(url, data=image_form()).status_code == 200
    assert alice.get(url).get_json()["version"] == 2


def test_an_admin_sees_every_owner_and_may_filter_by_owner(owners):
    mine = ImagesClient(owners["alice"]).create()
    theirs = ImagesClient(owners["bob"]).create()
    admin = owners["admin"]
    everything = admin.get("/api/images").get_json()
    assert {mine["_id"], theirs["_id"]} <= {i["_id"] for i in everything["images"]}
    only_bob = admin.get("/api/images?owner=bob&limit=1").get_json()
    assert [i["_id"] for i in only_bob["images"]] == [theirs["_id"]] and only_bob["total"] == 1
    assert admin.get(f"/api/images/{mine['_id']}").status_code == 200
    response = owners["alice"].get("/api/images?owner=bob")
    assert response.status_code == 403 and response.get_json()["code"] == "forbidden"
    assert owners["alice"].get("/api/images?owner=alice").get_json()["total"] == 1


def test_idempotency_keys_are_per_owner(owners):
    headers = {"Idempotency-Key": "same-key"}
    first = ImagesClient(owners["alice"]).upload(make_image(color="red"), headers=headers)
    second = ImagesClient(owners["bob"]).upload(make_image(color="blue"), headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.get_json()["image"]["_id"] != second.get_json()["image"]["_id"]
    again = ImagesClient(owners["alice2"]).upload(make_image(color="red"), headers=headers)
    assert again.get_json()["image"]["_id"] == first.get_json()["image"]["_id"]
