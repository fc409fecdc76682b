//! This host as the commands see it: the hook's view of it, root or not, where the hook is.

use anyhow::Context as _;
use std::path::Path;

/// The hook's own view of the host, so the CLI decides exactly as the hook does.
pub use crate::builder::systems::{ENGINE_IS_LOCAL, host_arch};

/// The `nixdock-hook` installed next to this program.
pub fn hook_next_to_me() -> anyhow::Result<std::path::PathBuf> {
    let me = std::env::current_exe().context("cannot find this program")?;
    let me = std::fs::canonicalize(&me).unwrap_or(me);
    let dir = me
        .parent()
        .with_context(|| format!("{} has no directory", me.display()))?;
    Ok(dir.join("nixdock-hook"))
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
