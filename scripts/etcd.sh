#!/usr/bin/env bash
# A single-member etcd for the remote-hw directory, in the foreground.
#
#   scripts/etcd.sh [HOST [DATA_DIR]]
#
# Clients (remote-hw servers: --directory http://HOST:2379) reach it on HOST:2379; its
# peer port stays on the loopback. Debian's etcd-server provides the binary (the
# install script installs it).
set -euo pipefail
host=${1:-127.0.0.1}
data=${2:-/var/lib/remote-hw/etcd}
mkdir -p "$data"
exec etcd --name remote-hw --data-dir "$data" \
  --listen-client-urls "http://$host:2379" --advertise-client-urls "http://$host:2379" \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster remote-hw=http://127.0.0.1:2380 --log-level warn
