#!/bin/sh
# nixdock builder entry point, uploaded into the container by nixdock before it starts.
# Works with any image that has Nix and OpenSSH's sshd, wherever they live (on PATH, or only
# in a profile as in nixos/nix), and provisions everything else.
set -eu
ND=/etc/nixdock
log() { echo "nixdock-entry: $*" >&2; }

find_bin() {
    for d in /root/.nix-profile/bin /root/.nix-profile/sbin /nix/var/nix/profiles/default/bin \
        /nix/var/nix/profiles/default/sbin /run/current-system/sw/bin /usr/local/sbin \
        /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
        if [ -x "$d/$1" ]; then echo "$d/$1"; return 0; fi
    done
    for p in /nix/store/*/bin/"$1" /nix/store/*/sbin/"$1"; do
        if [ -x "$p" ]; then echo "$p"; return 0; fi
    done
    return 1
}

arch=$(uname -m)
if [ -n "${NIXDOCK_EXPECT_ARCH:-}" ] && [ "$arch" != "$NIXDOCK_EXPECT_ARCH" ]; then
    log "FATAL: this container runs $arch, but $NIXDOCK_EXPECT_ARCH is needed for ${NIXDOCK_SYSTEM:-?}; is emulation (binfmt/qemu) enabled for it?"
    exit 64
fi

nix_daemon=$(find_bin nix-daemon) || { log "FATAL: no nix-daemon in this image (Nix 2.8 or newer is required)"; exit 65; }
sshd=$(find_bin sshd) || { log "FATAL: no sshd in this image (OpenSSH's sshd is required)"; exit 66; }
mkdir -p "$ND/bin"
ln -sf "$nix_daemon" "$ND/bin/nix-daemon"
nix_bin_dir=$(dirname "$nix_daemon")
for tool in nix-store nix nix-collect-garbage; do
    if [ -x "$nix_bin_dir/$tool" ]; then ln -sf "$nix_bin_dir/$tool" "$ND/bin/$tool"; fi
done

# Builds run as build users only when the image has a nixbld group with members.
build_users_group=
if grep -q '^nixbld:[^:]*:[0-9]*:..*' /etc/group 2>/dev/null; then build_users_group=nixbld; fi

mkdir -p /etc/nix
{
    echo "# written by nixdock at container start; settings of one caller travel per connection"
    echo "build-users-group = $build_users_group"
    cat "$ND/nix.conf.in"
    if [ "${NIXDOCK_EMULATED:-0}" = 1 ]; then
        # seccomp filters cannot be loaded under qemu-user: "unable to load seccomp BPF program"
        echo "filter-syscalls = false"
    fi
} > /etc/nix/nix.conf.nixdock
mv /etc/nix/nix.conf.nixdock /etc/nix/nix.conf

# sshd needs its privilege-separation user and directories; root must not be locked.
grep -q '^sshd:' /etc/passwd 2>/dev/null || echo 'sshd:x:74:65534:sshd:/var/empty:/bin/false' >> /etc/passwd
mkdir -p /run/sshd /var/empty
chmod 0755 /run/sshd /var/empty
if [ -f /etc/shadow ] && grep -q '^root:!' /etc/shadow; then
    sed -i 's/^root:!*/root:*/' /etc/shadow
fi
chmod 0600 "$ND/ssh_host_ed25519_key" "$ND/authorized_keys"
echo "$arch" > "$ND/arch"

"$sshd" -D -e -f "$ND/sshd_config" &
sshd_pid=$!
log "sshd started ($sshd), nix-daemon at $nix_daemon, arch $arch, build-users-group '$build_users_group'"

# Stop after NIXDOCK_IDLE_TIMEOUT seconds with no nix-daemon running, so no host daemon is needed.
idle_limit=${NIXDOCK_IDLE_TIMEOUT:-1800}
idle=0
trap 'kill "$sshd_pid" 2>/dev/null; exit 0' TERM INT
while kill -0 "$sshd_pid" 2>/dev/null; do
    sleep 5 &
    wait $! || true
    busy=0
    for c in /proc/[0-9]*/comm; do
        read -r name < "$c" 2>/dev/null || continue
        case "$name" in nix-daemon) busy=1; break ;; esac
    done
    if [ "$busy" = 1 ]; then idle=0; else idle=$((idle + 5)); fi
    if [ "$idle" -ge "$idle_limit" ]; then
        log "idle for ${idle_limit}s, stopping"
        kill "$sshd_pid" 2>/dev/null || true
        exit 0
    fi
done
log "sshd exited"
wait "$sshd_pid"
