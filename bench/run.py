"""Side-by-side benchmarks of image-api; writes docs/benchmarks.md.

Everything runs on loopback and is started here: the service under gunicorn (the same
gunicorn.conf.py as `make run`), reference apps under the same configuration, nginx from
Debian's packages, and a moto S3 server. Each comparison alternates its two sides for
several rounds and reports the medians and their ratio, so machine noise hits both sides.

    make bench            # or: .venv/bin/python bench/run.py [--seconds 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ctypes.util
import io
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.decode_memory_bench import bench_decode_memory  # noqa: E402
from bench.processes import free_port, worker_pids  # noqa: E402
from bench.repair_bench import bench_repair  # noqa: E402
from image_api.records import new_id, utc_now  # noqa: E402
from image_api.repository.sqlite import SqliteRepository  # noqa: E402
from image_api.signing import UrlSigner  # noqa: E402

BIN = Path(sys.executable).parent
MiB = 1024 * 1024


# --- processes -----------------------------------------------------------------------------


def wait_for(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def process(args, env=None, ready_url=None, cwd=ROOT):
    """A subprocess (output to an anonymous file, never a full pipe), stopped on exit."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            args, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log, stderr=log
        )
        try:
            if ready_url:
                wait_for(ready_url)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def service_env(data_dir: Path, port: int, **extra) -> dict:
    """The service on the embedded default unless `extra` says otherwise."""
    return {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATA_DIR": str(data_dir),
        "S3_BUCKET_NAME": "",
        "MONGODB_URL": "",
        "MAX_UPLOAD_BYTES": str(64 * MiB),
        # Most runs compare the service with bare endpoints and nginx, without keys and with
        # limits never reached; bench_access measures what keys and limits cost.
        "AUTH": "off",
        "RATE_LIMIT_READ": "100000000/minute",
        "RATE_LIMIT_WRITE": "100000000/minute",
        **extra,
    }


@contextmanager
def gunicorn(app: str, env: dict, ready_path: str = "/healthz", cwd: Path = ROOT):
    """`app` under gunicorn.conf.py (the `make run` configuration), from the code in `cwd`."""
    port = int(env["PORT"])
    args = [str(BIN / "gunicorn"), "--config", "gunicorn.conf.py", app]
    with process(args, env, f"http://127.0.0.1:{port}{ready_path}", cwd) as proc:
        yield proc


#: Debian's njs module (libnginx-mod-http-js), for the signed-URL reference of bench_nginx.
NJS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")


@contextmanager
def nginx(root: Path, port: int, signed: tuple[Path, bytes] | None = None):
    """nginx serving the files under `root`. With `signed` (a directory of one symlink per
    image id, and the key signed URLs are made with), also the service's download path:
    its signed URL checked by nginx itself (bench/signed.js) and the file the image's
    symlink names sent, as a deployment that takes Python off that path would."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    conf = workdir / "nginx.conf"
    temp = {name: workdir / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    module, script, location = "", "", ""
    if signed is not None:
        by_id, key = signed
        module = f"load_module {NJS_MODULE};"
        script = f"js_import bench from {ROOT / 'bench/signed.js'}; js_set $signed bench.signed;"
        location = f"""
        location ~ "^/api/images/(?<image_id>[0-9a-f]{{24}})/download$" {{
            set $signing_key {key.hex()};
            if ($signed != "ok") {{ return 403; }}
            etag off;
            alias {by_id}/$image_id;
        }}"""
    conf.write_text(
        f"""
{module}
user root;
worker_processes 2;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    default_type application/octet-stream;
    {script}
    server {{
        listen 127.0.0.1:{port};
        root {root};{location}
    }}
}}
"""
    )
    try:
        with process(["nginx", "-c", str(conf), "-p", str(workdir)]) as proc:
            wait_for(f"http://127.0.0.1:{port}/")
            yield proc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def moto_server(port: int):
    with process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]):
        wait_for(f"http://127.0.0.1:{port}/")
        yield f"http://127.0.0.1:{port}"


def ensure_tools() -> None:
    """nginx, wrk, libvips (for the record beside Pillow) and nginx's njs module (for a
    reference row) from Debian's packages, installed if missing."""
    missing = [tool for tool in ("nginx", "wrk") if not shutil.which(tool)]
    if not ctypes.util.find_library("vips"):
        missing.append("libvips")
    if not NJS_MODULE.exists():
        missing.append("njs")
    if not missing:
        return
    packages = {
        "nginx": "nginx-light",
        "wrk": "wrk",
        "libvips": "libvips42",
        "njs": "libnginx-mod-http-js",
    }
    print(f"installing {', '.join(missing)} from apt", flush=True)
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=apt_env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *(packages[t] for t in missing)],
        check=True,
        env=apt_env,
    )
    subprocess.run(["pkill", "-x", "nginx"], check=False)  # the package starts one on :80


# --- load generation -----------------------------------------------------------------------


@dataclass
class Load:
    rps: float
    p50_ms: float


def wrk(
    url: str,
    seconds: int,
    connections: int = 8,
    script: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> Load:
    """`script`: a wrk Lua script and its arguments (`["bench/upload.lua", body_file]`)."""
    threads = min(2, connections)
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    if script:
        command += ["-s", script[0], url, "--", *script[1:]]
    else:
        command.append(url)
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    value, unit = re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out).groups()
    p50 = float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
    if "Non-2xx or 3xx responses" in out:
        raise RuntimeError(f"errors from {url}:\n{out}")
    return Load(rps, p50)


def side_by_side(
    a: str,
    b: str,
    args,
    connections: int = 8,
    script: list[str] | None = None,
    headers: tuple[dict | None, dict | None] = (None, None),
) -> tuple[list[Load], list[Load]]:
    """Alternate a and b for `args.rounds` rounds after a 2 s warm-up each; `headers`: what
    each side's requests add."""
    wrk(a, 2, connections, script, headers[0])
    wrk(b, 2, connections, script, headers[1])
    first, second = [], []
    for _ in range(args.rounds):
        first.append(wrk(a, args.seconds, connections, script, headers[0]))
        second.append(wrk(b, args.seconds, connections, script, headers[1]))
    return first, second


def median(loads: list[Load], field: str) -> float:
    return statistics.median(getattr(load, field) for load in loads)


# --- fixtures ------------------------------------------------------------------------------


def random_png(side: int) -> bytes:
    """Incompressible pixels: the PNG is about side*side*3 bytes."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
    return out.getvalue()


def photo_jpeg(target: int = 83_000, width: int = 400, height: int = 300) -> bytes:
    """A photo-sized JPEG (quality 85) of a colour gradient under noise, about `target` bytes.

    The same bytes every run: the noise is seeded and its strength is bisected to the size.
    """
    noise = Image.frombytes("RGB", (width, height), random.Random(83).randbytes(width * height * 3))
    gradient = Image.merge(
        "RGB", [Image.linear_gradient("L").rotate(a).resize((width, height)) for a in (0, 90, 45)]
    )

    def encode(strength: float) -> bytes:
        out = io.BytesIO()
        Image.blend(gradient, noise, strength).save(out, "JPEG", quality=85)
        return out.getvalue()

    low, high = 0.0, 1.0
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (middle, high) if len(encode(middle)) < target else (low, middle)
    return encode(high)


def multipart_body(data: bytes, field: str, filename: str, content_type: str) -> bytes:
    """One file as a multipart/form-data body (the boundary is on its first line)."""
    boundary = b"----image-api-bench-" + os.urandom(12).hex().encode()
    assert boundary not in data
    return b"".join(
        (
            b"--" + boundary + b"\r\n",
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'.encode(),
            f"Content-Type: {content_type}\r\n\r\n".encode(),
            data,
            b"\r\n--" + boundary + b"--\r\n",
        )
    )


def upload(base: str, data: bytes, name: str = "bench.png", headers: dict | None = None) -> dict:
    response = requests.post(
        f"{base}/api/images/upload", files={"image": (name, data)}, headers=headers
    )
    response.raise_for_status()
    return response.json()["image"]


def worker_pid(master: int) -> int:
    pids = worker_pids(master)
    if not pids:
        raise RuntimeError("no gunicorn worker")
    return pids[0]


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


# --- the benchmarks ------------------------------------------------------------------------


def bench_download(args, work: Path, rows: list) -> None:
    """1 & 2: metadata GET vs trivial JSON; 5 MB download vs nginx (and bare send_file)."""
    data_dir = work / "fs"
    port, ref_port, nginx_port = free_port(), free_port(), free_port()
    with gunicorn("wsgi:app", service_env(data_dir, port)):
        base = f"http://127.0.0.1:{port}"
        image = upload(base, random_png(1300))
        blob = next((data_dir / "blobs").glob("*/*"))
        ref_env = {**service_env(data_dir, ref_port), "BENCH_FILE": str(blob)}
        ref = f"http://127.0.0.1:{ref_port}"
        with gunicorn("bench.reference:app", ref_env, "/ping"):
            # First, before the large transfers heat the machine.
            ours, trivial = side_by_side(f"{base}/api/images/{image['_id']}", f"{ref}/ping", args)
            rows.append(
                ratio_row(
                    "GET /api/images/<id> vs trivial JSON endpoint (same gunicorn config)",
                    ours, trivial, "rps", 0.75,
                    f"{median(ours, 'rps'):.0f} vs {median(trivial, 'rps'):.0f} requests/s",
                )
            )  # fmt: skip
            with nginx(data_dir / "blobs", nginx_port):
                nginx_url = f"http://127.0.0.1:{nginx_port}/{blob.parent.name}/{blob.name}"
                ours, theirs = side_by_side(image["imageUrl"], nginx_url, args)
                bare, nginx_again = side_by_side(f"{ref}/file", nginx_url, args)
        size_mb = image["size"] / 1e6
        rows.append(
            ratio_row(
                f"{size_mb:.1f} MB download, filesystem backend: service vs nginx",
                ours, theirs, "rps", 0.75,
                f"throughput: {median(ours, 'rps') * size_mb:.0f} vs "
                f"{median(theirs, 'rps') * size_mb:.0f} MB/s",
            )
        )  # fmt: skip
        rows.append(
            ratio_row(
                "reference: bare Flask send_file vs nginx (same file)",
                bare, nginx_again, "rps", None,
                f"throughput: {median(bare, 'rps') * size_mb:.0f} MB/s",
            )
        )  # fmt: skip


def flask_init(env: dict) -> None:
    """`flask --app image_api init`: the bucket (or directory) and the tables."""
    subprocess.run(
        [str(BIN / "flask"), "--app", "image_api", "init"],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )


def upload_growth(env: dict, data: bytes) -> float:
    """Peak RSS growth (MiB) of a fresh gunicorn worker while it stores `data`."""
    flask_init(env)
    port = int(env["PORT"])
    with gunicorn("wsgi:app", {**env, "WEB_CONCURRENCY": "1"}) as proc:
        base = f"http://127.0.0.1:{port}"
        pid = worker_pid(proc.pid)
        # Warm up: imports, Pillow plugins, backend clients.
        warm = upload(base, random_png(64))
        requests.get(warm["imageUrl"]).raise_for_status()
        before = peak_rss_kib(pid)
        upload(base, data)
        return (peak_rss_kib(pid) - before) / 1024


def bench_upload_memory(args, work: Path, rows: list, moto: str) -> None:
    """3: 4000x4000 PNG stored uncompressed (~48 MB) minus the same pixels compressed."""
    pixels = Image.linear_gradient("L").resize((4000, 4000)).convert("RGB")
    raw, small = io.BytesIO(), io.BytesIO()
    pixels.save(raw, "PNG", compress_level=0)
    pixels.save(small, "PNG", compress_level=9)
    backends = {
        "filesystem": ({}, 16),
        "S3 (moto)": (
            {
                "S3_BUCKET_NAME": "bench-memory",
                "S3_ENDPOINT_URL": moto,
                "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
            },
            32,
        ),
    }
    for name, (extra, goal) in backends.items():
        growth = {"raw": [], "small": []}
        for round_ in range(args.rounds):
            for label, data in (("raw", raw.getvalue()), ("small", small.getvalue())):
                env = service_env(work / f"mem-{name[:2]}-{label}-{round_}", free_port(), **extra)
                growth[label].append(upload_growth(env, data))
        cost = statistics.median(growth["raw"]) - statistics.median(growth["small"])
        rows.append(
            {
                "name": f"upload memory, {name}: peak RSS growth, "
                f"{len(raw.getvalue()) / 1e6:.0f} MB file minus {len(small.getvalue()) / 1e3:.0f}"
                f" KB file of the same pixels",
                "a": f"{statistics.median(growth['raw']):.1f} MiB",
                "b": f"{statistics.median(growth['small']):.1f} MiB",
                "result": f"{cost:.1f} MiB",
                "goal": f"<= {goal} MiB",
                "met": cost <= goal,
                "note": f"rounds: raw {fmt(growth['raw'])}; small {fmt(growth['small'])}",
            }
        )


def bench_upload(args, work: Path, rows: list) -> None:
    """6: POST /api/images/upload of an ~83 KB JPEG vs a bare Flask upload with one fsync.

    wrk POSTs the same multipart body for every request (bench/upload.lua). Both sides keep
    every upload, in fresh directories on the same filesystem: the service's data directory
    ends with one blob and one SQLite row per request of every round (a few thousand rows, a
    B-tree depth that does not change, blobs spread over 256 shard directories), the
    reference's directory with one file per request; the note reports how much was kept, and
    the per-round numbers show whether later rounds slowed down.
    """
    image = photo_jpeg()
    body = work / "upload-body.multipart"
    body.write_bytes(multipart_body(image, "image", "bench.jpg", "image/jpeg"))
    script = [str(Path(__file__).resolve().parent / "upload.lua"), str(body)]
    data_dir, ref_dir = work / "upload", work / "upload-ref"
    ref_dir.mkdir()
    port, ref_port = free_port(), free_port()
    with gunicorn("wsgi:app", service_env(data_dir, port)):
        base = f"http://127.0.0.1:{port}"
        stored = upload(base, image, "bench.jpg")  # the body is a valid upload: 201
        assert (stored["contentType"], stored["size"]) == ("image/jpeg", len(image)), stored
        ref_env = {**service_env(ref_dir, ref_port), "BENCH_UPLOAD_DIR": str(ref_dir)}
        with gunicorn("bench.reference:app", ref_env, "/ping"):
            ref = f"http://127.0.0.1:{ref_port}"
            ours, bare = side_by_side(
                f"{base}/api/images/upload", f"{ref}/upload", args, script=script
            )
        # While the service still runs: its last connection checkpoints and drops the WAL.
        wal = data_dir / "images.sqlite3-wal"
        wal_mb = wal.stat().st_size / 1e6 if wal.exists() else 0.0
    with sqlite3.connect(data_dir / "images.sqlite3") as db:
        kept, kept_bytes = db.execute("SELECT count(*), total(size) FROM images").fetchone()
    ref_files = sum(1 for _ in ref_dir.iterdir())
    rows.append(
        ratio_row(
            f"upload of a {len(image) / 1e3:.0f} KB JPEG, filesystem + SQLite: service vs bare "
            "Flask upload with one fsync",
            ours,
            bare,
            "rps",
            0.6,
            f"{median(ours, 'rps'):.0f} vs {median(bare, 'rps'):.0f} uploads/s; kept at the end: "
            f"service {kept} images ({kept_bytes / 1e6:.0f} MB, WAL {wal_mb:.1f} MB), "
            f"reference {ref_files} files",
        )
    )


def camera_jpeg() -> bytes:
    """A 12 MP photo as a phone stores it (4000x3000, quality 90) with an EXIF block:
    orientation, camera and GPS position."""
    width, height = 4000, 3000
    small = Image.frombytes("RGB", (400, 300), random.Random(12).randbytes(400 * 300 * 3))
    picture = Image.blend(
        small.resize((width, height), Image.Resampling.BILINEAR),
        Image.linear_gradient("L").resize((width, height)).convert("RGB"),
        0.5,
    )
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F], exif[0x0110] = "Phone maker", "Phone 15"
    exif[0x8825] = {1: "N", 2: (52.0, 22.0, 3.36), 3: "E", 4: (4.0, 54.0, 14.76)}
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def bench_strip(args, work: Path, rows: list) -> None:
    """9: upload of a 12 MP camera JPEG with metadata stripping (the default) vs without
    (STRIP_METADATA=false), the same code side by side; goal: at most 1.1x the time."""
    image = camera_jpeg()
    body = work / "camera-body.multipart"
    body.write_bytes(multipart_body(image, "image", "camera.jpg", "image/jpeg"))
    script = [str(Path(__file__).resolve().parent / "upload.lua"), str(body)]
    port, plain_port = free_port(), free_port()
    with (
        gunicorn("wsgi:app", service_env(work / "strip", port)),
        gunicorn("wsgi:app", service_env(work / "plain", plain_port, STRIP_METADATA="false")),
    ):
        stripped = upload(f"http://127.0.0.1:{port}", image, "camera.jpg")
        kept = upload(f"http://127.0.0.1:{plain_port}", image, "camera.jpg")
        assert stripped["size"] < kept["size"] == len(image), (stripped, kept)
        ours, plain = side_by_side(
            f"http://127.0.0.1:{port}/api/images/upload",
            f"http://127.0.0.1:{plain_port}/api/images/upload",
            args,
            script=script,
        )
    rows.append(
        ratio_row(
            f"upload of a 12 MP camera JPEG ({len(image) / 1e6:.1f} MB, EXIF with GPS): "
            "metadata stripped vs kept (STRIP_METADATA=false)",
            ours, plain, "rps", round(1 / 1.1, 2),
            f"{median(ours, 'rps'):.1f} vs {median(plain, 'rps'):.1f} uploads/s; stored "
            f"{stripped['size']} vs {kept['size']} bytes",
        )
    )  # fmt: skip


def has_libvips() -> bool:
    try:
        import pyvips

        pyvips.version(0)
    except (ImportError, OSError):
        return False
    return True


def timed_get(session: requests.Session, url: str) -> float:
    """Seconds for one GET, body read."""
    started = time.perf_counter()
    response = session.get(url)
    response.raise_for_status()
    return time.perf_counter() - started


def bench_variants(args, work: Path, rows: list) -> None:
    """10 & 11: a 12 MP camera JPEG to a 256 px WebP (in a 256x256 box, as the reference's
    `thumbnail((256, 256))`), first render through the service vs a
    bare Flask endpoint rendering the same stored file by Pillow's fastest path (open,
    draft, thumbnail, WebP save; goal: at most 1.3x the time), and libvips for the record;
    then the cached variant's download vs an original download of the same bytes (goal:
    at least 0.8 of its requests/s).

    Every service request is a first render: each goes to another upload of the photo.
    Requests alternate one by one on keep-alive connections; each round's value is the
    mean of `per_round` requests.
    """
    image, per_round = camera_jpeg(), 3
    data_dir = work / "variants"
    port, ref_port = free_port(), free_port()
    vips = has_libvips()
    with gunicorn("wsgi:app", service_env(data_dir, port)):
        base = f"http://127.0.0.1:{port}"
        ids = [upload(base, image, "camera.jpg")["_id"] for _ in range(args.rounds * per_round + 1)]
        key = record_key(data_dir, ids[0])
        stored = data_dir / "blobs" / key[:2] / key
        ref = f"http://127.0.0.1:{ref_port}"
        with gunicorn(
            "bench.reference:app",
            {**service_env(data_dir, ref_port), "BENCH_FILE": str(stored)},
            "/ping",
        ):
            session = requests.Session()
            variant = "/download?w=256&h=256&format=webp"
            timed_get(session, f"{base}/api/images/{ids.pop()}{variant}")  # warm-up
            timed_get(session, f"{ref}/render?w=256")
            if vips:
                timed_get(session, f"{ref}/render-vips?w=256")
            ours, bare, libvips = [], [], []
            for round_ids in zip(*[iter(ids)] * per_round, strict=True):
                times = {"ours": [], "bare": [], "vips": []}
                for image_id in round_ids:
                    times["ours"].append(
                        timed_get(session, f"{base}/api/images/{image_id}{variant}")
                    )
                    times["bare"].append(timed_get(session, f"{ref}/render?w=256"))
                    if vips:
                        times["vips"].append(timed_get(session, f"{ref}/render-vips?w=256"))
                for name, into in (("ours", ours), ("bare", bare), ("vips", libvips)):
                    if times[name]:
                        mean = statistics.mean(times[name])
                        into.append(Load(rps=1 / mean, p50_ms=mean * 1000))
            rows.append(
                ratio_row(
                    "12 MP JPEG to 256 px WebP, first render: service (render, store, record, "
                    "serve) vs bare Flask + Pillow (draft, thumbnail, save)",
                    ours, bare, "p50_ms", 1.3,
                    f"{median(ours, 'p50_ms'):.0f} vs {median(bare, 'p50_ms'):.0f} ms per render",
                    lower_is_better=True,
                )
            )  # fmt: skip
            if vips:
                rows.append(
                    ratio_row(
                        "for the record: the same bare render with libvips (pyvips thumbnail) "
                        "vs Pillow",
                        libvips, bare, "p50_ms", None,
                        f"{median(libvips, 'p50_ms'):.0f} vs {median(bare, 'p50_ms'):.0f} ms",
                        lower_is_better=True,
                    )
                )  # fmt: skip
        cached_url = f"{base}/api/images/{ids[0]}{variant}"
        thumbnail = requests.get(cached_url).content
        original = upload(base, thumbnail, "thumbnail.webp")
        assert original["size"] == len(thumbnail), "the variant was stored with changes"
        cached, plain = side_by_side(cached_url, original["imageUrl"], args)
    rows.append(
        ratio_row(
            f"cached variant download ({len(thumbnail) / 1e3:.0f} KB WebP) vs an original "
            "download of the same bytes",
            cached, plain, "rps", 0.8,
            f"{median(cached, 'rps'):.0f} vs {median(plain, 'rps'):.0f} requests/s",
        )
    )  # fmt: skip


def thumbnail_burst(work: Path, threads: int, clients: int, count: int) -> tuple[int, int]:
    """`count` new thumbnails (the gallery's `thumbnailUrl` variant of a photo each) asked
    for by `clients` keep-alive connections at once, each taking the next when answered,
    as browsers load a page of <img>; the service with `threads` threads per worker.
    How many were refused (503 `decoder_busy`), of how many."""
    port = free_port()
    env = service_env(work / f"burst-{threads}-{secrets.token_hex(4)}", port)
    with gunicorn("wsgi:app", {**env, "GUNICORN_THREADS": str(threads)}):
        base = f"http://127.0.0.1:{port}"
        photo = photo_jpeg()
        left = [upload(base, photo, f"p{i}.jpg")["_id"] for i in range(count)]
        codes, guard = [], threading.Lock()

        def browse():
            with requests.Session() as session:
                while True:
                    with guard:
                        if not left:
                            return
                        image_id = left.pop()
                    thumbnail = f"{base}/api/images/{image_id}/download?w=256&h=256&fit=cover"
                    codes.append(session.get(f"{thumbnail}&format=auto").status_code)

        connections = [threading.Thread(target=browse) for _ in range(clients)]
        for connection in connections:
            connection.start()
        for connection in connections:
            connection.join()
    assert set(codes) <= {200, 503}, codes
    return codes.count(503), len(codes)


def bench_burst(args, work: Path, rows: list) -> None:
    """For the record: the share of a burst of new thumbnails refused, one browser (6
    connections) and two (12), with the default GUNICORN_THREADS (8) and the old 4. Not a
    timed test: how the connections fall on the two workers is the kernel's choice."""
    for clients in (6, 12):
        refused = {8: [0, 0], 4: [0, 0]}
        for _ in range(min(args.rounds, 3)):
            for threads, total in refused.items():
                busy, asked = thumbnail_burst(work, threads, clients, 48)
                total[0] += busy
                total[1] += asked
        share = {threads: busy / asked for threads, (busy, asked) in refused.items()}
        rows.append(
            {"name": f"for the record: a burst of 48 new thumbnails from {clients} keep-alive "
                     "connections, refused (503 decoder_busy): GUNICORN_THREADS=8 vs 4",
             "a": f"{share[8]:.0%}", "b": f"{share[4]:.0%}", "result": "", "goal": "",
             "met": None,
             "note": f"{refused[8][0]} of {refused[8][1]} vs {refused[4][0]} of {refused[4][1]} "
                     f"over {min(args.rounds, 3)} rounds"}
        )  # fmt: skip


@contextmanager
def fronted(env: dict, nginx_port: int, work: Path, ready_path: str = "/healthz"):
    """nginx with the config `flask nginx-config` renders for `env`, in front of the
    gunicorn `env` describes (workers as root: the bench's data directory is private)."""
    prefix = work / f"nginx-{nginx_port}"
    for name in ("logs", "tmp"):
        (prefix / name).mkdir(parents=True, exist_ok=True)
    command = [
        str(BIN / "flask"), "--app", "image_api", "nginx-config",
        "--listen", f"127.0.0.1:{nginx_port}", "--upstream", f"127.0.0.1:{env['PORT']}",
        "--output", str(prefix / "nginx.conf"),
    ]  # fmt: skip
    if os.geteuid() == 0:
        command += ["--user", "root"]
    subprocess.run(command, env={**os.environ, **env}, cwd=ROOT, check=True, capture_output=True)
    args = ["nginx", "-p", str(prefix), "-c", "nginx.conf", "-g", "daemon off;"]
    with process(args, ready_url=f"http://127.0.0.1:{nginx_port}{ready_path}") as proc:
        yield proc


def slow_connections(port: int, download_path: str, count: int = 50) -> list:
    """`count` each of: headers sent a part at a time and never finished, a body promised
    and never sent, a large download never read."""
    held = []
    for i in range(count):
        # Each from an address of its own: nginx allows 64 busy connections per address,
        # and the load generator's own address must not be the one refused.
        source = (f"127.0.1.{i + 1}", 0)
        headers = socket.create_connection(("127.0.0.1", port), source_address=source)
        headers.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        body = socket.create_connection(("127.0.0.1", port), source_address=source)
        body.sendall(
            b"POST /api/images/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )
        unread = socket.create_connection(("127.0.0.1", port), source_address=source)
        unread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        unread.sendall(f"GET {download_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        held += [headers, body, unread]
    return held


def bench_nginx(args, work: Path, rows: list) -> None:
    """12 & 13: behind nginx (the rendered deploy config). A 5 MB download in accel mode vs
    nginx serving the same file from disk (goal: at least 0.8); proxy mode through nginx and
    gunicorn alone for the record; and what 150 slow clients add to a metadata GET's
    latency through nginx (for the record: a timed test would be flaky)."""
    data_dir = work / "nginx-fs"
    port, proxy_port, ref_port = free_port(), free_port(), free_port()
    accel_front, proxy_front, ref_front, static_port = (free_port() for _ in range(4))
    wsgi_port, wsgi_front = free_port(), free_port()
    accel_env = service_env(data_dir, port, DOWNLOAD_MODE="accel", PROXY_HOPS="1")
    proxy_env = service_env(data_dir, proxy_port, PROXY_HOPS="1")
    with gunicorn("wsgi:app", accel_env), gunicorn("wsgi:app", proxy_env):
        image = upload(f"http://127.0.0.1:{port}", random_png(1300))
        key = record_key(data_dir, image["_id"])
        path = f"/api/images/{image['_id']}/download"
        ref_env = {
            **accel_env,
            "PORT": str(ref_port),
            "BENCH_ACCEL": f"/_accel/whole/{key[:2]}/{key}",
        }
        wsgi_env = {**ref_env, "PORT": str(wsgi_port)}
        by_id, signer = signed_links(data_dir, work, image["_id"], key)
        with (
            gunicorn("bench.reference:app", ref_env, "/ping"),
            gunicorn("bench.reference:wsgi_accel", wsgi_env, "/ping"),
            fronted(accel_env, accel_front, work),
            fronted(proxy_env, proxy_front, work),
            fronted(ref_env, ref_front, work, ready_path="/ping"),
            fronted(wsgi_env, wsgi_front, work, ready_path="/ping"),
            nginx(data_dir / "blobs", static_port, (by_id, signer.key)),
        ):
            static = f"http://127.0.0.1:{static_port}/{key[:2]}/{key}"
            accel = f"http://127.0.0.1:{accel_front}{path}"
            bare_accel = f"http://127.0.0.1:{ref_front}/accel"
            wsgi_accel = f"http://127.0.0.1:{wsgi_front}/accel"
            signed = f"http://127.0.0.1:{static_port}{path}?{signer.sign(path, signer.expiry())}"
            assert requests.get(accel).content == requests.get(static).content
            assert requests.get(bare_accel).content == requests.get(static).content
            assert requests.get(wsgi_accel).content == requests.get(static).content
            assert requests.get(signed).content == requests.get(static).content
            assert requests.get(signed.replace("signature=", "signature=x")).status_code == 403
            ours, theirs = side_by_side(accel, static, args)
            # The ceiling for any download Python decides: the same nginx and gunicorn
            # with a Flask view that does nothing but name the file.
            bare, theirs_bare = side_by_side(bare_accel, static, args)
            # The floor under that: the same answer from a WSGI callable, no Flask.
            floor, theirs_floor = side_by_side(wsgi_accel, static, args)
            # And without Python: nginx checks the signature and follows a symlink.
            by_nginx, theirs_signed = side_by_side(signed, static, args)
            proxied, theirs_again = side_by_side(
                f"http://127.0.0.1:{proxy_front}{path}", static, args
            )
            direct, theirs_third = side_by_side(
                f"http://127.0.0.1:{proxy_port}{path}", static, args
            )
            metadata = f"http://127.0.0.1:{accel_front}/api/images/{image['_id']}"
            wrk(metadata, 2)
            calm, crowded = [], []
            for _ in range(args.rounds):
                calm.append(wrk(metadata, args.seconds))
                held = slow_connections(accel_front, path)
                try:
                    crowded.append(wrk(metadata, args.seconds))
                finally:
                    for connection in held:
                        connection.close()
    size_mb = image["size"] / 1e6
    for name, a, b, goal in (
        ("nginx -> service in accel mode", ours, theirs, 0.8),
        ("reference: nginx -> a bare Flask X-Accel-Redirect view", bare, theirs_bare, None),
        (
            "reference: nginx -> a WSGI callable answering X-Accel-Redirect (no Flask)",
            floor,
            theirs_floor,
            None,
        ),
        (
            "reference: nginx alone, checking the signed URL (njs) and following a symlink "
            "per image",
            by_nginx,
            theirs_signed,
            None,
        ),
        ("for the record: nginx -> service in proxy mode", proxied, theirs_again, None),
        ("for the record: gunicorn alone (proxy mode)", direct, theirs_third, None),
    ):
        rows.append(
            ratio_row(
                f"{size_mb:.1f} MB download: {name} vs nginx serving the file from disk",
                a, b, "rps", goal,
                f"throughput: {median(a, 'rps') * size_mb:.0f} vs "
                f"{median(b, 'rps') * size_mb:.0f} MB/s",
            )
        )  # fmt: skip
    rows.append(
        ratio_row(
            "for the record: metadata GET through nginx with 150 slow clients held (50 slow "
            "headers, 50 slow bodies, 50 unread downloads) vs none, p50 latency",
            crowded, calm, "p50_ms", None,
            f"{median(crowded, 'p50_ms'):.2f} vs {median(calm, 'p50_ms'):.2f} ms",
            lower_is_better=True,
        )
    )  # fmt: skip


def signed_links(data_dir: Path, work: Path, image_id: str, key: str):
    """For the nginx-alone reference: a directory with a symlink from the image's id to its
    blob, and a signer of the service's kind (`signing.UrlSigner`) with a fresh secret."""
    by_id = work / "by-id"
    by_id.mkdir(exist_ok=True)
    (by_id / image_id).symlink_to(data_dir / "blobs" / key[:2] / key)
    return by_id, UrlSigner(secrets.token_urlsafe(48), 3600, utc_now)


#: The last commit before API keys, owners, rate limits and signed URLs.
BEFORE_ACCESS = "ed8850e"


def bench_access(args, work: Path, rows: list) -> None:
    """7 & 8: what access control costs. The service as `make run` serves it (a key on every
    request, its rate limits counted in memory, signed imageUrls) vs the code of the last
    commit before any of that, side by side: metadata GET and the upload of `bench_upload`.

    Both run the same gunicorn configuration on fresh data directories; the limits are set
    high enough never to refuse (so they are counted, not hit). For the record, the same
    two against this build with AUTH=off: access control's own cost today, without what
    later issues added to every request.
    """
    before = work / "before-access"
    before.mkdir()
    archive = subprocess.run(
        ["git", "archive", BEFORE_ACCESS], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    image = photo_jpeg()
    body = work / "access-body.multipart"
    body.write_bytes(multipart_body(image, "image", "bench.jpg", "image/jpeg"))
    script = [str(Path(__file__).resolve().parent / "upload.lua"), str(body)]
    now_dir, before_dir, off_dir = work / "access-now", work / "access-before", work / "access-off"
    port, before_port, off_port = free_port(), free_port(), free_port()
    with (
        gunicorn("wsgi:app", service_env(now_dir, port, AUTH="on")),
        gunicorn("wsgi:app", service_env(before_dir, before_port), cwd=before),
        gunicorn("wsgi:app", service_env(off_dir, off_port)),
    ):
        key = {"Authorization": f"Bearer {(now_dir / 'admin-key').read_text().strip()}"}
        now, then = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{before_port}"
        off = f"http://127.0.0.1:{off_port}"
        ours = upload(now, image, "bench.jpg", key)
        theirs = upload(then, image, "bench.jpg")
        unkeyed = upload(off, image, "bench.jpg")
        assert "signature=" in ours["imageUrl"] and "?" not in theirs["imageUrl"]
        assert "signature=" not in unkeyed["imageUrl"]

        def compared(other: str, their_image: dict):
            """A keyed GET of our image and a keyed upload vs the same without a key on
            `other`, side by side."""
            gets = side_by_side(
                f"{now}/api/images/{ours['_id']}",
                f"{other}/api/images/{their_image['_id']}",
                args,
                headers=(key, None),
            )
            uploads = side_by_side(
                f"{now}/api/images/upload",
                f"{other}/api/images/upload",
                args,
                script=script,
                headers=(key, None),
            )
            return gets, uploads

        (get_now, get_then), (up_now, up_then) = compared(then, theirs)
        # For the record: the same build with AUTH=off (no key, no signed URLs; its limits
        # still counted, by client address), which leaves out what later issues added to
        # every request (media, logs, metrics) that the comparison above includes.
        (get_on, get_off), (up_on, up_off) = compared(off, unkeyed)
    rows.append(
        ratio_row(
            "GET /api/images/<id> with a key, limits and a signed imageUrl vs before "
            f"access control ({BEFORE_ACCESS})",
            get_now, get_then, "rps", 0.85,
            f"{median(get_now, 'rps'):.0f} vs {median(get_then, 'rps'):.0f} requests/s",
        )
    )  # fmt: skip
    rows.append(
        ratio_row(
            f"upload of a {len(image) / 1e3:.0f} KB JPEG with a key and limits vs before "
            f"access control ({BEFORE_ACCESS})",
            up_now, up_then, "rps", 0.85,
            f"{median(up_now, 'rps'):.0f} vs {median(up_then, 'rps'):.0f} uploads/s",
        )
    )  # fmt: skip
    for name, a, b in (
        ("GET /api/images/<id>", get_on, get_off),
        (f"upload of a {len(image) / 1e3:.0f} KB JPEG", up_on, up_off),
    ):
        rows.append(
            ratio_row(
                f"for the record: {name}, AUTH=on (a key, signed URLs) vs AUTH=off, this build",
                a, b, "rps", None,
                f"{median(a, 'rps'):.0f} vs {median(b, 'rps'):.0f} per second",
            )
        )  # fmt: skip


def fill_sqlite(data_dir: Path, count: int) -> None:
    """`count` image records, inserted in one transaction (bench set-up only)."""
    repository = SqliteRepository(data_dir / "images.sqlite3")
    repository.create()
    repository.close()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(count):
        moment = (start + timedelta(seconds=i)).isoformat(timespec="microseconds")
        rows.append(
            (
                new_id(),
                os.urandom(16).hex(),
                f"img{i}.png",
                "image/png",
                1000,
                10,
                10,
                "0" * 64,
                1,
                moment,
                moment,
                "active",
            )
        )
    with sqlite3.connect(data_dir / "images.sqlite3") as db:
        # The first release's columns: later ones (owner, orientation...) take their defaults.
        db.executemany(
            f"INSERT INTO images ({_FIRST_COLUMNS}) VALUES ({', '.join('?' * 12)})", rows
        )


_FIRST_COLUMNS = (
    "id, key, filename, content_type, size, width, height, sha256, version, uploaded_at, "
    "updated_at, status"
)


def page_urls(base: str, limit: int, page: int) -> tuple[str, str]:
    first = f"{base}/api/images?limit={limit}"
    url = first
    for _ in range(page - 1):
        url = f"{first}&cursor={requests.get(url).json()['nextCursor']}"
    return first, url


def bench_lists(args, work: Path, rows: list) -> None:
    """4: first and 100th page latency with 1,000 vs 100,000 images (SQLite)."""
    urls = {}
    with ExitStack() as stack:
        for count in (1_000, 100_000):
            data_dir = work / f"list-{count}"
            data_dir.mkdir()
            fill_sqlite(data_dir, count)
            port = free_port()
            stack.enter_context(gunicorn("wsgi:app", service_env(data_dir, port)))
            urls[count] = page_urls(f"http://127.0.0.1:{port}", 10, 100)
        for index, page in enumerate(("first", "100th")):
            small, large = side_by_side(urls[1_000][index], urls[100_000][index], args, 1)
            rows.append(
                ratio_row(
                    f"list latency p50, {page} page (limit 10): 100,000 vs 1,000 images",
                    large,
                    small,
                    "p50_ms",
                    1.5,
                    f"{median(large, 'p50_ms'):.2f} vs {median(small, 'p50_ms'):.2f} ms",
                    lower_is_better=True,
                )
            )


def bench_s3(args, work: Path, rows: list, moto: str) -> None:
    """5: 5 MB proxied from S3 vs straight from moto; redirect 302 vs metadata GET."""
    s3 = {
        "S3_BUCKET_NAME": "bench-s3",
        "S3_ENDPOINT_URL": moto,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
    }
    port, redirect_port = free_port(), free_port()
    env = service_env(work / "s3", port, **s3)
    flask_init(env)
    with gunicorn("wsgi:app", env):
        base = f"http://127.0.0.1:{port}"
        image = upload(base, random_png(1300))
        # Straight from moto: a presigned GET of the same object (moto refuses anonymous ones).
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=moto,
            region_name=s3["AWS_REGION"],
            aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"],
        )
        key = f"images/{record_key(work / 's3', image['_id'])}"
        direct = client.generate_presigned_url(
            "get_object", Params={"Bucket": "bench-s3", "Key": key}, ExpiresIn=3600
        )
        ours, theirs = side_by_side(image["imageUrl"], direct, args)
        size_mb = image["size"] / 1e6
        rows.append(
            ratio_row(
                f"{size_mb:.1f} MB download proxied from S3 (moto) vs straight from moto",
                ours,
                theirs,
                "rps",
                0.6,
                f"throughput: {median(ours, 'rps') * size_mb:.0f} vs "
                f"{median(theirs, 'rps') * size_mb:.0f} MB/s",
            )
        )
        env = service_env(work / "s3", redirect_port, DOWNLOAD_MODE="redirect", **s3)
        with gunicorn("wsgi:app", env):
            redirect_base = f"http://127.0.0.1:{redirect_port}"
            redirect = f"{redirect_base}/api/images/{image['_id']}/download"
            meta = f"{redirect_base}/api/images/{image['_id']}"
            ours, theirs = side_by_side(redirect, meta, args)
            rows.append(
                ratio_row(
                    "redirect mode: the 302 vs GET /api/images/<id> (same service)",
                    ours,
                    theirs,
                    "rps",
                    0.8,
                    f"{median(ours, 'rps'):.0f} vs {median(theirs, 'rps'):.0f} requests/s",
                )
            )


def record_key(data_dir: Path, image_id: str) -> str:
    with sqlite3.connect(data_dir / "images.sqlite3") as db:
        return db.execute("SELECT key FROM images WHERE id = ?", (image_id,)).fetchone()[0]


# --- report --------------------------------------------------------------------------------


def fmt(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def ratio_row(name, a, b, field, goal, note, lower_is_better=False) -> dict:
    """A/B is the median of the rounds' own ratios: each round measures both sides back to
    back, so a burst of this machine's noise that lasts a few seconds moves one round's
    ratio (which the median then discards), not one side's median."""
    ratio = statistics.median(
        getattr(x, field) / getattr(y, field) for x, y in zip(a, b, strict=True)
    )
    met = None if goal is None else (ratio <= goal if lower_is_better else ratio >= goal)
    unit = "ms p50" if field == "p50_ms" else "req/s"
    return {
        "name": name,
        "a": f"{median(a, field):.2f} {unit}"
        if field == "p50_ms"
        else f"{median(a, field):.0f} {unit}",
        "b": f"{median(b, field):.2f} {unit}"
        if field == "p50_ms"
        else f"{median(b, field):.0f} {unit}",
        "result": f"{ratio:.2f}",
        "goal": "" if goal is None else (f"<= {goal}" if lower_is_better else f">= {goal}"),
        "met": met,
        "note": f"{note}; rounds: {fmt(getattr(x, field) for x in a)} | "
        f"{fmt(getattr(x, field) for x in b)}",
    }


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1]
    nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory / 1024 / 1024:.0f} GiB, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"wrk {wrk_version}, {nginx_version.replace('nginx version: ', '')}"
    )


def write_report(rows: list, args, started: datetime) -> Path:
    met = {True: "yes", False: "**no**", None: "reference"}
    lines = [
        "# Benchmarks",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {machine()}.",
        "",
        "Made by `make bench` (`bench/run.py`): every process on loopback, started by the",
        "script; the service and the reference apps under `gunicorn.conf.py` (the `make run`",
        "configuration: 2 gthread workers of 8 threads). Each comparison alternates its two",
        f"sides for {args.rounds} rounds of `wrk -t2 -c8 -d{args.seconds}s --latency URL`",
        "(`-t1 -c1` for list latency) after a 2 s warm-up each. A and B are each side's median;",
        "A/B is the median of the rounds' own ratios (each round measures both sides back to",
        "back, so a burst of noise that hits one side of one round is discarded rather than",
        "moving that side's median). The load generator shares the 2 cores with the servers,",
        "so absolute numbers are low and only the ratios mean much.",
        "",
        "| measurement | A | B | A/B | goal | met | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['a']} | {row['b']} | {row['result']} | {row['goal']} "
            f"| {met[row['met']]} | {row['note']} |"
        )
    lines += [
        "",
        "Upload memory is the growth of the worker's peak RSS (`VmHWM`) over one upload, after",
        "a warm-up upload, in a fresh single-worker gunicorn per measurement; the compressed",
        "file's growth (decoding 16 MP costs ~48 MB either way) is subtracted.",
        "",
        "Upload throughput POSTs one fixed multipart body (`bench/upload.lua`, field `image`) to",
        "`POST /api/images/upload` and to a bare Flask endpoint (`bench/reference.py`) that",
        "writes the file and fsyncs it once; every upload is kept on both sides (see the note).",
        "",
    ]
    path = ROOT / "docs" / "benchmarks.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _run_section(name: str, run, rows: list) -> None:
    """Run one benchmark; one that fails is a row of the report (with its error), not the
    end of a run whose other results would be lost."""
    try:
        run()
    except Exception as error:  # noqa: BLE001 (any failure of a benchmark is reported)
        traceback.print_exc()
        rows.append(
            {"name": f"{name}: failed", "a": "", "b": "", "result": "error", "goal": "",
             "met": False, "note": f"{type(error).__name__}: {error}"}
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per pair")
    parser.add_argument(
        "--only",
        nargs="*",
        help="download, memory, lists, s3, upload, access, strip, variants, burst, nginx, "
        "repair, decode",
    )
    args = parser.parse_args()
    ensure_tools()
    started = datetime.now(UTC)
    rows: list = []
    everything = (
        "download", "memory", "lists", "s3", "upload", "access", "strip", "variants", "burst",
        "nginx", "repair", "decode",
    )  # fmt: skip
    chosen = set(args.only or everything)
    with tempfile.TemporaryDirectory(prefix="image-api-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        moto = stack.enter_context(moto_server(free_port()))
        sections = {
            "download": lambda: bench_download(args, work, rows),
            "memory": lambda: bench_upload_memory(args, work, rows, moto),
            "lists": lambda: bench_lists(args, work, rows),
            "s3": lambda: bench_s3(args, work, rows, moto),
            "upload": lambda: bench_upload(args, work, rows),
            "access": lambda: bench_access(args, work, rows),
            "strip": lambda: bench_strip(args, work, rows),
            "variants": lambda: bench_variants(args, work, rows),
            "burst": lambda: bench_burst(args, work, rows),
            "nginx": lambda: bench_nginx(args, work, rows),
            "repair": lambda: bench_repair(args, work, rows),
            "decode": lambda: bench_decode_memory(args, work, rows),
        }
        for name in everything:
            if name in chosen:
                _run_section(name, sections[name], rows)
    for row in rows:
        print(f"{row['result']:>10}  {row['goal']:<9} {row['name']}")
    print(f"wrote {write_report(rows, args, started)}")


if __name__ == "__main__":
    main()
