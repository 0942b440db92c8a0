"""`flask migrate`: from the embedded default (directory + SQLite) to S3 + MongoDB (moto and
mongomock here), interrupted halfway and run again; the service then started on the new
backends serves every image, variant and key, and the old signed URLs."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import mongomock
import pytest
from moto import mock_aws

from image_api.storage.s3 import S3Storage
from tests.conftest import build_app
from tests.helpers import FAKE_AWS, MONGO_URL, ImagesClient, make_image

TARGET = ["--to-s3", "migrated", "--to-mongodb", MONGO_URL]


@pytest.fixture
def clouds():
    with mock_aws(), mongomock.patch(servers=(("mongo.test", 27017),)):
        yield


@pytest.fixture
def embedded(tmp_path, clock, clouds, monkeypatch):
    """An embedded-default app with three images (one replaced), a variant, a second key
    and an idempotency key; the settings the CLI reads for the target's region."""
    for name, value in FAKE_AWS.items():
        monkeypatch.setenv(name, value)
    env = {"DATA_DIR": str(tmp_path / "data")}
    app = build_app(env, clock)
    client = app.test_client()
    images = ImagesClient(client)
    made = [images.create(make_image("PNG", (20 + i, 10)), filename=f"{i}.png") for i in range(3)]
    assert images.replace(made[0]["_id"], make_image("JPEG", (30, 30)), "r.jpg").status_code == 200
    retry = images.upload(make_image("PNG", (9, 9)), headers={"Idempotency-Key": "once"})
    assert retry.status_code == 201
    made.append(retry.get_json()["image"])
    assert client.get(f"/api/images/{made[1]['_id']}/download?w=8&format=webp").status_code == 200
    runner = app.test_cli_runner()
    created = runner.invoke(
        args=["keys", "create", "--name", "reader", "--owner", "bob", "--scope", "read"]
    )
    assert created.exit_code == 0, created.output
    reader_secret = created.output.strip().split()[-1]
    return app, env, made, reader_secret


def run(env, clock, *args):
    app = build_app({**env, "READ_ONLY": "true", "AWS_REGION": "us-east-1"}, clock)
    return app.test_cli_runner().invoke(args=["migrate", *TARGET, *args])


def test_migrate_needs_read_only(embedded, clock):
    app = embedded[0]
    result = app.test_cli_runner().invoke(args=["migrate", *TARGET])
    assert result.exit_code != 0 and "READ_ONLY=true" in result.output


def test_dry_run_counts_and_writes_nothing(embedded, clock):
    env = embedded[1]
    result = run(env, clock, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["images"], report["variants"], report["keys"]) == (4, 1, 2)
    assert report["idempotency_keys"] == 1
    cloud = build_app(cloud_env(env), clock)
    assert cloud.test_client().get("/api/images").get_json()["total"] == 0


def cloud_env(env):
    secret = (env_dir(env) / "secret-key").read_text().strip()
    return {
        "DATA_DIR": env["DATA_DIR"],
        "S3_BUCKET_NAME": "migrated",
        "AWS_REGION": "us-east-1",
        "MONGODB_URL": MONGO_URL,
        "SECRET_KEY": secret,
        **FAKE_AWS,
    }


def env_dir(env):
    from pathlib import Path

    return Path(env["DATA_DIR"])


def test_an_interrupted_migration_finishes_on_a_rerun_and_the_new_backends_serve_it_all(
    embedded, clock, monkeypatch
):
    app, env, made, reader_secret = embedded
    old = app.test_client()
    signed = old.get(f"/api/images/{made[2]['_id']}").get_json()["imageUrl"]
    bytes_before = {i["_id"]: old.get(f"/api/images/{i['_id']}/download").data for i in made}

    # The copy dies after two blobs.
    put, calls = S3Storage.put, []

    def dying_put(self, key, stream, content_type):
        if len(calls) == 2:
            raise RuntimeError("power cut")
        calls.append(key)
        return put(self, key, stream, content_type)

    monkeypatch.setattr(S3Storage, "put", dying_put)
    first = run(env, clock, "--json")
    assert first.exit_code != 0
    monkeypatch.setattr(S3Storage, "put", put)

    second = run(env, clock, "--json")
    assert second.exit_code == 0, second.output
    report = json.loads(second.output)
    assert report["problems"] == []
    assert report["skipped"] >= 2 + 2  # the two keys, and the two images already copied
    assert report["images"] + report["variants"] + report["skipped"] - 2 == 5
    third = json.loads(run(env, clock, "--json").output)
    assert (third["images"], third["variants"], third["keys"]) == (0, 0, 0)

    cloud = build_app(cloud_env(env), clock)
    client = cloud.test_client()  # the same admin key, copied
    listing = client.get("/api/images").get_json()
    assert sorted(i["_id"] for i in listing["images"]) == sorted(i["_id"] for i in made)
    for image in made:
        assert client.get(f"/api/images/{image['_id']}/download").data == bytes_before[image["_id"]]
    service = cloud.extensions["image_api"]
    assert len(service.repository.variants_of(made[1]["_id"])) == 1
    client.get(f"/api/images/{made[1]['_id']}/download?w=8&format=webp")
    assert service.variant_counts == {"cached": 1}
    # An old signed URL works (the same SECRET_KEY), and so does the other key.
    anonymous = cloud.test_client(key=None)
    parts = urlsplit(signed)
    assert anonymous.get(f"{parts.path}?{parts.query}").status_code == 200
    reader = cloud.test_client(key=reader_secret)
    assert reader.get("/api/images").status_code == 200
    # The idempotency key still answers a retry with the first response.
    again = ImagesClient(client).upload(
        make_image("PNG", (9, 9)), headers={"Idempotency-Key": "once"}
    )
    assert again.get_json()["image"]["_id"] == made[3]["_id"]


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("--to-mongodb", "mongodb://", "MONGODB_URL"),
        ("--to-mongodb", "mongodb://user:pw@", "cannot use the target"),
        ("--to-mongodb", "notaurl", "MONGODB_URL"),
        ("--s3-endpoint-url", "ftp://x", "S3_ENDPOINT_URL"),
        # An unset shell variable: it read as unset, so the target was the source, and the
        # copy of nothing exited 0 ("5201 were there already").
        ("--to-mongodb", "", "--to-mongodb is empty"),
        ("--to-s3", " ", "--to-s3 is empty"),
    ],
)
def test_a_bad_target_is_one_line_naming_it(embedded, clock, option, value, problem):
    env = embedded[1]
    arguments = {"--to-s3": "migrated", "--to-mongodb": MONGO_URL, option: value}
    app = build_app({**env, "READ_ONLY": "true", "AWS_REGION": "us-east-1"}, clock)
    result = app.test_cli_runner().invoke(
        args=["migrate", *[part for pair in arguments.items() for part in pair], "--dry-run"]
    )
    assert result.exit_code == 1
    assert problem in result.output and "Traceback" not in result.output
