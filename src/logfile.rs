//! The hook's own log in the state dir. What the hook says before `# accept` lands in the
//! daemon's journal, not with the user, so this file is where its story is told; `nixdock
//! logs --hook` shows it. Bounded: past `MAX_BYTES` the file is rotated once.

use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

const MAX_BYTES: u64 = 4 * 1024 * 1024;

/// Sends `tracing` output to `path` (appending; rotated to `path.1` when large). Falls back to
/// no logging at all rather than to stderr, which belongs to the parent Nix. Call it only for
/// a state directory [`crate::state::StateDir::open`] accepted: the file is then created 0600
/// (whatever the umask), never opened through a symlink, and not used unless it is this
/// user's and private.
pub fn init(path: &Path, default_level: &str) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() > MAX_BYTES) {
        let _ = std::fs::rename(path, path.with_extension("log.1"));
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIXDOCK_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default_level},russh=warn"))
    });
    let Ok(file) = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match file.metadata() {
        Ok(m) if m.is_file() && m.uid() == me && m.mode() & 0o077 == 0 => {}
        _ => return,
    }
    if crate::state::ensure_mode(&file, 0o600).is_err() {
        return;
    }
    let pid = std::process::id();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .with_thread_names(false)
        .with_target(false)
        .fmt_fields(tracing_subscriber::fmt::format::DefaultFields::new())
        .try_init();
    tracing::debug!(pid, "hook log opened");
}
