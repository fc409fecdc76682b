//! The install manifest: every file install touched with its original (or "absent"), kept in
//! the state directory, and writing those originals back.

use anyhow::Context as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::StateDir;

use super::super::Env;
use super::ServiceManager;
use super::files::{print_change, write_file};

/// The manifest's file name in the state directory.
pub const MANIFEST: &str = "install-manifest.json";

/// The install manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub root: PathBuf,
    pub hook: PathBuf,
    pub nix_version: String,
    pub service_manager: ServiceManager,
    /// In the order they were changed.
    pub files: Vec<FileEntry>,
    /// Directories install made, parents first.
    pub created_dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: PathBuf,
    pub original: Original,
    /// sha256 of what install wrote, to notice later edits.
    pub installed_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Original {
    Absent(AbsentTag),
    Present(Present),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum AbsentTag {
    #[serde(rename = "absent")]
    Absent,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Present {
    /// The content when it is UTF-8 …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// … else as hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hex: Option<String>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Present {
    pub(super) fn of(bytes: &[u8], meta: &std::fs::Metadata) -> Present {
        let (text, hex) = match std::str::from_utf8(bytes) {
            Ok(s) => (Some(s.to_string()), None),
            Err(_) => (
                None,
                Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
            ),
        };
        Present {
            text,
            hex,
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }

    pub(super) fn bytes(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(t) = &self.text {
            return Ok(t.as_bytes().to_vec());
        }
        let h = self.hex.as_deref().unwrap_or("");
        (0..h.len())
            .step_by(2)
            .map(|i| {
                h.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
                    .context("corrupt hex content in the install manifest")
            })
            .collect()
    }
}

pub(super) fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

pub(super) fn manifest_path(env: &Env) -> PathBuf {
    env.state_path.join(MANIFEST)
}

pub(super) fn load_manifest(path: &Path) -> anyhow::Result<Option<Manifest>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .with_context(|| format!("{} is corrupt", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

pub(super) fn save_manifest(env: &Env, m: &Manifest) -> anyhow::Result<()> {
    // An older nixdock left its state directory with the umask's modes, which the hook now
    // refuses; installing over it is the upgrade, so make it private here.
    let tightened = crate::state::tighten_legacy_modes(&env.state_path)?;
    if !tightened.is_empty() {
        println!(
            "made {} private ({} entries were readable by other users; an older nixdock made them)",
            env.state_path.display(),
            tightened.len()
        );
    }
    let state = StateDir::open(&env.state_path)?;
    let path = state.path().join(MANIFEST);
    let json = serde_json::to_vec_pretty(m)?;
    crate::state::write_private(&path, &json, 0o600)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes back every original of a manifest, newest change first, then removes the
/// directories install made (when empty).
pub(super) fn restore(m: &Manifest) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    for f in m.files.iter().rev() {
        let cur = match std::fs::symlink_metadata(&f.path) {
            Ok(_) => std::fs::read(&f.path).ok(),
            Err(_) => None,
        };
        if let Some(cur) = &cur
            && sha256_hex(cur) != f.installed_sha256
        {
            let bak = PathBuf::from(format!("{}.nixdock-uninstall.bak", f.path.display()));
            match std::fs::write(&bak, cur) {
                Ok(()) => println!(
                    "warning: {} changed since the install; its current content is saved as {}",
                    f.path.display(),
                    bak.display()
                ),
                Err(e) => {
                    errors.push(format!(
                        "{} changed since the install and cannot be saved to {}: {e}",
                        f.path.display(),
                        bak.display()
                    ));
                    continue;
                }
            }
        }
        match &f.original {
            Original::Absent(_) => {
                if cur.is_some() {
                    match std::fs::remove_file(&f.path) {
                        Ok(()) => print_change(&f.path, cur.as_deref(), None, "made by install"),
                        Err(e) => errors.push(format!("cannot delete {}: {e}", f.path.display())),
                    }
                }
            }
            Original::Present(p) => {
                let bytes = p.bytes()?;
                if cur.as_deref() == Some(bytes.as_slice()) {
                    continue;
                }
                match write_file(&f.path, &bytes, p.mode, Some((p.uid, p.gid))) {
                    Ok(()) => print_change(&f.path, cur.as_deref(), Some(&bytes), "restored"),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }
    }
    for d in m.created_dirs.iter().rev() {
        if std::fs::remove_dir(d).is_ok() {
            println!("removed directory {}", d.display());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!(errors.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_original_forms() {
        let absent = serde_json::to_string(&Original::Absent(AbsentTag::Absent)).unwrap();
        assert_eq!(absent, "\"absent\"");
        let back: Original = serde_json::from_str(&absent).unwrap();
        assert!(matches!(back, Original::Absent(_)));
        let p: Original =
            serde_json::from_str(r#"{"hex":"00ff","mode":420,"uid":0,"gid":0}"#).unwrap();
        let Original::Present(p) = p else { panic!() };
        assert_eq!(p.bytes().unwrap(), vec![0, 255]);
    }
}
