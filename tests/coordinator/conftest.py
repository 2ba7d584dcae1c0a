"""Fixtures of the coordinator tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def coordinator_cli() -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """``coordinator_cli(config_path)`` starts ``fedmq coordinator run -c PATH`` as its own
    process (stdout: its ``key=value`` progress lines, text); any still running after the
    test is killed."""
    started: list[subprocess.Popen[str]] = []

    def start(cfg: Path) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        with open(cfg.parent / "coordinator.log", "a") as log:  # read it when a test fails
            proc = subprocess.Popen([sys.executable, "-m", "fedmq.cli", "coordinator", "run", "-c", str(cfg)],
                                    env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
