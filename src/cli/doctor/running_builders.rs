//! The running builder containers: an SSH and nix-daemon handshake with each.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::builder::{Builders, Engine};
use crate::state::StateDir;
use crate::transport::keys;

use super::super::{Env, containers};
use super::Checks;

/// An SSH handshake plus `nix-daemon --stdio` handshake with every running builder.
pub(super) async fn check_ssh(c: &mut Checks, engine: &Engine, env: &Env, instance: &str) {
    let existing = match containers::list_existing(engine, instance).await {
        Ok(x) => x,
        Err(e) => {
            c.fail("builders running", format!("{e:#}"), "see the engine's log");
            return;
        }
    };
    if existing.is_empty() {
        c.info(
            "builders running",
            "none (a builder starts at the first build for its system)",
        );
        return;
    }
    let state = match StateDir::open(&env.state_path) {
        Ok(s) => s,
        Err(e) => {
            c.fail("ssh", e.to_string(), "fix the state directory (see above)");
            return;
        }
    };
    let builders = match Builders::new(engine.clone(), state) {
        Ok(b) => b,
        Err(e) => {
            c.fail("ssh", e.to_string(), "fix the state directory (see above)");
            return;
        }
    };
    for ex in existing {
        let name = format!("ssh {}", ex.system);
        if !ex.running() {
            c.info(
                &name,
                format!(
                    "{} is {} (it starts at the next build)",
                    ex.name,
                    ex.state_name()
                ),
            );
            continue;
        }
        let (Some(port), Some(key)) = (ex.port(), ex.host_key()) else {
            c.fail(
                &name,
                format!("{} has no published SSH port or pinned host key", ex.name),
                format!(
                    "nixdock gc --volumes {} (the next build recreates it)",
                    ex.system
                ),
            );
            continue;
        };
        let pinned = match keys::parse_public_key(key) {
            Ok(k) => k,
            Err(e) => {
                c.fail(
                    &name,
                    format!("{}: bad pinned host key: {e}", ex.name),
                    format!("nixdock gc --volumes {}", ex.system),
                );
                continue;
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let t = Instant::now();
        match tokio::time::timeout(
            Duration::from_secs(30),
            builders.connect(&ex.name, addr, &pinned),
        )
        .await
        {
            Ok(Ok((session, _daemon))) => {
                c.ok(
                    &name,
                    format!(
                        "{} at {addr}: SSH and nix-daemon answered in {} ms",
                        ex.name,
                        t.elapsed().as_millis()
                    ),
                );
                let _ = session.close().await;
            }
            Ok(Err(e)) => c.fail(
                &name,
                e.to_string(),
                format!(
                    "see `nixdock logs {}`; `nixdock stop {}` lets the next build start it afresh",
                    ex.system, ex.system
                ),
            ),
            Err(_) => c.fail(
                &name,
                format!("{} at {addr} did not answer within 30 s", ex.name),
                format!("see `nixdock logs {}`", ex.system),
            ),
        }
    }
}
