#!/usr/bin/env bash
# One idempotent set-up for remote-hw on Debian 12: system packages, then a project
# virtualenv in .venv with remote-hw installed in editable mode. Safe to run again and
# again: it installs only what is missing. Needs root for the system packages.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages by purpose: binutils builds the guests; iproute2 makes the network
# namespaces of the multi-host rig; etcd-server/etcd-client are the shared directory;
# fuse3/libfuse3 serve the FUSE view (mfusepy); udev/systemd check the export rules and
# units; vagrant with its libvirt provider plugin (a separate package, and only a
# "recommends" of vagrant, so it must be named) validates the Vagrantfile;
# gcc/linux-libc-dev build python-evdev; gcc/python3-dev build remote_hw.net._fastio (the C
# hot path); python3-venv makes .venv; git clones the tree for `make fresh-check`.
# tests/test_environment.py keeps this list honest: it fails naming the package when
# a tool the suite uses is missing.
APT_PACKAGES=(binutils iproute2 ca-certificates etcd-server etcd-client
              fuse3 libfuse3-3 udev util-linux systemd vagrant vagrant-libvirt gcc
              linux-libc-dev python3-dev python3-venv git)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: apt-get install ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then echo "install: run as root to install system packages" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc and kernel headers for the eBPF probes (docs/ebpf.md); never fails the set-up:
# without them only the probe commands are unavailable, and they say why.
bash scripts/install_bpf.sh
bash scripts/install_qemu.sh  # QEMU >= 10.1 (vfio-user-pci) in a trixie chroot, for `remote-hw bridge` (docs/bridge.md)

# The project's Python environment. The stamp records the hash of pyproject.toml,
# setup.py and the C sources, so a dependency change reinstalls, a changed extension is
# rebuilt, and an unchanged tree costs nothing.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "install: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.remote-hw-installed
want=$(cat pyproject.toml setup.py remote_hw/net/_fastio.c remote_hw/net/_sockio.h remote_hw/bridge/_fastvfu.c | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "install: pip install -e .[test]"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  echo "$want" > "$stamp"
fi
# The C hot path is optional (setup.py): say so when it did not build.
.venv/bin/python -c 'from remote_hw.net import fastio; ok, why = fastio.status(); ok or print("install: note: C fast path off:", why)'

# Guest programs are built from source on every install (cheap, reproducible).
if [ -x guests/build.sh ]; then
  bash guests/build.sh >/dev/null
fi
echo "install: ready"
