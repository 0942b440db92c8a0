"""Schemathesis against the service under gunicorn, driven by its own OpenAPI document.

All of schemathesis's checks and phases (examples, coverage, fuzzing, and stateful runs that
follow the document's links from an upload to get, replace, download and delete), with
deterministic generation and a bounded number of examples (tests/fuzz/schemathesis.toml).
Real image bytes go into positive multipart bodies through tests/fuzz/hooks.py. What it
found is kept as regular tests in test_openapi.py and test_hardening.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, Service

FUZZ = ROOT / "tests" / "fuzz"


@pytest.fixture
def running(tmp_path):
    """The service under gunicorn, one worker, with variants of at most 256 px: the document
    states that bound, and the fuzzer's largest variants (AVIF of 4096x4096 upscaled from a
    few pixels) would otherwise take most of its run."""
    service = Service(tmp_path / "data", {"WEB_CONCURRENCY": "1", "MAX_VARIANT_DIMENSION": "256"})
    service.start()
    yield service
    service.stop()


def test_schemathesis_finds_nothing(running):
    st = str(Path(sys.executable).with_name("st"))
    document = f"{running.url}/api/openapi.json"
    result = subprocess.run(
        [
            st,
            "--config-file",
            "schemathesis.toml",
            "--no-color",
            "run",
            document,
            "--checks",
            "all",
        ],
        cwd=FUZZ,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(FUZZ), str(ROOT)]),
            "IMAGE_API_KEY": running.key,
        },
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    summary = result.stdout[result.stdout.rindex("SUMMARY") :]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in summary, summary  # every phase ran and passed
    assert "API Links:" in result.stdout and " 0 covered" not in result.stdout
    running.stop()
    log = running.log.read_text()
    assert "Traceback" not in log and "[ERROR]" not in log, log
