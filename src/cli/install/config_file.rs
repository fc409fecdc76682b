//! nixdock's own config file: the commented default install writes, and the Docker engine it
//! records as `docker-host`.

use std::path::Path;

use crate::builder::Engine;
use crate::builder::engine;

use super::Change;
use super::files::read_for_edit;

/// The config file, under the install root.
pub const CONFIG: &str = "etc/nixdock/nixdock.toml";

/// The config file `install` writes when there is none: every setting, commented out.
pub const DEFAULT_CONFIG: &str = r#"# nixdock configuration, read by nixdock-hook at every build and by `nixdock`.
# Written by `nixdock install` with every setting commented out: the defaults apply.
# `nixdock doctor` checks it; unknown keys are errors.

# The Docker engine. As root (under nix-daemon) the hook uses only this, else DOCKER_HOST,
# else the sockets /var/run/docker.sock and /run/podman/podman.sock when they and every
# directory above them belong to root: it never looks in users' homes. `sudo nixdock install`
# records here the engine it finds (Docker Desktop, OrbStack, colima, ...). An engine named
# here that does not answer is an error; no other is tried.
# docker-host = "unix:///var/run/docker.sock"

# Also send builds for this machine's own system to a builder (normally they run here).
# offload-local = false

# `nixdock serve` (an ssh-ng endpoint for any Nix) uses builders of its own; true lets it use
# the hook's, whose stores its trusted clients could then put unsigned paths into.
# serve-shares-builders = false

# A tcp:// docker-host takes tls-ca, tls-cert and tls-key (only that CA is trusted); an
# ssh://user@host one takes ssh-key and ssh-host-key (the base64 of its host's public key
# line: `base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub`; never trusted on first use), as do
# the engines tables below.

# How the hook reaches a builder's nix-daemon: "auto" goes straight to the daemon's socket in
# the builder's /nix volume when the engine is local (Linux) and that socket is the hook's
# user's (root on a rootful engine, the engine's own user on a rootless one), over
# SSH to a loopback port on other local engines, and through the engine's exec on tcp:// and
# ssh:// engines (no sshd on the network); "ssh" always uses SSH (a remote engine's builders
# then publish sshd on its address); "engine-exec" always uses the engine's exec.
# transport = "auto"

# Over SSH or the engine's exec, the first hook that reaches a builder leaves a small process
# holding the way there for this many seconds after its last use: the SSH session (later hooks
# open channels on it: no key exchange or authentication on a warm build), through the
# engine's exec an SSH session with the builder's sshd run by one exec (no exec on a warm
# build). 0: every hook connects itself.
# ssh-persist = 60

# Nix's sandbox inside the builders (a builder's own `sandbox` overrides it): true, false or
# "auto". "auto" turns it on where it costs the host nothing: an engine inside a VM (Docker
# Desktop, OrbStack, colima, Lima) or a user-namespaced one (rootless, userns-remap). It stays
# off for emulated systems in containers of their own (emulation "container": qemu-user
# cannot start it; true fails their builds) and on a rootful engine on this host, where the sandbox's unmasked /proc/sys would be writable by the
# container's root, the host's root: true accepts that. The image needs a static shell for
# /bin/sh (Debian: bash-static). `nixdock status` says per builder whether and why.
# sandbox = "auto"

# How an emulated system (aarch64-linux on an x86_64 engine, say) is built: "native-builder"
# builds it in the engine's native builder, whose nix.conf lists it in extra-platforms, only
# the build's own programs running under qemu (binfmt_misc, flag F): same slots, same
# settings, the sandbox as that builder has it, no image for the emulated system. "container"
# gives it a container of its own architecture, everything in it under qemu-user.
# emulation = "native-builder"

# With no [builders] table, nixdock serves this machine's own Linux system and, when it can
# emulate it (binfmt_misc with qemu, flag F), the other of x86_64-linux / aarch64-linux.
# A table per system replaces those defaults. An emulated system built by the native builder
# uses that builder's container settings (image … sandbox below), not its own table's:
#
# [builders."x86_64-linux"]
# image = "nixdock/builder:x86_64-linux"    # default: nixos/nix (pinned), pulled at the first
#                                           # build; offline: `nixdock image build --from-debian`
# platform = "linux/amd64"                  # for a pull; default: the system's
# max-jobs = 8                              # builds at once in this builder
# cpus = 4.0                                # CPU limit of the container
# memory = "8g"                             # memory limit of the container
# max-store-size = "20G"                    # collect garbage in the builder above this
# idle-timeout = 1800                       # seconds without builds before it stops
# features = ["big-parallel", "benchmark"]  # system features it offers
# extra-nix-conf = ["keep-outputs = true"]  # lines added to the builder's nix.conf
# kvm = false                               # pass /dev/kvm (adds kvm, nixos-test)
# speed-factor = 1.0                        # against the machines in Nix's `builders`
# sandbox = "auto"                          # Nix's sandbox: true, false or "auto"
#
# [builders."aarch64-linux"]
# emulation = "native-builder"              # or "container" (then image, platform, …)

# More engines, beside docker-host: a pool. A build goes to a builder of its system's own
# architecture first (emulation only when every native one is full), then to the least busy
# per speed factor, across engines and the machines in Nix's `builders`. An engine that does
# not answer within 5 s is skipped, with a warning naming it, for a minute.
#
# [engines.arm-server]
# docker-host = "tcp://arm.example:2376"
# tls-ca = "/etc/nixdock/arm/ca.pem"         # the engine's CA, the only one trusted
# tls-cert = "/etc/nixdock/arm/cert.pem"     # nixdock's client certificate
# tls-key = "/etc/nixdock/arm/key.pem"
# systems = ["aarch64-linux"]                # what it may serve (default: its own system)
# speed-factor = 2.0                         # multiplies its builders' speed factor
# max-jobs = 16                              # caps each of its builders' max-jobs
#
# [engines.lab]
# docker-host = "ssh://builder@lab.example"  # `docker system dial-stdio` over SSH
# ssh-key = "/etc/nixdock/lab/id_ed25519"
# ssh-host-key = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUxhYg=="
"#;

/// Plans the config file: the commented default when there is none, with the engine to
/// record as `docker-host` unless the config already names one (`kept_host`, read before an
/// earlier install was undone); `docker_host` is `--docker-host`, `real_root` an install into /.
pub(super) async fn plan_config(
    cfg_path: &Path,
    kept_host: anyhow::Result<Option<String>>,
    docker_host: Option<&String>,
    real_root: bool,
) -> anyhow::Result<Option<Change>> {
    let record = match (&kept_host, docker_host) {
        (Err(e), _) => {
            println!(
                "warning: {e:#}\nthe config is left as it is and no docker-host is recorded: fix \
                 it (the hook cannot read it either), then install again"
            );
            None
        }
        (Ok(Some(h)), _) => {
            println!(
                "Docker engine: keeping docker-host = {} from {}",
                toml_string(h),
                cfg_path.display()
            );
            if docker_host.is_some_and(|a| a != h) {
                println!(
                    "warning: --docker-host ignored: the config already names an engine; \
                     change it there"
                );
            }
            None
        }
        (Ok(None), Some(h)) => Some(h.clone()),
        (Ok(None), None) if real_root => engine_to_record().await,
        (Ok(None), None) => None,
    };
    let cur_cfg = match read_for_edit(cfg_path)? {
        Some((b, _)) => Some(
            String::from_utf8(b)
                .map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", cfg_path.display()))?,
        ),
        None => None,
    };
    // Undoing an earlier install may have taken away the docker-host it recorded (or that was
    // set since): it goes back in.
    let record = record.or_else(|| {
        let now = cur_cfg
            .as_deref()
            .and_then(|t| crate::config::Config::parse(t, cfg_path).ok())
            .and_then(|c| c.docker_host);
        kept_host.ok().flatten().filter(|_| now.is_none())
    });
    Ok(match (&cur_cfg, &record) {
        (None, None) => Some(Change {
            path: cfg_path.to_path_buf(),
            new: DEFAULT_CONFIG.as_bytes().to_vec(),
            why: "nixdock's config, every setting commented out".into(),
        }),
        (cur, Some(host)) => Some(Change {
            new: config_with_docker_host(cur.as_deref(), host, cfg_path)?.into_bytes(),
            path: cfg_path.to_path_buf(),
            why: format!("nixdock's config: docker-host = {}", toml_string(host)),
        }),
        (Some(_), None) => None,
    })
}

/// A TOML string literal.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The config with `docker-host` set: the commented default with that line filled in when
/// there is none, else the file with the setting added at its top (before any table).
fn config_with_docker_host(cur: Option<&str>, host: &str, path: &Path) -> anyhow::Result<String> {
    let line = format!("docker-host = {}", toml_string(host));
    let new = match cur {
        None => {
            DEFAULT_CONFIG.replacen("# docker-host = \"unix:///var/run/docker.sock\"", &line, 1)
        }
        Some(text) => format!(
            "# The Docker engine `nixdock install` found (the hook as root looks nowhere else but\n\
             # DOCKER_HOST and root's own system sockets).\n{line}\n\n{text}"
        ),
    };
    match crate::config::Config::parse(&new, path) {
        Ok(c) if c.docker_host.as_deref() == Some(host) => Ok(new),
        Ok(_) => Err(anyhow::anyhow!(
            "cannot add docker-host to {}: set docker-host = {} there yourself",
            path.display(),
            toml_string(host)
        )),
        Err(e) => Err(anyhow::anyhow!("{e} (with docker-host added)")),
    }
}

/// `sudo nixdock install`'s search for the engine ([`Engine::search_at_install`]): shows what
/// answered and returns its address to record, unless its socket belongs to someone other
/// than root, the invoking user (SUDO_UID) or the console user, whose engine would get the
/// builders: that is shown, and left to the operator to name.
async fn engine_to_record() -> Option<String> {
    let (found, tried) = Engine::search_at_install().await;
    let tried_text = tried
        .iter()
        .map(|(w, why)| format!("  {w}: {why}"))
        .collect::<Vec<_>>()
        .join("\n");
    let Some(e) = found else {
        println!(
            "warning: no Docker engine answered; tried:\n{tried_text}\nThe hook (as root) will \
             use only the root-owned system sockets. Start your engine (Docker Desktop, \
             OrbStack, colima, ...) and run `sudo nixdock install` again, or set docker-host in \
             the config."
        );
        return None;
    };
    println!(
        "Docker engine: {} (found via {}), {} {}",
        e.addr, e.how_found, e.os, e.arch
    );
    let mut trusted = vec![0, euid()];
    trusted.extend(
        std::env::var("SUDO_UID")
            .ok()
            .and_then(|u| u.parse::<u32>().ok()),
    );
    trusted.extend(engine::console_uid());
    if let Some(uid) = engine::socket_owner(&e.addr)
        && !trusted.contains(&uid)
    {
        println!(
            "warning: not recorded as docker-host: that socket belongs to uid {uid}, who is \
             neither root, you nor the console user, and whoever runs the engine gets the \
             builders and what they build. If you trust it, set docker-host = {} in the config.",
            toml_string(&e.addr)
        );
        return None;
    }
    Some(e.addr)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses_to_defaults() {
        let c = crate::config::Config::parse(DEFAULT_CONFIG, Path::new("x")).unwrap();
        assert_eq!(c, crate::config::Config::default());
        // Uncommented, the example table is valid too.
        let uncommented: String = DEFAULT_CONFIG
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.contains('=') || l.starts_with('['))
            .map(|l| format!("{l}\n"))
            .collect();
        crate::config::Config::parse(&uncommented, Path::new("x")).unwrap();
    }
}
