#!/bin/bash
# The checks, inside the VM (vmtest.service runs this at boot). Each check
# appends "name<TAB>pass|fail<TAB>seconds<TAB>detail" to /root/results/checks.tsv;
# everything is also logged to the serial console and /root/results/log.txt.
# Then the VM powers off. Time-bound claims are scaled by plughost.scale=N on
# the kernel command line (software emulation runs Python 10-20x slower).
R=/root/results; mkdir -p $R; : > $R/checks.tsv
exec > >(tee -a $R/log.txt > /dev/ttyS0) 2>&1
PH=/opt/plughost/bin/plughost
SCALE=$(sed -n 's/.*plughost\.scale=\([0-9.]*\).*/\1/p' /proc/cmdline); SCALE=${SCALE:-8}
SAMPLES=$(/opt/plughost/bin/python -c 'import plughost_plugins; print(plughost_plugins.__path__[0])')/samples
URL=http://127.0.0.1:8000
SERVICE_CG=/sys/fs/cgroup/system.slice/plughost.service
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
begin() { NAME=$1; T=$(now); echo; echo "=== $NAME (t=$(cut -d' ' -f1 /proc/uptime)s)"; }
result() { printf '%s\t%s\t%s\t%s\n' "$NAME" "$1" "$(secs "$T")" "$2" >> $R/checks.tsv; echo "--- $NAME: $1 ($2)"; }
summary_of() { tail -n 3 "$1" | grep -E 'passed' | tail -1; }
wait_ready() {  # seconds -> 0 once /readyz answers 200
  local end=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt $end ]; do
    [ "$(curl -s -o /dev/null -w '%{http_code}' $URL/readyz)" = 200 ] && return 0
    case "$(systemctl is-active plughost)" in active|activating|reloading) ;; *) return 1 ;; esac
    sleep 0.5
  done
  return 1
}
analyze() {  # body file [answer file] -> prints the HTTP status; a failed call's answer goes to the log
  local answer=${2:-$R/last-analyze.json} code
  code=$(curl -s -o "$answer" -w '%{http_code}' -H 'authorization: Bearer vm-client' \
    -H 'content-type: application/json' --data @"$1" $URL/v1/analyze)
  [ "$code" = 200 ] || echo "analyze $1: HTTP $code $(cut -c1-600 "$answer")" >&2
  echo "$code"
}
call_cgroups() { find $SERVICE_CG -mindepth 1 -maxdepth 1 -type d -name 'call-*' 2>/dev/null | wc -l; }
# Call cgroups that hold no process: left behind. One that holds some is a
# running call's, or a warm child's waiting for the next call.
empty_call_cgroups() {
  for d in $SERVICE_CG/call-*; do [ -d "$d" ] && grep -qx 'populated 0' "$d/cgroup.events" && echo "$d"; done
}
suite() {  # report name, command... -> rc; the table in $R/<name>.txt
  local name=$1; shift
  "$@" > $R/$name.txt 2> $R/$name.stderr; local rc=$?
  grep -vE ' pass +[0-9.]+s ' $R/$name.txt | tail -n 40; tail -n 5 $R/$name.stderr
  return $rc
}
cd /

check_platform() {
  begin platform
  kernel=$(uname -r); systemd=$(systemctl --version | head -1); controllers=$(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null)
  state=$(systemctl is-system-running); landlock=$(/opt/plughost/bin/python -c 'from sandbox.layers.landlock import landlock_abi; print(landlock_abi())' 2>/dev/null || echo "?")
  echo "kernel $kernel; $systemd; cgroup2 controllers: $controllers; system $state; landlock ABI $landlock"
  mount | grep -E ' on /sys type ' ; $PH --version
  [ -n "$controllers" ] && [[ " $controllers " == *" memory "* && " $controllers " == *" pids "* ]] \
    && result pass "kernel $kernel, $systemd, cgroup v2 ($controllers), Landlock ABI $landlock, system $state" \
    || result fail "no unified cgroup hierarchy with memory and pids: '$controllers'"
}

check_suite_root() {
  begin suite-root
  mkdir -p /root/csrun; cd /root/csrun
  suite suite-root $PH crash-suite --time-scale $SCALE --json $R/suite-root.json \
    && result pass "$(summary_of $R/suite-root.txt)" || result fail "$(summary_of $R/suite-root.txt)"
  cd /
}

check_compat() {
  begin compat
  # The compatibility corpus as root: its environments were prepared at build.
  suite compat $PH crash-suite --compat --time-scale $SCALE --state-dir /var/lib/plughost-compat \
    && result pass "$(summary_of $R/compat.txt)" || result fail "$(summary_of $R/compat.txt)"
  grep -E '^[a-z_]+ ' $R/compat.txt
}

check_service_ready() {
  begin service-ready
  # As docs/deploy.md says.
  $PH deploy systemd > /etc/systemd/system/plughost.service
  install -d -m 0700 /etc/plughost
  printf 'PLUGHOST_CLIENT_TOKENS=vm-client\nPLUGHOST_ADMIN_TOKEN=vm-admin\n' > /etc/plughost/plughost.env
  # This machine is emulated: the bundled plugins with their timeouts scaled (build.sh).
  overrides=$(for d in /opt/plugins-scaled/*/; do n=$(basename $d); printf '%s=%s,' $n ${d%/}; done)
  printf 'PLUGHOST_PLUGINS_DIRS=/opt/plugins-scaled\nPLUGHOST_PLUGIN_OVERRIDES=%s\n' "${overrides%,}" >> /etc/plughost/plughost.env
  chmod 0600 /etc/plughost/plughost.env
  systemd-analyze verify /etc/systemd/system/plughost.service
  systemctl daemon-reload && systemctl enable --now plughost
  if wait_ready $(awk -v s=$SCALE 'BEGIN{print int(60*s)}'); then
    result pass "/readyz 200"
  else
    result fail "/readyz: $(curl -s -w ' HTTP %{http_code}' $URL/readyz | cut -c1-600)"
  fi
  journalctl -u plughost --no-pager | grep -E "layers active|self-check|cannot contain" | cut -c1-400
}

check_service_calls() {
  begin service-calls
  B64=$(base64 -w0 $SAMPLES/sunset.png)
  echo "{\"plugin\": \"image_info\", \"image\": \"$B64\", \"mime_type\": \"image/png\"}" > /tmp/info.json
  echo "{\"plugin\": \"dominant_colors\", \"image\": \"$B64\", \"mime_type\": \"image/png\", \"options\": {\"count\": 3}}" > /tmp/colors.json
  rm -f /tmp/stop-watch
  ( while [ ! -e /tmp/stop-watch ]; do
      for d in $SERVICE_CG/call-*; do
        [ -d "$d" ] && echo "$(basename $d | cut -c1-5) memory.max=$(cat $d/memory.max 2>/dev/null) memory.swap.max=$(cat $d/memory.swap.max 2>/dev/null) pids.max=$(cat $d/pids.max 2>/dev/null)"
      done
      sleep 0.05
    done | sort | uniq -c > $R/call-cgroups.txt ) &
  watch=$!
  codes="$(analyze /tmp/info.json) $(analyze /tmp/colors.json)"
  pids=""; for i in 1 2 3 4; do analyze /tmp/info.json $R/analyze-$i.json > /tmp/code.$i & pids="$pids $!"; done; wait $pids
  for i in 1 2 3 4; do codes="$codes $(cat /tmp/code.$i)"; done
  touch /tmp/stop-watch; wait $watch
  cat $R/call-cgroups.txt; cat $R/last-analyze.json | cut -c1-400; echo
  limits=$(grep -cE 'memory\.max=[0-9]+ memory\.swap\.max=0 pids\.max=[0-9]+' $R/call-cgroups.txt)
  if [ "$(echo $codes | tr ' ' '\n' | grep -vc '^200$')" = 0 ] && [ "$limits" -gt 0 ]; then
    result pass "6 calls answered 200; per-call cgroups under plughost.service: $(grep -m1 -oE 'memory\.max=[0-9]+ memory\.swap\.max=0 pids\.max=[0-9]+' $R/call-cgroups.txt)"
  else
    result fail "HTTP statuses: $codes; call cgroups with limits seen: $limits; last answer: $(cut -c1-300 $R/last-analyze.json)"
  fi
}

check_service_no_cgroup_left() {
  begin service-no-cgroup-left
  # The calls answered; their processes end and their cgroups go off the answer's path.
  # A cgroup is left behind when it stays empty: one just made for a warm
  # child that has not joined it yet is empty for a moment.
  for i in $(seq 1 $(awk -v s=$SCALE 'BEGIN{print int(40*s)}')); do [ -z "$(empty_call_cgroups)" ] && break; sleep 0.25; done
  empty_call_cgroups | sort > /tmp/empty1; sleep $SCALE; empty_call_cgroups | sort > /tmp/empty2
  comm -12 /tmp/empty1 /tmp/empty2 > /tmp/empty-left
  left=$(wc -l < /tmp/empty-left)
  for d in $(ls -d $SERVICE_CG/call-* 2>/dev/null | head -4); do
    echo "--- $d: procs [$(cat $d/cgroup.procs | tr '\n' ' ')]; $(tr '\n' ' ' < $d/cgroup.events)"
  done
  [ "$left" = 0 ] && result pass "no empty call cgroup left under plughost.service ($(call_cgroups) held by warm children)" \
    || result fail "$left empty call cgroup(s) left: $(head -3 /tmp/empty-left | tr '\n' ' ')"
}

check_service_suite_http() {
  begin service-suite-http
  # The hostile corpus with its timeouts scaled, served by the unit (a drop-in adds it).
  $PH crash-suite --time-scale $SCALE --write-corpus /opt/hostile-scaled > /dev/null
  chmod -R a+rX /opt/hostile-scaled
  mkdir -p /etc/systemd/system/plughost.service.d
  printf '[Service]\nExecStart=\nExecStart=/opt/plughost/bin/plughost serve --state-dir ${STATE_DIRECTORY} --plugins-dir /opt/plugins-scaled --plugins-dir /opt/hostile-scaled\n' \
    > /etc/systemd/system/plughost.service.d/hostile.conf
  systemctl daemon-reload; systemctl restart plughost
  if wait_ready $(awk -v s=$SCALE 'BEGIN{print int(60*s)}'); then
    PLUGHOST_TOKEN=vm-client suite suite-http $PH crash-suite --http $URL --time-scale $SCALE --json $R/suite-http.json \
      && result pass "$(summary_of $R/suite-http.txt)" || result fail "$(summary_of $R/suite-http.txt)"
  else
    result fail "not ready after the restart: $(curl -s $URL/readyz | cut -c1-400)"
  fi
  for i in $(seq 1 $(awk -v s=$SCALE 'BEGIN{print int(40*s)}')); do [ -z "$(empty_call_cgroups)" ] && break; sleep 0.25; done
  echo "call cgroups after the suite: $(call_cgroups), empty: $(empty_call_cgroups | wc -l)"
  [ -z "$(empty_call_cgroups)" ] || { NAME=service-no-cgroup-left-after-suite; T=$(now); result fail "$(empty_call_cgroups | wc -l) empty call cgroup(s) left"; }
  rm -rf /etc/systemd/system/plughost.service.d; systemctl daemon-reload
}

check_service_restart() {
  begin service-restart
  systemctl restart plughost
  if wait_ready $(awk -v s=$SCALE 'BEGIN{print int(60*s)}') && [ "$(analyze /tmp/info.json)" = 200 ]; then
    result pass "restarted, ready, a call answered 200"
  else
    result fail "after a restart: /readyz $(curl -s -o /dev/null -w '%{http_code}' $URL/readyz), analyze $(cut -c1-300 $R/last-analyze.json)"
  fi
  journalctl -u plughost --no-pager -o short-monotonic > $R/journal-plughost.txt
  systemctl stop plughost
}

check_suite_user_delegated() {
  begin suite-user-delegated
  mkdir -p /home/tester/csrun && chown tester:tester /home/tester/csrun
  suite suite-user-delegated systemd-run --quiet --wait --pipe --collect -p User=tester -p Delegate=yes \
    -p WorkingDirectory=/home/tester/csrun $PH crash-suite --time-scale $SCALE --json /home/tester/csrun/delegated.json
  rc=$?; cp /home/tester/csrun/delegated.json $R/suite-user-delegated.json 2>/dev/null
  cgroup=$(/opt/plughost/bin/python -c "import json,sys; p=json.load(open(sys.argv[1]))['protections']; print(p.get('cgroup_memory'), p.get('cgroup_pids'))" $R/suite-user-delegated.json 2>/dev/null)
  [ $rc = 0 ] && [ "$cgroup" = "True True" ] && result pass "$(summary_of $R/suite-user-delegated.txt); per-call cgroups" \
    || result fail "rc $rc, cgroup memory/pids: ${cgroup:-?}; $(summary_of $R/suite-user-delegated.txt)"
}

check_suite_user_manager() {
  begin suite-user-manager
  loginctl enable-linger tester
  uid=$(id -u tester)
  for i in $(seq 1 120); do [ -S /run/user/$uid/bus ] && break; sleep 0.5; done
  suite suite-user-manager runuser -u tester -- env XDG_RUNTIME_DIR=/run/user/$uid DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/$uid/bus \
    systemd-run --user --quiet --wait --pipe --collect -p Delegate=yes -p WorkingDirectory=/home/tester/csrun \
    $PH crash-suite --time-scale $SCALE --json /home/tester/csrun/manager.json
  rc=$?; cp /home/tester/csrun/manager.json $R/suite-user-manager.json 2>/dev/null
  cgroup=$(/opt/plughost/bin/python -c "import json,sys; p=json.load(open(sys.argv[1]))['protections']; print(p.get('cgroup_memory'), p.get('cgroup_pids'))" $R/suite-user-manager.json 2>/dev/null)
  [ $rc = 0 ] && result pass "$(summary_of $R/suite-user-manager.txt); cgroup memory/pids: $cgroup" \
    || result fail "rc $rc; $(summary_of $R/suite-user-manager.txt)"
  loginctl disable-linger tester
}

check_suite_user_plain() {
  begin suite-user-plain
  cd /home/tester/csrun
  suite suite-user-plain runuser -u tester -- $PH crash-suite --time-scale $SCALE --json /home/tester/csrun/plain.json \
    && result pass "$(summary_of $R/suite-user-plain.txt)" || result fail "$(summary_of $R/suite-user-plain.txt)"
  cd /
}

# All checks, in this order; plughost.checks=a,b,... on the kernel command line runs only those
# (the service checks need service-ready first).
ALL="platform suite-root compat service-ready service-calls service-no-cgroup-left service-suite-http service-restart suite-user-delegated suite-user-manager suite-user-plain"
ONLY=$(sed -n 's/.*plughost\.checks=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
for name in $ALL; do
  if [ -z "$ONLY" ] || [[ " $ONLY " == *" $name "* ]]; then "check_${name//-/_}"; fi
done
echo; echo "=== END (t=$(cut -d' ' -f1 /proc/uptime)s)"
journalctl -b --no-pager -p warning > $R/journal-warnings.txt
sync
systemctl --no-block poweroff
