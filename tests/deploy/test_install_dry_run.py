"""deploy/install.sh --dry-run on each device family: what it would run, with nothing
changed (no root needed, the prefix is never created). The platform and architecture
are forced with FEDMQ_PLATFORM / FEDMQ_ARCH, as the script documents; an "old Python"
is an interpreter that reports 3.9, as Debian 11's does."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "install.sh"
BASH = shutil.which("bash") or "/bin/bash"
CPU_TORCH = "pip install --index-url https://download.pytorch.org/whl/cpu torch"


def dry_run(tmp_path: Path, *args: str, path: str | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = {"PATH": path or os.environ["PATH"], "HOME": str(tmp_path), "FEDMQ_PREFIX": str(tmp_path / "opt"),
               "FEDMQ_PYTHON": sys.executable, **env}
    return subprocess.run([BASH, str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, env=environ,
                          timeout=60)


def commands(result: subprocess.CompletedProcess) -> list[str]:
    """The commands the dry run printed (shell-quoted there), each as its words joined by spaces."""
    return [" ".join(shlex.split(line[2:])) for line in result.stdout.splitlines() if line.startswith("+ ")]


def _old_python(tmp_path: Path) -> Path:
    """A bin folder holding only a python3 that reports 3.9 and the tools the script uses,
    so that no newer python3.X is found on PATH either."""
    folder = tmp_path / "bin"
    folder.mkdir()
    fake = folder / "python3"
    fake.write_text("#!/bin/sh\necho 3.9\n")
    fake.chmod(0o755)
    for tool in ("sh", "sed", "sort", "head", "grep", "uname", "id", "dirname"):
        found = shutil.which(tool)
        assert found, f"{tool} not installed"
        (folder / tool).symlink_to(found)
    return fake


@pytest.fixture(autouse=True)
def _nothing_written(tmp_path):
    yield
    assert not (tmp_path / "opt").exists(), "the dry run created the prefix"


def test_raspberry_pi_installs_the_cpu_build_of_torch(tmp_path):
    result = dry_run(tmp_path, FEDMQ_PLATFORM="raspberrypi", FEDMQ_ARCH="aarch64")
    assert result.returncode == 0, result.stderr
    run = commands(result)
    assert any(c.endswith(CPU_TORCH) for c in run)
    assert any(c.endswith(f"pip install {ROOT}") for c in run)
    assert any("install -m 0644 " in c and c.endswith("/etc/systemd/system/fedmq-edge.service") for c in run)
    assert "systemctl enable fedmq-edge.service" in run
    assert "platform raspberrypi (aarch64)" in result.stdout


def test_jetson_without_a_wheel_installs_the_cpu_build_and_says_so(tmp_path):
    result = dry_run(tmp_path, FEDMQ_PLATFORM="jetson", FEDMQ_ARCH="aarch64")
    assert result.returncode == 0, result.stderr
    assert any(c.endswith(CPU_TORCH) for c in commands(result))
    assert "Jetson without FEDMQ_TORCH_WHEEL: installing the CPU build of torch" in result.stdout


def test_jetson_with_a_wheel_installs_that_wheel(tmp_path):
    wheel = tmp_path / "torch-2.5.0a0+872d972e41.nv24.08-cp311-cp311-linux_aarch64.whl"
    wheel.write_bytes(b"")
    result = dry_run(tmp_path, FEDMQ_PLATFORM="jetson", FEDMQ_ARCH="aarch64", FEDMQ_TORCH_WHEEL=str(wheel))
    assert result.returncode == 0, result.stderr
    run = commands(result)
    assert any(c.endswith(f"pip install {wheel}") for c in run), run
    assert not any("download.pytorch.org" in c for c in run)
    missing = dry_run(tmp_path, FEDMQ_PLATFORM="jetson", FEDMQ_ARCH="aarch64",
                      FEDMQ_TORCH_WHEEL=str(tmp_path / "absent.whl"))
    assert missing.returncode == 1 and "is not a file" in missing.stderr


def test_old_python_stops_with_the_routes_then_takes_the_uv_route(tmp_path):
    fake = _old_python(tmp_path)
    path = str(fake.parent)  # no python3.11+ on this PATH
    result = dry_run(tmp_path, path=path, FEDMQ_PLATFORM="raspberrypi", FEDMQ_ARCH="aarch64", FEDMQ_PYTHON=str(fake))
    assert result.returncode == 1
    assert "Python 3.9; fedmq needs >= 3.11" in result.stderr and "--uv-python" in result.stderr
    assert commands(result) == []

    result = dry_run(tmp_path, "--uv-python", path=path, FEDMQ_PLATFORM="raspberrypi", FEDMQ_ARCH="aarch64",
                     FEDMQ_PYTHON=str(fake))
    assert result.returncode == 0, result.stderr
    run = commands(result)
    opt = tmp_path / "opt"
    assert run[:3] == [f"{fake} -m venv {opt}/bootstrap", f"{opt}/bootstrap/bin/pip install uv",
                       f"env UV_PYTHON_INSTALL_DIR={opt}/python {opt}/bootstrap/bin/uv python install 3.11"]
    assert run[3] == f"mkdir -p {opt}"
    assert "python3.11 -m venv" in run[4] and run[4].startswith(f"{opt}/python/")


def test_old_python_uses_a_newer_one_on_path(tmp_path):
    fake = _old_python(tmp_path)
    (fake.parent / "python3.11").symlink_to(sys.executable)
    result = dry_run(tmp_path, path=str(fake.parent), FEDMQ_PLATFORM="generic", FEDMQ_ARCH="x86_64",
                     FEDMQ_PYTHON=str(fake))
    assert result.returncode == 0, result.stderr
    assert f"using {fake.parent / 'python3.11'}" in result.stdout
    assert commands(result)[1] == f"{fake.parent / 'python3.11'} -m venv {tmp_path / 'opt'}/venv"


def test_coordinator_role_installs_its_unit_and_template(tmp_path):
    result = dry_run(tmp_path, "--role", "coordinator", FEDMQ_PLATFORM="generic", FEDMQ_ARCH="x86_64")
    assert result.returncode == 0, result.stderr
    run = commands(result)
    assert any(c.endswith("/etc/systemd/system/fedmq-coordinator.service") for c in run)
    assert "systemctl enable fedmq-coordinator.service" in run
    assert any("coordinator.service" in c and "import torch" in c for c in run)


@pytest.mark.parametrize("args, env, expected", [
    (["--role", "broker"], {}, "--role broker is unknown"),
    (["--bogus"], {}, "unknown option --bogus"),
    ([], {"FEDMQ_ARCH": "armv7l"}, "32-bit ARM (armv7l) has no torch wheels"),
    ([], {"FEDMQ_PLATFORM": "pc"}, "FEDMQ_PLATFORM=pc is unknown"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, env, expected):
    result = dry_run(tmp_path, *args, **env)
    assert result.returncode == 1 and expected in result.stderr
