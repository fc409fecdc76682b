//! The state directory, checked with the hook's own check without creating it.

use crate::state::StateDir;

use super::super::{Env, host};
use super::Checks;

/// Checks the state directory without creating it; returns the instance id if there is one.
pub(super) fn check_state_dir(c: &mut Checks, env: &Env) -> Option<String> {
    let p = &env.state_path;
    let explicit =
        std::env::var_os("NIXDOCK_STATE_DIR").is_some() || p != &StateDir::default_path();
    // A single-user install's hook runs as this user and uses this same directory.
    if !host::is_root() && !host::single_user_nix() && !explicit {
        c.warn(
            "state dir",
            format!(
                "you are not root, so this is {}; nix-daemon's hook runs as root and uses \
                 /var/lib/nixdock",
                p.display()
            ),
            "run `sudo nixdock doctor` to check what the daemon's hook sees",
        );
    }
    let meta = match std::fs::metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            c.ok(
                "state dir",
                format!(
                    "{} does not exist yet; the hook makes it (mode 0700)",
                    p.display()
                ),
            );
            return None;
        }
        Err(e) => {
            c.fail(
                "state dir",
                format!("cannot read {}: {e}", p.display()),
                "run as the user the hook runs as (root under nix-daemon)",
            );
            return None;
        }
    };
    // The hook's own check (owner and mode of the directory, its parents and every entry),
    // so doctor and hook never disagree; it only adds the empty subdirectories it would add.
    let problem = if meta.is_dir() {
        StateDir::open(p).err().map(|e| e.to_string())
    } else {
        Some(format!("{} is not a directory; remove it", p.display()))
    };
    let id = std::fs::read_to_string(p.join("instance-id"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    match problem {
        None => c.ok(
            "state dir",
            format!(
                "{} (0700, yours), instance {}",
                p.display(),
                id.as_deref().unwrap_or("not made yet")
            ),
        ),
        Some(why) => c.fail(
            "state dir",
            why,
            "fix it as the message says: the hook refuses this directory and builds nothing remotely",
        ),
    }
    id
}
