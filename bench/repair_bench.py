"""`repair` at scale: 100,000 records and 100,000 blobs (SQLite + filesystem), against
listing both sides alone, each in a fresh process (time and peak RSS from wait4)."""

from __future__ import annotations

import os
import secrets
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from image_api.records import RECORD_FIELDS, new_id  # noqa: E402
from image_api.repository.sqlite import SqliteRepository  # noqa: E402

REPAIR = (
    """
from datetime import timedelta
from image_api import create_app
from image_api.repair import repair
app = create_app({"DATA_DIR": %r})
report = repair(app.extensions["image_api"], timedelta(hours=1))
assert (report.records, report.blobs, report.findings) == (%d, %d, []), report
"""
    + "\nprint(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
)

LIST_BOTH = (
    """
from image_api import create_app
from image_api.repository import scan_all
service = create_app({"DATA_DIR": %r}).extensions["image_api"]
records = sum(1 for _ in scan_all(service.repository))
blobs = sum(1 for _ in service.storage.list())
assert (records, blobs) == (%d, %d)
"""
    + "\nprint(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
)


def fill(data_dir: Path, count: int) -> None:
    """`count` active records, each with a 16-byte blob, made directly (fast)."""
    repository = SqliteRepository(data_dir / "images.sqlite3")
    repository.create()
    repository.close()
    old = (datetime.now(UTC) - timedelta(days=2)).isoformat(timespec="microseconds")
    rows = []
    for _ in range(count):
        key = secrets.token_hex(16)
        shard = data_dir / "blobs" / key[:2]
        shard.mkdir(parents=True, exist_ok=True)
        (shard / key).write_bytes(b"0123456789abcdef")
        os.utime(shard / key, (time.time() - 2 * 86400,) * 2)
        values = {
            "id": new_id(),
            "key": key,
            "filename": "bench.png",
            "content_type": "image/png",
            "size": 16,
            "width": 1,
            "height": 1,
            "sha256": "0" * 64,
            "version": 1,
            "uploaded_at": old,
            "updated_at": old,
            "status": "active",
            "owner": "admin",
            "orientation": 1,
            "placeholder": None,
        }
        rows.append([values[name] for name in RECORD_FIELDS])
    with sqlite3.connect(data_dir / "images.sqlite3") as db:
        marks = ", ".join("?" * len(RECORD_FIELDS))
        db.executemany(f"INSERT INTO images ({', '.join(RECORD_FIELDS)}) VALUES ({marks})", rows)


def measure(code: str) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of `python -c code` in a fresh process.

    The peak is the child's own VmHWM, printed by the child: the ru_maxrss that wait4
    reports also counts the pages of the parent it was forked from.
    """
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {result.stderr}")
    return seconds, int(result.stdout.split()[-1]) / 1024


def bench_repair(args, work: Path, rows: list, count: int = 100_000) -> None:
    data_dir = work / "repair"
    fill(data_dir, count)
    repair_code = REPAIR % (str(data_dir), count, count)
    list_code = LIST_BOTH % (str(data_dir), count, count)
    measure(list_code)  # warm the page cache for both
    repairs, listings = [], []
    for _ in range(args.rounds):
        repairs.append(measure(repair_code))
        listings.append(measure(list_code))
    repair_s = statistics.median(s for s, _ in repairs)
    list_s = statistics.median(s for s, _ in listings)
    repair_rss = max(rss for _, rss in repairs)
    rounds = ", ".join(f"{a[0]:.1f}/{b[0]:.1f}" for a, b in zip(repairs, listings, strict=True))
    rows.append(
        {
            "name": f"repair (dry run), {count:,} records and blobs, vs listing both sides alone",
            "a": f"{repair_s:.1f} s",
            "b": f"{list_s:.1f} s",
            "result": f"{repair_s / list_s:.2f}",
            "goal": "<= 2",
            "met": repair_s / list_s <= 2,
            "note": f"seconds repair/list per round: {rounds}",
        }
    )
    rows.append(
        {
            "name": f"repair peak RSS over {count:,} records and blobs (fresh process)",
            "a": f"{repair_rss:.0f} MiB",
            "b": f"{max(rss for _, rss in listings):.0f} MiB (listing)",
            "result": f"{repair_rss:.0f} MiB",
            "goal": "< 100 MiB",
            "met": repair_rss < 100,
            "note": "VmHWM of the repair process; the highest of the rounds",
        }
    )


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=100_000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="repair-bench-") as tmp:
        results: list = []
        bench_repair(options, Path(tmp), results, options.count)
        for row in results:
            print(row["name"], "|", row["a"], "|", row["b"], "|", row["result"], "|", row["note"])
