#!/bin/bash
# Boots a throw-away copy of $VM/image.raw with the kernel $KVER (a directory
# of $VM/boot) under QEMU: KVM where it works, else software emulation (TCG).
# The serial console goes to $OUT/serial.log with elapsed seconds; the results
# the checks wrote in /root/results are copied out to $OUT/results.
set -uo pipefail
VM=${VM:?}; KVER=${KVER:?}; OUT=${OUT:?}
LIMIT=${VM_LIMIT_S:-1500}
rm -rf "$OUT"; mkdir -p "$OUT"
cp --sparse=always "$VM/image.raw" "$VM/run.raw"
accel=(-accel tcg -cpu max)
if [ "${VM_ACCEL:-tcg}" = kvm ] && [ -w /dev/kvm ]; then accel=(-accel kvm -cpu host); fi
T0=$EPOCHREALTIME
timeout "$LIMIT" qemu-system-x86_64 "${accel[@]}" -smp 2 -m "${VM_MEM_MB:-2048}" -nographic -no-reboot \
  -kernel "$VM/boot/$KVER/vmlinuz" -initrd "$VM/boot/$KVER/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 panic=-1 systemd.unified_cgroup_hierarchy=1 systemd.show_status=false quiet ${VM_APPEND:-}" \
  -drive "file=$VM/run.raw,format=raw,if=virtio" \
  -nic none < /dev/null 2>&1 | while IFS= read -r line; do
    printf '[%7.1f] %s\n' "$(echo "$EPOCHREALTIME $T0" | awk '{print $1-$2}')" "${line%$'\r'}"
  done > "$OUT/serial.log"
status=${PIPESTATUS[0]}
echo "qemu exit $status after $(echo "$EPOCHREALTIME $T0" | awk '{printf "%.0f", $1-$2}') s" > "$OUT/qemu.txt"
debugfs -R "rdump /root/results $OUT" "$VM/run.raw" >/dev/null 2>&1
rm -f "$VM/run.raw"
exit 0
