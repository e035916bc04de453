#!/usr/bin/env bash
# Provides a QEMU that has the vfio-user client (`-device vfio-user-pci`, QEMU >= 10.1)
# for `remote-hw bridge` (docs/bridge.md) and the packages its tests boot a stock Linux
# guest with. Idempotent: a second run finds the stamp and does nothing. Needs root.
#
# Why a chroot: Debian 12 ships QEMU 7.2 and bookworm-backports 10.0 (no vfio-user-pci);
# trixie-backports ships 11.1, which needs glibc >= 2.38, so it cannot run on the host.
# A debootstrap'ed trixie (minbase, ~150 MB with QEMU) holds it, the host's apt sources
# stay untouched, and `python -m remote_hw.bridge.qemu` runs that QEMU with /proc, /dev
# and the needed folders bind-mounted in a private mount namespace.
#
# Host packages (all --no-install-recommends):
#   debootstrap        builds the trixie chroot
#   linux-image-amd64  the stock kernel the bridge tests boot in the guest
#   busybox-static     the guest's userland (a static binary packed into an initramfs)
#   cpio               to inspect/repack initramfs images by hand (the tests pack in Python)
#   util-linux         unshare/mount for the wrapper's private mount namespace
#   ca-certificates    https mirrors, if the host's sources use one
#   libxml2-utils      xmllint: the tests validate docs/bridge.md's libvirt XML...
#   libvirt0           ...against libvirt's own schema (/usr/share/libvirt/schemas)
# Chroot packages: qemu-system-x86 from trixie-backports (it pulls qemu-system-common,
# qemu-system-data, seabios, ipxe-qemu as dependencies; recommends are skipped).
#
# Environment: REMOTE_HW_QEMU_ROOT (default /var/lib/remote-hw/trixie),
#              REMOTE_HW_DEBIAN_MIRROR (default: the host's Debian mirror).
set -euo pipefail

say() { echo "install_qemu: $*"; }

ROOT=${REMOTE_HW_QEMU_ROOT:-/var/lib/remote-hw/trixie}
STAMP=$ROOT/.remote-hw-qemu-ready
HOST_PACKAGES=(debootstrap linux-image-amd64 busybox-static cpio util-linux ca-certificates
               libxml2-utils libvirt0)

if [ "$(id -u)" != 0 ]; then
  say "not root: skipping the vfio-user QEMU (the bridge tests will be skipped)"
  exit 0
fi

missing=()
for p in "${HOST_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || say "apt-get update failed; trying the install anyway"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -f "$STAMP" ] && [ -x "$ROOT/usr/bin/qemu-system-x86_64" ]; then
  say "ready: $(cat "$STAMP") in $ROOT"
  exit 0
fi

# The host's own Debian mirror (deb822 .sources or one-line .list), never a
# security or foreign repository.
host_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    grep -Eo '(URIs:[[:space:]]*|^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)[a-z]+://[^[:space:]]+' "$f" \
      | grep -Eo '[a-z]+://[^[:space:]]+' | grep -E '/debian/?$' | grep -v security || true
  done | head -n 1
}
MIRROR=${REMOTE_HW_DEBIAN_MIRROR:-$(host_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
MIRROR=${MIRROR%/}

# Nothing may be mounted inside ROOT before we remove or populate it.
if grep -qs " $ROOT/" /proc/mounts; then
  say "something is mounted under $ROOT; unmount it first" >&2
  grep " $ROOT/" /proc/mounts >&2
  exit 1
fi

# A finished debootstrap leaves apt-get and removes ROOT/debootstrap; anything else is a
# half-made tree from an interrupted run: start it again.
if [ -d "$ROOT" ] && { [ -d "$ROOT/debootstrap" ] || [ ! -x "$ROOT/usr/bin/apt-get" ]; }; then
  say "removing an unfinished chroot in $ROOT"
  rm -rf --one-file-system "$ROOT"
fi
if [ ! -d "$ROOT" ]; then
  say "debootstrap --variant=minbase trixie $ROOT $MIRROR (a few minutes)"
  mkdir -p "$(dirname "$ROOT")"
  debootstrap --variant=minbase trixie "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 || {
    say "debootstrap failed; see $ROOT.debootstrap.log" >&2; exit 1; }
fi

# trixie-backports for the chroot only (the host's sources are never touched).
echo "deb $MIRROR trixie-backports main" > "$ROOT/etc/apt/sources.list.d/trixie-backports.list"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true

say "apt-get install -t trixie-backports qemu-system-x86 in the chroot"
unshare --mount --propagation private -- sh -eu -c '
  mount -t proc proc "$1/proc"
  mount --rbind /dev "$1/dev"  # /dev/pts for apt/dpkg logs
  export DEBIAN_FRONTEND=noninteractive LC_ALL=C
  chroot "$1" apt-get update -q >/dev/null
  chroot "$1" apt-get install -y -q --no-install-recommends -t trixie-backports qemu-system-x86 >/dev/null
  chroot "$1" apt-get clean
' install_qemu "$ROOT"

if ! chroot "$ROOT" qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vfio-user-pci"'; then
  say "the chroot's QEMU has no vfio-user-pci device" >&2
  exit 1
fi
version=$(chroot "$ROOT" qemu-system-x86_64 --version | head -n 1)
echo "$version" > "$STAMP"
say "ready: $version in $ROOT"
