#!/usr/bin/env bash
# Installs what remote-hw's eBPF probes (`remote-hw trace`, `remote-hw top`, the agent's
# probe session) need: bcc's Python module, its tools and kernel headers. Idempotent:
# installs only what is missing and leaves correct links alone. Needs root.
#
# bcc compiles the probes against /lib/modules/$(uname -r)/build. When the running
# kernel has no headers of its own (a custom kernel, as on this project's machines),
# the newest installed Debian headers are linked in their place: the kvm tracepoints'
# argument layouts the probes read come from tracefs, not from the headers, so a
# near-enough header tree is all bcc needs to compile.
#
# Never fails the caller for a missing kernel tree: it prints why and exits 0, and the
# probe commands then say in one sentence why they cannot run.
set -euo pipefail

say() { echo "install_bpf: $*"; }

if [ "$(id -u)" != 0 ]; then
  say "not root: skipping bcc and kernel headers (probe commands will say they are unavailable)"
  exit 0
fi

PACKAGES=(python3-bpfcc bpfcc-tools linux-headers-amd64)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || say "apt-get update failed; trying the install anyway"
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
    say "could not install ${missing[*]}; probe commands will be unavailable"
    exit 0
  fi
fi

kver=$(uname -r)
moddir=/lib/modules/$kver

# tracefs (where bcc reads the tracepoints' formats) and bpffs (where the probes pin the
# maps the agent and `remote-hw trace`/`top` share). The probes mount them too if need
# be; mounting here makes a fresh machine ready at once.
if [ -d /sys/kernel/tracing ] && [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || say "could not mount tracefs"
fi
if [ -d /sys/fs/bpf ] && ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
  mount -t bpf bpf /sys/fs/bpf 2>/dev/null || say "could not mount bpffs"
fi

# The running kernel's own headers win: a real directory (not one of our links).
if [ -d "$moddir/build" ] && [ ! -L "$moddir/build" ]; then
  say "kernel $kver has its own headers"
  say "ready"
  exit 0
fi
if [ -d "/usr/src/linux-headers-$kver" ]; then
  mkdir -p "$moddir"
  if [ "$(readlink "$moddir/build" 2>/dev/null)" != "/usr/src/linux-headers-$kver" ]; then
    ln -sfn "/usr/src/linux-headers-$kver" "$moddir/build"
    say "linked $moddir/build -> /usr/src/linux-headers-$kver"
  fi
  say "ready"
  exit 0
fi

# Otherwise the newest installed Debian amd64 headers (by version order), with their
# -common tree as the source.
newest=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$newest" ]; then
  say "no /usr/src/linux-headers-*-amd64 installed; probe commands will be unavailable"
  exit 0
fi
common=${newest%-amd64}-common
mkdir -p "$moddir"
if [ "$(readlink "$moddir/build" 2>/dev/null)" != "$newest" ]; then
  ln -sfn "$newest" "$moddir/build"
  say "linked $moddir/build -> $newest (kernel $kver has no headers of its own)"
fi
if [ -d "$common" ] && [ "$(readlink "$moddir/source" 2>/dev/null)" != "$common" ]; then
  ln -sfn "$common" "$moddir/source"
  say "linked $moddir/source -> $common"
fi
say "ready"
