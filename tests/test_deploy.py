"""The Docker image and compose file. No Docker engine exists on these machines, so they are
checked as files: the properties a deployment relies on, and that the nginx config compose
mounts is the one `flask nginx-config` renders for compose's settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from image_api.cli import NGINX_SOURCE
from image_api.config import Settings
from image_api.nginx import Frontend, render
from image_api.storage.s3 import S3Storage
from tests.helpers import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def compose_environment() -> dict[str, str]:
    """The api service's environment as compose gives it, with the defaults it names."""
    values = {}
    for name, value in COMPOSE["services"]["api"]["environment"].items():
        value = str(value)
        match = re.fullmatch(r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)\}", value)
        if match:
            value = match.group(2) if match.group(2) is not None else "x" * 48
        values[name] = value
    return values


def compose_nginx_config() -> str:
    # DATA_DIR as the Dockerfile sets it (unused on S3, but named by the config).
    settings = Settings.from_mapping({"DATA_DIR": "/app/data", **compose_environment()})
    storage = S3Storage.from_settings(settings)
    return render(settings, storage, Frontend(listen="8080", upstream="api:5000"), NGINX_SOURCE)


def test_the_compose_nginx_config_is_rendered_for_composes_settings():
    assert (ROOT / "deploy" / "nginx.compose.conf").read_text() == compose_nginx_config(), (
        "deploy/nginx.compose.conf is stale: python -c 'from tests.test_deploy import "
        'compose_nginx_config as c; open("deploy/nginx.compose.conf", "w").write(c())\''
    )


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_both_nginx_configs_are_valid_for_nginx(tmp_path):
    for name in ("nginx.conf", "nginx.compose.conf"):
        text = (ROOT / "deploy" / name).read_text()
        # Compose's names resolve only inside compose's network: stand-ins for the check.
        text = text.replace("api:5000", "127.0.0.1:5000").replace("minio:9000", "127.0.0.1:9000")
        for directory in ("logs", "tmp"):
            (tmp_path / directory).mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
        result = subprocess.run(
            ["nginx", "-t", "-p", str(tmp_path), "-c", name], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr


def test_compose_publishes_nginx_only_and_pins_every_image():
    services = COMPOSE["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"nginx"}
    for name, service in services.items():
        if "image" in service:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), (name, image)
            assert re.search(r":[\w.-]*\d", image), (name, image)  # a version, not a channel
        else:
            assert service["build"] == "."


def test_compose_checks_health_keeps_data_and_initialises_once():
    services = COMPOSE["services"]
    for name in ("api", "nginx", "mongo", "minio"):
        assert services[name]["healthcheck"]["test"], name
    assert set(COMPOSE["volumes"]) == {"mongo-data", "minio-data"}
    assert "mongo-data:/data/db" in services["mongo"]["volumes"]
    assert "minio-data:/data" in services["minio"]["volumes"]
    init = services["init"]
    assert init["entrypoint"] == ["flask", "--app", "image_api", "init"]
    assert init["restart"] == "no"
    assert services["api"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["nginx"]["depends_on"]["api"]["condition"] == "service_healthy"
    for dependency in ("mongo", "minio"):
        assert init["depends_on"][dependency]["condition"] == "service_healthy"
    environment = services["api"]["environment"]
    assert environment == init["environment"]
    assert environment["SECRET_KEY"].startswith("${SECRET_KEY:?")  # no default secret
    assert environment["PROXY_HOPS"] == "1" and environment["DOWNLOAD_MODE"] == "accel"
    mounted = services["nginx"]["volumes"][0]
    assert mounted.startswith("./deploy/nginx.compose.conf:") and mounted.endswith(":ro")


def test_the_image_is_multi_stage_slim_pinned_and_unprivileged():
    stages = re.findall(r"^FROM (\S+)", DOCKERFILE, re.MULTILINE)
    assert len(stages) >= 2
    for base in stages:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    assert re.search(r"^USER (?!root)\w+", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", DOCKERFILE, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["gunicorn"', DOCKERFILE, re.MULTILINE)
    assert "HOST=0.0.0.0" in DOCKERFILE  # inside the container; compose publishes nginx only
    ignored = (ROOT / ".dockerignore").read_text().split()
    for secret_or_local in (".env", ".venv/", "data/", ".git/"):
        assert secret_or_local in ignored


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--listen", "abc"),
        ("--listen", "70000"),
        ("--listen", "8080; } server { listen 9999"),
        ("--upstream", "127.0.0.1:5000; } server { listen 9999; }"),
        ("--upstream", "gunicorn"),
        ("--user", "root; daemon off"),
    ],
)
def test_nginx_config_refuses_what_would_add_directives(tmp_path, option, value):
    """The options are written into the config as they are: a value that is not an
    address (or a user) is refused, naming the option, and nothing is written."""
    output = tmp_path / "nginx.conf"
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "image_api", "nginx-config", option, value,
         "--output", str(output)],
        cwd=ROOT, env={**os.environ, "DATA_DIR": str(tmp_path / "data")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and f"{option} must be" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not output.exists()


@pytest.mark.parametrize(
    ("data_dir", "output", "problem"),
    [
        # The blob directory goes into `alias` in double quotes: what would end or escape
        # the string, or name a variable, is refused (tests/test_nginx.py runs the rest).
        ('data"dir', "nginx.conf", "cannot be written into nginx's config"),
        ("data$dir", "nginx.conf", "cannot be written into nginx's config"),
        ("data", "missing/nginx.conf", "cannot write"),
    ],
)
def test_nginx_config_refuses_a_data_dir_it_cannot_write_in_one_line(
    tmp_path, data_dir, output, problem
):
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "image_api", "nginx-config",
         "--output", str(tmp_path / output)],
        cwd=ROOT, env={**os.environ, "DATA_DIR": str(tmp_path / data_dir)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1 and problem in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / output).exists()


def test_nginx_config_takes_addresses_unix_sockets_and_a_user_with_a_group():
    for listen, upstream, user in [
        ("8080", "127.0.0.1:5000", None),
        ("127.0.0.1:8080", "unix:/run/gunicorn.sock", "nobody nogroup"),
        ("[::1]:8080", "api:5000", "www-data"),
    ]:
        assert Frontend(listen, upstream, user).listen == listen
