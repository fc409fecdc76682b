//! Putting built outputs into the local Nix store without going through the daemon.
//!
//! While the hook runs, the parent Nix holds the lock of every output path, so any route that
//! goes through `addToStore` (the daemon's `AddToStoreNar`, `nix-store --import`, `nix copy`)
//! blocks forever (reference §9). What works on every Nix version is to write the trees into the
//! store directory ourselves and register them with one
//! `nix-store --register-validity --hash-given`, which takes no path locks.
//!
//! [`OutputImporter::add`] unpacks each NAR into a private staging directory inside the store
//! directory (same file system, so the final move is a `rename`) and checks its SHA-256 and size
//! against what the builder claimed. [`OutputImporter::commit`] moves the trees into place and
//! registers them all in one transaction, with their hashes, derivers and references. If
//! anything fails, every path it moved is removed again and nothing stays registered; dropping
//! an importer removes its staging directory.
//!
//! If the process is killed in the middle (the parent may SIGKILL the hook), what can remain is
//! a `.nixdock-tmp-*` directory and unregistered store paths. The latter are harmless to Nix
//! (an invalid path is treated as absent and deleted before it is built or substituted) and are
//! replaced by the next import of the same path. Nix's garbage collector removes both: it
//! deletes every entry of the store directory that is not a valid store path (checked with Nix
//! 2.8, where even `nix-store --gc --print-dead` removes a stale staging directory). The flip
//! side: a collection running during an import can remove its staging directory; the import
//! then fails with an I/O error, registers nothing, and the build can be retried.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{self, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use hook_protocol::hash::{Hash, nix32_encode};
use hook_protocol::nar::{NarError, UnpackOptions, remove_tree, unpack_nar};
use hook_protocol::store_path::StorePath;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Prefix of the staging directories [`OutputImporter`] makes in the store directory.
pub const STAGING_PREFIX: &str = ".nixdock-tmp-";

/// What to register for one store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// Absolute store path, e.g. `/nix/store/<hash>-hello-2.12`.
    pub path: String,
    /// Absolute path of the `.drv` that produced it, if known.
    pub deriver: Option<String>,
    /// SHA-256 of the path's NAR serialisation.
    pub nar_hash_sha256: [u8; 32],
    /// Length of the path's NAR serialisation.
    pub nar_size: u64,
    /// Absolute store paths it refers to (may include itself and other paths of the same import).
    pub references: BTreeSet<String>,
}

/// Why an import failed. After any of these, nothing of the import is left registered or on
/// disk (except what is still staged in a live importer, which its `Drop` removes).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the store directory '{}' is unusable: {reason}", path.display())]
    StoreDir { path: PathBuf, reason: String },
    #[error("invalid {what} '{path}': {reason}")]
    BadPath {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("'{0}' was added twice to the same import")]
    Duplicate(String),
    #[error("unpacking the NAR of '{path}': {source}")]
    Nar {
        path: String,
        #[source]
        source: NarError,
    },
    #[error(
        "the NAR received for '{path}' does not match its path info: expected {expected_size} bytes with SHA-256 {expected_hash}, got {got_size} bytes with SHA-256 {got_hash}"
    )]
    Mismatch {
        path: String,
        expected_size: u64,
        expected_hash: String,
        got_size: u64,
        got_hash: String,
    },
    #[error(
        "the NAR received for '{path}' is longer than the {expected_size} bytes its path info says"
    )]
    TooLong { path: String, expected_size: u64 },
    #[error("{op} '{}': {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run '{}': {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    NixStore {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = ImportError> = std::result::Result<T, E>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImportError + 'a {
    move |source| ImportError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

struct Staged {
    info: PathInfo,
    /// `<store_dir>/<hash>-<name>`.
    dest: PathBuf,
    /// Where it was unpacked, inside the staging directory.
    tmp: PathBuf,
}

/// Writes store paths into the local store directory and registers them (see the module docs).
pub struct OutputImporter {
    store_dir: PathBuf,
    case_hack: bool,
    /// Created by the first `add`.
    staging: Option<PathBuf>,
    staged: Vec<Staged>,
}

impl OutputImporter {
    /// `store_dir` is the real store directory (`/nix/store`); `case_hack` is the parent's
    /// `use-case-hack` setting.
    pub fn new(store_dir: &Path, case_hack: bool) -> Result<Self> {
        let bad = |reason: String| ImportError::StoreDir {
            path: store_dir.to_owned(),
            reason,
        };
        if !store_dir.is_absolute() {
            return Err(bad("it is not an absolute path".into()));
        }
        match fs::metadata(store_dir) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(bad("it is not a directory".into())),
            Err(e) => return Err(bad(e.to_string())),
        }
        Ok(OutputImporter {
            store_dir: store_dir.to_owned(),
            case_hack,
            staging: None,
            staged: Vec::new(),
        })
    }

    /// Checks that `path` is `<store_dir>/<valid store path base name>`; returns the base name.
    fn check_store_path<'p>(&self, what: &'static str, path: &'p str) -> Result<&'p str> {
        let bad = |reason: String| ImportError::BadPath {
            what,
            path: path.to_string(),
            reason,
        };
        let base = Path::new(path)
            .strip_prefix(&self.store_dir)
            .ok()
            .and_then(|rest| rest.to_str())
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            .ok_or_else(|| bad(format!("not directly inside {}", self.store_dir.display())))?;
        // Rejects anything odd, including newlines, which would corrupt the registration input.
        StorePath::from_base_name(base).map_err(|e| bad(e.to_string()))?;
        if path != format!("{}/{base}", self.store_dir.display()) {
            return Err(bad("not in canonical form".into()));
        }
        Ok(base)
    }

    fn ensure_staging(&mut self) -> Result<PathBuf> {
        if let Some(s) = &self.staging {
            return Ok(s.clone());
        }
        for _ in 0..16 {
            let dir = self
                .store_dir
                .join(format!("{STAGING_PREFIX}{}", random_suffix()));
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    self.staging = Some(dir.clone());
                    return Ok(dir);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("creating staging directory", &dir)(e)),
            }
        }
        Err(ImportError::Internal(
            "could not find an unused staging directory name".into(),
        ))
    }

    /// Unpacks one path's NAR (read up to its end, no further) into the staging directory and
    /// checks it against `info`'s NAR hash and size. On error nothing of this path remains;
    /// paths added before stay staged.
    pub async fn add(&mut self, info: PathInfo, mut nar: impl AsyncRead + Unpin) -> Result<()> {
        let base = self.check_store_path("store path", &info.path)?.to_owned();
        if let Some(d) = &info.deriver {
            self.check_store_path("deriver", d)?;
        }
        for r in &info.references {
            self.check_store_path("reference", r)?;
        }
        if self.staged.iter().any(|s| s.info.path == info.path) {
            return Err(ImportError::Duplicate(info.path));
        }
        let staging = self.ensure_staging()?;
        let tmp = staging.join(&base);
        let opts = UnpackOptions {
            case_hack: self.case_hack,
        };
        // Never read (and write to disk) more than the size the builder announced.
        let mut limited = (&mut nar).take(info.nar_size);
        let summary = match unpack_nar(&mut limited, &tmp, opts).await {
            Ok(s) => s,
            Err(source) => {
                // unpack_nar has removed what it created.
                self.remove_staging_if_unused();
                if source.is_truncated() && limited.limit() == 0 {
                    return Err(ImportError::TooLong {
                        path: info.path,
                        expected_size: info.nar_size,
                    });
                }
                return Err(ImportError::Nar {
                    path: info.path,
                    source,
                });
            }
        };
        if summary.nar_sha256 != info.nar_hash_sha256 || summary.nar_size != info.nar_size {
            remove_tree_logged(&tmp).await;
            self.remove_staging_if_unused();
            return Err(ImportError::Mismatch {
                path: info.path,
                expected_size: info.nar_size,
                expected_hash: Hash::sha256(info.nar_hash_sha256).to_string(),
                got_size: summary.nar_size,
                got_hash: Hash::sha256(summary.nar_sha256).to_string(),
            });
        }
        tracing::debug!(path = %info.path, nar_size = summary.nar_size, "staged store path");
        self.staged.push(Staged {
            dest: self.store_dir.join(&base),
            info,
            tmp,
        });
        Ok(())
    }

    fn remove_staging_if_unused(&mut self) {
        if !self.staged.is_empty() {
            return;
        }
        if let Some(s) = self.staging.take() {
            // Empty: nothing of this importer's is in it.
            let _ = fs::remove_dir(&s);
        }
    }

    /// Moves every staged path into the store (replacing invalid leftovers, skipping paths that
    /// are already valid) and registers them with one
    /// `<nix_store_bin> --register-validity --hash-given`. On failure, removes what it moved and
    /// returns the error (with nix-store's stderr).
    ///
    /// The work runs in a task of its own, so it completes (or rolls back) even if the future
    /// returned here is dropped.
    pub async fn commit(self, nix_store_bin: &Path) -> Result<()> {
        self.commit_inner(nix_store_bin, true).await
    }

    /// [`commit`](Self::commit) for paths the caller has just found invalid while the calling
    /// Nix holds their output locks, so nobody can have made them valid since: skips the
    /// validity check (a `nix-store` process start).
    pub async fn commit_locked_invalid(self, nix_store_bin: &Path) -> Result<()> {
        self.commit_inner(nix_store_bin, false).await
    }

    async fn commit_inner(mut self, nix_store_bin: &Path, check_validity: bool) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        let staging = self.staging.take();
        let nix_store = nix_store_bin.to_owned();
        let task = tokio::spawn(async move {
            let result = if staged.is_empty() {
                Ok(())
            } else {
                commit_staged(&nix_store, staged, check_validity).await
            };
            if let Some(s) = staging {
                remove_tree_logged(&s).await;
            }
            result
        });
        task.await
            .map_err(|e| ImportError::Internal(format!("the commit task failed: {e}")))?
    }
}

impl Drop for OutputImporter {
    fn drop(&mut self) {
        let Some(s) = self.staging.take() else {
            return;
        };
        if let Err(e) = remove_tree(&s) {
            tracing::warn!("could not remove staging directory '{}': {e}", s.display());
        }
    }
}

async fn commit_staged(nix_store: &Path, staged: Vec<Staged>, check_validity: bool) -> Result<()> {
    let all: Vec<String> = staged.iter().map(|s| s.info.path.clone()).collect();
    let invalid = if check_validity {
        query_invalid(nix_store, &all).await?
    } else {
        all.iter().cloned().collect()
    };

    // Move into place.
    let mut moved: Vec<PathBuf> = Vec::new();
    let mut to_register: Vec<&PathInfo> = Vec::new();
    for s in &staged {
        if !invalid.contains(&s.info.path) {
            tracing::info!(path = %s.info.path, "already valid in the local store; keeping it");
            continue;
        }
        if let Err(e) = move_into_place(&s.tmp, &s.dest).await {
            remove_all(&moved).await;
            return Err(e);
        }
        moved.push(s.dest.clone());
        to_register.push(&s.info);
    }
    if to_register.is_empty() {
        return Ok(());
    }

    // Register them all at once.
    let input = registration_input(&to_register);
    let command = format!("{} --register-validity --hash-given", nix_store.display());
    let res = run_nix_store(
        nix_store,
        &["--register-validity", "--hash-given"],
        input.as_bytes(),
    )
    .await;
    let err = match res {
        Ok(out) if out.status.success() => {
            tracing::debug!(paths = ?all, "registered store paths");
            return Ok(());
        }
        Ok(out) => ImportError::NixStore {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        },
        Err(e) => e,
    };

    // Roll back. The registration is one SQLite transaction, so normally none of the paths are
    // valid now; only remove what is confirmed invalid, so as never to leave a valid path
    // without its files.
    let moved_paths: Vec<String> = to_register.iter().map(|i| i.path.clone()).collect();
    match query_invalid(nix_store, &moved_paths).await {
        Ok(still_invalid) => {
            let (remove, keep): (Vec<_>, Vec<_>) = moved
                .into_iter()
                .zip(moved_paths)
                .partition(|(_, p)| still_invalid.contains(p));
            for (_, p) in keep {
                tracing::warn!(path = %p, "registration failed but the path is valid; keeping it");
            }
            remove_all(&remove.into_iter().map(|(d, _)| d).collect::<Vec<_>>()).await;
        }
        Err(e) => {
            tracing::warn!("could not check validity after a failed registration: {e}");
            remove_all(&moved).await;
        }
    }
    Err(err)
}

/// `nix-store --register-validity --hash-given` input (`decodeValidPathInfo` in
/// `src/libstore/store-api.cc`): per path, lines `path`, `sha256:<base16>`, `narSize`,
/// `deriver` (empty if none), the number of references, and the references.
fn registration_input(infos: &[&PathInfo]) -> String {
    let mut s = String::new();
    for i in infos {
        let _ = writeln!(s, "{}", i.path);
        let _ = writeln!(s, "sha256:{}", Hash::sha256(i.nar_hash_sha256).to_base16());
        let _ = writeln!(s, "{}", i.nar_size);
        let _ = writeln!(s, "{}", i.deriver.as_deref().unwrap_or(""));
        let _ = writeln!(s, "{}", i.references.len());
        for r in &i.references {
            let _ = writeln!(s, "{r}");
        }
    }
    s
}

/// Which of `paths` the local store does not consider valid.
async fn query_invalid(nix_store: &Path, paths: &[String]) -> Result<BTreeSet<String>> {
    let mut args = vec!["--check-validity", "--print-invalid"];
    args.extend(paths.iter().map(String::as_str));
    let out = run_nix_store(nix_store, &args, b"").await?;
    if !out.status.success() {
        return Err(ImportError::NixStore {
            command: format!("{} --check-validity --print-invalid …", nix_store.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

async fn run_nix_store(
    nix_store: &Path,
    args: &[&str],
    stdin: &[u8],
) -> Result<std::process::Output> {
    let mut child = Command::new(nix_store)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImportError::Spawn {
            program: nix_store.to_owned(),
            source,
        })?;
    let mut child_stdin = child.stdin.take().expect("stdin is piped");
    let write = async move {
        let r = child_stdin.write_all(stdin).await;
        drop(child_stdin);
        r
    };
    let (written, output) = tokio::join!(write, child.wait_with_output());
    let output = output.map_err(|source| ImportError::Spawn {
        program: nix_store.to_owned(),
        source,
    })?;
    // A write error (nix-store exited early) shows in its status and stderr.
    match written {
        Err(e) if output.status.success() => Err(ImportError::Spawn {
            program: nix_store.to_owned(),
            source: e,
        }),
        _ => Ok(output),
    }
}

/// Replaces whatever is at `dest` (an invalid leftover) with the staged tree at `tmp`.
async fn move_into_place(tmp: &Path, dest: &Path) -> Result<()> {
    let (tmp, dest) = (tmp.to_owned(), dest.to_owned());
    tokio::task::spawn_blocking(move || {
        match fs::symlink_metadata(&dest) {
            Ok(_) => {
                tracing::info!(path = %dest.display(), "removing an invalid leftover");
                remove_tree(&dest).map_err(io_err("removing invalid leftover", &dest))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("checking", &dest)(e)),
        }
        // Moving a directory to another parent rewrites its "..", which needs write permission
        // on it (for anyone but root).
        let is_dir = fs::symlink_metadata(&tmp)
            .map_err(io_err("checking", &tmp))?
            .is_dir();
        if is_dir {
            fs::set_permissions(&tmp, Permissions::from_mode(0o755))
                .map_err(io_err("setting permissions of", &tmp))?;
        }
        fs::rename(&tmp, &dest).map_err(io_err("moving a staged path to", &dest))?;
        if is_dir {
            fs::set_permissions(&dest, Permissions::from_mode(0o555))
                .map_err(io_err("setting permissions of", &dest))?;
            // The chmod did not touch the mtime, but be explicit: Nix's canonical mtime is 1.
            fs::File::open(&dest)
                .and_then(|f| {
                    f.set_times(
                        fs::FileTimes::new().set_modified(
                            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1),
                        ),
                    )
                })
                .map_err(io_err("setting the mtime of", &dest))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| ImportError::Internal(format!("moving into place: {e}")))?
}

async fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        remove_tree_logged(p).await;
    }
}

async fn remove_tree_logged(p: &Path) {
    let p = p.to_owned();
    let res = tokio::task::spawn_blocking({
        let p = p.clone();
        move || remove_tree(&p)
    })
    .await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("could not remove '{}': {e}", p.display()),
        Err(e) => tracing::warn!("could not remove '{}': {e}", p.display()),
    }
}

/// 20 random bytes (from the kernel, else from time and pid) in nix32.
fn random_suffix() -> String {
    let mut b = [0u8; 20];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        use sha2::{Digest, Sha256};
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut h = Sha256::new();
        h.update(now.as_nanos().to_le_bytes());
        h.update(std::process::id().to_le_bytes());
        h.update((&b as *const _ as usize).to_le_bytes());
        b.copy_from_slice(&h.finalize()[..20]);
    }
    nix32_encode(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_input_format() {
        let a = PathInfo {
            path: "/nix/store/00000000000000000000000000000000-a".into(),
            deriver: Some("/nix/store/11111111111111111111111111111111-a.drv".into()),
            nar_hash_sha256: [0xab; 32],
            nar_size: 120,
            references: [
                "/nix/store/00000000000000000000000000000000-a".to_string(),
                "/nix/store/22222222222222222222222222222222-b".to_string(),
            ]
            .into(),
        };
        let b = PathInfo {
            path: "/nix/store/22222222222222222222222222222222-b".into(),
            deriver: None,
            nar_hash_sha256: [0; 32],
            nar_size: 8,
            references: BTreeSet::new(),
        };
        let s = registration_input(&[&a, &b]);
        let expected = format!(
            "/nix/store/00000000000000000000000000000000-a\nsha256:{}\n120\n\
             /nix/store/11111111111111111111111111111111-a.drv\n2\n\
             /nix/store/00000000000000000000000000000000-a\n\
             /nix/store/22222222222222222222222222222222-b\n\
             /nix/store/22222222222222222222222222222222-b\nsha256:{}\n8\n\n0\n",
            "ab".repeat(32),
            "00".repeat(32)
        );
        assert_eq!(s, expected);
    }

    #[test]
    fn store_path_checks() {
        let t = tempfile::tempdir().unwrap();
        let imp = OutputImporter::new(t.path(), false).unwrap();
        let store = t.path().display().to_string();
        let good = format!("{store}/00000000000000000000000000000000-a");
        assert!(imp.check_store_path("p", &good).is_ok());
        for bad in [
            format!("{store}/../00000000000000000000000000000000-a"),
            format!("{store}/00000000000000000000000000000000-a/sub"),
            format!("{store}//00000000000000000000000000000000-a"),
            format!("{store}/00000000000000000000000000000000-a\nx"),
            format!("{store}/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-a"),
            format!("{store}/00000000000000000000000000000000-"),
            format!("{store}/"),
            "/elsewhere/00000000000000000000000000000000-a".to_string(),
            "00000000000000000000000000000000-a".to_string(),
        ] {
            assert!(imp.check_store_path("p", &bad).is_err(), "{bad:?}");
        }
        assert!(OutputImporter::new(Path::new("relative"), false).is_err());
        assert!(OutputImporter::new(&t.path().join("missing"), false).is_err());
    }
}
