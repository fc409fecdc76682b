//! What the hook does when it is told to stop: SIGTERM (Nix 2.35 sends it, then SIGKILL
//! 500 ms later; an init system or an operator), SIGINT, SIGHUP.
//!
//! Within [`BUDGET`] (well under Nix's 500 ms), without waiting on anything unbounded:
//! 1. this hook's staging directories are removed through descriptors
//!    ([`staging::remove_own_within`], at most [`STAGING_LIMIT`]; what is not done by then
//!    keeps its lock file and is swept by the next import);
//! 2. one `@nix` error line naming the signal, the derivation, the builder and the phase goes
//!    to the calling Nix (fd 2, made non-blocking first, so a parent that stopped reading
//!    cannot hold the hook) — only when a build was accepted: an idle hook stopped at Nix's
//!    teardown has nothing to report;
//! 3. the hook ends by the same signal (default action, re-raised), so its status is a
//!    failure that says what happened ("failed due to signal 15 (Terminated)" in Nix).
//!
//! Everything else goes with the process: its connections to the builder close (the
//! builder's daemon sees the client gone and kills the build, as when the hook is SIGKILLed),
//! the kernel drops the slot and builder locks and the staging locks.
//!
//! The handler runs on the hook's only runtime thread (polled before the build's future in
//! `main`, and run while that future is still alive: dropping it first would run destructors
//! without a time bound), so while it runs no other task of the hook makes progress: in particular the
//! commit task can not move a staged tree into place or start a registration after the
//! handler began. Blocking threads may still be finishing one step (an unpack writing a queued
//! batch, one `rename` into the store); the removal retries until its limit, and a tree
//! renamed into the store meanwhile is an unregistered path, which Nix treats as absent.
//!
//! **A registration already running is not killed.** `nix-store --register-validity` registers
//! every path in one SQLite transaction, after all of them were moved into place complete: it
//! commits (the outputs are valid, complete and checked: a consistent store, only the build is
//! reported failed) or does not (they stay unregistered, harmless). Killing it would be as
//! safe for the database (SQLite rolls back a killed transaction) but gains nothing and would
//! throw away a finished import; waiting for it could exceed the budget. So the hook exits
//! without touching it (it is not killed by the hook's exit: `kill_on_drop` acts only on a
//! drop, and the hook exits without dropping). Nix 2.35 signals the hook's whole process group,
//! so there it also gets SIGTERM and, 500 ms later, SIGKILL: both end it with the transaction
//! committed or rolled back, never half applied. The content-address write after it is one
//! transaction as well (at worst the paths stay valid without `ca`, see
//! `local_store::ImportError::CaNotRecorded`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use hook_protocol::log::LogLine;
use tokio::signal::unix::{SignalKind, signal};

use crate::local_store::staging;

/// Everything the hook does after a signal, at most (Nix sends SIGKILL 500 ms after SIGTERM).
pub const BUDGET: Duration = Duration::from_millis(300);
/// The part of [`BUDGET`] the removal of staging directories may take.
pub const STAGING_LIMIT: Duration = Duration::from_millis(200);

/// The phase of the accepted build (0: none accepted), as `fault_points::reached` names them.
static PHASE: AtomicU8 = AtomicU8::new(0);
/// The accepted build's derivation and builder, for the message.
static BUILD: Mutex<Option<(String, String)>> = Mutex::new(None);

const PHASES: [&str; 6] = ["", "ready", "inputs", "build", "outputs", "register"];

/// A build was accepted: `drv` will be built on `machine` (the name given to Nix).
pub fn accepted(drv: &str, machine: &str) {
    *BUILD.lock().unwrap_or_else(|p| p.into_inner()) = Some((drv.to_string(), machine.to_string()));
    enter("ready");
}

/// The accepted build enters `phase` (one of `ready`, `inputs`, `build`, `outputs`,
/// `register`).
pub fn enter(phase: &str) {
    if let Some(i) = PHASES.iter().position(|p| *p == phase) {
        PHASE.store(i as u8, Ordering::Relaxed);
    }
}

/// A signal that stops the hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop(pub i32);

impl Stop {
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::SIGTERM => "SIGTERM",
            libc::SIGINT => "SIGINT",
            libc::SIGHUP => "SIGHUP",
            _ => "a signal",
        }
    }
}

/// Resolves when the hook is told to stop. The handlers are installed at the first poll, so
/// poll it before anything else (a `biased` `select!` branch). If they cannot be installed the
/// hook keeps the default actions (it dies at once, as before) and this never resolves.
pub async fn next() -> Stop {
    let kinds = [
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::hangup(), libc::SIGHUP),
    ];
    let mut streams = Vec::new();
    for (kind, sig) in kinds {
        match signal(kind) {
            Ok(s) => streams.push((s, sig)),
            Err(e) => {
                tracing::warn!("cannot handle signal {sig}: {e}");
            }
        }
    }
    if streams.is_empty() {
        return std::future::pending().await;
    }
    let waits = streams.iter_mut().map(|(s, sig)| {
        let sig = *sig;
        Box::pin(async move {
            s.recv().await;
            Stop(sig)
        })
    });
    futures_select_all(waits).await
}

/// The first of `futs` to resolve (a small `select_all`, not worth a dependency).
async fn futures_select_all<F>(futs: impl Iterator<Item = std::pin::Pin<Box<F>>>) -> Stop
where
    F: std::future::Future<Output = Stop>,
{
    let mut futs: Vec<_> = futs.collect();
    std::future::poll_fn(move |cx| {
        for f in futs.iter_mut() {
            if let std::task::Poll::Ready(s) = f.as_mut().poll(cx) {
                return std::task::Poll::Ready(s);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Stops the hook after `sig` (see the module's documentation); never returns.
pub fn stop(sig: Stop) -> ! {
    let t0 = Instant::now();
    let removal = staging::remove_own_within(STAGING_LIMIT);
    let phase = PHASES
        .get(PHASE.load(Ordering::Relaxed) as usize)
        .copied()
        .unwrap_or("");
    let build = BUILD.try_lock().ok().and_then(|g| g.clone());
    if let Some((drv, machine)) = build {
        let msg = crate::printable::message(&message(sig, phase, &drv, &machine, &removal));
        tracing::warn!("{msg}");
        write_line_now(&LogLine::error(msg.as_str()).to_line());
    } else {
        tracing::info!("stopped by {} (no build accepted)", sig.name());
    }
    tracing::info!(
        ms = t0.elapsed().as_millis() as u64,
        removed = removal.removed.len(),
        left = removal.left.len(),
        "stopped by {}",
        sig.name()
    );
    // SAFETY: restoring the default action and raising the signal in this process; no memory
    // is involved. The default action of all three is to terminate.
    unsafe {
        libc::signal(sig.0, libc::SIG_DFL);
        libc::raise(sig.0);
    }
    // Not reached unless the signal is blocked; a failure status all the same.
    std::process::exit(128 + sig.0)
}

fn message(
    sig: Stop,
    phase: &str,
    drv: &str,
    machine: &str,
    removal: &staging::OwnRemoval,
) -> String {
    let doing = match phase {
        "ready" => "getting the builder ready for",
        "inputs" => "copying the inputs of",
        "build" => "building",
        "outputs" => "copying the outputs of",
        "register" => "registering the outputs of",
        _ => "building",
    };
    let mut m = format!(
        "nixdock-hook: stopped by {} while {doing} '{drv}' on '{machine}': its connection to \
         the builder is closed, which ends the build there",
        sig.name()
    );
    match phase {
        "outputs" | "register" if !removal.removed.is_empty() && removal.left.is_empty() => {
            m.push_str("; the outputs copied so far are removed")
        }
        "outputs" | "register" if !removal.left.is_empty() => m.push_str(
            "; what was copied of the outputs is left for the next build on this host to remove",
        ),
        _ => {}
    }
    if phase == "register" {
        m.push_str(
            "; a registration already under way completes or rolls back as a whole (one \
             transaction), nothing else is registered",
        );
    } else {
        m.push_str("; nothing is registered");
    }
    m
}

/// Writes `line` to fd 2 in one non-blocking write: a parent that no longer reads must not
/// hold a hook that is stopping.
fn write_line_now(line: &str) {
    // SAFETY: fcntl and write on fd 2, which this process owns for its whole life; the buffer
    // is valid for its length. O_NONBLOCK changes only this process's open file description
    // (the pipe's write end), which nothing uses after this.
    unsafe {
        let flags = libc::fcntl(2, libc::F_GETFL);
        if flags != -1 {
            libc::fcntl(2, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        let _ = libc::write(2, line.as_ptr().cast(), line.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_signal_phase_and_what_happened() {
        let none = staging::OwnRemoval::default();
        let m = message(Stop(libc::SIGTERM), "build", "/nix/store/x.drv", "b", &none);
        assert!(
            m.starts_with(
                "nixdock-hook: stopped by SIGTERM while building '/nix/store/x.drv' on 'b'"
            ),
            "{m}"
        );
        assert!(m.ends_with("nothing is registered"), "{m}");
        let removed = staging::OwnRemoval {
            removed: vec!["/nix/store/.nixdock-tmp-a".into()],
            left: vec![],
        };
        let m = message(Stop(libc::SIGHUP), "outputs", "d", "b", &removed);
        assert!(m.contains("SIGHUP while copying the outputs of"), "{m}");
        assert!(m.contains("the outputs copied so far are removed"), "{m}");
        let m = message(Stop(libc::SIGINT), "register", "d", "b", &none);
        assert!(m.contains("completes or rolls back as a whole"), "{m}");
    }
}
