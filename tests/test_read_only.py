"""READ_ONLY=true (while migrating): writes get a JSON 503 with Retry-After, reads go on."""

from __future__ import annotations

import pytest

from image_api.config import ConfigError
from tests.helpers import ImagesClient, assert_error, make_image, shared_directory, unprivileged


def test_writes_wait_and_reads_go_on(make_app, tmp_path):
    env = {"DATA_DIR": str(tmp_path)}
    image = ImagesClient(make_app(env).test_client()).create(make_image(), filename="a.png")
    client = make_app({**env, "READ_ONLY": "true"}).test_client()
    url = f"/api/images/{image['_id']}"
    for response in (
        ImagesClient(client).upload(),
        ImagesClient(client).replace(image["_id"]),
        client.delete(url),
    ):
        assert response.status_code == 503
        assert response.get_json()["code"] == "read_only"
        assert response.headers["Retry-After"] == "60"
    assert client.get(url).get_json()["sha256"] == image["sha256"]
    assert client.get("/api/images").get_json()["total"] == 1
    assert client.get(f"{url}/download").status_code == 200
    assert client.get(f"{url}/download?w=10").status_code == 200  # variants are a cache
    assert client.get("/readyz").status_code == 200


def test_writes_that_could_never_succeed_get_their_own_answer(make_app, tmp_path):
    make_app({"DATA_DIR": str(tmp_path)})  # the store
    client = make_app({"DATA_DIR": str(tmp_path), "READ_ONLY": "true"}).test_client()
    assert client.patch(f"/api/images/{'0' * 24}").status_code == 405
    assert client.put("/api/images/upload").status_code == 405
    assert client.delete("/api/images/nothex").status_code == 404
    assert client.post("/api/nowhere").status_code == 404


def test_commands_that_write_refuse_and_their_dry_runs_go_on(make_app, tmp_path):
    """A migration copying the store would miss what a command writes meanwhile: a key
    created or revoked, an image stripped. Those refuse in one line, writing nothing."""
    env = {"DATA_DIR": str(tmp_path)}
    writable = make_app(env)
    assert (
        writable.test_cli_runner()
        .invoke(args=["keys", "create", "--name", "k", "--owner", "o"])
        .exit_code
        == 0
    )
    paused = make_app({**env, "READ_ONLY": "true"}).test_cli_runner()
    for args in (
        ["keys", "create", "--name", "other", "--owner", "o"],
        ["keys", "revoke", "k"],
        ["strip-metadata", "--apply"],
        ["repair", "--apply"],
    ):
        result = paused.invoke(args=args)
        assert result.exit_code == 1, args
        assert result.output.startswith("Error: READ_ONLY=true:") and result.output.count("\n") == 1
    for args in (["keys", "list"], ["strip-metadata"], ["repair"]):
        assert paused.invoke(args=args).exit_code == 0, args
    listed = paused.invoke(args=["keys", "list"]).output
    assert "k\towner=o" in listed and "other" not in listed and "revoked" not in listed


def test_read_only_makes_no_store_where_there_is_none(make_app, tmp_path):
    """A mistyped DATA_DIR under READ_ONLY=true (a dry-run repair during a migration) made
    a new store there, with a new admin key and secret, quietly."""
    missing = tmp_path / "mistyped"
    with pytest.raises(ConfigError, match=r"READ_ONLY=true, and DATA_DIR .* holds no database"):
        make_app({"DATA_DIR": str(missing), "READ_ONLY": "true"})
    assert not missing.exists()


def test_readiness_says_whether_writes_can_succeed(make_app):
    """A store the service's user may read but not write (restored as another user, a
    read-only mount): /readyz is a 503 naming the metadata store, as every upload is.
    Under READ_ONLY=true, writes are refused anyway: ready while reads are served."""
    with shared_directory() as data:
        env = {"DATA_DIR": str(data)}
        writer = make_app(env)
        image = ImagesClient(writer.test_client()).create(make_image(), filename="a.png")
        serving = make_app(env)
        paused = make_app({**env, "READ_ONLY": "true"})
        for app in (serving, paused):
            app.extensions["image_api"].close()  # connections opened as root stay writable
        for path in data.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o444)
        with unprivileged():
            client = serving.test_client()
            ready = client.get("/readyz")
            assert_error(ready, 503, "backend_unavailable")
            assert "sqlite" in ready.get_json()["message"]
            assert_error(ImagesClient(client).upload(), 503, "backend_unavailable")

            client = paused.test_client()
            assert client.get("/readyz").status_code == 200
            url = f"/api/images/{image['_id']}"
            assert client.get(url).get_json()["sha256"] == image["sha256"]
            assert client.get(f"{url}/download").status_code == 200
