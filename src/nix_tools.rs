//! Finding the calling Nix's own tools. The daemon's PATH often has no Nix, so look next to
//! the parent's executable first, then `NIX_BIN_DIR`, then the usual profiles.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot find `{tool}`; tried:\n{}\nSet NIX_BIN_DIR to the directory holding Nix's programs.", .tried.iter().map(|p| format!("  {}", p.display())).collect::<Vec<_>>().join("\n"))]
pub struct NotFound {
    pub tool: String,
    pub tried: Vec<PathBuf>,
}

/// Directories to look in, best first.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    // SAFETY: getppid has no preconditions.
    let ppid = unsafe { libc::getppid() };
    if let Ok(exe) = std::fs::read_link(format!("/proc/{ppid}/exe"))
        && let Some(d) = exe.parent()
    {
        dirs.push(d.to_path_buf());
    }
    if let Some(d) = std::env::var_os("NIX_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    for d in [
        "/nix/var/nix/profiles/default/bin",
        "/run/current-system/sw/bin",
        "/usr/local/bin",
        "/usr/bin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.dedup();
    dirs
}

pub fn find(tool: &str) -> Result<PathBuf, NotFound> {
    find_in(tool, &search_dirs())
}

pub fn find_in(tool: &str, dirs: &[PathBuf]) -> Result<PathBuf, NotFound> {
    let mut tried = Vec::new();
    for d in dirs {
        let p = d.join(tool);
        if is_executable(&p) {
            return Ok(p);
        }
        tried.push(p);
    }
    Err(NotFound {
        tool: tool.to_string(),
        tried,
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_lists_every_place_tried() {
        let e = find_in(
            "no-such-nix-tool",
            &[PathBuf::from("/a"), PathBuf::from("/b")],
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("/a/no-such-nix-tool") && s.contains("/b/no-such-nix-tool"),
            "{s}"
        );
        assert!(s.contains("NIX_BIN_DIR"));
    }

    #[test]
    fn finds_sh() {
        assert!(
            find_in(
                "sh",
                &[PathBuf::from("/nonexistent"), PathBuf::from("/bin")]
            )
            .is_ok()
        );
    }
}
