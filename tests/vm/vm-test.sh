#!/bin/bash
# `make vm-test`: plughost on a real systemd + cgroup v2 machine. Builds a
# Debian 12 image with the wheel of this checkout (build.sh), boots it once
# per kernel under QEMU (boot.sh), where inside.sh runs the checks; prints
# each check with its wall time and exits 1 if one failed or did not run.
#
#   PLUGHOST_VM_DIR  work directory and cache (default /var/tmp/plughost-vm)
#   VM_KERNELS       both (default: Debian 12's 6.1 and Debian 13's newer one) or 12
#   VM_KERNEL        boot only this one (a directory name of $PLUGHOST_VM_DIR/boot)
#   VM_SCALE         time scale of the crash-suite runs and the service's plugins inside (default 8)
#   VM_ACCEL         tcg (default) or kvm
#   VM_CHECKS        a,b,c: run only these checks (the service ones need service-ready)
#   VM_WHEEL         a wheel to test instead of the checkout's (the checks stay the checkout's)
set -euo pipefail
H=$(dirname "$(readlink -f "$0")"); SRC=$(cd "$H/../.." && pwd)
export VM=${PLUGHOST_VM_DIR:-/var/tmp/plughost-vm}
CHECKS="platform suite-root compat service-ready service-calls service-no-cgroup-left service-suite-http service-restart suite-user-delegated suite-user-manager suite-user-plain"
[ "$(id -u)" = 0 ] || { echo "vm-test: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
mkdir -p "$VM"
exec 9> "$VM/.lock"; flock -n 9 || { echo "vm-test: another run holds $VM/.lock" >&2; exit 2; }
T0=$(date +%s)

echo "[vm-test] the wheel of $SRC"
rm -rf "$VM/dist"
${PYTHON:-python3} -m pip wheel -q --no-deps -w "$VM/dist" "$SRC" >/dev/null
WHEEL=${VM_WHEEL:-$(ls "$VM"/dist/plughost-*.whl)}   # VM_WHEEL=...: test another build's wheel
t=$(date +%s)
SRC=$SRC WHEEL=$WHEEL "$H/build.sh"
build_s=$(( $(date +%s) - t ))

failed=0
for kdir in "$VM"/boot/*/; do
  kver=$(basename "$kdir"); out=$VM/out/$kver
  if [ -n "${VM_KERNEL:-}" ] && [ "$kver" != "$VM_KERNEL" ]; then continue; fi
  wanted=$(cat "$kdir/checks" 2>/dev/null || echo all)
  checks=$CHECKS; append="plughost.scale=${VM_SCALE:-8}"
  [ -n "${VM_CHECKS:-}" ] && wanted=$VM_CHECKS   # a,b,c: only these (while working on one)
  if [ "$wanted" != all ]; then checks=${wanted//,/ }; append="$append plughost.checks=$wanted"; fi
  echo "[vm-test] boot kernel $kver (${VM_ACCEL:-tcg}); inside: $checks"
  t=$(date +%s)
  KVER=$kver OUT=$out VM_APPEND=$append "$H/boot.sh"
  boot_s=$(( $(date +%s) - t ))
  first=$(grep -m1 -oE '=== platform \(t=[0-9.]+s\)' "$out/serial.log" | grep -oE '[0-9.]+' || echo "?")
  echo "[vm-test] kernel $kver: $(cat "$out/qemu.txt"); the checks started ${first}s after boot"
  printf '  %-28s %-5s %8s  %s\n' check result seconds detail
  for check in $checks; do
    line=$(awk -F'\t' -v c="$check" '$1 == c' "$out/results/checks.tsv" 2>/dev/null | tail -1)
    if [ -z "$line" ]; then
      printf '  %-28s %-5s %8s  %s\n' "$check" FAIL - "did not run (see $out/serial.log)"; failed=1; continue
    fi
    IFS=$'\t' read -r name status seconds detail <<< "$line"
    [ "$status" = pass ] || failed=1
    printf '  %-28s %-5s %8s  %s\n' "$name" "$( [ "$status" = pass ] && echo pass || echo FAIL )" "$seconds" "$detail"
  done
  # Checks outside the list (a failure found along the way) fail the run too.
  awk -F'\t' -v list=" $checks " 'index(list, " " $1 " ") == 0' "$out/results/checks.tsv" 2>/dev/null | while IFS=$'\t' read -r name status seconds detail; do
    printf '  %-28s %-5s %8s  %s\n' "$name" FAIL "$seconds" "$detail"
  done
  if awk -F'\t' -v list=" $checks " 'index(list, " " $1 " ") == 0' "$out/results/checks.tsv" 2>/dev/null | grep -q .; then failed=1; fi
  echo "[vm-test] kernel $kver: ${boot_s}s from boot to power-off; results in $out"
done
echo "[vm-test] image build ${build_s}s; whole run $(( $(date +%s) - T0 ))s"
if [ $failed != 0 ]; then
  echo "[vm-test] FAILED: the failing checks' output is in $VM/out/<kernel>/results/ (log.txt, <check>.txt)" >&2
  exit 1
fi
echo "[vm-test] all checks passed"
