"""The Docker smoke run (docker/smoke.sh) as a test: deselected by default, run with

    .venv/bin/python -m pytest -m docker tests/test_docker.py

It builds the image (several GB of downloads), extracts the demo corpus in a container and on the
host, and compares the shards. Skipped where no Docker engine runs and this user cannot install and
start one (smoke.sh does that as root on a Debian machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")


def _engine_unavailable() -> str | None:
    """Why the smoke run cannot have an engine here, or None when it can."""
    if Path(DOCKER).is_file() and subprocess.run([DOCKER, "info"], capture_output=True).returncode == 0:
        return None
    if os.geteuid() == 0 and (shutil.which("dockerd") or shutil.which("apt-get")):
        return None  # smoke.sh installs docker.io and starts dockerd
    return f"no Docker engine answers at {DOCKER} and this user cannot install or start one"


def test_constraints_match_the_environment() -> None:
    """docker/constraints.txt pins what this environment runs, so the container's features can match."""
    result = subprocess.run([sys.executable, "docker/lock.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_smoke_container_extracts_the_host_features() -> None:
    reason = _engine_unavailable()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "PYTHON": sys.executable, "DOCKER": DOCKER}
    result = subprocess.run(["bash", "docker/smoke.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=6 * 3600)
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output[-6000:]
    assert "smoke: PASS" in result.stdout
    assert "compare: OK" in result.stdout
