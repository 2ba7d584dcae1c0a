"""The edge client's systemd unit passes `systemd-analyze verify` and has the settings the agent
relies on. Both units' exposure bound and documentation links, the coordinator's unit and
install.sh's dry runs: tests/deploy/."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "fedmq-edge.service"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"


def _render(tmp_path: Path, text: str) -> Path:
    # ExecStart names /opt/fedmq/venv/bin/python, absent here; verify needs an executable.
    out = tmp_path / "fedmq-edge.service"
    out.write_text(text.replace("/opt/fedmq/venv/bin/python", sys.executable))
    return out


def _verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)


def test_unit_verifies_cleanly(tmp_path):
    result = _verify(_render(tmp_path, UNIT.read_text()))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_verify_catches_a_misspelt_directive(tmp_path):
    # Proves the clean run above means something: systemd-analyze reports unknown keys on stderr.
    result = _verify(_render(tmp_path, UNIT.read_text().replace("WatchdogSec=", "WatchdgSec=")))
    assert "WatchdgSec" in result.stderr


def test_unit_has_notify_watchdog_restart_dirs_credentials_and_hardening():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    # Repeated keys (LoadCredential=, SystemCallFilter=) are legal in units; keep the last.
    parser.read_string(UNIT.read_text())
    svc = parser["Service"]
    assert svc["Type"] == "notify"
    assert int(svc["WatchdogSec"]) > 0
    assert svc["Restart"] == "on-failure"
    assert svc["StateDirectory"] and svc["ConfigurationDirectory"]
    assert "LoadCredential" in svc
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes"}.items():
        assert svc[key] == value, key
    assert "-m edge_client run" in svc["ExecStart"]


def test_install_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(ROOT / "deploy" / "install.sh")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
