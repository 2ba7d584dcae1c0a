#!/usr/bin/env bash
# Install the fedmq edge client as a systemd service on a 64-bit Raspberry Pi OS or
# NVIDIA Jetson (JetPack) device. Run as root from a checkout of fedmq:
#
#   sudo deploy/install.sh                 # detect the platform
#   sudo FEDMQ_TORCH_WHEEL=/path/torch-...-linux_aarch64.whl deploy/install.sh   # Jetson
#
# What it does:
#   1. checks for 64-bit Linux (32-bit Pi OS has no torch wheels) and Python >= 3.11;
#   2. creates a virtual environment in /opt/fedmq/venv (FEDMQ_PREFIX to change /opt/fedmq);
#   3. installs torch for the platform:
#        - Raspberry Pi / generic aarch64 or x86_64: CPU-only wheels from the PyTorch CPU
#          index (https://download.pytorch.org/whl/cpu). From torch 2.11 the aarch64 wheels
#          on PyPI depend on CUDA packages (gigabytes, useless on a Pi); up to 2.10 they
#          were CPU-only, so FEDMQ_TORCH_SPEC="torch<=2.10" from PyPI also works;
#        - Jetson: torch must come from NVIDIA's wheels built for the installed JetPack
#          (see https://docs.nvidia.com/deeplearning/frameworks/install-pytorch-jetson-platform/
#          or the jetson-ai-lab pip index). Download the wheel matching JetPack and the
#          venv's Python and pass it as FEDMQ_TORCH_WHEEL; without it the script stops;
#   4. installs fedmq itself (from this checkout) and onnxruntime (aarch64 wheels exist);
#   5. installs the unit (DynamicUser=yes: no system user to create), the configuration
#      template /etc/fedmq/edge.toml (kept if present) and the credential folder
#      /etc/fedmq/credentials (root only; the unit hands the files over by LoadCredential=);
#   6. enables the unit; it is started only when FEDMQ_START=1 (edit edge.toml first).
set -euo pipefail

PREFIX=${FEDMQ_PREFIX:-/opt/fedmq}
VENV="$PREFIX/venv"
PYTHON=${FEDMQ_PYTHON:-python3}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UNIT_DIR=${FEDMQ_UNIT_DIR:-/etc/systemd/system}
CONF_DIR=/etc/fedmq

die() { echo "install.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo)"
arch=$(uname -m)
case "$arch" in
  aarch64|x86_64) ;;
  armv7l|armv6l) die "32-bit ARM ($arch) has no torch wheels: install 64-bit Raspberry Pi OS" ;;
  *) die "unsupported architecture $arch" ;;
esac
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is older than 3.11 (fedmq needs tomllib): install python3.11 or set FEDMQ_PYTHON"

platform=generic
if [ -f /etc/nv_tegra_release ] || grep -qi jetson /proc/device-tree/model 2>/dev/null; then
  platform=jetson
elif grep -qi "raspberry pi" /proc/device-tree/model 2>/dev/null; then
  platform=raspberrypi
fi
echo "install.sh: platform $platform ($arch), prefix $PREFIX"

mkdir -p "$PREFIX"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip wheel

if [ "$platform" = jetson ]; then
  [ -n "${FEDMQ_TORCH_WHEEL:-}" ] || die "Jetson: download NVIDIA's torch wheel for your JetPack release and Python $("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') and set FEDMQ_TORCH_WHEEL=/path/to/torch-*.whl"
  "$VENV/bin/pip" install "$FEDMQ_TORCH_WHEEL"
elif [ -n "${FEDMQ_TORCH_SPEC:-}" ]; then
  "$VENV/bin/pip" install "$FEDMQ_TORCH_SPEC"
else
  "$VENV/bin/pip" install --index-url https://download.pytorch.org/whl/cpu torch
fi
# fedmq's own dependencies; torch is already satisfied, so pip keeps the one chosen above.
"$VENV/bin/pip" install "$SRC"
"$VENV/bin/python" -c "import torch, onnxruntime, edge_client.agent; print('torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"

install -d -m 0755 "$CONF_DIR"
install -d -m 0700 "$CONF_DIR/credentials"
if [ ! -e "$CONF_DIR/edge.toml" ]; then
  install -m 0644 "$SRC/deploy/edge.toml.example" "$CONF_DIR/edge.toml"
  echo "install.sh: wrote $CONF_DIR/edge.toml from the template: set device_id, federation, task, data, broker_url"
fi
for cred in username password ca.crt client.crt client.key; do
  [ -e "$CONF_DIR/credentials/$cred" ] || \
    echo "install.sh: copy $cred from 'fedmq broker add-device NAME --cert' (devices/NAME/) to $CONF_DIR/credentials/"
done
install -m 0644 "$SRC/deploy/fedmq-edge.service" "$UNIT_DIR/fedmq-edge.service"
sed -i "s#/opt/fedmq/venv#$VENV#g" "$UNIT_DIR/fedmq-edge.service"
systemctl daemon-reload
systemctl enable fedmq-edge.service
if [ "${FEDMQ_START:-0}" = 1 ]; then
  systemctl restart fedmq-edge.service
  echo "install.sh: started; follow with: journalctl -fu fedmq-edge"
else
  echo "install.sh: enabled; edit $CONF_DIR/edge.toml, then: systemctl start fedmq-edge"
fi
