#!/bin/bash
# A minimal Debian root with systemd as init at $ROOT, from the apt mirror this
# machine is configured with. SUITE=bookworm (Debian 12) unless given.
set -euo pipefail
ROOT=${ROOT:?the directory to fill}
SUITE=${SUITE:-bookworm}
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=$(grep -rhoE 'https?://[^ ]+/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -1)
[ -n "$MIRROR" ] || { echo "vm: no Debian mirror in this machine's apt sources" >&2; exit 1; }
rm -rf "$ROOT"; mkdir -p "$ROOT"
debootstrap --variant=minbase \
  --include=systemd-sysv,systemd,udev,dbus,dbus-user-session,libpam-systemd,python3,python3-venv,iproute2,procps,ca-certificates,kmod,initramfs-tools,curl,linux-base,util-linux \
  "$SUITE" "$ROOT" "$MIRROR"
