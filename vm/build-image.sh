#!/usr/bin/env bash
# Builds the guest for the VM lane from Debian's packages and prints the directory holding it:
#   rootfs.img  ext4 root: Debian 12 (debootstrap minbase) + systemd as PID 1, Debian 12's runc,
#               trixie's containerd (1.7: honours runtime_path; 1.6.20 ignores it), jq, the
#               lane's runner unit (vm/guest/dockhand-vm.service)
#   vmlinuz, initrd.img  Debian 12's linux-image-cloud-amd64, taken from that root
# The result is cached under target/vm/image-<key>/, the key hashing this script, the guest files
# baked in and the mirror; a build happens in a scratch directory renamed into place at the end.
# The mirror is the one this machine's apt uses (/etc/apt/sources.list.d/debian.sources).
# Usage: vm/build-image.sh [CACHE_DIR]   (run as root)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${1:-$here/../target/vm}
packages=systemd,systemd-sysv,udev,dbus,kmod,linux-image-cloud-amd64,runc,jq,procps,iproute2,util-linux,mount,e2fsprogs

log() { echo "vm-image: $*" >&2; }
die() { echo "vm-image: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 missing (apt-get install e2fsprogs)"

# The Debian mirror: the first URI of the deb822 stanza whose Suites list bookworm itself.
sources=/etc/apt/sources.list.d/debian.sources
[ -r "$sources" ] || die "cannot read $sources (the Debian mirror is read from there)"
mirror=$(awk '
    BEGIN { RS = ""; FS = "\n" }
    {
        uri = ""; suite = 0
        for (i = 1; i <= NF; i++) {
            if ($i ~ /^URIs:/) { split($i, u, /[ \t]+/); uri = u[2] }
            if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == "bookworm") suite = 1 }
        }
        if (suite && uri != "") { print uri; exit }
    }' "$sources")
[ -n "$mirror" ] || die "no URIs: line for suite bookworm in $sources"

key=$( { cat "$0" "$here/guest/dockhand-vm.service"; echo "$mirror $packages"; } | sha256sum | cut -c1-16)
out=$cache/image-$key
if [ -e "$out/done" ]; then
    log "cached: $out"
    echo "$out"
    exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.building-XXXXXX")
root=$work/root
cleanup() {
    for m in proc sys dev/pts dev; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
    done
    rm -rf "$work"
}
trap cleanup EXIT

# trixie's containerd, fetched with private apt state so the system's sources stay untouched.
apt_dir=$work/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" >"$apt_dir/sources.list"
apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
log "fetching trixie's containerd"
apt-get "${apt_opts[@]}" -q update >&2
(cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" -q download containerd >&2)
deb=$(ls "$apt_dir"/debs/containerd_*.deb)
case "$(dpkg-deb -f "$deb" Version)" in
    1.7.*) ;;
    *) die "trixie's containerd is $(dpkg-deb -f "$deb" Version), the lane needs 1.7 (runtime_path)" ;;
esac

log "debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >&2 \
    || { tail -n 30 "$root/debootstrap/debootstrap.log" >&2 2>/dev/null; die "debootstrap failed"; }

mount -t proc proc "$root/proc"
cp "$deb" "$root/tmp/"
# runc is Debian 12's 1.1.5 (trixie's needs a newer glibc); containerd asks only for a runc.
chroot "$root" dpkg -i "/tmp/$(basename "$deb")" >&2
rm -f "$root/tmp/$(basename "$deb")"
umount "$root/proc"

echo dockhand-vm >"$root/etc/hostname"
# containerd copies both into every host-network sandbox; minbase leaves them out.
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdockhand-vm\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
[ -e "$root/etc/resolv.conf" ] || : >"$root/etc/resolv.conf"
printf '/dev/vda / ext4 rw 0 1\n' >"$root/etc/fstab"
install -D -m 0644 "$here/guest/dockhand-vm.service" "$root/etc/systemd/system/dockhand-vm.service"
mkdir -p "$root/payload"
chroot "$root" systemctl enable dockhand-vm.service >&2
# Nothing on the consoles, no periodic apt jobs: the lane's runner is the only workload.
chroot "$root" systemctl mask serial-getty@ttyS0.service serial-getty@ttyS1.service \
    getty@tty1.service apt-daily.timer apt-daily-upgrade.timer >&2
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

mkdir -p "$work/out"
kernel=$(ls "$root"/boot/vmlinuz-* | head -n 1)
[ -f "$kernel" ] || die "no kernel in $root/boot"
cp "$kernel" "$work/out/vmlinuz"
cp "$root/boot/initrd.img-${kernel##*/vmlinuz-}" "$work/out/initrd.img" || die "no initrd for $kernel"
size_mb=$(( $(du -sm "$root" | cut -f1) + 1536 ))
mkfs.ext4 -q -F -L root -d "$root" "$work/out/rootfs.img" "${size_mb}M" >&2
touch "$work/out/done"
rm -rf "$out"
mv "$work/out" "$out"
log "built: $out"
echo "$out"
