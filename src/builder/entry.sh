#!/bin/sh
# nixdock builder entry point, uploaded into the container by nixdock before it starts.
# Works with any image that has Nix and OpenSSH's sshd, wherever they live (on PATH, or only
# in a profile as in nixos/nix), and provisions everything else. Needs only a POSIX shell,
# coreutils and grep: the official nixos/nix image has no sed, no awk and no useradd.
set -eu
ND=/etc/nixdock
# First uid of the builder's build users (see below); far above any host's users and below
# Nix's auto-allocate-uids range (872415232 and up). A user-namespaced engine (rootless Docker
# or Podman, userns-remap) maps only a small range (usually 65536 uids), so nixdock passes a base
# inside it there; mapped uids are not the host's, so its killUser cannot reach them anyway.
NIXDOCK_BUILD_UID_BASE=${NIXDOCK_BUILD_UID_BASE:-700000000}
case "$NIXDOCK_BUILD_UID_BASE" in
    ''|*[!0-9]*) echo "nixdock-entry: FATAL: NIXDOCK_BUILD_UID_BASE '$NIXDOCK_BUILD_UID_BASE' is not a number" >&2; exit 67 ;;
esac
log() { echo "nixdock-entry: $*" >&2; }

# A persistent nix-daemon: the hook reaches its socket through an SSH streamlocal channel, and
# the daemon forks a worker per connection, so a build starts no process but its builder.
launch_daemon() {
    rm -f /nix/var/nix/daemon-socket/socket
    "$ND/bin/nix-daemon" --daemon &
    daemon_pid=$!
}
await_daemon() {
    i=0
    while [ ! -S /nix/var/nix/daemon-socket/socket ] && [ "$i" -lt 200 ]; do
        if ! kill -0 "$daemon_pid" 2>/dev/null; then
            log "nix-daemon exited at start; connections fall back to nix-daemon --stdio"
            return 0
        fi
        sleep 0.05 2>/dev/null || sleep 1
        i=$((i + 1))
    done
}
start_daemon() { launch_daemon; await_daemon; }
# sshd starts beside the daemon, not after it: an SSH cold start needs both, and a session that
# comes before the daemon's socket runs `nix-daemon --stdio` instead (the hook's fallback).
serve() {
    launch_daemon
    "$ND/bin/sshd" -D -e -f "$ND/sshd_config" &
    sshd_pid=$!
    serving=1
}
# A restart (the idle stop, `docker start`): the files nixdock uploads come only with the
# container's creation, and the environment is the container's, so the first start's setup below
# (links to the image's programs, users, nix.conf, sshd's needs) is in place and gives the same
# result again: serve before anything else and redo it behind (a cold start waits for neither;
# the architecture check below still ends the container if the binaries cannot run).
serving=
if [ -e "$ND/set-up" ]; then
    serve
    log "restart: sshd and nix-daemon started before the set-up"
fi

# `key = value` of the last line setting key in a nix.conf-like file ($1: file, $2: key).
conf_value() {
    v=
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in
            "$2 = "*) v=${line#"$2 = "} ;;
        esac
    done < "$1"
    echo "$v"
}

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
nix_bin_dir=$(dirname "$nix_daemon")
# Made by the first start; a restart's daemon and sessions already run through them (a link
# replaced under them could be missing for a moment), and an image is a container's for life.
if [ -z "$serving" ]; then
    mkdir -p "$ND/bin"
    ln -sf "$nix_daemon" "$ND/bin/nix-daemon"
    ln -sf "$sshd" "$ND/bin/sshd"
    for tool in nix-store nix nix-collect-garbage; do
        if [ -x "$nix_bin_dir/$tool" ]; then ln -sf "$nix_bin_dir/$tool" "$ND/bin/$tool"; fi
    done
fi


# Builds always run as unprivileged build users, never as root: a build as root would own this
# shared builder (replace its nix-daemon, rewrite its store) and so every later build of this
# system for every user.
#
# The host's Nix kills every process of a build user's uid before and after each of its own
# builds (killUser: kill(-1, SIGKILL) as that uid), and the host's PID namespace contains this
# container's processes. An image's build users usually have the host's uids (Debian: 990-999,
# NixOS and the installer: 30001-30032), so a host build would kill builds running here. The
# group gets its own users, in a uid range no host allocates. Images without a nixbld group (or
# with one without members) get the group too, with a gid from the same range. /etc/passwd and
# /etc/group are edited directly: many images have no useradd/groupadd.

# A file that is a symlink (e.g. into /nix/store) is replaced by a private copy before editing.
own_file() {
    if [ -L "$1" ]; then
        cp "$1" "$1.nixdock" && mv -f "$1.nixdock" "$1"
    elif [ ! -e "$1" ]; then
        : > "$1"
    fi
}
# Whether an id is taken in /etc/passwd or /etc/group ($1: file, $2: id).
id_taken() { grep -q "^[^:]*:[^:]*:$2:" "$1"; }

# Build users must be uids (and the group a gid) that the container's user namespace maps: a
# user-namespaced engine nixdock could not recognise as one (it passes no base then) maps only the
# engine user's subordinate range, and a build user outside it cannot exist ("setgroups: Invalid
# argument"). So a base whose range /proc/self/uid_map and gid_map do not cover falls back to
# 10000, then 1000.
ids_mapped() { # MAP FIRST LAST: whether one line of MAP covers FIRST..LAST
    [ -r "$1" ] || return 0
    while read -r inside _outside count; do
        if [ "$inside" -le "$2" ] && [ "$3" -lt $((inside + count)) ]; then return 0; fi
    done < "$1"
    return 1
}
pick_uid_base() {
    jobs=$(conf_value "$ND/nix.conf.in" max-jobs)
    case "$jobs" in ''|*[!0-9]*) jobs=0 ;; esac
    need=$jobs
    [ "$need" -ge 32 ] || need=32
    need=$((need + 64)) # room for ids the image already uses
    for base in "$NIXDOCK_BUILD_UID_BASE" 10000 1000; do
        if ids_mapped /proc/self/uid_map "$base" $((base + need)) &&
            ids_mapped /proc/self/gid_map "$base" $((base + need)); then
            if [ "$base" != "$NIXDOCK_BUILD_UID_BASE" ]; then
                log "build users from uid $((base + 1)): this container's user namespace does not map $NIXDOCK_BUILD_UID_BASE and up"
                NIXDOCK_BUILD_UID_BASE=$base
            fi
            return 0
        fi
    done
    log "FATAL: this container's user namespace maps no $need free uids for build users ($(tr -s ' \n' ' ,' < /proc/self/uid_map))"
    exit 67
}
pick_uid_base

own_file /etc/group
own_file /etc/passwd
if ! grep -q '^nixbld:' /etc/group; then
    gid=$NIXDOCK_BUILD_UID_BASE
    while id_taken /etc/group "$gid"; do gid=$((gid + 1)); done
    echo "nixbld:x:$gid:" >> /etc/group
    log "created group nixbld (gid $gid)"
fi
bld_gid=
while IFS=: read -r gname _ gid _; do
    if [ "$gname" = nixbld ]; then bld_gid=$gid; fi
done < /etc/group
case "$bld_gid" in *[!0-9]*) bld_gid= ;; esac
if [ -z "$bld_gid" ] || [ "$bld_gid" = 0 ]; then
    log "FATAL: group nixbld in /etc/group has no usable gid ('$bld_gid'); builds must not run in group root"
    exit 67
fi
if ! grep -q '^nixdockbld1:' /etc/passwd; then
    jobs=$(conf_value "$ND/nix.conf.in" max-jobs)
    case "$jobs" in ''|*[!0-9]*) jobs=0 ;; esac
    n=$jobs
    [ "$n" -ge 32 ] || n=32
    uid=$NIXDOCK_BUILD_UID_BASE
    i=1
    while [ "$i" -le "$n" ]; do
        uid=$((uid + 1))
        while id_taken /etc/passwd "$uid"; do uid=$((uid + 1)); done
        echo "nixdockbld$i:x:$uid:$bld_gid:nixdock build user $i:/var/empty:/bin/false" >> /etc/passwd
        i=$((i + 1))
    done
fi
# The group's members are exactly nixdock's build users (the image's own, with host uids, go).
members=
while IFS=: read -r name _; do
    case "$name" in nixdockbld[0-9]*) members="$members${members:+,}$name" ;; esac
done < /etc/passwd
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        nixbld:*)
            rest=${line#nixbld:}
            pw=${rest%%:*}
            echo "nixbld:$pw:$bld_gid:$members" ;;
        *) echo "$line" ;;
    esac
done < /etc/group > /etc/group.nixdock
mv -f /etc/group.nixdock /etc/group
if ! grep -q "^nixbld:[^:]*:$bld_gid:nixdockbld1" /etc/group; then
    log "FATAL: could not give group nixbld its build users in /etc/group"
    exit 67
fi
build_users_group=nixbld

mkdir -p /etc/nix
# The image's own nix.conf, kept before the first start replaces it: where its Nix puts a static
# shell for /bin/sh in the sandbox (Debian's: sandbox-paths = /bin/sh=/usr/bin/bash-static).
if [ ! -e "$ND/image-nix.conf" ]; then
    if [ -f /etc/nix/nix.conf ]; then cp /etc/nix/nix.conf "$ND/image-nix.conf"; else : > "$ND/image-nix.conf"; fi
fi
# NIXDOCK_SANDBOX=1: nixdock decided on Nix's sandbox for this builder (and gave the container
# what it needs). sandbox-fallback = false: a sandbox that cannot start fails the build instead
# of building unsandboxed without a word (Nix's default falls back).
sandbox_conf="sandbox = false"
if [ "${NIXDOCK_SANDBOX:-0}" = 1 ]; then
    # The sandbox has no /bin/sh but what sandbox-paths gives it, and a dynamic shell would
    # find no libraries there: a static one, from the image's nix.conf, Nix's built-in default
    # (NixOS's Nix: a static busybox) or a known static shell.
    # The target of /bin/sh= in the last `sandbox-paths = …` line read from stdin.
    sh_from() {
        found=
        while IFS= read -r line || [ -n "$line" ]; do
            set -f
            # shellcheck disable=SC2086 # split into words on purpose
            set -- $line
            set +f
            [ "${1:-}" = sandbox-paths ] && [ "${2:-}" = = ] || continue
            shift 2
            for w in "$@"; do
                case "$w" in /bin/sh=*) found=${w#/bin/sh=} ;; esac
            done
        done
        echo "$found"
    }
    static_sh=$(sh_from < "$ND/image-nix.conf")
    if [ -z "$static_sh" ] && [ -x "$nix_bin_dir/nix" ]; then
        mkdir -p "$ND/no-conf"
        static_sh=$(NIX_CONF_DIR="$ND/no-conf" NIX_USER_CONF_FILES= NIX_CONFIG= \
            "$nix_bin_dir/nix" --extra-experimental-features nix-command show-config 2>/dev/null | sh_from) || static_sh=
    fi
    if [ -n "$static_sh" ] && [ ! -x "$static_sh" ]; then static_sh=; fi
    if [ -z "$static_sh" ]; then
        for c in /usr/bin/bash-static /bin/bash-static; do
            if [ -x "$c" ]; then static_sh=$c; break; fi
        done
    fi
    if [ -z "$static_sh" ]; then
        log "FATAL: the sandbox is on for ${NIXDOCK_SYSTEM:-this builder}, but this image has no static shell to be /bin/sh in Nix's sandbox (looked at the image's nix.conf sandbox-paths, Nix's built-in default, /usr/bin/bash-static, /bin/bash-static): install one (Debian: bash-static) or set sandbox = false for this builder"
        exit 68
    fi
    sandbox_conf="sandbox = true
sandbox-fallback = false
sandbox-paths = /bin/sh=$static_sh"
fi
{
    echo "# written by nixdock at container start; settings of one caller travel per connection"
    # Before the config's lines: its extra-sandbox-paths add to these (it may not set sandbox).
    echo "$sandbox_conf"
    cat "$ND/nix.conf.in"
    if [ "${NIXDOCK_EMULATED:-0}" = 1 ]; then
        # seccomp filters cannot be loaded under qemu-user: "unable to load seccomp BPF program"
        echo "filter-syscalls = false"
    fi
    # Last, so no earlier line can change it (the config refuses such lines anyway).
    echo "build-users-group = $build_users_group"
} > /etc/nix/nix.conf.nixdock
mv /etc/nix/nix.conf.nixdock /etc/nix/nix.conf

# sshd (every OpenSSH since 7.5: privilege separation cannot be turned off) needs its
# privilege-separation user and chroot directory: Debian's is /run/sshd, the one nixpkgs builds
# (nixos/nix) /var/empty, an image without OpenSSH's packaging scripts (nixos/nix) has neither
# the user nor the directory. Root must not be locked ("!" in shadow), or sshd refuses its key.
if ! grep -q '^sshd:' /etc/passwd; then
    uid=74
    while id_taken /etc/passwd "$uid"; do uid=$((uid + 1)); done
    echo "sshd:x:$uid:65534:sshd privilege separation:/var/empty:/bin/false" >> /etc/passwd
    log "created sshd's privilege-separation user (uid $uid)"
fi
mkdir -p /run/sshd /var/empty
chmod 0755 /run/sshd /var/empty
if [ -e /etc/shadow ] && grep -q '^root:!' /etc/shadow; then
    own_file /etc/shadow
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in
            root:*)
                rest=${line#root:}
                pw=${rest%%:*}
                while [ "${pw#!}" != "$pw" ]; do pw=${pw#!}; done
                case "$rest" in *:*) tail=":${rest#*:}" ;; *) tail= ;; esac
                echo "root:*$pw$tail" ;;
            *) echo "$line" ;;
        esac
    done < /etc/shadow > /etc/shadow.nixdock
    chmod 0600 /etc/shadow.nixdock
    mv -f /etc/shadow.nixdock /etc/shadow
fi
# sshd gives sessions its compiled-in PATH (/usr/bin:/bin:…), where nixos/nix has no tools
# (coreutils, grep, nix live in root's profile): sessions get this container's PATH instead
# (sshd_config has PermitUserEnvironment for it; root is the only user who logs in).
root_home=/root
while IFS=: read -r uname _ uid _ _ home _; do
    if [ "$uid" = 0 ] && [ "$uname" = root ] && [ -n "$home" ]; then root_home=$home; fi
done < /etc/passwd
mkdir -p "$root_home/.ssh"
echo "PATH=${PATH:-/usr/bin:/bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" > "$root_home/.ssh/environment"
chmod 0600 "$ND/ssh_host_ed25519_key" "$ND/authorized_keys"
echo "$arch" > "$ND/arch"

# A first start serves once the setup above is done; a restart already did (see the top).
if [ -z "$serving" ]; then serve; fi
: > "$ND/set-up"
await_daemon
log "sshd started ($sshd), nix-daemon at $nix_daemon (pid $daemon_pid), arch $arch, build-users-group '$build_users_group', $(echo "$sandbox_conf" | tr '\n' ' ')"

# max-store-size: when the store holds more than NIXDOCK_MAX_STORE_KB (du's KiB; 0: no limit),
# collect garbage down to 90% of it. Checked here, in the builder, once at start and whenever
# no daemon connection is open and the store's database changed since the last check (paths
# were added): after the hook has copied a build's outputs back, so
# it never delays a build's result, needs no hook or engine call, and works on every engine.
# It runs in the background; a build that starts meanwhile is safe (Nix's GC honours the
# temporary roots of running builds) and the idle stop waits for it.
max_store_kb=${NIXDOCK_MAX_STORE_KB:-0}
case "$max_store_kb" in ''|*[!0-9]*) max_store_kb=0 ;; esac
gc_pid=
gc_stamp=$ND/gc.stamp
store_gc() {
    [ "$max_store_kb" -gt 0 ] || return 0
    if [ -n "$gc_pid" ] && kill -0 "$gc_pid" 2>/dev/null; then return 0; fi
    : > "$gc_stamp"
    used=$(du -sk /nix/store 2>/dev/null) || used=0
    used=${used%%[!0-9]*}
    [ "${used:-0}" -gt "$max_store_kb" ] || return 0
    want=$((used - max_store_kb * 9 / 10))
    log "store holds ${used} KiB, more than max-store-size (${max_store_kb} KiB): collecting garbage (up to ${want} KiB)"
    (
        if "$ND/bin/nix-store" --gc --max-freed "$((want * 1024))" > "$ND/gc.log" 2>&1; then
            after=$(du -sk /nix/store 2>/dev/null) || after=?
            log "garbage collected: the store holds ${after%%[!0-9]*} KiB"
        else
            log "garbage collection failed: $(tail -n 3 "$ND/gc.log" | tr '\n' ' ')"
        fi
    ) &
    gc_pid=$!
}
store_gc

# Stop after NIXDOCK_IDLE_TIMEOUT seconds with no nix-daemon running, so no host daemon is needed.
idle_limit=${NIXDOCK_IDLE_TIMEOUT:-1800}
idle=0
trap 'kill "$sshd_pid" "$daemon_pid" 2>/dev/null; exit 0' TERM INT
while kill -0 "$sshd_pid" 2>/dev/null; do
    sleep 5 &
    wait $! || true
    if ! kill -0 "$daemon_pid" 2>/dev/null; then
        log "nix-daemon (pid $daemon_pid) is gone; starting it again"
        start_daemon
    fi
    # Busy while any nix-daemon but the listening one runs: its per-connection workers (same
    # name, forked) and any nix-daemon --stdio.
    busy=0
    for d in /proc/[0-9]*; do
        [ "${d#/proc/}" = "$daemon_pid" ] && continue
        read -r name < "$d/comm" 2>/dev/null || continue
        case "$name" in nix-daemon) busy=1; break ;; esac
    done
    if [ "$busy" = 0 ] && { [ /nix/var/nix/db/db.sqlite -nt "$gc_stamp" ] ||
        [ /nix/var/nix/db/db.sqlite-wal -nt "$gc_stamp" ]; }; then
        store_gc
    fi
    if [ -n "$gc_pid" ] && kill -0 "$gc_pid" 2>/dev/null; then busy=1; fi
    if [ "$busy" = 1 ]; then idle=0; else idle=$((idle + 5)); fi
    if [ "$idle" -ge "$idle_limit" ]; then
        log "idle for ${idle_limit}s, stopping"
        kill "$sshd_pid" "$daemon_pid" 2>/dev/null || true
        exit 0
    fi
done
log "sshd exited"
wait "$sshd_pid"
