#!/bin/bash
# The VM lane's test driver, run in the guest by dockhand-vm.service with its output on the second
# serial port. It installs dockhand the way an operator does (the files `make install` wrote,
# containerd pointed at the shim, the unit enabled), then checks what a user of a systemd node
# with cgroup v2 would check. Every check prints `VMTEST PASS <name>` or
# `VMTEST FAIL <name>: <why>`; the last line is `VMTEST DONE <passed> <failed>`. The host turns
# that into the lane's exit code (vm/run.sh).
# Usage: test.sh PAYLOAD_DIR
set -uo pipefail

# The checks this script makes, one name a line, each to report exactly one PASS line. vm/run.sh
# reads this list on the host (between the CHECKS markers) and fails the lane on a FAIL line, on a
# check here that reported no PASS (the guest stopped early, a branch never ran), and on a PASS for
# a name not here: keep the list in step with the checks below. (`setup:` steps report only when
# they fail.)
# CHECKS BEGIN
#   node: PID 1 is systemd
#   node: /sys/fs/cgroup is the unified cgroup2 hierarchy
#   node: kernel booted with systemd.unified_cgroup_hierarchy=1
#   node: cgroup2 has the memory and pids controllers
#   node: / is a shared mount (systemd)
#   node: containerd is 1.7
#   node: runc is Debian 12's 1.1
#   unit: enabled
#   unit: active
#   unit: ordered after containerd
#   unit: ordered before kubelet
#   unit: its Documentation= file is installed
#   unit: socket is a socket with mode 0660, owned by root
#   unit: systemctl status exits 0
#   unit: systemctl status says active (running)
#   unit: systemctl status shows no error
#   unit: no WARN or ERROR lines in dockhand's journal
#   besteffort: pod and container start
#   burstable: pod and container start
#   guaranteed: pod and container start
#   besteffort: shim wrote a started record
#   besteffort: record's placement is cgroup v2
#   besteffort: record's directory is the kubelet-style scope
#   besteffort: record says the systemd driver
#   besteffort: record's QoS class
#   besteffort: record's pid is the container's init
#   besteffort: record's own check matches
#   besteffort: /proc/<pid>/cgroup is the record's directory
#   besteffort: the scope's cgroup.procs holds the pid
#   besteffort: verbose ContainerStatus through dockhand carries the record
#   besteffort: memory.max is unlimited
#   burstable: shim wrote a started record
#   burstable: record's placement is cgroup v2
#   burstable: record's directory is the kubelet-style scope
#   burstable: record says the systemd driver
#   burstable: record's QoS class
#   burstable: record's pid is the container's init
#   burstable: record's own check matches
#   burstable: /proc/<pid>/cgroup is the record's directory
#   burstable: the scope's cgroup.procs holds the pid
#   burstable: verbose ContainerStatus through dockhand carries the record
#   burstable: memory.max is the container's limit
#   guaranteed: shim wrote a started record
#   guaranteed: record's placement is cgroup v2
#   guaranteed: record's directory is the kubelet-style scope
#   guaranteed: record says the systemd driver
#   guaranteed: record's QoS class
#   guaranteed: record's pid is the container's init
#   guaranteed: record's own check matches
#   guaranteed: /proc/<pid>/cgroup is the record's directory
#   guaranteed: the scope's cgroup.procs holds the pid
#   guaranteed: verbose ContainerStatus through dockhand carries the record
#   guaranteed: memory.max is the container's limit
#   guaranteed: cpu.max is the container's quota
#   cgroups: dockhand cgroups --usage --json runs
#   besteffort: dockhand cgroups lists it from the shim's record
#   besteffort: dockhand cgroups shows the scope
#   besteffort: --usage shows v2 memory
#   besteffort: --usage shows v2 pids
#   besteffort: the --usage table shows shim, the scope, memory and pids
#   burstable: dockhand cgroups lists it from the shim's record
#   burstable: dockhand cgroups shows the scope
#   burstable: --usage shows v2 memory
#   burstable: --usage shows v2 pids
#   burstable: the --usage table shows shim, the scope, memory and pids
#   guaranteed: dockhand cgroups lists it from the shim's record
#   guaranteed: dockhand cgroups shows the scope
#   guaranteed: --usage shows v2 memory
#   guaranteed: --usage shows v2 pids
#   guaranteed: the --usage table shows shim, the scope, memory and pids
#   archive: container ran and exited
#   archive: RemoveContainer through dockhand
#   archive: dockhand logs prints the removed container's output
#   archive: dockhand logs --pod lists it
#   propagation: pod with hostPath / at /rootfs starts
#   propagation: dockhand's decision annotation
#   propagation: /rootfs is a slave mount in the container
#   propagation: a host mount made after start is seen in the container
#   restart: with containerd stopped, callers get UNAVAILABLE
#   restart: dockhand keeps running while containerd is stopped
#   restart: service again once containerd is back
#   restart: service again after systemctl restart containerd
#   restart: dockhand is the same process throughout
#   restart: the running container is still listed
#   stop: a call in flight is answered (drain)
#   stop: unit is inactive
#   stop: clean result, main process exited with 0
#   stop: dockhand logged its stop
#   2.4: containerd behind dockhand is 2.4.2
#   2.4: runc 1.5.3 runs here, with seccomp
#   2.4: besteffort: pod and container start
#   2.4: burstable: pod and container start
#   2.4: guaranteed: pod and container start
#   2.4: besteffort: shim wrote a started record
#   2.4: besteffort: record's placement is cgroup v2
#   2.4: besteffort: record's directory is the kubelet-style scope
#   2.4: besteffort: record says the systemd driver
#   2.4: besteffort: record's QoS class
#   2.4: besteffort: record's pid is the container's init
#   2.4: besteffort: record's own check matches
#   2.4: besteffort: /proc/<pid>/cgroup is the record's directory
#   2.4: besteffort: the scope's cgroup.procs holds the pid
#   2.4: besteffort: verbose ContainerStatus through dockhand carries the record
#   2.4: besteffort: memory.max is unlimited
#   2.4: burstable: shim wrote a started record
#   2.4: burstable: record's placement is cgroup v2
#   2.4: burstable: record's directory is the kubelet-style scope
#   2.4: burstable: record says the systemd driver
#   2.4: burstable: record's QoS class
#   2.4: burstable: record's pid is the container's init
#   2.4: burstable: record's own check matches
#   2.4: burstable: /proc/<pid>/cgroup is the record's directory
#   2.4: burstable: the scope's cgroup.procs holds the pid
#   2.4: burstable: verbose ContainerStatus through dockhand carries the record
#   2.4: burstable: memory.max is the container's limit
#   2.4: guaranteed: shim wrote a started record
#   2.4: guaranteed: record's placement is cgroup v2
#   2.4: guaranteed: record's directory is the kubelet-style scope
#   2.4: guaranteed: record says the systemd driver
#   2.4: guaranteed: record's QoS class
#   2.4: guaranteed: record's pid is the container's init
#   2.4: guaranteed: record's own check matches
#   2.4: guaranteed: /proc/<pid>/cgroup is the record's directory
#   2.4: guaranteed: the scope's cgroup.procs holds the pid
#   2.4: guaranteed: verbose ContainerStatus through dockhand carries the record
#   2.4: guaranteed: memory.max is the container's limit
#   2.4: guaranteed: cpu.max is the container's quota
#   2.4: cgroups: dockhand cgroups --usage --json runs
#   2.4: besteffort: dockhand cgroups lists it from the shim's record
#   2.4: besteffort: dockhand cgroups shows the scope
#   2.4: besteffort: --usage shows v2 memory
#   2.4: besteffort: --usage shows v2 pids
#   2.4: besteffort: the --usage table shows shim, the scope, memory and pids
#   2.4: burstable: dockhand cgroups lists it from the shim's record
#   2.4: burstable: dockhand cgroups shows the scope
#   2.4: burstable: --usage shows v2 memory
#   2.4: burstable: --usage shows v2 pids
#   2.4: burstable: the --usage table shows shim, the scope, memory and pids
#   2.4: guaranteed: dockhand cgroups lists it from the shim's record
#   2.4: guaranteed: dockhand cgroups shows the scope
#   2.4: guaranteed: --usage shows v2 memory
#   2.4: guaranteed: --usage shows v2 pids
#   2.4: guaranteed: the --usage table shows shim, the scope, memory and pids
# CHECKS END

payload=${1:?usage: test.sh PAYLOAD_DIR}
socket=/run/dockhand/dockhand.sock
records=/run/dockhand/cgroups
passed=0
failed=0

pass() { echo "VMTEST PASS $1"; passed=$((passed + 1)); }
fail() { echo "VMTEST FAIL $1: $2"; failed=$((failed + 1)); }
# expect NAME GOT WANT: string equality.
expect() { if [ "$2" = "$3" ]; then pass "$1"; else fail "$1" "got '$2', want '$3'"; fi; }
# expect_match NAME GOT REGEX
expect_match() { if [[ $2 =~ $3 ]]; then pass "$1"; else fail "$1" "got '$2', want a match of /$3/"; fi; }
# expect_ok NAME COMMAND...: the command succeeds (its output is shown on failure).
expect_ok() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$* failed: $(tail -n 3 <<<"$out" | tr '\n' ' ')"; fi
}
finish() {
    if [ "$failed" -gt 0 ]; then
        echo "--- journal of containerd and dockhand (last 60 lines) ---"
        journalctl -u containerd -u dockhand --no-pager -n 60 -o short-monotonic 2>&1 | sed 's/^/LOG /'
    fi
    echo "VMTEST DONE $passed $failed"
    # The unit's SuccessAction did not power the guest off here (systemd 252, qemu TCG): do it,
    # once the serial port has drained. The root disk is a throw-away snapshot.
    sleep 2
    systemctl poweroff --force --no-block >/dev/null 2>&1
    exit 0
}
# A setup step that later checks cannot do without.
setup() {
    local what=$1 out
    shift
    if ! out=$("$@" 2>&1); then
        fail "setup: $what" "$* failed: $(tail -n 5 <<<"$out" | tr '\n' ' ')"
        finish
    fi
}
# wait_for SECONDS COMMAND...: retries until the command succeeds.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}
cri() { "$payload/bin/crictl" "$@"; }
main_pid() { systemctl show -p MainPID --value "$1"; }
exited() { cri inspect -o json "$1" | jq -e '.status.state == "CONTAINER_EXITED"'; }
archived() { dockhand logs "$1" | grep -q 'second line'; }

echo "guest: $(uname -r), $(nproc) cpus, PID 1 $(readlink /proc/1/exe)"

# --- the node -----------------------------------------------------------------------------------
expect "node: PID 1 is systemd" "$(readlink /proc/1/exe)" /usr/lib/systemd/systemd
expect "node: /sys/fs/cgroup is the unified cgroup2 hierarchy" "$(stat -fc %T /sys/fs/cgroup)" cgroup2fs
expect_match "node: kernel booted with systemd.unified_cgroup_hierarchy=1" "$(cat /proc/cmdline)" 'systemd\.unified_cgroup_hierarchy=1'
expect_match "node: cgroup2 has the memory and pids controllers" "$(cat /sys/fs/cgroup/cgroup.controllers)" 'memory.*pids'
expect "node: / is a shared mount (systemd)" "$(findmnt -no PROPAGATION /)" shared
expect_match "node: containerd is 1.7" "$(containerd --version)" ' (v)?1\.7\.'
expect_match "node: runc is Debian 12's 1.1" "$(runc --version | head -n 1)" 'runc version 1\.1\.'

# --- install as an operator ---------------------------------------------------------------------
# The files `make install DESTDIR=…` wrote on the host, copied to the same places here.
setup "copy the files make install wrote" cp -a "$payload/install/." /
setup "configure containerd" install -m 0644 "$payload/containerd-config.toml" /etc/containerd/config.toml
setup "restart containerd with the shim configured" systemctl restart containerd
setup "import the test images" ctr -n k8s.io images import "$payload/images.tar"
# crictl pointed at dockhand, as kubelet is (--container-runtime-endpoint).
printf 'runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 60\n' "$socket" "$socket" >/etc/crictl.yaml
setup "systemctl daemon-reload" systemctl daemon-reload
setup "systemctl enable --now dockhand" systemctl enable --now dockhand.service
if ! wait_for 60 cri version; then
    fail "setup: dockhand answers CRI Version" "$(cri version 2>&1 | tail -n 2 | tr '\n' ' ')"
    finish
fi
has_image() { cri images -q "$1" | grep -q .; }
setup "CRI lists the imported images" wait_for 30 has_image docker.io/dockhand/busybox:test

# --- the unit as systemd runs it ----------------------------------------------------------------
expect "unit: enabled" "$(systemctl is-enabled dockhand.service)" enabled
expect "unit: active" "$(systemctl is-active dockhand.service)" active
expect_match "unit: ordered after containerd" "$(systemctl show -p After --value dockhand.service)" '(^| )containerd\.service( |$)'
expect_match "unit: ordered before kubelet" "$(systemctl show -p Before --value dockhand.service)" '(^| )kubelet\.service( |$)'
doc=$(systemctl show -p Documentation --value dockhand.service)
expect_ok "unit: its Documentation= file is installed" test -f "${doc#file://}"
expect "unit: socket is a socket with mode 0660, owned by root" "$(stat -c '%F %a %U:%G' "$socket")" "socket 660 root:root"
status=$(systemctl status --no-pager --full dockhand.service 2>&1)
status_rc=$?
expect "unit: systemctl status exits 0" "$status_rc" 0
expect_match "unit: systemctl status says active (running)" "$status" 'Active: active \(running\)'
if grep -qiE 'error|fail|warn' <<<"$status"; then
    fail "unit: systemctl status shows no error" "$(grep -iE 'error|fail|warn' <<<"$status" | head -n 3 | tr '\n' ' ')"
else
    pass "unit: systemctl status shows no error"
fi
# tracing writes its level into the line; journald files stderr lines at info whatever they say.
expect "unit: no WARN or ERROR lines in dockhand's journal" \
    "$(journalctl -u dockhand.service --no-pager -q -o cat | grep -E ' (WARN|ERROR) ' | head -n 3)" ""

# --- pods of each QoS class with the systemd cgroup driver --------------------------------------
# pod_json NAME UID PARENT: a host-network sandbox config as kubelet sends it.
pod_json() {
    cat <<EOF
{"metadata": {"name": "$1", "namespace": "default", "uid": "$2", "attempt": 0},
 "log_directory": "/var/log/pods/default_$1_$2",
 "labels": {"io.kubernetes.pod.name": "$1", "io.kubernetes.pod.namespace": "default", "io.kubernetes.pod.uid": "$2"},
 "linux": {"cgroup_parent": "$3", "security_context": {"namespace_options": {"network": 2, "pid": 1, "ipc": 0}}}}
EOF
}
# container_json POD UID NAME COMMAND_JSON [RESOURCES_JSON] [MOUNTS_JSON]: kubelet's labels included
# (the archive takes the pod's name from them).
container_json() {
    local pod=$1 uid=$2
    shift 2
    cat <<EOF
{"metadata": {"name": "$1", "attempt": 0},
 "image": {"image": "docker.io/dockhand/busybox:test"},
 "command": $2,
 "log_path": "$1/0.log",
 "labels": {"io.kubernetes.container.name": "$1", "io.kubernetes.pod.name": "$pod",
            "io.kubernetes.pod.namespace": "default", "io.kubernetes.pod.uid": "$uid"},
 "mounts": ${4:-[]},
 "linux": {"resources": ${3:-{\}}}}
EOF
}
tmp=$(mktemp -d)
# run_pod NAME UID PARENT CONTAINER COMMAND_JSON [RESOURCES_JSON] [MOUNTS_JSON]: prints the
# container id; the sandbox id goes to $tmp/NAME.pod.
run_pod() {
    pod_json "$1" "$2" "$3" >"$tmp/$1.pod.json"
    container_json "$1" "$2" "$4" "$5" "${6:-}" "${7:-}" >"$tmp/$1.ctr.json"
    local pod ctr
    pod=$(cri runp "$tmp/$1.pod.json") || return 1
    echo "$pod" >"$tmp/$1.pod"
    ctr=$(cri create "$pod" "$tmp/$1.ctr.json" "$tmp/$1.pod.json") || return 1
    cri start "$ctr" >/dev/null || return 1
    echo "$ctr"
}

sleeper='["sh", "-c", "sleep 3600"]'
declare -A want_dir ids
# qos_checks PREFIX: a pod of each QoS class under kubelet's systemd slices, then the shim's record,
# the scope, the limits, `crictl inspect` and `dockhand cgroups` for each; check names start with
# PREFIX (empty on containerd 1.7, "2.4: " on the second round). Sets ids[QOS] to the containers.
qos_checks() {
    local p=$1 qos uid slice_uid parent dir resources id want record inspect pid cgroups_json table
    local entry mem pids row
    ids=()
    want_dir=()
    for qos in besteffort burstable guaranteed; do
        uid=$(cat /proc/sys/kernel/random/uuid)
        slice_uid=${uid//-/_}
        case $qos in
            besteffort)
                parent=kubepods-besteffort-pod$slice_uid.slice
                dir=/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/$parent
                resources='{}' ;;
            burstable)
                parent=kubepods-burstable-pod$slice_uid.slice
                dir=/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/$parent
                resources='{"cpu_shares": 102, "memory_limit_in_bytes": 134217728}' ;;
            guaranteed)
                parent=kubepods-pod$slice_uid.slice
                dir=/sys/fs/cgroup/kubepods.slice/$parent
                resources='{"cpu_shares": 512, "cpu_period": 100000, "cpu_quota": 50000, "memory_limit_in_bytes": 67108864}' ;;
        esac
        if ! id=$(run_pod "$qos-pod" "$uid" "$parent" app "$sleeper" "$resources" 2>"$tmp/err"); then
            fail "$p$qos: pod and container start" "$(tail -n 3 "$tmp/err" | tr '\n' ' ')"
            continue
        fi
        pass "$p$qos: pod and container start"
        ids[$qos]=$id
        want_dir[$qos]=$dir/cri-containerd-$id.scope
    done

    for qos in "${!ids[@]}"; do
        id=${ids[$qos]}
        want=${want_dir[$qos]}
        record=$records/$id.json
        if ! wait_for 20 jq -e '.state == "started"' "$record"; then
            fail "$p$qos: shim wrote a started record" "$(cat "$record" 2>&1 | head -c 300)"
            continue
        fi
        pass "$p$qos: shim wrote a started record"
        inspect=$(cri inspect -o json "$id")
        pid=$(jq -r '.info.pid' <<<"$inspect")
        expect "$p$qos: record's placement is cgroup v2" "$(jq -r '.placement.version' "$record")" v2
        expect "$p$qos: record's directory is the kubelet-style scope" "$(jq -r '.placement.path' "$record")" "$want"
        expect "$p$qos: record says the systemd driver" "$(jq -r '.driver' "$record")" systemd
        expect "$p$qos: record's QoS class" "$(jq -r '.qosClass' "$record")" "$qos"
        expect "$p$qos: record's pid is the container's init" "$(jq -r '.pid' "$record")" "$pid"
        expect "$p$qos: record's own check matches" "$(jq -r '.check.matches' "$record")" true
        expect "$p$qos: /proc/<pid>/cgroup is the record's directory" "$(cat "/proc/$pid/cgroup")" "0::${want#/sys/fs/cgroup}"
        expect_match "$p$qos: the scope's cgroup.procs holds the pid" "$(tr '\n' ' ' <"$want/cgroup.procs")" "(^| )$pid( |$)"
        expect "$p$qos: verbose ContainerStatus through dockhand carries the record" \
            "$(jq -c '.["dockhand.cgroup"] | {path: .placement.path, driver, qosClass, pid}' <<<"$inspect")" \
            "$(jq -c '{path: .placement.path, driver, qosClass, pid}' "$record")"
        case $qos in
            guaranteed) expect "$p$qos: memory.max is the container's limit" "$(cat "$want/memory.max")" 67108864
                        expect "$p$qos: cpu.max is the container's quota" "$(cat "$want/cpu.max")" "50000 100000" ;;
            burstable) expect "$p$qos: memory.max is the container's limit" "$(cat "$want/memory.max")" 134217728 ;;
            besteffort) expect "$p$qos: memory.max is unlimited" "$(cat "$want/memory.max")" max ;;
        esac
    done

    # dockhand cgroups --usage: v2 memory and pids, from the scope's own files.
    if ! cgroups_json=$(dockhand cgroups --socket "$socket" --usage --json 2>"$tmp/err"); then
        fail "${p}cgroups: dockhand cgroups --usage --json runs" "$(tail -n 3 "$tmp/err" | tr '\n' ' ')"
        return
    fi
    pass "${p}cgroups: dockhand cgroups --usage --json runs"
    table=$(dockhand cgroups --socket "$socket" --usage)
    for qos in "${!ids[@]}"; do
        id=${ids[$qos]}
        entry=$(jq -c --arg id "$id" '.[] | select(.containerId == $id)' <<<"$cgroups_json")
        expect "$p$qos: dockhand cgroups lists it from the shim's record" "$(jq -r '.record.source' <<<"$entry")" shim
        expect "$p$qos: dockhand cgroups shows the scope" "$(jq -r '.record.placement.path' <<<"$entry")" "${want_dir[$qos]}"
        mem=$(jq -r '.usage.memoryBytes' <<<"$entry")
        pids=$(jq -r '.usage.pids' <<<"$entry")
        if [[ $mem =~ ^[0-9]+$ ]] && [ "$mem" -gt 0 ]; then
            pass "$p$qos: --usage shows v2 memory"
        else
            fail "$p$qos: --usage shows v2 memory" "memoryBytes is '$mem'"
        fi
        # `sh -c 'sleep 3600'`: sh and sleep, or sleep alone where sh execs it.
        expect_match "$p$qos: --usage shows v2 pids" "$pids" '^[12]$'
        row=$(grep " ${id:0:13} " <<<"$table")
        expect_match "$p$qos: the --usage table shows shim, the scope, memory and pids" "$row" \
            " running +shim +/sys/fs/cgroup/kubepods\\.slice/.*/cri-containerd-$id\\.scope +[1-9][0-9]* +[12]\$"
    done
}
qos_checks ""

# --- the log archive: kubelet's removal, then dockhand logs -------------------------------------
uid=$(cat /proc/sys/kernel/random/uuid)
if id=$(run_pod archive-pod "$uid" "kubepods-besteffort-pod${uid//-/_}.slice" hello \
    '["sh", "-c", "echo hello from the vm; echo second line"]' 2>"$tmp/err"); then
    log=/var/log/pods/default_archive-pod_$uid/hello/0.log
    if wait_for 60 exited "$id"; then
        pass "archive: container ran and exited"
        # kubelet deletes the log files first, then calls RemoveContainer.
        rm -f "$log"*
        expect_ok "archive: RemoveContainer through dockhand" cri rm "$id"
        if wait_for 60 archived "$id"; then
            expect "archive: dockhand logs prints the removed container's output" "$(dockhand logs "$id")" \
                "$(printf 'hello from the vm\nsecond line')"
        else
            fail "archive: dockhand logs prints the removed container's output" "$(dockhand logs "$id" 2>&1 | tail -n 2 | tr '\n' ' ')"
        fi
        expect_match "archive: dockhand logs --pod lists it" "$(dockhand logs --pod archive-pod)" "default +archive-pod +hello +0 +${id:0:13}"
    else
        fail "archive: container ran and exited" "$(cri ps -a 2>&1 | tail -n 3 | tr '\n' ' ')"
    fi
else
    fail "archive: pod and container start" "$(tail -n 3 "$tmp/err" | tr '\n' ' ')"
fi

# --- propagation: hostPath / on a systemd host (where / is shared) gets rslave ------------------
uid=$(cat /proc/sys/kernel/random/uuid)
if id=$(run_pod exporter-pod "$uid" "kubepods-besteffort-pod${uid//-/_}.slice" node-exporter "$sleeper" '{}' \
    '[{"container_path": "/rootfs", "host_path": "/", "readonly": true, "propagation": 0}]' 2>"$tmp/err"); then
    pass "propagation: pod with hostPath / at /rootfs starts"
    expect "propagation: dockhand's decision annotation" \
        "$(cri inspect -o json "$id" | jq -r '.status.annotations["dockhand.io/mount-propagation"]')" "/rootfs=rslave"
    expect_match "propagation: /rootfs is a slave mount in the container" \
        "$(cri exec -s "$id" sh -c "grep ' /rootfs ' /proc/self/mountinfo")" ' master:[0-9]+'
    # What node-exporter needs: a volume the host mounts later shows up under /rootfs.
    mkdir -p /mnt/dockhand-vm-late
    if mount -t tmpfs -o size=1m dockhand-vm-late /mnt/dockhand-vm-late && echo late >/mnt/dockhand-vm-late/marker; then
        expect "propagation: a host mount made after start is seen in the container" \
            "$(cri exec -s "$id" cat /rootfs/mnt/dockhand-vm-late/marker 2>&1)" late
        umount /mnt/dockhand-vm-late
    else
        fail "propagation: a host mount made after start is seen in the container" "cannot mount a tmpfs on the host"
    fi
else
    fail "propagation: pod with hostPath / at /rootfs starts" "$(tail -n 3 "$tmp/err" | tr '\n' ' ')"
fi

# --- containerd stopped and restarted under a running dockhand ----------------------------------
pid_before=$(main_pid dockhand.service)
systemctl stop containerd
out=$(cri version 2>&1)
expect_match "restart: with containerd stopped, callers get UNAVAILABLE" "$out" 'code = Unavailable'
expect "restart: dockhand keeps running while containerd is stopped" "$(systemctl is-active dockhand.service)/$(main_pid dockhand.service)" "active/$pid_before"
systemctl start containerd
if wait_for 60 cri version; then pass "restart: service again once containerd is back"; else fail "restart: service again once containerd is back" "$(cri version 2>&1 | tail -n 1)"; fi
systemctl restart containerd
if wait_for 60 cri version; then pass "restart: service again after systemctl restart containerd"; else fail "restart: service again after systemctl restart containerd" "$(cri version 2>&1 | tail -n 1)"; fi
expect "restart: dockhand is the same process throughout" "$(systemctl is-active dockhand.service)/$(main_pid dockhand.service)" "active/$pid_before"
if [ -n "${ids[besteffort]:-}" ]; then
    expect "restart: the running container is still listed" "$(cri ps -q --id "${ids[besteffort]}")" "${ids[besteffort]}"
fi

# --- systemctl stop: drain, exit 0 --------------------------------------------------------------
if [ -n "${ids[besteffort]:-}" ]; then
    # An ExecSync in flight when the stop comes must still get its answer.
    cri exec --sync --timeout 30 "${ids[besteffort]}" sh -c 'sleep 4; echo drained' >"$tmp/exec.out" 2>&1 &
    exec_pid=$!
    sleep 2
    systemctl stop dockhand.service
    wait "$exec_pid"
    exec_rc=$?
    expect "stop: a call in flight is answered (drain)" "$exec_rc/$(cat "$tmp/exec.out")" "0/drained"
else
    systemctl stop dockhand.service
fi
expect "stop: unit is inactive" "$(systemctl is-active dockhand.service)" inactive
expect "stop: clean result, main process exited with 0" \
    "$(systemctl show -p Result -p ExecMainCode -p ExecMainStatus dockhand.service | sort | tr '\n' ' ')" \
    "ExecMainCode=1 ExecMainStatus=0 Result=success "
expect_match "stop: dockhand logged its stop" "$(journalctl -u dockhand.service --no-pager -q -o cat | tail -n 5)" 'dockhand proxy stopped'

# --- the same node on containerd 2.4 with runc 1.5.3 --------------------------------------------
# The pods removed through dockhand, then containerd.service switched to the 2.4 binaries the host
# built (a drop-in for ExecStart, the stock 2.4 shim first in PATH as dockhand's shim's delegate,
# the README's version = 3 config with runc 1.5.3 as BinaryName) and the placement checks rerun.
lab=/usr/local/lib/dockhand-lab
setup "start dockhand again" systemctl start dockhand.service
setup "dockhand answers CRI Version" wait_for 60 cri version
setup "remove containerd 1.7's pods" cri rmp -fa
setup "create $lab" mkdir -p "$lab"
setup "install containerd 2.4 and runc 1.5.3" cp -a "$payload/containerd-2.4" "$payload/runc-1.5.3" "$lab/"
setup "configure containerd 2.4" install -m 0644 "$payload/containerd-2.4-config.toml" /etc/containerd/config-2.4.toml
mkdir -p /etc/systemd/system/containerd.service.d
printf '[Service]\nEnvironment=PATH=%s\nExecStart=\nExecStart=%s --config %s\n' \
    "$lab/containerd-2.4:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "$lab/containerd-2.4/containerd" /etc/containerd/config-2.4.toml \
    >/etc/systemd/system/containerd.service.d/dockhand-lab-2.4.conf
setup "systemctl daemon-reload" systemctl daemon-reload
setup "restart containerd as 2.4" systemctl restart containerd
setup "import the test images with 2.4's ctr" "$lab/containerd-2.4/ctr" -n k8s.io images import "$payload/images.tar"
if ! wait_for 60 cri version; then
    fail "setup: dockhand answers CRI Version on containerd 2.4" "$(cri version 2>&1 | tail -n 2 | tr '\n' ' ')"
    finish
fi
setup "CRI lists the imported images on 2.4" wait_for 30 has_image docker.io/dockhand/busybox:test
expect_match "2.4: containerd behind dockhand is 2.4.2" "$(cri version)" 'RuntimeVersion: +v?2\.4\.2'
expect_match "2.4: runc 1.5.3 runs here, with seccomp" "$("$lab/runc-1.5.3/runc" --version 2>&1)" 'runc version 1\.5\.3.*libseccomp'
qos_checks "2.4: "

finish
