//! Reading, writing and showing the files install edits.

use anyhow::Context as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Reads a file for editing: `None` when absent; a symlink is refused (NixOS and
/// home-manager make these, and their owner would overwrite our change).
pub(super) fn read_for_edit(path: &Path) -> anyhow::Result<Option<(Vec<u8>, std::fs::Metadata)>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(anyhow::anyhow!(
            "{} is a symlink (managed by NixOS or home-manager?): set build-hook there instead \
             (NixOS: nix.settings.build-hook, and for Nix 2.25-2.33 \
             systemd.services.nix-daemon.environment.NIX_CONFIG)",
            path.display()
        )),
        Ok(m) if !m.is_file() => Err(anyhow::anyhow!("{} is not a regular file", path.display())),
        Ok(m) => std::fs::read(path)
            .map(|b| Some((b, m)))
            .with_context(|| format!("cannot read {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `bytes` to `path` atomically with the given mode and owner (when known).
pub(super) fn write_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.nixdock-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        std::fs::write(&tmp, bytes)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        anyhow::bail!("cannot write {}: {e}", path.display());
    }
    Ok(())
}

/// Prints a change as a small line diff.
pub(super) fn print_change(path: &Path, old: Option<&[u8]>, new: Option<&[u8]>, why: &str) {
    let old_s = old.map(String::from_utf8_lossy);
    let new_s = new.map(String::from_utf8_lossy);
    match (&old_s, &new_s) {
        (None, Some(_)) => println!("created {}  ({why})", path.display()),
        (Some(_), None) => println!("deleted {}  ({why})", path.display()),
        _ => println!("changed {}  ({why})", path.display()),
    }
    let old_lines: Vec<&str> = old_s
        .as_deref()
        .map(|s| s.lines().collect())
        .unwrap_or_default();
    let new_lines: Vec<&str> = new_s
        .as_deref()
        .map(|s| s.lines().collect())
        .unwrap_or_default();
    // Common prefix and suffix are unchanged; print what lies between.
    let pre = old_lines
        .iter()
        .zip(&new_lines)
        .take_while(|(a, b)| a == b)
        .count();
    let suf = old_lines[pre..]
        .iter()
        .rev()
        .zip(new_lines[pre..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let removed = &old_lines[pre..old_lines.len() - suf];
    let added = &new_lines[pre..new_lines.len() - suf];
    // A whole file of some length (the commented config) is summarised, not listed.
    if (old.is_none() || new.is_none()) && removed.len() + added.len() > 8 {
        println!("  ({} lines)", removed.len() + added.len());
        return;
    }
    for l in removed {
        println!("  - {l}");
    }
    for l in added {
        println!("  + {l}");
    }
}
