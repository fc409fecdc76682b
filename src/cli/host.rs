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

/// A single-user Nix install, as Nix's default store ("auto") tells it: not root, `NIX_REMOTE`
/// not naming the daemon, and Nix's state directory (`NIX_STATE_DIR`, else /nix/var/nix)
/// writable by this user — or, before the first build made it, no daemon socket and its
/// nearest existing parent writable. Nix then opens the store itself and runs its own
/// `build-hook` setting as this user (no nix-daemon involved).
pub fn single_user_nix() -> bool {
    if is_root() {
        return false;
    }
    if std::env::var("NIX_REMOTE").is_ok_and(|r| r == "daemon" || r.starts_with("unix://")) {
        return false;
    }
    let state = std::path::PathBuf::from(
        std::env::var_os("NIX_STATE_DIR").unwrap_or_else(|| "/nix/var/nix".into()),
    );
    if writable(&state) {
        return true;
    }
    if state.exists() || state.join("daemon-socket/socket").exists() {
        return false;
    }
    state.ancestors().find(|a| a.exists()).is_some_and(writable)
}

fn writable(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access reads the NUL-terminated path it is given.
    unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) == 0 }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
