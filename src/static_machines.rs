//! The user's own remote builders: the machines in Nix's `builders` setting (usually
//! `@/etc/nix/machines`), served beside the Docker builders once nixdock has replaced Nix's
//! hook. A sibling of the builder lifecycle: it turns a machine entry into a ready
//! [`RemoteStore`] (SSH with the machine's key and trusted host keys, `nix-daemon --stdio`,
//! worker handshake), with no Docker involved.
//!
//! Host keys are never trusted on first use: the machine's own host key field is pinned when
//! present; otherwise the keys known_hosts lists for it (`~/.ssh/known_hosts`,
//! `/etc/ssh/ssh_known_hosts`, as OpenSSH reads them) are accepted. `@revoked` keys from those
//! files are refused in both cases. `~/.ssh/config` is not read (no `Host` aliases, `Port` or
//! `IdentityFile` from there): put the port in the URI and the key in the entry.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hook_protocol::hook::Settings;
use hook_protocol::machines::{self, Machine, MachinesError};
use hook_protocol::worker::WorkerClient;

use crate::transport::keys::{self, ClientKey, KeyError};
use crate::transport::known_hosts::{self, KnownHosts};
use crate::transport::ssh::{self, HostKeys, SshError};
use crate::transport::{DaemonConnection, Link, PublicKey, RemoteStore, Reopen};

/// Limit on TCP connect + SSH key exchange + authentication.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Limit on the `nix-daemon --stdio` handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a static machine could not be used. Each names the machine.
#[derive(Debug, thiserror::Error)]
pub enum StaticError {
    #[error(
        "remote builder '{machine}' uses {scheme}://, Nix's legacy serve protocol, which nixdock does not speak; write it as ssh-ng://{rest} in `builders` (the machine then needs `nix-daemon`, any Nix since 2.4)"
    )]
    LegacySsh {
        machine: String,
        scheme: String,
        rest: String,
    },
    #[error(
        "remote builder '{machine}': nixdock builds only on ssh-ng:// machines (and its Docker builders), not on '{scheme}' stores"
    )]
    Unsupported { machine: String, scheme: String },
    #[error("remote builder '{machine}': cannot resolve '{host}': {reason}")]
    Resolve {
        machine: String,
        host: String,
        reason: String,
    },
    #[error(
        "remote builder '{machine}': its host key field (8th column) does not decode to an OpenSSH public key line ({reason}); it must be the base64 of e.g. the contents of /etc/ssh/ssh_host_ed25519_key.pub"
    )]
    BadHostKey { machine: String, reason: KeyError },
    #[error(
        "remote builder '{machine}': its host key field (8th column) does not decode to an OpenSSH public key line (it is empty); it must be the base64 of e.g. the contents of /etc/ssh/ssh_host_ed25519_key.pub"
    )]
    EmptyHostKey { machine: String },
    #[error("remote builder '{machine}': {source}")]
    Key {
        machine: String,
        #[source]
        source: KeyError,
    },
    #[error(
        "remote builder '{machine}': no SSH key to log in with: its entry names none (3rd column) and none of {tried} is usable{detail}"
    )]
    NoIdentity {
        machine: String,
        tried: String,
        detail: String,
    },
    #[error(
        "remote builder '{machine}' is unreachable at {addr}: {reason} (is the machine up, and its sshd listening on that port? The port goes in the URI: ssh-ng://user@host:port)"
    )]
    Unreachable {
        machine: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error("remote builder '{machine}': {source}")]
    Ssh {
        machine: String,
        #[source]
        source: Box<SshError>,
    },
    #[error(
        "remote builder '{machine}': `{command}` did not answer the worker handshake: {reason} (is Nix installed there and `{program}` on the PATH of non-interactive SSH sessions? Set ?remote-program=/full/path/to/nix-daemon in the URI otherwise)"
    )]
    Daemon {
        machine: String,
        command: String,
        program: String,
        reason: String,
    },
}

/// The machines of the parent's `builders` setting. Entries without systems build for the
/// parent's `system`. `Ok(empty)` when `builders` is unset or empty.
pub fn from_settings(settings: &Settings) -> Result<Vec<Machine>, MachinesError> {
    let text = settings.builders().unwrap_or("");
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let default: BTreeSet<String> = settings.system().map(str::to_string).into_iter().collect();
    machines::parse_config_fs(&default, text)
}

/// The name of a machine's slot lock files under `current-load/`: `static-` and its store URI
/// with everything but `[A-Za-z0-9._-]` replaced by `_`, shortened with a hash when long.
pub fn slot_name(m: &Machine) -> String {
    let clean: String = m
        .store_uri
        .uri
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.len() <= 96 {
        return format!("static-{clean}");
    }
    let h = hook_protocol::hash::Hash::sha256_of(m.store_uri.uri.as_bytes()).to_nix32();
    format!("static-{}-{}", &clean[..64], &h[..16])
}

/// The command run over SSH: `nix-daemon --stdio` (or the URI's `remote-program`), with
/// `--store` when the URI has `remote-store`.
pub fn remote_command(m: &Machine) -> (String, String) {
    let program = m
        .store_uri
        .params
        .get("remote-program")
        .filter(|p| !p.is_empty())
        .cloned()
        .unwrap_or_else(|| "nix-daemon".into());
    let mut cmd = format!("{program} --stdio");
    if let Some(store) = m
        .store_uri
        .params
        .get("remote-store")
        .filter(|s| !s.is_empty())
    {
        cmd.push_str(" --store ");
        cmd.push_str(&shell_quote(store));
    }
    (program, cmd)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Whether nixdock can build on this machine at all; the error says why not and what to do.
pub fn check_supported(m: &Machine) -> Result<(), StaticError> {
    let machine = m.store_uri.uri.clone();
    match m.store_uri.scheme.as_str() {
        "ssh-ng" => Ok(()),
        "ssh" => Err(StaticError::LegacySsh {
            rest: m
                .store_uri
                .uri
                .strip_prefix("ssh://")
                .unwrap_or(&m.store_uri.uri)
                .to_string(),
            scheme: "ssh".into(),
            machine,
        }),
        s => Err(StaticError::Unsupported {
            scheme: if s.is_empty() {
                "path".into()
            } else {
                s.into()
            },
            machine,
        }),
    }
}

/// `$HOME`, else the passwd entry's home of the current user.
pub fn home_dir() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(h));
    }
    passwd_field(|pw| pw.pw_dir).map(PathBuf::from)
}

/// The login name OpenSSH would use when the URI has no `user@`.
fn local_user() -> String {
    for v in ["USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(v)
            && !u.is_empty()
        {
            return u;
        }
    }
    passwd_field(|pw| pw.pw_name).unwrap_or_else(|| "root".into())
}

fn passwd_field(f: impl Fn(&libc::passwd) -> *mut libc::c_char) -> Option<String> {
    let mut buf = vec![0u8; 16384];
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `pw` and `buf`, which outlive every pointer read below.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::getuid(),
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return None;
    }
    let p = f(&pw);
    if p.is_null() {
        return None;
    }
    // SAFETY: a non-null field of a filled passwd entry is a NUL-terminated string in `buf`.
    let s = unsafe { std::ffi::CStr::from_ptr(p) };
    Some(s.to_string_lossy().into_owned())
}

/// The host keys this machine may present, with where they come from.
pub fn host_keys(m: &Machine, home: Option<&Path>) -> Result<HostKeys, StaticError> {
    let port = m.store_uri.port.unwrap_or(22);
    let files = known_hosts::default_files(home);
    let kh = KnownHosts::read_files(&files);
    let from_param = m
        .store_uri
        .params
        .get("base64-ssh-public-host-key")
        .and_then(|b| hook_protocol::hash::base64_decode(b).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    if let Some(text) = m.public_host_key.as_ref().or(from_param.as_ref()) {
        let mut keys = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            keys.push(
                parse_key_line(line).map_err(|reason| StaticError::BadHostKey {
                    machine: m.store_uri.uri.clone(),
                    reason,
                })?,
            );
        }
        if keys.is_empty() {
            return Err(StaticError::EmptyHostKey {
                machine: m.store_uri.uri.clone(),
            });
        }
        return Ok(HostKeys::any_of(
            keys,
            kh.revoked(),
            "the host key field of its builders entry".into(),
        ));
    }
    let found = kh.lookup(&m.store_uri.host, port);
    let looked: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    Ok(HostKeys::any_of(
        found.accepted,
        found.revoked,
        format!(
            "known_hosts for '{}' ({})",
            known_hosts::lookup_name(&m.store_uri.host, port),
            looked.join(", ")
        ),
    ))
}

/// An OpenSSH public key line, or a known_hosts-style `host keytype key` line.
fn parse_key_line(line: &str) -> Result<PublicKey, KeyError> {
    match keys::parse_public_key(line) {
        Ok(k) => Ok(k),
        Err(e) => {
            // Nix writes the field after the host name into a known_hosts file, so a line
            // with a leading host pattern works there too.
            let rest = line.split_once(char::is_whitespace).map(|(_, r)| r.trim());
            match rest.map(keys::parse_public_key) {
                Some(Ok(k)) => Ok(k),
                _ => Err(e),
            }
        }
    }
}

/// The key to log in with: the entry's key file, else the first usable default identity.
pub fn client_key(m: &Machine, home: Option<&Path>) -> Result<ClientKey, StaticError> {
    let machine = m.store_uri.uri.clone();
    if let Some(path) = m.ssh_key.as_ref().or(m.store_uri.params.get("ssh-key")) {
        return keys::load_identity(Path::new(path))
            .map_err(|source| StaticError::Key { machine, source });
    }
    let candidates = home.map(keys::default_identity_files).unwrap_or_default();
    let mut problems = Vec::new();
    for p in &candidates {
        if !p.exists() {
            continue;
        }
        match keys::load_identity(p) {
            Ok(k) => return Ok(k),
            Err(e) => problems.push(e.to_string()),
        }
    }
    Err(StaticError::NoIdentity {
        machine,
        tried: if candidates.is_empty() {
            "the default identities (no home directory known)".into()
        } else {
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
        detail: if problems.is_empty() {
            String::new()
        } else {
            format!(" ({})", problems.join("; "))
        },
    })
}

async fn resolve(m: &Machine) -> Result<SocketAddr, StaticError> {
    let host = m.store_uri.host.clone();
    let port = m.store_uri.port.unwrap_or(22);
    let err = |reason: String| StaticError::Resolve {
        machine: m.store_uri.uri.clone(),
        host: host.clone(),
        reason,
    };
    let mut addrs = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    .map_err(|_| err("name lookup timed out".into()))?
    .map_err(|e| err(e.to_string()))?;
    addrs.next().ok_or_else(|| err("no address".into()))
}

/// SSH to the machine (host key checked before anything is sent), then the worker handshake
/// with its `nix-daemon --stdio`.
pub async fn connect(m: &Machine, home: Option<&Path>) -> Result<RemoteStore, StaticError> {
    check_supported(m)?;
    let machine = m.store_uri.uri.clone();
    let host_keys = host_keys(m, home)?;
    let key = client_key(m, home)?;
    let addr = resolve(m).await?;
    let user = m.store_uri.user.clone().unwrap_or_else(local_user);
    let session = ssh::connect_with(addr, &user, &key, &host_keys, CONNECT_TIMEOUT)
        .await
        .map_err(|source| match source {
            SshError::ConnectionRefused { addr } => StaticError::Unreachable {
                machine: machine.clone(),
                addr,
                reason: "connection refused".into(),
            },
            SshError::Connect { addr, source } => StaticError::Unreachable {
                machine: machine.clone(),
                addr,
                reason: source.to_string(),
            },
            SshError::Timeout {
                addr,
                phase: ssh::ConnectPhase::Tcp,
                limit,
            } => StaticError::Unreachable {
                machine: machine.clone(),
                addr,
                reason: format!("no TCP connection within {limit:?}"),
            },
            source => StaticError::Ssh {
                machine: machine.clone(),
                source: Box::new(source),
            },
        })?;
    let (program, command) = remote_command(m);
    let link = Link::Ssh(session);
    let daemon = open_daemon(&link, &command, &machine)
        .await
        .map_err(|e| match e {
            StaticError::Daemon { reason, .. } => StaticError::Daemon {
                machine: machine.clone(),
                command: command.clone(),
                program: program.clone(),
                reason,
            },
            e => e,
        })?;
    Ok(RemoteStore {
        name: machine,
        link: Some(link),
        daemon,
        reopen: Reopen::Exec(command),
        bulk: None,
    })
}

/// Runs `command` (`nix-daemon --stdio`) over `session` and does the worker handshake. What
/// the remote side printed on stderr (e.g. "command not found") is put in the error.
pub async fn open_daemon(
    link: &Link,
    command: &str,
    machine: &str,
) -> Result<DaemonConnection, StaticError> {
    let daemon_err = |reason: String| StaticError::Daemon {
        machine: machine.to_string(),
        command: command.to_string(),
        program: command.split_whitespace().next().unwrap_or("").to_string(),
        reason,
    };
    let ch = link
        .exec(command)
        .await
        .map_err(|e| daemon_err(e.to_string()))?;
    let ssh::ExecChannel {
        stdin,
        stdout,
        mut stderr,
        ..
    } = ch;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let name = machine.to_string();
    tokio::spawn(async move {
        while let Some(Ok(chunk)) = stderr.next_chunk().await {
            let text = String::from_utf8_lossy(&chunk).trim_end().to_string();
            tracing::debug!(machine = %name, "remote nix-daemon stderr: {text}");
            let _ = tx.send(text);
        }
    });
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, WorkerClient::handshake(stdout, stdin)).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => {
            // What the remote side printed says more than EOF.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut said = Vec::new();
            while let Ok(s) = rx.try_recv() {
                said.push(s);
            }
            Err(daemon_err(if said.is_empty() {
                e.to_string()
            } else {
                format!("{e}; it said: {}", said.join(" "))
            }))
        }
        Err(_) => Err(daemon_err(format!(
            "no answer within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(line: &str) -> Machine {
        machines::parse_entry(&BTreeSet::from(["x86_64-linux".to_string()]), line).unwrap()
    }

    #[test]
    fn slot_names_are_file_names() {
        let n = slot_name(&m(
            "ssh-ng://root@127.0.0.1:2222?remote-program=/x/nix-daemon",
        ));
        assert_eq!(
            n,
            "static-ssh-ng___root_127.0.0.1_2222_remote-program__x_nix-daemon"
        );
        let long = slot_name(&m(&format!("ssh-ng://{}", "a".repeat(300))));
        assert!(long.len() < 100 && !long.contains('/'));
        assert_ne!(
            long,
            slot_name(&m(&format!("ssh-ng://{}b", "a".repeat(300))))
        );
    }

    #[test]
    fn remote_command_honours_uri_params() {
        assert_eq!(remote_command(&m("ssh-ng://h")).1, "nix-daemon --stdio");
        assert_eq!(
            remote_command(&m(
                "ssh-ng://h?remote-program=/run/bin/nix-daemon&remote-store=/x y"
            ))
            .1,
            "/run/bin/nix-daemon --stdio --store '/x'"
        );
    }

    #[test]
    fn legacy_ssh_points_to_ssh_ng() {
        let e = check_supported(&m("nix@box")).unwrap_err().to_string();
        assert!(
            e.contains("ssh-ng://nix@box") && e.contains("'ssh://nix@box'"),
            "{e}"
        );
        assert!(check_supported(&m("ssh-ng://nix@box")).is_ok());
    }

    #[test]
    fn pinned_host_key_field_is_used_and_bad_ones_named() {
        let k = keys::generate_host_key().unwrap();
        let b64 = hook_protocol::hash::base64_encode(k.public_openssh().as_bytes());
        let d = tempfile::tempdir().unwrap();
        let hk = host_keys(&m(&format!("ssh-ng://h - - 1 1 - - {b64}")), Some(d.path())).unwrap();
        assert!(keys::same_key(&hk.accepted()[0], k.public_key()));
        let bad = hook_protocol::hash::base64_encode(b"not a key");
        let e = host_keys(&m(&format!("ssh-ng://h - - 1 1 - - {bad}")), Some(d.path()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'ssh-ng://h'") && e.contains("8th column"),
            "{e}"
        );
    }

    #[test]
    fn known_hosts_of_home_are_read() {
        let k = keys::generate_host_key().unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join(".ssh")).unwrap();
        std::fs::write(
            d.path().join(".ssh/known_hosts"),
            format!("[builder.lan]:2200 {}\n", k.public_openssh()),
        )
        .unwrap();
        let hk = host_keys(&m("ssh-ng://builder.lan:2200"), Some(d.path())).unwrap();
        assert_eq!(hk.accepted().len(), 1);
        assert!(
            host_keys(&m("ssh-ng://builder.lan"), Some(d.path()))
                .unwrap()
                .accepted()
                .is_empty()
        );
    }

    #[test]
    fn missing_identity_says_what_was_tried() {
        let d = tempfile::tempdir().unwrap();
        let e = client_key(&m("ssh-ng://h"), Some(d.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("id_ed25519") && e.contains("id_rsa"), "{e}");
        let e = client_key(&m("ssh-ng://h x /nonexistent/key"), Some(d.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/key"), "{e}");
    }
}
