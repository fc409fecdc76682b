#!/usr/bin/env bash
# `nixdock image build --from-debian`: a builder root file system from Debian packages only
# (no container registry needed), the recipe of scripts/testbed: debootstrap a minbase tree,
# install nix-bin and openssh-server in it, and pack it as a tar archive for `docker import`.
#
# usage: debian-image.sh SUITE ARCH MIRROR WORKDIR OUT_TAR LOG
# Progress goes to stderr; everything the tools say goes to LOG.
set -Eeuo pipefail

suite=$1 arch=$2 mirror=$3 work=$4 out=$5 log=$6
root=$work/rootfs
unsafe_io=nixdock-image-unsafe-io # a dpkg.cfg.d file that only exists while the tree is built
t0=$(date +%s)

say() { printf '  [%4ss] %s\n' "$(($(date +%s) - t0))" "$*" >&2; }

# umount everything mounted below DIR (deepest first), so no mount outlives the build.
release_mounts() {
	local dir m
	[[ -e $1 ]] || return 0
	dir=$(readlink -f "$1")
	[[ $dir == /?* ]] || return 0
	while read -r m; do
		umount "$m" 2>/dev/null || umount -l "$m"
	done < <(awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts | sort -r)
}
trap 'release_mounts "$root"' EXIT

fail() {
	say "FAILED: $*"
	say "last lines of $log:"
	tail -n 25 "$log" >&2 || true
	exit 1
}

mkdir -p "$root"
native=$(dpkg --print-architecture 2>/dev/null || true)
how="natively"
[[ $arch == "$native" ]] || how="under emulation (slow)"
say "debootstrap $suite/$arch from $mirror, $how"
debootstrap --foreign --variant=minbase --arch="$arch" "$suite" "$root" "$mirror" >>"$log" 2>&1 ||
	fail "debootstrap (first stage)"
# dpkg's per-file fsync only costs time on a throw-away tree.
mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
echo force-unsafe-io >"$root/etc/dpkg/dpkg.cfg.d/$unsafe_io"
say "debootstrap second stage"
chroot "$root" /debootstrap/debootstrap --second-stage >>"$log" 2>&1 || fail "debootstrap (second stage)"

say "apt-get install nix-bin openssh-server"
cp /etc/resolv.conf "$root/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" # start no services
chmod 755 "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc" # nix needs /proc
apt=(chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
	apt-get -o Acquire::Check-Valid-Until=false -o Acquire::Retries=3)
"${apt[@]}" update >>"$log" 2>&1 || fail "apt-get update"
"${apt[@]}" install -y nix-bin openssh-server >>"$log" 2>&1 || fail "apt-get install"
version=$(chroot "$root" nix --version) || fail "nix --version in the new tree"
say "installed $version"
release_mounts "$root"
chroot "$root" apt-get clean >>"$log" 2>&1
rm -rf "$root"/var/lib/apt/lists/* "$root/usr/sbin/policy-rc.d" "$root/etc/dpkg/dpkg.cfg.d/$unsafe_io"

say "packing the tree"
tar -C "$root" --numeric-owner --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' \
	-cf "$out" . 2>>"$log" || fail "tar"
say "packed $(du -h "$out" | cut -f1)"
