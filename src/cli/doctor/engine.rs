//! The engines of the pool: each reachable, how it was found, and whether nix-daemon's hook
//! finds it too.

use crate::builder::engine::{DEFAULT_ENGINE, HowFound};
use crate::builder::pool::{BACKOFF, CONNECT_DEADLINE};
use crate::config::Config;

use super::super::engines::PoolEngine;
use super::super::{Env, host};
use super::Checks;

/// One engine of the pool answers (check `engine <name>`); for the top-level one, warns where
/// the hook (root, under nix-daemon) would not find it or where it runs another architecture
/// than this host, from which the hook decides its builders.
pub(super) async fn check_engine(c: &mut Checks, env: &Env, config: &Config, pe: &PoolEngine) {
    let check = format!("engine {}", pe.name());
    let check = check.as_str();
    if pe.name() != DEFAULT_ENGINE {
        return check_pool_engine(c, env, pe, check).await;
    }
    match &pe.engine {
        Ok(e) => {
            let version = docker_version(e).await;
            let access = pe
                .access_note()
                .map(|a| format!(", {a}"))
                .unwrap_or_default();
            c.ok(
                check,
                format!(
                    "{} (found via {}), Docker {version}, {} {}{access}",
                    e.addr, e.how_found, e.os, e.arch
                ),
            );
            if e.how_found == HowFound::DockerHostEnv {
                c.warn(
                    check,
                    "found through DOCKER_HOST, which nix-daemon's environment usually lacks",
                    format!(
                        "set docker-host = \"{}\" in {}",
                        e.addr,
                        env.config_path.display()
                    ),
                );
            }
            // A single-user install's hook runs as this user and finds the same engine.
            if !host::is_root()
                && !host::single_user_nix()
                && config.docker_host.is_none()
                && !matches!(
                    e.how_found,
                    HowFound::DockerHostEnv | HowFound::SystemSocket | HowFound::PodmanRootful
                )
            {
                // As root the hook looks at no one's home: it will not find this engine.
                c.warn(
                    check,
                    format!(
                        "found in your own home or /run/user ({}), where nix-daemon's hook, \
                         running as root, does not look",
                        e.how_found
                    ),
                    format!(
                        "run `sudo nixdock install` (it records the engine as docker-host), or \
                         set docker-host = \"{}\" in {}",
                        e.addr,
                        env.config_path.display()
                    ),
                );
            }
            // A remote top-level engine's builders are placed by its own architecture; a local
            // one's by this host's.
            if pe.settings.is_local_default() && e.arch != host::host_arch() {
                c.warn(
                    check,
                    format!(
                        "the engine runs {} but this machine is {}; the hook decides what is \
                         emulated from this machine's architecture",
                        e.arch,
                        host::host_arch()
                    ),
                    "use an engine on this machine, or name each system's image in [builders]",
                );
            }
        }
        Err(e) => {
            let fix = match (&config.docker_host, host::is_root()) {
                (Some(h), _) => format!(
                    "start the engine at {h}, or change docker-host in {} (nixdock tries no \
                     other engine when one is configured)",
                    env.config_path.display()
                ),
                // Root (so the hook) uses only the system sockets; an engine in a user's
                // home must be named.
                (None, true) => format!(
                    "start the Docker engine (e.g. `systemctl start docker`); for Docker \
                     Desktop, OrbStack, colima or a rootless engine, start it and run `sudo \
                     nixdock install` (it records the engine it finds), or set docker-host = \
                     \"unix:///path/to/docker.sock\" in {}",
                    env.config_path.display()
                ),
                (None, false) => format!(
                    "start the Docker engine (e.g. `systemctl start docker`), or set \
                     docker-host = \"unix:///path/to/docker.sock\" in {}; run doctor as root \
                     to see what nix-daemon's hook sees",
                    env.config_path.display()
                ),
            };
            c.fail(check, format!("{e:#}"), fix);
        }
    }
}

/// An `[engines.<name>]` engine: it answers (with its TLS or SSH access named), or fails with
/// a fix naming it. Its architecture may differ from this host's: the hook places builds by
/// the engine's own.
async fn check_pool_engine(c: &mut Checks, env: &Env, pe: &PoolEngine, check: &str) {
    let access = pe
        .access_note()
        .map(|a| format!(", {a}"))
        .unwrap_or_default();
    match &pe.engine {
        Ok(e) => {
            let version = docker_version(e).await;
            c.ok(
                check,
                format!("{}{access}, Docker {version}, {} {}", e.addr, e.os, e.arch),
            );
        }
        Err(err) => c.fail(
            check,
            match pe.access_note() {
                Some(a) => format!("{err:#} (reached with {a})"),
                None => format!("{err:#}"),
            },
            format!(
                "start engine {name} at {addr} or make it reachable from here, or fix \
                 [engines.{name}] in {config} (docker-host, tls-ca/tls-cert/tls-key or \
                 ssh-key/ssh-host-key), or remove that table; meanwhile each hook skips \
                 engine {name} for {backoff} s after it fails to answer and builds on the \
                 other engines",
                name = pe.name(),
                addr = pe.addr(),
                config = env.config_path.display(),
                backoff = BACKOFF.as_secs(),
            ),
        ),
    }
}

/// The engine's Docker version, or `?` when it does not say within the connect deadline.
async fn docker_version(e: &crate::builder::Engine) -> String {
    tokio::time::timeout(CONNECT_DEADLINE, e.docker.version())
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|v| v.version)
        .unwrap_or_else(|| "?".into())
}
