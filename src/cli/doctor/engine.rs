//! The Docker engine: reachable, how it was found, and whether nix-daemon's hook finds it too.

use crate::builder::Engine;
use crate::builder::engine::HowFound;
use crate::config::Config;

use super::super::{Env, builders, host};
use super::Checks;

/// The engine answers; warns where the hook (root, under nix-daemon) would not find it or
/// where it runs another architecture.
pub(super) async fn check_engine(c: &mut Checks, env: &Env, config: &Config) -> Option<Engine> {
    match builders::engine(config).await {
        Ok(e) => {
            let version = e
                .docker
                .version()
                .await
                .ok()
                .and_then(|v| v.version)
                .unwrap_or_else(|| "?".into());
            c.ok(
                "engine",
                format!(
                    "{} (found via {}), Docker {version}, {} {}",
                    e.addr, e.how_found, e.os, e.arch
                ),
            );
            if e.how_found == HowFound::DockerHostEnv {
                c.warn(
                    "engine",
                    "found through DOCKER_HOST, which nix-daemon's environment usually lacks",
                    format!(
                        "set docker-host = \"{}\" in {}",
                        e.addr,
                        env.config_path.display()
                    ),
                );
            }
            if !host::is_root()
                && config.docker_host.is_none()
                && !matches!(
                    e.how_found,
                    HowFound::DockerHostEnv | HowFound::SystemSocket | HowFound::PodmanRootful
                )
            {
                // As root the hook looks at no one's home: it will not find this engine.
                c.warn(
                    "engine",
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
            if e.arch != host::host_arch() {
                c.warn(
                    "engine",
                    format!(
                        "the engine runs {} but this machine is {}; the hook decides what is \
                         emulated from this machine's architecture",
                        e.arch,
                        host::host_arch()
                    ),
                    "use an engine on this machine, or name each system's image in [builders]",
                );
            }
            Some(e)
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
            c.fail("engine", format!("{e:#}"), fix);
            None
        }
    }
}
