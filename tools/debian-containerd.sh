#!/usr/bin/env bash
# Extracts containerd (and its ctr and containerd-shim-runc-v2) of another Debian suite into
# DEST/bin, without touching the system's apt sources, lists or containerd:
#   tools/debian-containerd.sh SUITE PACKAGE_VERSION DEST
# apt runs with a sources list, lists and cache of its own under DEST/apt; the mirror is the one
# this machine already uses (read from /etc/apt/sources.list.d/debian.sources or sources.list).
# Their runc needs a newer glibc than Debian 12 has: the tests keep the system's runc.
set -euo pipefail
suite=$1 version=$2
mkdir -p "$3"
dest=$(cd "$3" && pwd)

uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
	/etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
	uri=$(awk '$1 == "deb" && $2 !~ /security/ && $2 !~ /^\[/ { print $2; exit }' /etc/apt/sources.list)
fi
if [ -z "$uri" ]; then
	echo "debian-containerd: no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list" >&2
	exit 1
fi

apt_dir=$dest/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/parts" "$apt_dir/debs" "$dest/root"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main" >"$apt_dir/sources.list"
apt_opts=(
	-o "Dir::Etc::sourcelist=$apt_dir/sources.list"
	-o "Dir::Etc::sourceparts=$apt_dir/parts"
	-o "Dir::State::Lists=$apt_dir/lists"
	-o "Dir::Cache=$apt_dir/cache"
	-o "APT::Get::List-Cleanup=0"
	-o "APT::Sandbox::User=root"
)
apt-get "${apt_opts[@]}" update
(cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" download "containerd=$version") || {
	echo "debian-containerd: containerd=$version is not in $suite; it has:" >&2
	apt-cache "${apt_opts[@]}" policy containerd >&2
	exit 1
}
dpkg-deb -x "$apt_dir"/debs/containerd_*.deb "$dest/root"
mkdir -p "$dest/bin"
for binary in containerd ctr containerd-shim-runc-v2; do
	ln -sf "../root/usr/bin/$binary" "$dest/bin/$binary"
done
"$dest/bin/containerd" --version
