"""Settings: read once, typed, and refused loudly when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_api import create_app
from image_api.config import ConfigError, Settings


def test_defaults_are_the_embedded_backends():
    settings = Settings.from_mapping({})
    assert (settings.blob_backend, settings.metadata_backend) == ("filesystem", "sqlite")
    assert settings.data_dir == Path("data")
    assert settings.max_upload_bytes == 25 * 1024 * 1024
    assert settings.max_image_pixels == 50_000_000
    assert settings.accepted_formats == ("JPEG", "PNG", "GIF", "WEBP", "AVIF")


def test_seed_variables_choose_s3_and_mongodb():
    settings = Settings.from_mapping(
        {
            "S3_BUCKET_NAME": "pics",
            "AWS_REGION": "eu-west-1",
            "MONGODB_URL": "mongodb://db:27017/pics",
            "SECRET_KEY": "s" * 32,
            "ACCEPTED_FORMATS": "jpg, png",
            "MAX_UPLOAD_BYTES": "1_000",
        }
    )
    assert (settings.blob_backend, settings.metadata_backend) == ("s3", "mongodb")
    assert settings.accepted_formats == ("JPEG", "PNG")
    assert settings.max_upload_bytes == 1000


def test_empty_values_count_as_unset():
    settings = Settings.from_mapping({"S3_BUCKET_NAME": "", "MONGODB_URL": "  "})
    assert (settings.blob_backend, settings.metadata_backend) == ("filesystem", "sqlite")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MAX_UPLOAD_BYTES": "lots"}, "MAX_UPLOAD_BYTES"),
        ({"MAX_IMAGE_PIXELS": "0"}, "MAX_IMAGE_PIXELS"),
        ({"ACCEPTED_FORMATS": "png,svg"}, "ACCEPTED_FORMATS"),
        ({"MONGODB_URL": "postgres://x"}, "MONGODB_URL"),
        ({"S3_BUCKET_NAME": "b"}, "AWS_REGION"),
        ({"S3_BUCKET_NAME": "b", "AWS_REGION": "r", "AWS_ACCESS_KEY_ID": "k"}, "AWS_SECRET"),
        ({"S3_ENDPOINT_URL": "http://minio:9000"}, "S3_BUCKET_NAME"),
        ({"S3_BUCKET_NAME": "b", "AWS_REGION": "r", "S3_ENDPOINT_URL": "minio"}, "S3_ENDPOINT"),
        ({"BACKEND_READ_TIMEOUT": "-1"}, "BACKEND_READ_TIMEOUT"),
        ({"PROXY_HOPS": "x"}, "PROXY_HOPS"),
        ({"CORS_ORIGINS": "ftp://a.example"}, "CORS_ORIGINS"),
        ({"CORS_ORIGINS": "https://a.example/app"}, "CORS_ORIGINS"),
        # Written into nginx's config too: nothing that could end its string or directive.
        ({"CORS_ORIGINS": 'https://a.example";'}, "CORS_ORIGINS"),
        ({"CORS_ORIGINS": "https://a.example:8080 x"}, "CORS_ORIGINS"),
        ({"CORS_ORIGINS": "https://a.example:99999"}, "CORS_ORIGINS"),
        # Accepted, then broken at use (found by the outside attack on operations): every
        # variant a 503, every request a 429, a traceback at every start or a 500 on every
        # keyed upload, a config nginx refuses, "S3 is down; retry later".
        ({"GUNICORN_THREADS": "1"}, "GUNICORN_THREADS"),
        ({"RATE_LIMIT_WRITE": "0/minute"}, "RATE_LIMIT_WRITE"),
        ({"RATE_LIMIT_READ": "10/second;0/day"}, "RATE_LIMIT_READ"),
        ({"IDEMPOTENCY_TTL": "99999999999999999999"}, "IDEMPOTENCY_TTL"),
        ({"IDEMPOTENCY_TTL": "999999999999"}, "IDEMPOTENCY_TTL"),
        ({"MAX_UPLOAD_BYTES": "9223372036854775807"}, "MAX_UPLOAD_BYTES"),
        ({"GUNICORN_TIMEOUT": "99999999999999999999"}, "GUNICORN_TIMEOUT"),
        ({"S3_BUCKET_NAME": "a b", "AWS_REGION": "r"}, "S3_BUCKET_NAME"),
        ({"S3_BUCKET_NAME": "../x", "AWS_REGION": "r"}, "S3_BUCKET_NAME"),
        # Found by the second attack: a fork bomb, every request or probe a 503.
        ({"WEB_CONCURRENCY": "99999999999999999999"}, "WEB_CONCURRENCY"),
        ({"GUNICORN_THREADS": "100000"}, "GUNICORN_THREADS"),
        ({"REQUEST_TIMEOUT": "1e-300"}, "REQUEST_TIMEOUT"),
        ({"PROBE_TIMEOUT": "0.000001"}, "PROBE_TIMEOUT"),
    ],
)
def test_bad_values_stop_start_up_naming_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        create_app(env)


def test_dotenv_is_read_under_the_real_environment(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text("NAME=from-dotenv\nMAX_IMAGE_PIXELS=123\n")
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "456")
    monkeypatch.delenv("NAME", raising=False)
    settings = Settings.from_environment(env_file)
    assert (settings.name, settings.max_image_pixels) == ("from-dotenv", 456)


def test_a_malformed_url_setting_is_named_without_its_password():
    with pytest.raises(ConfigError) as refused:
        create_app({"MONGODB_URL": "mongo://admin:hunter2@db.example/images"})
    assert "MONGODB_URL" in refused.value.message and "hunter2" not in refused.value.message
