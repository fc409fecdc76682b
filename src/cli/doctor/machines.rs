//! The user's own remote builders from Nix's `builders` setting.

use std::time::{Duration, Instant};

use crate::static_machines::{self, StaticError};
use crate::transport::SshError;

use super::super::host;
use super::Checks;

/// The user's own remote builders in Nix's `builders`: listed, and each checked the way the
/// hook will use it (TCP, host key, login, `nix-daemon --stdio` handshake).
pub(super) async fn check_builders(c: &mut Checks, builders: &str, system: Option<&str>) {
    let name = "builders";
    let default: std::collections::BTreeSet<String> = system
        .map(str::to_string)
        .or_else(|| Some(format!("{}-linux", host::host_arch())))
        .into_iter()
        .collect();
    let machines = match hook_protocol::machines::parse_config_fs(&default, builders) {
        Ok(m) => m,
        Err(e) => {
            c.fail(
                name,
                format!("Nix's `builders` setting ({builders:?}) does not parse: {e}"),
                "fix the entry in /etc/nix/machines (or wherever `builders` points); \
                 the hook ignores all of them until then",
            );
            return;
        }
    };
    if machines.is_empty() {
        c.ok(name, "no remote machines in Nix's `builders` setting");
        return;
    }
    c.ok(
        name,
        format!(
            "{} remote machine(s) in Nix's `builders`, served beside the Docker builders: {}",
            machines.len(),
            machines
                .iter()
                .map(|m| format!(
                    "{} ({}, {} job(s), speed {})",
                    m.store_uri,
                    m.systems.iter().cloned().collect::<Vec<_>>().join(","),
                    m.max_jobs,
                    m.speed_factor
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    );
    let home = static_machines::home_dir();
    c.info(
        "builders",
        format!(
            "checked with the keys and known_hosts of {} (the hook uses its own user's: root's \
             under nix-daemon)",
            home.as_deref()
                .map(|h| h.display().to_string())
                .unwrap_or_else(|| "no home directory".into())
        ),
    );
    for m in &machines {
        let check = format!("machine {}", m.store_uri);
        if let Err(e) = static_machines::check_supported(m) {
            c.warn(
                &check,
                e.to_string(),
                "change the entry to ssh-ng:// (or remove it)",
            );
            continue;
        }
        let host_port = format!("{}:{}", m.store_uri.host, m.store_uri.port.unwrap_or(22));
        let reach = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(host_port.as_str()),
        )
        .await;
        match reach {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                c.fail(
                    &check,
                    format!("{host_port} is not reachable: {e}"),
                    "check that the machine is up and its sshd listens there (the port goes in the URI: ssh-ng://user@host:port)",
                );
                continue;
            }
            Err(_) => {
                c.fail(
                    &check,
                    format!("{host_port} did not answer within 10 s"),
                    "check the machine, the network and firewalls",
                );
                continue;
            }
        }
        let t = Instant::now();
        match static_machines::connect(m, home.as_deref()).await {
            Ok(r) => {
                c.ok(
                    &check,
                    format!(
                        "reachable, host key trusted, nix-daemon answered (protocol {}) in {} ms",
                        r.daemon.version(),
                        t.elapsed().as_millis()
                    ),
                );
                if let Some(s) = r.link {
                    let _ = s.close().await;
                }
            }
            Err(e) => {
                let fix = match &e {
                    StaticError::Ssh { source, .. }
                        if matches!(
                            **source,
                            SshError::HostKeyNotTrusted { .. } | SshError::NoHostKey { .. }
                        ) =>
                    {
                        "check the machine's host key out of band (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on it), then put `base64 -w0` of that .pub file in the 8th field of its entry, or add it to known_hosts".to_string()
                    }
                    StaticError::Ssh { source, .. }
                        if matches!(**source, SshError::AuthFailed { .. }) =>
                    {
                        "add the public half of the key (3rd field, or your ~/.ssh/id_*) to the machine's authorized_keys".to_string()
                    }
                    StaticError::Daemon { .. } => {
                        "install Nix on the machine, or give its nix-daemon's full path with ?remote-program= in the URI".to_string()
                    }
                    _ => "see the message; the hook skips this machine with a warning until it is fixed".to_string(),
                };
                c.fail(&check, e.to_string(), fix);
            }
        }
    }
}
