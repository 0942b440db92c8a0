"""Worker memory under concurrent uploads of large images: 16 uploads at once of a small
PNG that decodes to 7071x7071 RGBA (50 MP, 200 MB of pixels), with the decode budget
(DECODE_MEMORY, the default) and without it, side by side."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.processes import free_port, worker_pids  # noqa: E402

BIN = Path(sys.executable).parent


def big_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (7071, 7071), (10, 20, 30, 255)).save(out, "PNG", optimize=True)
    return out.getvalue()


def peak_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def run(data: bytes, extra: dict[str, str], uploads: int = 16) -> tuple[list[float], dict]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "DATA_DIR": tmp,
            "S3_BUCKET_NAME": "",
            "MONGODB_URL": "",
            "AUTH": "off",
            "RATE_LIMIT_WRITE": "100000000/minute",
            **extra,
        }
        proc = subprocess.Popen(
            [str(BIN / "gunicorn"), "--config", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.1)

            def upload(_):
                response = requests.post(
                    f"{url}/api/images/upload", files={"image": ("big.png", data)}, timeout=120
                )
                retry = response.headers.get("Retry-After")
                return f"{response.status_code}" + (f" (Retry-After {retry})" if retry else "")

            with ThreadPoolExecutor(uploads) as pool:
                statuses = list(pool.map(upload, range(uploads)))
            peaks = sorted(peak_mib(pid) for pid in worker_pids(proc.pid))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return peaks, counts


def bench_decode_memory(args, work: Path, rows: list) -> None:
    data = big_png()
    with_budget = run(data, {})
    without = run(data, {"DECODE_MEMORY": str(1 << 40)})
    worst = max(with_budget[0])
    rows.append(
        {
            "name": "16 concurrent uploads of a 7071x7071 RGBA PNG "
            f"({len(data) / 1e3:.0f} KB): peak RSS of the worst worker, "
            "decode budget on (default) vs off",
            "a": f"{worst:.0f} MiB",
            "b": f"{max(without[0]):.0f} MiB",
            "result": f"{worst:.0f} MiB",
            "goal": "< 400 MiB",
            "met": worst < 400,
            "note": f"statuses on: {with_budget[1]}; off: {without[1]}; "
            f"workers on {with_budget[0]}, off {without[0]} MiB",
        }
    )


if __name__ == "__main__":
    results: list = []
    bench_decode_memory(None, Path(tempfile.gettempdir()), results)
    for row in results:
        print(row)
