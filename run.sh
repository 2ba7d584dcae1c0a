#!/usr/bin/env bash
# fedmq: the two commands of a fresh checkout.
#
#   ./run.sh demo [fedmq demo flags...]   # the demo federation (embedded broker, 10 device processes)
#   ./run.sh test [pytest args...]        # the test suite (real mosquitto + embedded broker)
#
# Both create .venv (Python 3.11+) and install fedmq with its dependencies on first use.
# torch is pinned to a CPU build: 2.13.0, with the PyTorch CPU index as an extra index, so
# that pip takes the "+cpu" wheel where it is available instead of several GB of CUDA
# packages. `test` also installs mosquitto, Chromium, Prometheus and RabbitMQ (Debian/Ubuntu packages)
# when they are missing.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_SPEC="torch==2.13.0"
TORCH_CPU_INDEX="${FEDMQ_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
VENV="${FEDMQ_VENV:-.venv}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "error: need root (or sudo) to run: $*" >&2; exit 1; fi
}

apt_install() {
    command -v apt-get >/dev/null || { echo "error: $* missing and apt-get not available; install it by hand" >&2; exit 1; }
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_venv() {
    local py="${PYTHON:-python3}"
    if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        echo "error: fedmq needs Python 3.11 or newer as '$py' (set PYTHON=/path/to/python3.11)" >&2; exit 1
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        "$py" -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; rm -rf "$VENV"; "$py" -m venv "$VENV"; }
    fi
    local stamp="$VENV/.fedmq-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        # The CPU index only where it answers: an unreachable index costs retries per package.
        local extra=()
        if "$VENV/bin/python" - "$TORCH_CPU_INDEX" <<'PY' 2>/dev/null; then extra=(--extra-index-url "$TORCH_CPU_INDEX"); fi
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
socket.setdefaulttimeout(5)
socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80))).close()
PY
        "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" "${extra[@]}"
        "$VENV/bin/python" -m pip install -q -e ".[test]"
        touch "$stamp"
    fi
}

ensure_test_tools() {
    # Real parts for the tests: mosquitto (brokers), Chromium (the run report is rendered
    # headless), Prometheus (scrapes the coordinator's metrics; the tests run the binary,
    # never the system service), RabbitMQ (a broker cluster). Installed together so that
    # apt runs once.
    local missing=()
    if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then missing+=(mosquitto mosquitto-clients); fi
    if ! command -v chromium >/dev/null; then missing+=(chromium); fi
    if [ ! -x /usr/bin/prometheus ]; then missing+=(prometheus); fi
    # RabbitMQ (with its MQTT plugin) for the broker-cluster test; the test starts its own
    # nodes on loopback from /usr/lib/rabbitmq/bin, never the system service.
    if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then missing+=(rabbitmq-server); fi
    if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
    demo)
        ensure_venv
        exec "$VENV/bin/fedmq" demo "$@" ;;
    test)
        ensure_venv
        ensure_test_tools
        # Two test processes (pytest-xdist; FEDMQ_TEST_WORKERS to change it): most tests wait on
        # brokers and device processes, so two overlap well even on 2 cores. Torch keeps to one
        # thread per process.
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
        exec "$VENV/bin/python" -m pytest -q -n "${FEDMQ_TEST_WORKERS:-2}" "$@" ;;
    *)
        echo "usage: ./run.sh demo [flags]   |   ./run.sh test [pytest args]" >&2; exit 2 ;;
esac
