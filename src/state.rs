//! The state directory: this installation's instance id, its SSH client key, lock files and the
//! hook's own log. `$NIXDOCK_STATE_DIR`, else `/var/lib/nixdock` for root and the XDG state
//! directory for anyone else.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds an invalid instance id {id:?}; delete the file to make a new one")]
    BadInstanceId { path: PathBuf, id: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("NIXDOCK_STATE_DIR") {
            return PathBuf::from(p);
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/var/lib/nixdock");
        }
        if let Some(x) = std::env::var_os("XDG_STATE_HOME") {
            return PathBuf::from(x).join("nixdock");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
        PathBuf::from(home).join(".local/state/nixdock")
    }

    /// Opens (creating with mode 0700 if needed) the state directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<StateDir, StateError> {
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io(&root))?;
        for sub in ["locks", "current-load"] {
            let p = root.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p)
                .map_err(io(&p))?;
        }
        Ok(StateDir { root })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join("locks").join(format!("{name}.lock"))
    }

    pub fn load_dir(&self) -> PathBuf {
        self.root.join("current-load")
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join("hook.log")
    }

    /// The short random id that names this installation's containers and volumes, made once.
    pub fn instance_id(&self) -> Result<String, StateError> {
        let path = self.root.join("instance-id");
        let _guard = FileLock::exclusive(&self.lock_path("instance-id"))?;
        match fs::read_to_string(&path) {
            Ok(s) => {
                let id = s.trim().to_string();
                if id.len() < 4
                    || id.len() > 16
                    || !id
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                {
                    return Err(StateError::BadInstanceId { path, id });
                }
                Ok(id)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = random_id(8).map_err(io(&path))?;
                let tmp = path.with_extension("tmp");
                fs::write(&tmp, format!("{id}\n")).map_err(io(&tmp))?;
                fs::rename(&tmp, &path).map_err(io(&path))?;
                Ok(id)
            }
            Err(e) => Err(io(&path)(e)),
        }
    }
}

/// `n` characters from [a-z0-9], from the kernel's random source.
pub fn random_id(n: usize) -> std::io::Result<String> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut buf = vec![0u8; n];
    File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect())
}

/// An advisory `flock` held until drop. The kernel releases it when the process dies, so a
/// killed hook never leaves a stale lock behind.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl FileLock {
    fn open(path: &Path) -> Result<File, StateError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io(path))
    }

    /// Blocks until the lock is ours. Call from a blocking context (or `spawn_blocking`).
    pub fn exclusive(path: &Path) -> Result<FileLock, StateError> {
        let file = Self::open(path)?;
        loop {
            // SAFETY: flock on a descriptor we own.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if r == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io(path)(e));
            }
        }
        Ok(FileLock {
            file,
            path: path.to_owned(),
        })
    }

    /// Takes the lock if nobody holds it.
    pub fn try_exclusive(path: &Path) -> Result<Option<FileLock>, StateError> {
        let file = Self::open(path)?;
        // SAFETY: flock on a descriptor we own.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(Some(FileLock {
                file,
                path: path.to_owned(),
            }));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(io(path)(e))
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records who holds the lock, for `nixdock status`.
    pub fn note(&mut self, text: &str) {
        let _ = self.file.set_len(0);
        let _ = self.file.write_all(text.as_bytes());
    }
}

/// Writes `contents` to `path` with `mode`, atomically (temp file + rename).
pub fn write_private(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_id_is_made_once() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path().join("state")).unwrap();
        let a = s.instance_id().unwrap();
        let b = StateDir::open(d.path().join("state"))
            .unwrap()
            .instance_id()
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 8);
        let mode = fs::metadata(s.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn corrupt_instance_id_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        fs::write(d.path().join("instance-id"), "NOT/VALID").unwrap();
        assert!(matches!(
            s.instance_id(),
            Err(StateError::BadInstanceId { .. })
        ));
    }

    #[test]
    fn try_lock_sees_a_held_lock() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        let held = FileLock::try_exclusive(&p).unwrap().unwrap();
        // flock locks belong to the open file description, so a second open conflicts even
        // within one process.
        assert!(FileLock::try_exclusive(&p).unwrap().is_none());
        drop(held);
        assert!(FileLock::try_exclusive(&p).unwrap().is_some());
    }
}
