"""The user task package (tests/tasks/userpkg) is importable here and in child processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def child_env(*extra: Path) -> dict[str, str]:
    """Environment for fedmq child processes that import userpkg (and ``extra`` folders)."""
    parts = [str(ROOT), str(HERE), *map(str, extra), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in parts if p), OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1")


def make_entry_point_dist(folder: Path, name: str, value: str) -> Path:
    """A minimal installed distribution in ``folder`` registering task ``name`` = ``value``
    in the ``fedmq.tasks`` entry-point group (what ``pip install`` of a user's package leaves)."""
    info = folder / "usertasks-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: usertasks\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[fedmq.tasks]\n{name} = {value}\n")
    return folder


@pytest.fixture
def entry_point_dir(tmp_path: Path) -> Path:
    return make_entry_point_dist(tmp_path / "site", "user-regress-ep", "userpkg.sensors:regress")
