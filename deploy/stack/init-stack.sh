#!/usr/bin/env bash
# Credentials, TLS and configuration of the local compose stack (deploy/stack/compose.yml),
# made once into $FEDMQ_STACK_DIR (default /stack, the compose volume) by the `init`
# service; a second run finds the marker and changes nothing.
#
#   FEDMQ_STACK_DIR     folder to fill (default /stack)
#   FEDMQ_STACK_DEVICES number of devices, dev-1 ... dev-N (default 3; compose.yml runs 3)
#   FEDMQ_FEDERATION    federation id (default stack)
#   FEDMQ_ROUNDS        rounds the coordinator runs (default 20)
#   FEDMQ               the fedmq command (default fedmq)
#   FEDMQ_BROKER_GID    group the broker reads its secrets through (default 1883, the
#                       eclipse-mosquitto image's; empty: leave groups alone)
#   FEDMQ_APP_UID       owner of the coordinator's and devices' folders (default 10001,
#                       the fedmq image's user; empty: leave owners alone)
#
# Layout: ca/ (the CA key: only this service mounts it), broker/ (mounted as the broker's
# /mosquitto/config: auth/passwd, auth/acl, certs/ca.crt, server.crt, server.key),
# coordinator/ (credentials, coordinator.toml, test.npz), devices/dev-N/ (credentials,
# edge.toml, data.npz). Every account uses mutual TLS with a certificate whose CN is its
# name, as the shipped broker configuration requires.
set -euo pipefail

STACK=${FEDMQ_STACK_DIR:-/stack}
DEVICES=${FEDMQ_STACK_DEVICES:-3}
FED=${FEDMQ_FEDERATION:-stack}
ROUNDS=${FEDMQ_ROUNDS:-20}
BROKER_GID=${FEDMQ_BROKER_GID-1883}
APP_UID=${FEDMQ_APP_UID-10001}
read -r -a FEDMQ_CMD <<< "${FEDMQ:-fedmq}"
MARKER="$STACK/.fedmq-stack"

die() { echo "init-stack.sh: $*" >&2; exit 1; }
[[ "$DEVICES" =~ ^[1-9][0-9]{0,3}$ ]] || die "FEDMQ_STACK_DEVICES=$DEVICES: expected a count 1..9999"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "FEDMQ_ROUNDS=$ROUNDS: expected a count >= 1"
if [ -e "$MARKER" ]; then
  echo "init-stack.sh: $STACK already initialised ($MARKER); keeping its credentials"
  exit 0
fi
mkdir -p "$STACK"
[ -z "$(ls -A "$STACK")" ] || die "$STACK is not empty and has no $MARKER: refusing to write into it"

umask 077
broker=(--passwd-file "$STACK/broker/auth/passwd" --acl-file "$STACK/broker/auth/acl" --ca-dir "$STACK/ca"
        --federation "$FED" --cert --hasher fedmq --broker-url mqtts://mosquitto:8883)
"${FEDMQ_CMD[@]}" broker init-ca "$STACK/ca" --hostname mosquitto --hostname localhost --hostname 127.0.0.1
"${FEDMQ_CMD[@]}" broker add-coordinator coordinator "${broker[@]}" --out-dir "$STACK/coordinator" > /dev/null
for i in $(seq 1 "$DEVICES"); do
  dev="dev-$i"
  snippet=$("${FEDMQ_CMD[@]}" broker add-device "$dev" "${broker[@]}" --out-dir "$STACK/devices/$dev")
  # Top-level options first: add-device prints a [broker] table, which takes every key after it.
  cat > "$STACK/devices/$dev/edge.toml" <<TOML
task = "digits-mlp"
data = "data.npz"
state_dir = "state"
torch_threads = 1
seed = $i
$snippet
TOML
done
cat > "$STACK/coordinator/coordinator.toml" <<TOML
# The local stack's coordinator (deploy/stack/init-stack.sh); reference: docs/coordinator.md.
federation = "$FED"
task = "digits-mlp"
rounds = $ROUNDS
state_dir = "state"

[broker]
url = "mqtts://mosquitto:8883"
username = "coordinator"
password_file = "password"
ca_file = "ca.crt"
cert_file = "client.crt"
key_file = "client.key"

[round]
devices_per_round = $DEVICES
min_updates = 1
deadline_s = 60
wait_for_devices_s = 300
min_devices = $DEVICES

[evaluation]
data = "test.npz"

# Prometheus (deploy/stack/prometheus.yml) scrapes coordinator:9464 over the compose
# network; the port is not published on the host.
[metrics]
port = 9464
address = "0.0.0.0"
TOML
# Each device's share of the digits train set (the demo's IID split), and the test set.
python3 - "$STACK" "$DEVICES" <<'PY'
import sys
from pathlib import Path

from fedmq.data import digits_split, partition, save_npz_atomic

stack, devices = Path(sys.argv[1]), int(sys.argv[2])
x_train, y_train, x_test, y_test = digits_split()
save_npz_atomic(stack / "coordinator" / "test.npz", x_test, y_test)
for i, rows in enumerate(partition(y_train, devices, "iid"), start=1):
    save_npz_atomic(stack / "devices" / f"dev-{i}" / "data.npz", x_train[rows], y_train[rows])
PY

mkdir -p "$STACK/broker/certs"
for f in ca.crt server.crt server.key; do
  cp "$STACK/ca/$f" "$STACK/broker/certs/$f"
done
chmod 0644 "$STACK/broker/certs/ca.crt" "$STACK/broker/certs/server.crt"
chmod 0600 "$STACK/broker/certs/server.key"
if [ -n "$BROKER_GID" ]; then
  # The image's mosquitto (uid/gid 1883) reads the password file and server key through their group.
  chgrp "$BROKER_GID" "$STACK/broker" "$STACK/broker/auth" "$STACK/broker/certs" "$STACK/broker/auth/passwd" \
    "$STACK/broker/certs/server.key"
  chmod 0750 "$STACK/broker" "$STACK/broker/auth" "$STACK/broker/certs"
  chmod 0640 "$STACK/broker/auth/passwd" "$STACK/broker/certs/server.key"
fi
if [ -n "$APP_UID" ]; then
  chown -R "$APP_UID" "$STACK/coordinator" "$STACK/devices"
fi
chmod 0755 "$STACK"
echo "made by deploy/stack/init-stack.sh" > "$MARKER"
chmod 0644 "$MARKER"
echo "init-stack.sh: $STACK ready: CA, broker, coordinator and $DEVICES devices (federation $FED)"
