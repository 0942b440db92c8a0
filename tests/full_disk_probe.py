"""Run by tests/test_faults.py in a process of its own: the embedded default when the
metadata file can no longer grow (a full disk, as SQLite sees one: RLIMIT_FSIZE makes its
writes fail with EFBIG, and SIGXFSZ is ignored), then with room again.

    python -m tests.full_disk_probe DATA_DIR
prints one JSON object: what uploads, deletes and reads answered while full and after.
"""

from __future__ import annotations

import collections
import io
import json
import resource
import signal
import sys
from pathlib import Path

from image_api import create_app
from tests.helpers import make_image


def main(data_dir: Path) -> None:
    app = create_app({"DATA_DIR": str(data_dir), "AUTH": "off"})
    client = app.test_client()

    def upload(i: int):
        body = {"image": (io.BytesIO(make_image(size=(4, 4), color=(i, 0, 0))), "a.png")}
        return client.post("/api/images/upload", data=body)

    kept = [upload(i).get_json()["image"]["_id"] for i in range(3)]
    wal = data_dir / "images.sqlite3-wal"
    # Room for a few more pages of the write-ahead log, then none: the statement that
    # fails is an INSERT, an UPDATE ... RETURNING or a DELETE ... RETURNING as it comes.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (wal.stat().st_size + 40_000, resource.RLIM_INFINITY))
    full = collections.Counter()
    for i in range(40):
        response = upload(i)
        full[f"upload {response.status_code} {response.get_json().get('code')}"] += 1
    for image_id in kept:
        response = client.delete(f"/api/images/{image_id}")
        full[f"delete {response.status_code} {response.get_json().get('code')}"] += 1
    reads = [client.get(f"/api/images/{image_id}/download").status_code for image_id in kept]
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    again = [upload(i).status_code for i in range(3)]
    deleted = [client.delete(f"/api/images/{image_id}").status_code for image_id in kept]
    print(json.dumps({"full": full, "reads": reads, "again": again, "deleted": deleted}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
