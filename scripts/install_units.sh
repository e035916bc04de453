#!/usr/bin/env bash
# Install remote-hw's udev rules and systemd units (idempotent; safe to run again).
#
#   scripts/install_units.sh [--root DIR] [--bin PATH] [--enable server|agent]...
#
#   --root DIR     install under DIR instead of / (staging, packaging, tests); nothing
#                  is reloaded or enabled then
#   --bin PATH     the remote-hw executable the units run through
#                  /usr/local/bin/remote-hw (default: this checkout's .venv, made by
#                  scripts/install.sh, else the remote-hw on PATH)
#   --enable NAME  enable and (re)start remote-hw-NAME.service (server or agent)
#
# Installs:
#   /etc/udev/rules.d/90-remote-hw-export.rules   starts exports (replaced on update)
#   /etc/udev/rules.d/70-remote-hw-local.rules    the admin's matches (kept if present)
#   /etc/systemd/system/remote-hw-server.service, remote-hw-agent.service,
#                       remote-hw-export@.service
#   /etc/remote-hw/server.env, agent.env, export.env   (kept if present)
#   /usr/local/bin/remote-hw -> --bin               (unless it is already that)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

ROOT=""
BIN=""
ENABLE=()
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --bin) BIN=${2:?--bin needs a path}; shift 2 ;;
    --enable)
      case "${2:-}" in
        server|agent) ENABLE+=("$2") ;;
        *) echo "install_units: --enable takes server or agent, not '${2:-}'" >&2; exit 2 ;;
      esac
      shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "install_units: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
ROOT=${ROOT%/}

if [ -z "$BIN" ]; then
  if [ -x "$REPO/.venv/bin/remote-hw" ]; then
    BIN="$REPO/.venv/bin/remote-hw"
  elif command -v remote-hw >/dev/null 2>&1; then
    BIN=$(command -v remote-hw)
  else
    echo "install_units: no remote-hw executable: run scripts/install.sh first or pass --bin" >&2
    exit 1
  fi
fi
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
  echo "install_units: run as root to install into /etc (or use --root DIR)" >&2
  exit 1
fi

changed=0
put() {   # put SRC DEST MODE [keep]: install SRC at ROOT/DEST unless identical / kept
  local src=$1 dest=$ROOT$2 mode=$3 keep=${4:-}
  if [ -e "$dest" ] && { [ -n "$keep" ] || cmp -s "$src" "$dest"; }; then
    return
  fi
  install -D -m "$mode" "$src" "$dest"
  echo "install_units: wrote $2"
  changed=1
}

put udev_rules/90-remote-hw-export.rules /etc/udev/rules.d/90-remote-hw-export.rules 0644
put udev_rules/70-remote-hw-local.rules /etc/udev/rules.d/70-remote-hw-local.rules 0644 keep
for unit in remote-hw-server.service remote-hw-agent.service remote-hw-export@.service; do
  put "scripts/systemd/$unit" "/etc/systemd/system/$unit" 0644
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/server.env" <<'EOF'
# Options for `remote-hw server` (remote-hw-server.service). Example:
# REMOTE_HW_SERVER_ARGS=--listen 0.0.0.0:7700 --server-id a --device uart0=uart16550,backend=tcp:127.0.0.1:7701 --device rtc0=cmos-rtc
REMOTE_HW_SERVER_ARGS=--listen 127.0.0.1:7700 --server-id a --device uart0=uart16550,backend=tcp:127.0.0.1:7701 --device rtc0=cmos-rtc
EOF
cat > "$tmp/agent.env" <<'EOF'
# Extra options for `remote-hw agent --config /etc/remote-hw/agent.toml`
# (remote-hw-agent.service, which starts only once agent.toml exists).
REMOTE_HW_AGENT_ARGS=
EOF
cat > "$tmp/export.env" <<'EOF'
# Options for every `remote-hw export` started by udev (remote-hw-export@.service);
# export-<kernel name>.env next to this file adds options for one port. Options win
# over the REMOTE_HW_* properties of the udev rule. Example:
# REMOTE_HW_EXPORT_ARGS=--listen 0.0.0.0:7711 --device-id uart1
REMOTE_HW_EXPORT_ARGS=
EOF
for f in server.env agent.env export.env; do
  put "$tmp/$f" "/etc/remote-hw/$f" 0644 keep
done

link=$ROOT/usr/local/bin/remote-hw
if [ "$BIN" != /usr/local/bin/remote-hw ] && [ "$(readlink "$link" 2>/dev/null || true)" != "$BIN" ]; then
  if [ -e "$link" ] && [ ! -L "$link" ]; then
    echo "install_units: $link exists and is not a link; leaving it (units run it)" >&2
  else
    mkdir -p "$(dirname "$link")"
    ln -sfn "$BIN" "$link"
    echo "install_units: /usr/local/bin/remote-hw -> $BIN"
  fi
fi

if [ -n "$ROOT" ]; then
  echo "install_units: installed under $ROOT (nothing reloaded)"
  exit 0
fi

if udevadm control --ping >/dev/null 2>&1; then
  udevadm control --reload
  # Devices already present get their rules applied now, and their exports start.
  udevadm trigger --action=add --subsystem-match=tty
else
  echo "install_units: udevd is not running here; the rules take effect when it starts"
fi
if [ -d /run/systemd/system ]; then
  if [ "$changed" = 1 ]; then systemctl daemon-reload; fi
  for name in "${ENABLE[@]}"; do
    systemctl enable "remote-hw-$name.service"
    systemctl restart "remote-hw-$name.service"
    echo "install_units: remote-hw-$name.service enabled and started"
  done
else
  echo "install_units: systemd is not running here; units installed but not loaded"
  if [ ${#ENABLE[@]} -gt 0 ]; then
    echo "install_units: cannot enable ${ENABLE[*]} without systemd" >&2
    exit 1
  fi
fi
echo "install_units: done"
