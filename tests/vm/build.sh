#!/bin/bash
# Builds the VM image for `make vm-test`: $VM/image.raw and, under $VM/boot,
# a kernel and initrd per kernel package (Debian 12's own, and Debian 13's
# newer one where the mirror serves it). Inputs: WHEEL (the plughost wheel of
# the checkout), SRC (the checkout: the shipped unit, the in-VM checks).
#
#   base system   debootstrap of Debian 12 with systemd as init, cached as
#                 $VM/cache/base-<key>.tar (the key hashes debootstrap.sh)
#   kernels       downloaded once into $VM/cache/kernels, installed in a chroot
#                 (their initramfs get virtio_pci, virtio_blk, ext4)
#   plughost      a venv at /opt/plughost with the wheel; plugin environments
#                 prepared in the chroot (the VM has no network)
#   checks        inside.sh + a oneshot unit that runs it at boot, then powers off
set -euo pipefail
H=$(dirname "$(readlink -f "$0")")
VM=${VM:?the VM work directory}; SRC=${SRC:?the checkout}; WHEEL=${WHEEL:?the wheel to test}
ROOT=$VM/root; CACHE=$VM/cache; SCALE=${VM_SCALE:-8}
ts() { echo "[vm build $(date +%T)] $*"; }
T0=$(date +%s)
mkdir -p "$CACHE/kernels" "$VM/boot"

key=$(sha256sum "$H/debootstrap.sh" | cut -c1-12)
BASE=$CACHE/base-$key.tar
if [ ! -f "$BASE" ]; then
  ts "debootstrap (once; cached as $BASE)"; t=$(date +%s)
  ROOT=$CACHE/base-new "$H/debootstrap.sh" > "$VM/debootstrap.log" 2>&1 || { tail -30 "$VM/debootstrap.log"; exit 1; }
  tar -C "$CACHE/base-new" -cf "$BASE.part" . && mv "$BASE.part" "$BASE" && rm -rf "$CACHE/base-new"
  ts "debootstrap done in $(( $(date +%s) - t ))s"
fi

# Kernel packages: Debian 12's (the machine's own apt sources), Debian 13's
# (a private apt state for that one suite, so the machine's sources stay as they are).
kernel_of() {  # apt options... -> the versioned image package linux-image-amd64 depends on
  apt-cache "$@" depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'
}
fetch_kernel() {  # package, apt options...
  local pkg=$1; shift
  ls "$CACHE/kernels/${pkg}_"*.deb >/dev/null 2>&1 || (cd "$CACHE/kernels" && apt-get "$@" download -q "$pkg" >/dev/null 2>&1)
  ls "$CACHE/kernels/${pkg}_"*.deb | head -1
}
# What differs between kernels (Landlock's ABI, user namespaces, cgroup v2,
# mounts) shows in these; systemd's and the HTTP side's checks run once.
KERNEL_CHECKS=platform,suite-root,service-ready,service-calls,service-no-cgroup-left,service-restart,suite-user-delegated
KERNELS=()
k12=$(kernel_of); [ -n "$k12" ] || { apt-get update -q >/dev/null; k12=$(kernel_of); }
KERNELS+=("$(fetch_kernel "$k12")")
if [ "${VM_KERNELS:-both}" != "12" ]; then
  MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || echo http://deb.debian.org/debian)
  A=$CACHE/apt-trixie; mkdir -p "$A/etc" "$A/lists/partial" "$A/cache"
  printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$MIRROR" > "$A/etc/trixie.sources"
  opts=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$A/etc" -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache")
  [ -n "$(ls "$A/lists" 2>/dev/null | grep -v partial)" ] || apt-get "${opts[@]}" update -q >/dev/null 2>&1 || true
  k13=$(kernel_of "${opts[@]}")
  if [ -n "$k13" ]; then KERNELS+=("$(fetch_kernel "$k13" "${opts[@]}")"); else ts "no Debian 13 kernel on the mirror: Debian 12's only"; fi
fi

cleanup() {
  for m in dev/pts dev proc sys; do mountpoint -q "$ROOT/$m" && umount -l "$ROOT/$m" || true; done
  mountpoint -q "$ROOT" && umount -l "$ROOT" || true
}
trap cleanup EXIT
cleanup; rm -rf "$ROOT" "$VM/boot"; mkdir -p "$ROOT" "$VM/boot"
ts "unpack the base system"; tar -C "$ROOT" -xf "$BASE"
# The chroot's / a mount point of its own, as a booted system's is: the root
# host's installer makes its mount namespace private from / down.
mount --bind "$ROOT" "$ROOT"
mount -t proc proc "$ROOT/proc"; mount --rbind /sys "$ROOT/sys"; mount --bind /dev "$ROOT/dev"; mount --bind /dev/pts "$ROOT/dev/pts"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# This machine's CA bundle, for pip and uv in the chroot only; removed before imaging.
# Not below /tmp, which the root installer's mount namespace replaces.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/hostca.crt"; chmod 0644 "$ROOT/etc/ssl/hostca.crt"
pipconf=()
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST UV_INDEX_URL UV_EXTRA_INDEX_URL UV_DEFAULT_INDEX; do
  [ -n "${!v:-}" ] && pipconf+=("$v=${!v}")
done
ch() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
       SSL_CERT_FILE=/etc/ssl/hostca.crt PIP_CERT=/etc/ssl/hostca.crt "${pipconf[@]}" "$@"; }

ts "system configuration"
echo plughost-vm > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 plughost-vm\n' > "$ROOT/etc/hosts"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$ROOT/etc/fstab"
ch passwd -d root >/dev/null
: > "$ROOT/etc/machine-id"   # made at first boot
ch systemctl mask serial-getty@ttyS0.service getty@tty1.service systemd-timesyncd.service \
  apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true

ts "kernels: ${KERNELS[*]##*/}"
mkdir -p "$ROOT/etc/initramfs-tools/conf.d"
echo 'MODULES=list' > "$ROOT/etc/initramfs-tools/conf.d/vm.conf"
printf 'virtio_pci\nvirtio_blk\next4\ncrc32c_generic\n' >> "$ROOT/etc/initramfs-tools/modules"
for deb in "${KERNELS[@]}"; do
  cp "$deb" "$ROOT/tmp/k.deb"
  ch dpkg -i /tmp/k.deb > "$VM/kernel-install.log" 2>&1 || { cat "$VM/kernel-install.log"; exit 1; }
  rm "$ROOT/tmp/k.deb"
done
for image in "$ROOT"/boot/vmlinuz-*; do
  version=${image##*/vmlinuz-}
  mkdir -p "$VM/boot/$version"
  cp "$image" "$VM/boot/$version/vmlinuz"; cp "$ROOT/boot/initrd.img-$version" "$VM/boot/$version/initrd.img"
  # Debian 12's own kernel runs every check; the newer one those a kernel decides.
  [ "$version" = "${k12#linux-image-}" ] && echo all > "$VM/boot/$version/checks" || echo "$KERNEL_CHECKS" > "$VM/boot/$version/checks"
done
ls "$VM/boot"

ts "plughost: venv + wheel"
cp "$WHEEL" "$ROOT/tmp/"
ch /usr/bin/python3 -m venv /opt/plughost
ch /opt/plughost/bin/pip install -q --disable-pip-version-check "/tmp/$(basename "$WHEEL")"
rm "$ROOT/tmp/$(basename "$WHEEL")"
ch /opt/plughost/bin/plughost --version

ts "plugin environments of the service (its state directory; the crash suite needs none)"
ch useradd -m -s /bin/bash tester
ch useradd --system --no-create-home --shell /usr/sbin/nologin plughost
install -d -m 0700 "$ROOT/var/lib/plughost"; ch chown plughost:plughost /var/lib/plughost
ch runuser -u plughost -- /opt/plughost/bin/plughost plugins prepare --state-dir /var/lib/plughost > "$VM/prepare.log" 2>&1 \
  || { tail -30 "$VM/prepare.log"; exit 1; }

ts "the compatibility corpus's environments, for root (the VM has no network)"
CORPUS=$(ch /opt/plughost/bin/python -c 'import plughost_plugins; print(plughost_plugins.__path__[0])')/compat
install -d -m 0700 "$ROOT/var/lib/plughost-compat"
ch /opt/plughost/bin/plughost plugins prepare --plugins-dir "$CORPUS" --state-dir /var/lib/plughost-compat \
  > "$VM/prepare-compat.log" 2>&1 || { tail -30 "$VM/prepare-compat.log"; exit 1; }
ch sh -c 'rm -rf /etc/ssl/hostca.crt /var/lib/plughost/envs/.cache /var/lib/plughost-compat/envs/.cache /root/.cache'

ts "the bundled plugins with every timeout x$SCALE, for the service (plugin_overrides)"
# A machine ten to twenty times slower than the one a plugin's timeout was
# written for: its operator gives the plugins more time, as any operator can
# (the unit itself stays as docs/deploy.md installs it; inside.sh sets the
# overrides in /etc/plughost/plughost.env).
SITE=$(ls -d "$ROOT"/opt/plughost/lib/python3*/site-packages)
python3 - "$SITE/plughost_plugins" "$ROOT/opt/plugins-scaled" "$SCALE" <<'PY'
import re, shutil, sys
from pathlib import Path
source, target, scale = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
for manifest in sorted(source.glob("*/plugin.toml")):
    copy = target / manifest.parent.name
    shutil.copytree(manifest.parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    text = manifest.read_text()
    scaled = re.sub(r"^timeout_s\s*=\s*([0-9.]+)", lambda m: f"timeout_s = {float(m[1]) * scale:g}", text, flags=re.M)
    assert scaled != text, manifest
    (copy / "plugin.toml").write_text(scaled)
    print(copy.name, end=" ")
print()
PY
chmod -R a+rX "$ROOT/opt/plugins-scaled"

ts "checks"
install -m 0755 "$H/inside.sh" "$ROOT/usr/local/sbin/vmtest.sh"
install -m 0644 "$H/vmtest.service" "$ROOT/etc/systemd/system/vmtest.service"
ch systemctl enable vmtest.service >/dev/null 2>&1
ch apt-get clean
rm -f "$ROOT/etc/resolv.conf"

cleanup; trap - EXIT
ts "image"; t=$(date +%s)
rm -f "$VM/image.raw"
mkfs.ext4 -q -F -L vmroot -d "$ROOT" "$VM/image.raw" 4G
rm -rf "$ROOT"
ts "image done in $(( $(date +%s) - t ))s ($(du -sh "$VM/image.raw" | cut -f1) on disk)"
ts "build total $(( $(date +%s) - T0 ))s"
