#!/usr/bin/env bash
# The VM lane (`make test-vm`): dockhand on a real systemd node with cgroup v2.
#  1. builds (or reuses) the guest image: vm/build-image.sh
#  2. installs dockhand as an operator would, into a staging root: `make install DESTDIR=…`, and
#     checks that it wrote exactly the files the README lists
#  3. puts those files, crictl, the test images, containerd's config and the test driver on a
#     payload disk, with containerd 2.4, runc 1.5.3 and their config for the guest's second round
#  4. boots the guest under qemu (software emulation: KVM hangs on these machines) with a hard
#     timeout; the guest runs vm/guest/test.sh and reports on its second serial port
#  5. prints the guest's PASS/FAIL lines and `N passed, N failed`; exits 1 if anything failed, if
#     the guest never reported, or if any check the guest script lists (its CHECKS block) did not
#     report exactly one PASS line (and no PASS may name a check not listed)
# Environment: VM_TIMEOUT (seconds the guest may run, default 900), VM_MEMORY (MiB, default 2048),
# VM_CPUS (default 2), VM_KEEP=1 keeps the run directory under target/vm/.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=$repo/target/vm
timeout_s=${VM_TIMEOUT:-900}
started=$SECONDS

die() { echo "test-vm: error: $*" >&2; exit 1; }
note() { echo "test-vm: $*"; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, the guest image)"
command -v qemu-system-x86_64 >/dev/null \
    || die "qemu-system-x86_64 not found: the VM lane cannot run here (apt-get install qemu-system-x86)"
qemu-system-x86_64 -accel help 2>/dev/null | grep -qx tcg \
    || die "this qemu-system-x86_64 has no TCG accelerator: the VM lane cannot run here"
crictl=$repo/target/tools/bin/crictl
[ -x "$crictl" ] || die "$crictl missing (make tools)"
# The guest's second round: containerd 2.4 and runc 1.5.3 as the integration tests run them.
containerd24=$repo/target/containerd/2.4/bin
runc153=$repo/target/runc/1.5.3/runc
for f in "$containerd24"/{containerd,ctr,containerd-shim-runc-v2} "$runc153"; do
    [ -x "$f" ] || die "$f missing (make containerd-2.4)"
done

# The checks the guest script defines: its CHECKS block, one name a line.
mapfile -t checks < <(sed -n '/^# CHECKS BEGIN$/,/^# CHECKS END$/s/^#   //p' "$repo/vm/guest/test.sh")
[ "${#checks[@]}" -gt 0 ] || die "vm/guest/test.sh has no CHECKS block"

mkdir -p "$cache"
run=$(mktemp -d "$cache/run-XXXXXX")
[ "${VM_KEEP:-0}" = 1 ] || trap 'rm -rf "$run"' EXIT
payload=$run/payload
mkdir -p "$payload/bin"

# The image build waits on the network and dpkg, the release build below on the CPU: overlap them.
"$repo/vm/build-image.sh" "$cache" >"$run/image.path" 2>"$run/image.log" &
image_job=$!

passed=0
failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }

# What `make install` writes, as an operator runs it (into a staging root here).
make -C "$repo" --no-print-directory install DESTDIR="$payload/install" >"$run/install.log" 2>&1 \
    || { tail -n 20 "$run/install.log"; die "make install failed"; }
written=$(cd "$payload/install" && find . -type f -printf '%m /%P\n' | sort)
expected=$(sort <<'EOF'
755 /usr/local/bin/dockhand
755 /usr/local/bin/containerd-shim-dockhand-v2
644 /etc/systemd/system/dockhand.service
644 /etc/dockhand/config.toml.example
644 /usr/local/share/doc/dockhand/README.md
EOF
)
if [ "$written" = "$expected" ]; then
    pass "install: make install writes the files the README lists"
else
    fail "install: make install writes the files the README lists" "wrote: $(tr '\n' ' ' <<<"$written")"
fi

if ! wait "$image_job"; then
    tail -n 30 "$run/image.log"
    die "cannot build the guest image (log above)"
fi
image=$(cat "$run/image.path")
# Images of other keys are stale (an input changed): drop them (2 GB each, sparse).
find "$cache" -maxdepth 1 -name 'image-*' ! -path "$image" -exec rm -rf {} +
note "guest image ready after $((SECONDS - started)) s: $image"

cp "$crictl" "$payload/bin/crictl"
(cd "$repo" && cargo run -q -p dockhand-integration --bin vm-fixtures -- "$payload/images.tar") \
    || die "cannot build the test images"
cp "$repo/vm/guest/test.sh" "$repo/vm/guest/containerd-config.toml" "$repo/vm/guest/containerd-2.4-config.toml" "$payload/"
mkdir -p "$payload/containerd-2.4" "$payload/runc-1.5.3"
cp "$containerd24"/{containerd,ctr,containerd-shim-runc-v2} "$payload/containerd-2.4/"
cp "$runc153" "$payload/runc-1.5.3/"
size_mb=$(( $(du -sm "$payload" | cut -f1) + 64 ))
mkfs.ext4 -q -F -L payload -d "$payload" "$run/payload.img" "${size_mb}M" >/dev/null
note "payload ready after $((SECONDS - started)) s"

# The guest: systemd as PID 1 on the unified cgroup v2 hierarchy; no network. Console on the first
# serial port, the driver's report on the second; it powers off when the driver ends.
note "booting the guest (qemu TCG, at most $timeout_s s)"
boot=$SECONDS
timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
    -accel tcg -m "${VM_MEMORY:-2048}" -smp "${VM_CPUS:-2}" \
    -display none -monitor none -no-reboot -nic none \
    -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 panic=-1" \
    -drive "file=$image/rootfs.img,format=raw,if=virtio,snapshot=on" \
    -drive "file=$run/payload.img,format=raw,if=virtio,readonly=on" \
    -serial "file:$run/console.log" -serial "file:$run/report.log" \
    >"$run/qemu.log" 2>&1 &
qemu_job=$!
# The guest powers itself off after its report; if it has not within 30 s of the last line, the
# report is complete anyway: stop qemu.
reported=
while kill -0 "$qemu_job" 2>/dev/null; do
    if [ -z "$reported" ] && grep -q '^VMTEST DONE ' "$run/report.log" 2>/dev/null; then
        reported=$SECONDS
    fi
    if [ -n "$reported" ] && [ $((SECONDS - reported)) -gt 30 ]; then
        note "the guest reported but did not power off within 30 s; stopping qemu"
        kill "$qemu_job" 2>/dev/null || true
    fi
    sleep 1
done
qemu_rc=0
wait "$qemu_job" || qemu_rc=$?
note "guest ran $((SECONDS - boot)) s (qemu exit $qemu_rc)"

report=$(tr -d '\r' <"$run/report.log" 2>/dev/null || true)
grep -v '^VMTEST ' <<<"$report" | sed 's/^/guest: /' || true
declare -A pass_lines=()
guest_passed=0
while read -r _ verdict rest; do
    case $verdict in
        PASS) echo "PASS $rest"; passed=$((passed + 1)); guest_passed=$((guest_passed + 1))
              pass_lines[$rest]=$(( ${pass_lines[$rest]:-0} + 1 )) ;;
        FAIL) echo "FAIL $rest"; failed=$((failed + 1)) ;;
    esac
done < <(grep -E '^VMTEST (PASS|FAIL) ' <<<"$report" || true)

# Every check the guest script lists reported one PASS (or a FAIL, counted above); none other did.
declare -A listed=()
for name in "${checks[@]}"; do
    listed[$name]=1
    count=${pass_lines[$name]:-0}
    if [ "$count" = 0 ]; then
        grep -qF "VMTEST FAIL $name: " <<<"$report" || fail "guest: $name" "reported neither PASS nor FAIL"
    elif [ "$count" != 1 ]; then
        fail "guest: $name" "reported $count PASS lines"
    fi
done
for name in "${!pass_lines[@]}"; do
    [ -n "${listed[$name]:-}" ] || fail "guest: $name" "a PASS for a check not in vm/guest/test.sh's CHECKS"
done
if [ "$guest_passed" = "${#checks[@]}" ]; then
    pass "guest: PASS lines equal the ${#checks[@]} checks vm/guest/test.sh lists"
else
    fail "guest: PASS lines equal the checks vm/guest/test.sh lists" "$guest_passed PASS lines for ${#checks[@]} checks"
fi

done_line=$(grep -E '^VMTEST DONE ' <<<"$report" | tail -n 1 || true)
if [ -z "$done_line" ]; then
    if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
        fail "guest: the driver reported" "no report within $timeout_s s (VM_TIMEOUT); qemu killed"
    else
        fail "guest: the driver reported" "the guest stopped without a report (qemu exit $qemu_rc)"
    fi
    echo "--- qemu ---"; tail -n 20 "$run/qemu.log" || true
    echo "--- guest console (last 40 lines) ---"; tail -n 40 "$run/console.log" | tr -d '\r' || true
fi

note "lane took $((SECONDS - started)) s"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
