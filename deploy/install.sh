#!/usr/bin/env bash
# Install a fedmq edge client (or coordinator) as a systemd service on a 64-bit
# Raspberry Pi OS or NVIDIA Jetson (JetPack) device, or any 64-bit Debian-like host.
# Run as root from a checkout of fedmq:
#
#   sudo deploy/install.sh                      # edge client; detects the platform
#   sudo deploy/install.sh --role coordinator   # coordinator
#   deploy/install.sh --dry-run                 # print what it would do; changes nothing
#   sudo FEDMQ_TORCH_WHEEL=/path/torch-...-linux_aarch64.whl deploy/install.sh   # Jetson GPU wheel
#   sudo deploy/install.sh --uv-python          # system Python older than 3.11
#   sudo FEDMQ_EXTRAS=dp deploy/install.sh       # a device in differentially private secure rounds
#
# What it does:
#   1. checks for 64-bit Linux (32-bit Pi OS has no torch wheels) and Python >= 3.11.
#      Older Python (Debian 11, JetPack 5 images): it uses python3.11+ if one is on PATH;
#      else, with --uv-python, it pip-installs uv into a bootstrap venv and runs
#      `uv python install 3.11` into $PREFIX/python; else it stops and says so;
#   2. creates a virtual environment in /opt/fedmq/venv (FEDMQ_PREFIX to change /opt/fedmq);
#   3. installs torch for the platform:
#        - Raspberry Pi / generic aarch64 or x86_64: CPU-only wheels from the PyTorch CPU
#          index (https://download.pytorch.org/whl/cpu). From torch 2.11 the aarch64 wheels
#          on PyPI depend on CUDA packages (gigabytes, useless on a Pi); up to 2.10 they
#          were CPU-only, so FEDMQ_TORCH_SPEC="torch<=2.10" from PyPI also works;
#        - Jetson with FEDMQ_TORCH_WHEEL: NVIDIA's wheel built for the installed JetPack
#          (https://docs.nvidia.com/deeplearning/frameworks/install-pytorch-jetson-platform/);
#        - Jetson without it: the CPU build from the PyTorch CPU index, said so on the
#          way. fedmq trains on the CPU (the models are small); NVIDIA's wheel only adds
#          the GPU;
#   4. installs fedmq itself (from this checkout) and onnxruntime (aarch64 wheels exist);
#   5. installs the unit (DynamicUser=yes: no system user to create), the documentation
#      in /usr/share/doc/fedmq (the unit's Documentation= link), the configuration
#      template /etc/fedmq/edge.toml or coordinator.toml (kept if present) and the
#      credential folder /etc/fedmq/credentials (root only; the unit hands the files over
#      by LoadCredential=);
#   6. enables the unit; it is started only when FEDMQ_START=1 (edit the TOML first).
#
# Environment: FEDMQ_PREFIX, FEDMQ_PYTHON (interpreter to start from, default python3),
# FEDMQ_TORCH_WHEEL, FEDMQ_TORCH_SPEC, FEDMQ_UNIT_DIR (default /etc/systemd/system),
# FEDMQ_START; FEDMQ_PLATFORM (jetson, raspberrypi or generic) and FEDMQ_ARCH override
# the detection, e.g. to see with --dry-run what the script does on another device.
set -euo pipefail

PREFIX=${FEDMQ_PREFIX:-/opt/fedmq}
VENV="$PREFIX/venv"
PYTHON=${FEDMQ_PYTHON:-python3}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UNIT_DIR=${FEDMQ_UNIT_DIR:-/etc/systemd/system}
CONF_DIR=/etc/fedmq
DOC_DIR=/usr/share/doc/fedmq
CPU_INDEX=https://download.pytorch.org/whl/cpu
MIN_PYTHON=3.11

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

dry_run=0
role=edge
uv_python=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --uv-python) uv_python=1 ;;
    --role) [ $# -ge 2 ] || die "--role needs a value: edge or coordinator"; role=$2; shift ;;
    --role=*) role=${1#--role=} ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1: expected --dry-run, --role edge|coordinator, --uv-python or --help" ;;
  esac
  shift
done
case "$role" in
  edge) app_module=edge_client.agent ;;
  coordinator) app_module=coordinator.service ;;
  *) die "--role $role is unknown: expected edge or coordinator" ;;
esac

# run CMD...: run it, or with --dry-run print it (shell-quoted) and carry on.
run() {
  if [ "$dry_run" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

if [ "$dry_run" = 1 ]; then
  say "dry run: printing the commands, changing nothing"
else
  [ "$(id -u)" -eq 0 ] || die "run as root (sudo), or use --dry-run to see what it would do"
fi

arch=${FEDMQ_ARCH:-$(uname -m)}
case "$arch" in
  aarch64|x86_64) ;;
  armv7l|armv6l) die "32-bit ARM ($arch) has no torch wheels: install 64-bit Raspberry Pi OS" ;;
  *) die "unsupported architecture $arch: expected aarch64 or x86_64" ;;
esac

platform=${FEDMQ_PLATFORM:-}
if [ -z "$platform" ]; then
  platform=generic
  if [ -f /etc/nv_tegra_release ] || grep -qi jetson /proc/device-tree/model 2>/dev/null; then
    platform=jetson
  elif grep -qi "raspberry pi" /proc/device-tree/model 2>/dev/null; then
    platform=raspberrypi
  fi
fi
case "$platform" in
  jetson|raspberrypi|generic) ;;
  *) die "FEDMQ_PLATFORM=$platform is unknown: expected jetson, raspberrypi or generic" ;;
esac
say "role $role, platform $platform ($arch), prefix $PREFIX"

# Python version as MAJOR.MINOR, empty when the interpreter cannot run.
py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }
# new_enough X.Y: X.Y >= MIN_PYTHON.
new_enough() { [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$MIN_PYTHON" "$1" | sort -V | head -n1)" = "$MIN_PYTHON" ]; }

version=$(py_version "$PYTHON")
[ -n "$version" ] || die "$PYTHON does not run: install python3 or set FEDMQ_PYTHON"
if ! new_enough "$version"; then
  found=
  for candidate in python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null && new_enough "$(py_version "$candidate")"; then
      found=$(command -v "$candidate"); break
    fi
  done
  if [ -n "$found" ]; then
    say "$PYTHON is Python $version (fedmq needs >= $MIN_PYTHON, for tomllib): using $found"
    PYTHON=$found
  elif [ "$uv_python" = 1 ]; then
    say "$PYTHON is Python $version (fedmq needs >= $MIN_PYTHON): installing Python $MIN_PYTHON with uv" \
        "(pip-installed into $PREFIX/bootstrap) into $PREFIX/python"
    run "$PYTHON" -m venv "$PREFIX/bootstrap"
    run "$PREFIX/bootstrap/bin/pip" install uv
    run env UV_PYTHON_INSTALL_DIR="$PREFIX/python" "$PREFIX/bootstrap/bin/uv" python install "$MIN_PYTHON"
    if [ "$dry_run" = 1 ]; then
      PYTHON="$PREFIX/python/<cpython-$MIN_PYTHON>/bin/python$MIN_PYTHON"
    else
      PYTHON=$(env UV_PYTHON_INSTALL_DIR="$PREFIX/python" "$PREFIX/bootstrap/bin/uv" python find "$MIN_PYTHON")
    fi
  else
    die "$PYTHON is Python $version; fedmq needs >= $MIN_PYTHON (tomllib). Install python$MIN_PYTHON from the" \
        "distribution, set FEDMQ_PYTHON to one, or rerun with --uv-python to have uv install Python $MIN_PYTHON" \
        "(pip install uv; uv python install $MIN_PYTHON) into $PREFIX/python"
  fi
fi

run mkdir -p "$PREFIX"
run "$PYTHON" -m venv "$VENV"
run "$VENV/bin/pip" install --upgrade pip wheel

if [ -n "${FEDMQ_TORCH_WHEEL:-}" ]; then
  [ -f "$FEDMQ_TORCH_WHEEL" ] || die "FEDMQ_TORCH_WHEEL=$FEDMQ_TORCH_WHEEL is not a file: expected a torch-*.whl"
  [ "$platform" = jetson ] || say "installing the torch wheel $FEDMQ_TORCH_WHEEL on a $platform device as asked"
  run "$VENV/bin/pip" install "$FEDMQ_TORCH_WHEEL"
elif [ -n "${FEDMQ_TORCH_SPEC:-}" ]; then
  run "$VENV/bin/pip" install "$FEDMQ_TORCH_SPEC"
else
  if [ "$platform" = jetson ]; then
    say "Jetson without FEDMQ_TORCH_WHEEL: installing the CPU build of torch from $CPU_INDEX." \
        "fedmq trains on the CPU; for the GPU, install NVIDIA's wheel for your JetPack and Python" \
        "(FEDMQ_TORCH_WHEEL=/path/to/torch-*.whl)"
  fi
  run "$VENV/bin/pip" install --index-url "$CPU_INDEX" torch
fi
# fedmq's own dependencies; torch is already satisfied, so pip keeps the one chosen above.
# FEDMQ_EXTRAS (comma-separated extras, e.g. "dp": OpenDP's sampler for private secure rounds).
if [ -n "${FEDMQ_EXTRAS:-}" ]; then
  run "$VENV/bin/pip" install "$SRC[$FEDMQ_EXTRAS]"
else
  run "$VENV/bin/pip" install "$SRC"
fi
run "$VENV/bin/python" -c "import torch, onnxruntime, $app_module; print('torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"

run install -d -m 0755 "$DOC_DIR"
run install -m 0644 "$SRC"/docs/*.md "$SRC/README.md" "$DOC_DIR/"
run install -d -m 0755 "$CONF_DIR"
run install -d -m 0700 "$CONF_DIR/credentials"
if [ "$role" = edge ]; then
  template=edge.toml
  credentials="username password ca.crt client.crt client.key"
  source_hint="'fedmq broker add-device NAME --cert' (devices/NAME/)"
else
  template=coordinator.toml
  credentials="password ca.crt client.crt client.key"
  source_hint="'fedmq broker add-coordinator NAME --cert' (coordinators/NAME/)"
fi
unit=fedmq-$role.service
if [ ! -e "$CONF_DIR/$template" ]; then
  run install -m 0644 "$SRC/deploy/$template.example" "$CONF_DIR/$template"
  say "writes $CONF_DIR/$template from the template: edit it (see $DOC_DIR)"
fi
for cred in $credentials; do
  [ -e "$CONF_DIR/credentials/$cred" ] || say "copy $cred from $source_hint to $CONF_DIR/credentials/"
done
run install -m 0644 "$SRC/deploy/$unit" "$UNIT_DIR/$unit"
run sed -i "s#/opt/fedmq/venv#$VENV#g" "$UNIT_DIR/$unit"
run systemctl daemon-reload
run systemctl enable "$unit"
if [ "${FEDMQ_START:-0}" = 1 ]; then
  run systemctl restart "$unit"
  say "started; follow with: journalctl -fu ${unit%.service}"
else
  say "enabled; edit $CONF_DIR/$template, then: systemctl start ${unit%.service}"
fi
