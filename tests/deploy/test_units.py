"""Both systemd units (deploy/fedmq-edge.service, deploy/fedmq-coordinator.service):
`systemd-analyze verify` clean, `systemd-analyze security` exposure at most 2.0, and
documentation links to files install.sh really installs; the coordinator unit's
overrides name files its configuration accepts."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = ["fedmq-edge.service", "fedmq-coordinator.service"]
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
MAX_EXPOSURE = 2.0
# Settings whose removal leaves a unit with next to no sandbox.
SANDBOX = ("ProtectSystem=", "PrivateDevices=", "CapabilityBoundingSet=", "SystemCallFilter=",
           "RestrictAddressFamilies=", "DynamicUser=", "ProtectHome=", "PrivateTmp=", "RestrictNamespaces=")


def _render(tmp_path: Path, name: str, text: str) -> Path:
    # ExecStart names /opt/fedmq/venv/bin/python, absent here; verify needs an executable.
    out = tmp_path / name
    out.write_text(text.replace("/opt/fedmq/venv/bin/python", sys.executable))
    return out


def _unit(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string((DEPLOY / name).read_text())
    return parser


def exposure(unit: Path) -> float:
    """Overall exposure `systemd-analyze security --offline=yes` gives a unit file (0-10)."""
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies_cleanly(tmp_path, name):
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(_render(tmp_path, name,
                                                                                (DEPLOY / name).read_text()))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_exposure_is_at_most_2_and_the_check_sees_a_weaker_unit(tmp_path, name):
    text = (DEPLOY / name).read_text()
    assert exposure(_render(tmp_path, name, text)) <= MAX_EXPOSURE
    weak = "\n".join(line for line in text.splitlines() if not line.startswith(SANDBOX))
    assert exposure(_render(tmp_path, name, weak)) > MAX_EXPOSURE


@pytest.mark.parametrize("name", UNITS)
def test_documentation_links_name_files_install_sh_installs(name):
    links = _unit(name)["Unit"]["Documentation"].split()
    script = (DEPLOY / "install.sh").read_text()
    assert "DOC_DIR=/usr/share/doc/fedmq" in script and 'run install -m 0644 "$SRC"/docs/*.md' in script
    for link in links:
        assert link.startswith("file:///usr/share/doc/fedmq/"), link
        assert (ROOT / "docs" / link.rsplit("/", 1)[1]).is_file(), link


def test_coordinator_unit_runs_the_coordinator_with_systemds_state_and_credentials(tmp_path):
    svc = _unit("fedmq-coordinator.service")["Service"]
    assert svc["ExecStart"].endswith("-m fedmq.cli coordinator run -c /etc/fedmq/coordinator.toml")
    assert svc["Restart"] == "on-failure" and svc["RestartPreventExitStatus"] == "2"
    text = (DEPLOY / "fedmq-coordinator.service").read_text()
    credentials = dict(line.split("=", 1)[1].split(":", 1) for line in text.splitlines()
                       if line.startswith("LoadCredential="))
    overrides = dict(line.split("=", 1)[1].split("=", 1) for line in text.splitlines()
                     if line.startswith("Environment=FEDMQ_COORDINATOR__"))
    assert overrides["FEDMQ_COORDINATOR__STATE_DIR"] == f"/var/lib/{svc['StateDirectory']}"
    # Every file override names a credential the unit loads; %d is $CREDENTIALS_DIRECTORY.
    cred_dir = tmp_path / "credentials"
    cred_dir.mkdir()
    environ = {}
    for key, value in overrides.items():
        if value.startswith("%d/"):
            assert value[3:] in credentials, key
            (cred_dir / value[3:]).write_text("x\n")
            environ[key] = value.replace("%d", str(cred_dir))
        else:
            environ[key] = str(tmp_path / "state")
    cfg = load_config(DEPLOY / "coordinator.toml.example", environ=environ)
    assert cfg.broker.password_file == str(cred_dir / "password")
    assert cfg.broker.cert_file == str(cred_dir / "client.crt") and cfg.broker.url.startswith("mqtts://")
