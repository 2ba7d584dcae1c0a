"""The shared command-line pieces: logging that keeps third-party chatter out, and the
root ``fedmq`` command's one-line usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_EXPORT = """
import logging, sys
from fedmq.cli import setup_logging
from fedmq.model.modelio import export_onnx
from fedmq.tasks import get_task
if sys.argv[1] == "fedmq":
    setup_logging("INFO")
else:
    logging.basicConfig(level="INFO", stream=sys.stderr)
task = get_task("digits-mlp")
export_onnx(task.build_model(0), task)
logging.getLogger("fedmq.test").info("exported")
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def test_onnx_export_at_info_prints_no_onnxscript_lines():
    plain = _python("-c", _EXPORT, "plain")
    assert plain.returncode == 0, plain.stderr
    # Without the quieting the export does chatter (else this test could not fail).
    assert "onnxscript" in plain.stderr or "onnx_ir" in plain.stderr
    quiet = _python("-c", _EXPORT, "fedmq")
    assert quiet.returncode == 0, quiet.stderr
    assert "onnxscript" not in quiet.stderr and "onnx_ir" not in quiet.stderr, quiet.stderr
    assert "level=INFO logger=fedmq.test msg=exported" in quiet.stderr


def test_unknown_command_of_the_root_is_one_line():
    result = _python("-m", "fedmq.cli", "cordinator")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fedmq: error: No such command 'cordinator'. Did you mean 'coordinator'? (see fedmq --help)"]
