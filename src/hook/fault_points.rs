//! Test-only phase points for the fault tests (`tests/faults.rs`). With
//! `NIXDOCK_TEST_FAULT_DIR=DIR` in its environment, the hook writes `DIR/<phase>.reached` (its
//! pid) as it enters each phase of an accepted build (`ready`, `inputs`, `build`, `outputs`,
//! `register`), and, when `DIR/<phase>.hold` exists, waits there until the test removes it
//! (at most [`HOLD_LIMIT`]), so a fault can be injected at a phase too short to hit by timing
//! (registering). Without the variable this is one environment lookup per phase. `DIR` must be
//! a directory owned by the hook's user (the hook may be root): otherwise nothing is written.

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const ENV: &str = "NIXDOCK_TEST_FAULT_DIR";
/// The longest a phase waits for its hold file to go.
pub const HOLD_LIMIT: Duration = Duration::from_secs(120);

fn dir() -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dir = PathBuf::from(std::env::var_os(ENV)?);
    let md = std::fs::symlink_metadata(&dir).ok()?;
    // SAFETY: geteuid has no preconditions.
    (md.is_dir() && md.uid() == unsafe { libc::geteuid() }).then_some(dir)
}

/// Marks `phase` as reached and waits while it is held. Also tells the signal handler which
/// phase the build is in (`signals::enter`), with or without the variable.
pub async fn reached(phase: &str) {
    super::signals::enter(phase);
    let Some(dir) = dir() else { return };
    let _ = std::fs::write(
        dir.join(format!("{phase}.reached")),
        std::process::id().to_string(),
    );
    let hold = dir.join(format!("{phase}.hold"));
    let t = Instant::now();
    while std::fs::symlink_metadata(&hold).is_ok() && t.elapsed() < HOLD_LIMIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a copy may stand still before it is given up: `default`, or (tests only) the
/// seconds in `DIR/copy-stall-secs`.
pub fn copy_stall(default: Duration) -> Duration {
    dir()
        .and_then(|d| std::fs::read_to_string(d.join("copy-stall-secs")).ok())
        .and_then(|s| s.trim().parse().ok())
        .map_or(default, Duration::from_secs)
}
