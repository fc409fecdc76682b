//! The running builder containers of each engine: an SSH (or, on a remote engine without a
//! published port, an Engine API exec) and nix-daemon handshake with each.

use std::time::{Duration, Instant};

use crate::builder::engine::DEFAULT_ENGINE;
use crate::builder::lifecycle::open_daemon;
use crate::builder::{Builders, Engine};
use crate::state::StateDir;
use crate::transport::{EngineExec, Link, keys};

use super::super::{Env, containers};
use super::Checks;

/// A handshake with every running builder on `engine`, as the hook reaches it: SSH to its
/// published port (on loopback, or on a remote engine's host) plus the daemon's handshake, or
/// `nix-daemon --stdio` through the engine's exec when a remote builder publishes nothing. The
/// top-level engine's checks are `ssh <system>`, another engine's `builder <system> on <name>`.
pub(super) async fn check_ssh(c: &mut Checks, engine: &Engine, env: &Env, instance: &str) {
    let is_default = engine.name == DEFAULT_ENGINE;
    let running_check = if is_default {
        "builders running".to_string()
    } else {
        format!("builders running on {}", engine.name)
    };
    let logs_flag = if is_default {
        String::new()
    } else {
        format!(" --engine {}", engine.name)
    };
    let existing = match containers::list_existing(engine, instance).await {
        Ok(x) => x,
        Err(e) => {
            c.fail(&running_check, format!("{e:#}"), "see the engine's log");
            return;
        }
    };
    if existing.is_empty() {
        c.info(
            &running_check,
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
        let name = if is_default {
            format!("ssh {}", ex.system)
        } else {
            format!("builder {} on {}", ex.system, engine.name)
        };
        // Decided when the container was created, recorded in its labels.
        let (on, why) = ex.sandbox();
        let sandbox_check = if is_default {
            format!("sandbox {} (container)", ex.system)
        } else {
            format!("sandbox {} on {} (container)", ex.system, engine.name)
        };
        c.info(
            &sandbox_check,
            format!(
                "builds {} Nix's sandbox: {why}",
                if on { "run in" } else { "run without" }
            ),
        );
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
        if ex.port().is_none() && engine.remote_host().is_some() {
            // Published nothing: the hook reaches it through the engine (transport `auto`).
            let t = Instant::now();
            let link = Link::Engine(EngineExec::new(engine.docker.clone(), ex.name.clone()));
            match tokio::time::timeout(Duration::from_secs(30), open_daemon(&link, &ex.name)).await
            {
                Ok(Ok(_daemon)) => c.ok(
                    &name,
                    format!(
                        "{} through engine {}'s exec: nix-daemon answered in {} ms",
                        ex.name,
                        engine.name,
                        t.elapsed().as_millis()
                    ),
                ),
                Ok(Err(e)) => c.fail(
                    &name,
                    e.to_string(),
                    format!(
                        "see `nixdock logs {}{logs_flag}`; `nixdock stop {}{logs_flag}` lets the \
                         next build start it afresh",
                        ex.system, ex.system
                    ),
                ),
                Err(_) => c.fail(
                    &name,
                    format!("{} did not answer within 30 s", ex.name),
                    format!("see `nixdock logs {}{logs_flag}`", ex.system),
                ),
            }
            continue;
        }
        let (Some(port), Some(key)) = (ex.port(), ex.host_key()) else {
            c.fail(
                &name,
                format!("{} has no published SSH port or pinned host key", ex.name),
                format!(
                    "nixdock gc --volumes {}{logs_flag} (the next build recreates it)",
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
                    format!("nixdock gc --volumes {}{logs_flag}", ex.system),
                );
                continue;
            }
        };
        let addr = match engine.published_addr(port).await {
            Ok(a) => a,
            Err(why) => {
                c.fail(
                    &name,
                    why.to_string(),
                    format!("check that this host resolves {}", engine.addr),
                );
                continue;
            }
        };
        let t = Instant::now();
        match tokio::time::timeout(
            Duration::from_secs(30),
            builders.connect(&ex.name, addr, &pinned, std::time::Duration::ZERO),
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
                    "see `nixdock logs {}{logs_flag}`; `nixdock stop {}{logs_flag}` lets the next \
                     build start it afresh",
                    ex.system, ex.system
                ),
            ),
            Err(_) => c.fail(
                &name,
                format!("{} at {addr} did not answer within 30 s", ex.name),
                format!("see `nixdock logs {}{logs_flag}`", ex.system),
            ),
        }
    }
}
