"""Signed image URLs: `imageUrl` opens a download without a key until it expires; any
change to it is refused; it survives a replace; and the metadata that carries it (JSON and
ETag) stays right as it changes with time."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from image_api.config import ConfigError
from image_api.signing import UrlSigner
from tests.helpers import MONGO_URL, ImagesClient, make_image, unsigned

TTL = 3600


def _path(url: str) -> str:
    """What a test client requests for an absolute URL: its path and query."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def _with(url: str, **changes) -> str:
    """`url` with query parameters replaced (None: removed) or added."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for name, value in changes.items():
        if value is None:
            query.pop(name, None)
        else:
            query[name] = value
    return f"{parts.path}?{urlencode(query)}"


@pytest.fixture
def anonymous(app):
    return app.test_client(key=None)


def test_an_image_url_downloads_without_a_key(client, images, anonymous):
    data = make_image(color="teal")
    image = images.create(data)
    url = image["imageUrl"]
    query = dict(parse_qsl(urlsplit(url).query))
    assert set(query) == {"v", "expires", "signature"} and query["v"] == "1"
    response = anonymous.get(_path(url))
    assert response.status_code == 200 and response.data == data
    assert anonymous.head(_path(url)).status_code == 200
    ranged = anonymous.get(_path(url), headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.data == data[:10]
    # Without the signature the same download needs a key.
    assert anonymous.get(unsigned(_path(url))).status_code == 401
    # Every imageUrl a client is given works: list, get, upload and replace.
    listed = client.get("/api/images").get_json()["images"][0]["imageUrl"]
    fetched = client.get(f"/api/images/{image['_id']}").get_json()["imageUrl"]
    assert listed == fetched == url
    red = make_image(color="red")
    replaced = images.replace(image["_id"], red).get_json()["image"]
    assert dict(parse_qsl(urlsplit(replaced["imageUrl"]).query))["v"] == "2"
    assert anonymous.get(_path(replaced["imageUrl"])).data == red
    # The version is for caches: the first URL survives the replace, with the new bytes.
    assert anonymous.get(_path(url)).data == red


def test_a_url_lasts_at_least_the_ttl_then_is_refused(images, anonymous, clock):
    image = images.create()
    url = image["imageUrl"]
    expires = int(dict(parse_qsl(urlsplit(url).query))["expires"])
    issued = clock.now.timestamp()
    # At least SIGNED_URL_TTL, at most a tenth more (the rounding that keeps one URL).
    assert TTL <= expires - issued <= TTL * 1.1
    clock.advance(timedelta(seconds=expires - clock.now.timestamp() - 1))
    assert anonymous.get(_path(url)).status_code == 200  # its last second
    clock.advance(timedelta(seconds=1))
    expired = anonymous.get(_path(url))
    assert expired.status_code == 403
    assert expired.get_json()["code"] == "url_expired"
    assert "fresh imageUrl" in expired.get_json()["message"]


def test_any_change_to_a_signed_url_is_refused(images, anonymous):
    image, other = images.create(), images.create(make_image(color="blue"))
    url = image["imageUrl"]
    query = dict(parse_qsl(urlsplit(url).query))
    tampered = {
        "another image's path": _path(url).replace(image["_id"], other["_id"]),
        "a later expiry": _with(url, expires=str(int(query["expires"]) + 1)),
        "a parameter added": _with(url, disposition="inline"),
        "a signature cut short": _with(url, signature=query["signature"][:-1]),
        "no signature": _with(url, signature=None),
        "no expiry": _with(url, expires=None),
        "two signatures": f"{_path(url)}&signature={query['signature']}",
        "an expiry in other digits": _with(url, expires="١٢٣"),
        "a signature that is not ASCII": _with(url, signature="é" * 43),
        "a huge expiry": _with(url, expires="9" * 40),
    }
    for change, path in tampered.items():
        response = anonymous.get(path)
        assert response.status_code == 403, change
        assert response.get_json()["code"] == "invalid_signature", change
    # A signature is judged by itself, also next to a valid key.
    keyed = images.client.get(tampered["a parameter added"])
    assert keyed.status_code == 403


def test_a_url_signed_with_another_secret_is_refused(app, images, anonymous, clock):
    image = images.create()
    path = f"/api/images/{image['_id']}/download"
    forged = UrlSigner("another-secret-of-at-least-32-chars!", TTL, clock)
    query = forged.sign(path, int(clock.now.timestamp()) + 60)
    response = anonymous.get(f"{path}?{query}")
    assert response.status_code == 403 and response.get_json()["code"] == "invalid_signature"


def test_a_signed_url_names_the_image_not_a_version(images, anonymous):
    image = images.create(make_image(color="red"))
    blue = make_image(color="blue")
    images.replace(image["_id"], blue)
    response = anonymous.get(_path(image["imageUrl"]))  # the URL from before the replace
    assert response.status_code == 200 and response.data == blue


def test_a_signed_url_opens_another_owners_image_only_by_its_own_path(app, images, anonymous):
    service = app.extensions["image_api"]
    alice = ImagesClient(app.test_client(key=service.keys.create("a", "alice", ["write"])[1]))
    bob = app.test_client(key=service.keys.create("b", "bob", ["write"])[1])
    image = alice.create()
    assert bob.get(f"/api/images/{image['_id']}/download").status_code == 404
    # Whoever holds the URL may read that image: it is what a page shows in <img src>.
    assert anonymous.get(_path(image["imageUrl"])).status_code == 200


def test_metadata_json_and_etag_change_with_the_urls_expiry(client, images, clock):
    image = images.create()
    url = f"/api/images/{image['_id']}"
    first = client.get(url)
    etag = first.headers["ETag"]
    expires = dict(parse_qsl(urlsplit(first.get_json()["imageUrl"]).query))["expires"]
    assert etag == f'"{image["sha256"]}.1.{expires}"'
    again = client.get(url)
    assert again.get_json() == first.get_json() and again.headers["ETag"] == etag
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    # The bare sha256 (a download's ETag) does not vouch for the URL a client holds.
    assert client.get(url, headers={"If-None-Match": f'"{image["sha256"]}"'}).status_code == 200

    clock.advance(timedelta(seconds=TTL // 10))  # a tenth of the TTL: a new URL
    later = client.get(url, headers={"If-None-Match": etag})
    assert later.status_code == 200
    assert later.get_json()["imageUrl"] != first.get_json()["imageUrl"]
    assert later.headers["ETag"] != etag
    listed = client.get("/api/images").get_json()["images"][0]
    assert listed["imageUrl"] == later.get_json()["imageUrl"]  # the memo did not keep the old

    # A write's If-Match compares the image's version only: an old metadata ETag still works.
    replaced = images.replace(image["_id"], make_image(color="red"), headers={"If-Match": etag})
    assert replaced.status_code == 200
    stale = client.delete(url, headers={"If-Match": etag})
    assert stale.status_code == 412
    assert client.delete(url, headers={"If-Match": replaced.headers["ETag"]}).status_code == 200


def test_public_read_opens_downloads_and_nothing_else(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), "PUBLIC_READ": "true"})
    image = ImagesClient(app.test_client()).create()
    assert image["imageUrl"] == f"http://localhost/api/images/{image['_id']}/download?v=1"
    anonymous = app.test_client(key=None)
    public = anonymous.get(_path(image["imageUrl"]))
    assert public.status_code == 200
    assert public.headers["Cache-Control"] == "no-cache"  # a shared cache may keep it
    assert anonymous.head(_path(image["imageUrl"])).status_code == 200
    assert anonymous.get(f"/api/images/{image['_id']}").status_code == 401
    assert anonymous.get("/api/images").status_code == 401
    assert anonymous.delete(f"/api/images/{image['_id']}").status_code == 401
    assert not (tmp_path / "secret-key").exists()  # nothing is signed


def test_with_auth_off_urls_are_plain(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), "AUTH": "off"})
    image = ImagesClient(app.test_client(key=None)).create()
    assert image["imageUrl"].endswith("/download?v=1")  # the version only, not signed


def test_the_embedded_secret_is_made_once_and_kept(make_app, tmp_path):
    first = make_app({"DATA_DIR": str(tmp_path)})
    image = ImagesClient(first.test_client()).create()
    secret = (tmp_path / "secret-key").read_text()
    assert oct((tmp_path / "secret-key").stat().st_mode & 0o777) == "0o600"
    # A restart (or another worker) signs alike: the URL from before still works.
    second = make_app({"DATA_DIR": str(tmp_path)})
    response = second.test_client(key=None).get(_path(image["imageUrl"]))
    assert response.status_code == 200
    assert (tmp_path / "secret-key").read_text() == secret
    # A SECRET_KEY that is set wins over the file.
    third = make_app({"DATA_DIR": str(tmp_path), "SECRET_KEY": "z" * 32})
    assert third.test_client(key=None).get(_path(image["imageUrl"])).status_code == 403


def test_a_secret_key_must_be_long_and_is_required_with_mongodb(make_app, tmp_path):
    with pytest.raises(ConfigError, match="SECRET_KEY must be at least 32"):
        make_app({"DATA_DIR": str(tmp_path), "SECRET_KEY": "x" * 31})
    with pytest.raises(ConfigError, match="SECRET_KEY must be set"):
        make_app({"DATA_DIR": str(tmp_path), "MONGODB_URL": MONGO_URL})
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "secret-key").write_text("too-short\n")
    with pytest.raises(ConfigError, match="at least 32"):
        make_app({"DATA_DIR": str(tmp_path / "short")})


def test_settings_never_show_the_secrets(make_app, tmp_path):
    app = make_app({"DATA_DIR": str(tmp_path), "SECRET_KEY": "s3cr3t" * 6})
    settings = app.extensions["image_api"].settings
    assert "s3cr3t" not in repr(settings)


def test_query_strings_are_what_urlencode_makes():
    """`query_string` skips urlencode's quoting when nothing needs it: the same string
    either way, for names and values that need quoting and for those that do not."""
    import random
    import string

    from image_api.signing import query_string

    alphabet = string.ascii_letters + string.digits + "_.-~" + " &=+/?%#é\n\"'"
    pick = random.Random(1)
    for _ in range(20_000):
        pairs = [
            tuple("".join(pick.choices(alphabet, k=pick.randint(0, 8))) for _ in "nv")
            for _ in range(pick.randint(0, 4))
        ]
        assert query_string(pairs) == urlencode(pairs), pairs
    assert query_string([("w", "256"), ("v", "3"), ("signature", "a-b_c")]) == (
        "w=256&v=3&signature=a-b_c"
    )


# --- the files of DATA_DIR (found by the outside attack on operations) --------------------


def test_a_new_data_dir_is_its_users_alone_whatever_the_umask(make_app, tmp_path):
    """Under umask 000 DATA_DIR was made 0777: every local user could replace secret-key
    with one of their own and sign URLs the service took."""
    previous = os.umask(0)
    try:
        make_app({"DATA_DIR": str(tmp_path / "new")})
    finally:
        os.umask(previous)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o1777])
def test_a_data_dir_every_user_may_write_is_refused_unless_sticky(make_app, tmp_path, mode):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(mode)
    if mode & 0o1000:  # as /tmp: no one may remove or replace another's files
        make_app({"DATA_DIR": str(data)})
        return
    with pytest.raises(ConfigError, match="may be written by every user"):
        make_app({"DATA_DIR": str(data)})


def replaced_by_another_user(path: Path) -> None:
    path.unlink()
    path.write_text("attacker-chosen-secret-0123456789abcdef-0123456789abcdef\n")
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    else:
        path.chmod(0o666)  # one this user could not own: writable by all


def test_a_secret_file_another_user_could_have_written_is_refused(make_app, tmp_path):
    data = tmp_path / "data"
    make_app({"DATA_DIR": str(data)})
    replaced_by_another_user(data / "secret-key")
    with pytest.raises(ConfigError, match="could have been written by another user"):
        make_app({"DATA_DIR": str(data)})


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [("secret-key", b"\xff\xfe" * 40, "cannot be read"), ("admin-key", None, "must be a file")],
)
def test_a_secret_file_that_cannot_be_read_is_one_line(make_app, tmp_path, name, content, problem):
    data = tmp_path / "data"
    data.mkdir()
    if content is None:
        (data / name).mkdir()
    else:
        (data / name).write_bytes(content)
        (data / name).chmod(0o600)
    with pytest.raises(ConfigError, match=problem):
        make_app({"DATA_DIR": str(data)})


def test_secret_files_others_may_read_are_made_the_owners_alone(make_app, tmp_path, caplog):
    """Both keys stayed 0644 when the database beside them was made 0600 (found by the
    second outside attack): any local user could read the admin secret or sign URLs."""
    data = tmp_path / "data"
    make_app({"DATA_DIR": str(data)})
    for name in ("secret-key", "admin-key"):
        (data / name).chmod(0o644)
    with caplog.at_level("WARNING", logger="image_api"):
        make_app({"DATA_DIR": str(data)}).test_cli_runner().invoke(args=["init"])
    for name in ("secret-key", "admin-key"):
        assert (data / name).stat().st_mode & 0o777 == 0o600, name
        assert f"{data / name} was readable by other users" in caplog.text


def test_a_secret_key_that_is_a_symlink_is_refused(make_app, tmp_path):
    """A symlink to any readable file of 32 characters (/etc/machine-id) was taken as the
    secret that signs URLs."""
    data = tmp_path / "data"
    make_app({"DATA_DIR": str(data)})
    elsewhere = tmp_path / "machine-id"
    elsewhere.write_text("0123456789abcdef0123456789abcdef\n")
    (data / "secret-key").unlink()
    (data / "secret-key").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="must be a file"):
        make_app({"DATA_DIR": str(data)})


def test_init_says_in_one_line_that_the_admin_key_file_cannot_be_read(make_app, tmp_path):
    """`flask init` (the first step of make run) showed a UnicodeDecodeError traceback."""
    data = tmp_path / "data"
    app = make_app({"DATA_DIR": str(data)})
    (data / "admin-key").write_bytes(b"\xff\xfe" * 40)
    result = app.test_cli_runner().invoke(args=["init"])
    assert result.exit_code == 1 and "admin-key cannot be read" in result.output
    assert not isinstance(result.exception, UnicodeDecodeError)


@pytest.mark.parametrize("name", ["images.sqlite3", "blobs"])
def test_a_store_another_user_made_in_a_shared_data_dir_is_refused(make_app, tmp_path, name):
    """A sticky DATA_DIR (as /tmp) is allowed; another user who made the database (or the
    blob directory) there first was trusted with it, and could read and change every
    record, API keys included (found by the second outside attack)."""
    data = tmp_path / "shared"
    data.mkdir()
    data.chmod(0o1777)
    made = data / name
    if name == "blobs":
        made.mkdir()
    else:
        made.touch()
    if os.geteuid() == 0:
        os.chown(made, 65534, 65534)
    else:
        made.chmod(0o777 if made.is_dir() else 0o666)
    with pytest.raises(ConfigError, match="could have been made or changed by another user"):
        make_app({"DATA_DIR": str(data)})
