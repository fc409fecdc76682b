//! The state directory: this installation's instance id, its SSH client key, lock files and the
//! hook's own log. `$NIXDOCK_STATE_DIR`, else `/var/lib/nixdock` for root and the XDG state
//! directory for anyone else; never a shared place like `/tmp`.
//!
//! Another local user must not be able to read the client key or plant a file, lock or log
//! that the root hook then trusts or writes through. So the directory and its subdirectories
//! are 0700 and every file 0600, owned by the process's user, created with those modes
//! whatever the umask, and checked on every open: a wrong owner or mode is refused with an
//! error naming the path and the fix. Every existing parent must be owned by root or that user
//! and not writable by others (unless sticky), so nobody else can swap the directory itself;
//! with that, paths inside it are as good as descriptors.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The state directory's subdirectories, made (0700) and checked by [`StateDir::open`].
const SUBDIRS: [&str; 2] = ["locks", "current-load"];

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds an invalid instance id {id:?}; delete the file to make a new one")]
    BadInstanceId { path: PathBuf, id: String },
    #[error(
        "no state directory: HOME is not set (nor XDG_STATE_HOME or NIXDOCK_STATE_DIR), and \
         nixdock keeps its key and locks only in a directory of this user's own, never in /tmp; \
         set NIXDOCK_STATE_DIR (or HOME) for {user}"
    )]
    NoHome { user: String },
    /// A wrong owner or mode on the state directory, a file in it, or a parent.
    #[error("refusing to use {path}: {problem}; {fix}")]
    Insecure {
        path: PathBuf,
        problem: String,
        fix: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// `path` quoted for a shell command in a message.
fn sh_quote(path: &Path) -> String {
    let s = path.display().to_string();
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Where the state lives: `$NIXDOCK_STATE_DIR`; `/var/lib/nixdock` for root;
    /// `$XDG_STATE_HOME/nixdock`; `$HOME/.local/state/nixdock`. No fallback beyond those:
    /// without a home, there is no private place, and [`StateError::NoHome`] says so.
    pub fn locate() -> Result<PathBuf, StateError> {
        let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(p) = set("NIXDOCK_STATE_DIR") {
            return Ok(PathBuf::from(p));
        }
        if euid() == 0 {
            return Ok(PathBuf::from("/var/lib/nixdock"));
        }
        // The XDG spec says to ignore a relative XDG_STATE_HOME.
        if let Some(x) = set("XDG_STATE_HOME").filter(|x| Path::new(x).is_absolute()) {
            return Ok(PathBuf::from(x).join("nixdock"));
        }
        if let Some(home) = set("HOME") {
            return Ok(PathBuf::from(home).join(".local/state/nixdock"));
        }
        Err(StateError::NoHome {
            user: format!("uid {}", euid()),
        })
    }

    /// [`Self::locate`], or an empty path when there is none, which [`Self::open`] refuses
    /// with the same reason (for callers that show the path before opening it).
    pub fn default_path() -> PathBuf {
        Self::locate().unwrap_or_default()
    }

    /// Opens the state directory, creating it and its subdirectories (0700) if needed, and
    /// checks the owner and mode of it, its parents, its subdirectories and every entry in
    /// them. A wrong one is [`StateError::Insecure`], naming the path and the fix.
    pub fn open(root: impl Into<PathBuf>) -> Result<StateDir, StateError> {
        let root = root.into();
        if root.as_os_str().is_empty() {
            return Err(Self::locate().err().unwrap_or(StateError::NoHome {
                user: format!("uid {}", euid()),
            }));
        }
        // Relative to the working directory, as a command-line argument means it.
        let root = std::path::absolute(&root).map_err(io(&root))?;
        let missing_from = check_parents(&root)?;
        make_private_dirs(&root, missing_from)?;
        check_private(&root, &root, true)?;
        // Everything already there first, so nothing is made in a directory that is refused.
        for dir in std::iter::once(root.clone()).chain(SUBDIRS.iter().map(|s| root.join(s))) {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != root => continue,
                Err(e) => return Err(io(&dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io(&dir))?;
                match check_private(&root, &entry.path(), false) {
                    // Another hook's temporary file, renamed or removed since it was listed.
                    Err(StateError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound => {}
                    r => r?,
                }
            }
        }
        for sub in SUBDIRS {
            let p = root.join(sub);
            make_private_dirs(&p, p.components().count() - 1)?;
            check_private(&root, &p, true)?;
        }
        Ok(StateDir { root })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `<state>/<name>`, a directory of the state's own (made 0700, checked like the others).
    pub fn private_subdir(&self, name: &str) -> Result<PathBuf, StateError> {
        let p = self.root.join(name);
        make_private_dirs(&p, p.components().count() - 1)?;
        check_private(&self.root, &p, true)?;
        Ok(p)
    }

    /// Checks a file of the state (owner, mode, no symlink) as every part of it is checked.
    pub fn check_private_file(&self, path: &Path) -> Result<(), StateError> {
        check_private(&self.root, path, false)
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
                write_private(&path, format!("{id}\n").as_bytes(), 0o600).map_err(io(&path))?;
                Ok(id)
            }
            Err(e) => Err(io(&path)(e)),
        }
    }
}

/// Checks every existing parent of `root` (as written, and with symlinks resolved): owned by
/// root or this user, and not writable by group or others unless sticky (like /tmp, where
/// nobody can rename another's entries). Returns the number of leading components of `root`
/// that exist; the rest are for us to make.
fn check_parents(root: &Path) -> Result<usize, StateError> {
    let me = euid();
    let check = |p: &Path| -> Result<bool, StateError> {
        let m = match fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(p)(e)),
        };
        let owner_ok = m.uid() == 0 || m.uid() == me;
        let writable_by_others =
            m.file_type().is_dir() && m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0;
        if !owner_ok || writable_by_others {
            let problem = if !owner_ok {
                format!(
                    "it is a parent of the state directory {} but owned by uid {}, who could \
                     replace the state directory",
                    root.display(),
                    m.uid()
                )
            } else {
                format!(
                    "it is a parent of the state directory {} but writable by others (mode \
                     {:o}), who could replace the state directory",
                    root.display(),
                    m.mode() & 0o7777
                )
            };
            return Err(StateError::Insecure {
                path: p.to_owned(),
                problem,
                fix: format!(
                    "make it writable only by its owner (`chmod go-w {}`), owned by root or uid \
                     {me}, or set NIXDOCK_STATE_DIR to a directory in a place only you (and \
                     root) control",
                    sh_quote(p)
                ),
            });
        }
        Ok(true)
    };
    let mut prefix = PathBuf::new();
    let mut existing = 0;
    let mut deepest = None;
    let parent_count = root.components().count().saturating_sub(1);
    for c in root.components().take(parent_count) {
        prefix.push(c);
        if !check(&prefix)? {
            break;
        }
        existing += 1;
        deepest = Some(prefix.clone());
    }
    // Symlinks on the way: the real directories they lead to must pass too.
    if let Some(d) = deepest
        && let Ok(real) = fs::canonicalize(&d)
        && real != d
    {
        let mut p = PathBuf::new();
        for c in real.components() {
            p.push(c);
            check(&p)?;
        }
    }
    if existing == parent_count && fs::symlink_metadata(root).is_ok() {
        existing += 1;
    }
    Ok(existing)
}

/// Makes the components of `dir` from index `from` on, each with mode exactly 0700 (set
/// after `mkdir`, so the umask cannot widen or narrow it).
fn make_private_dirs(dir: &Path, from: usize) -> Result<(), StateError> {
    let mut p = PathBuf::new();
    for (i, c) in dir.components().enumerate() {
        p.push(c);
        if i < from {
            continue;
        }
        match fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).map_err(io(&p))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&p)(e)),
        }
    }
    Ok(())
}

/// Checks that `path` (in the state directory `root`) is this user's and private: a
/// directory 0700 when `dir`, else a directory or regular file with no group or other bits.
fn check_private(root: &Path, path: &Path, dir: bool) -> Result<(), StateError> {
    let me = euid();
    let m = fs::symlink_metadata(path).map_err(io(path))?;
    let insecure = |problem: String, fix: String| StateError::Insecure {
        path: path.to_owned(),
        problem,
        fix,
    };
    let ft = m.file_type();
    if !(ft.is_dir() || (!dir && ft.is_file())) {
        let what = if ft.is_symlink() {
            "a symbolic link"
        } else if ft.is_file() {
            "a file where a directory belongs"
        } else {
            "neither a file nor a directory"
        };
        return Err(insecure(
            format!("it is {what}, which nixdock never makes in its state directory"),
            format!(
                "remove it (`rm {}`) after checking who made it",
                sh_quote(path)
            ),
        ));
    }
    if m.uid() != me {
        return Err(insecure(
            format!(
                "it is owned by uid {}, but nixdock runs as uid {me}; another user may have \
                 made it to read or plant nixdock's state",
                m.uid()
            ),
            format!(
                "if it is not yours, remove {}; otherwise `chown -R {me} {}`",
                sh_quote(root),
                sh_quote(root)
            ),
        ));
    }
    let mode = m.mode() & 0o7777;
    if mode & 0o077 != 0 {
        let want = if ft.is_dir() { "700" } else { "600" };
        return Err(insecure(
            format!(
                "its mode is {mode:o}, which lets other users in (nixdock keeps its private key \
                 and locks here)"
            ),
            format!(
                "`chmod {want} {}` (or `chmod -R go= {}` for the whole state directory)",
                sh_quote(path),
                sh_quote(root)
            ),
        ));
    }
    Ok(())
}

/// Takes group and other bits off a state directory that an older nixdock made with the
/// umask's modes (0755 directories, 0644 files), so an upgrade keeps its instance id and
/// builders. Only what is ours and a plain file or directory is touched, each through a
/// descriptor opened without following a symlink; anything else is left for [`StateDir::open`]
/// to refuse. Returns the paths whose mode changed.
pub fn tighten_legacy_modes(root: &Path) -> Result<Vec<PathBuf>, StateError> {
    let mut changed = Vec::new();
    match fs::symlink_metadata(root) {
        Ok(m) if m.is_dir() && m.uid() == euid() => {}
        Ok(_) => return Ok(changed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(changed),
        Err(e) => return Err(io(root)(e)),
    }
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        if !tighten_one(&dir, true, &mut changed)? {
            continue;
        }
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            let m = fs::symlink_metadata(&path).map_err(io(&path))?;
            if m.is_dir() {
                dirs.push(path);
            } else if m.is_file() {
                tighten_one(&path, false, &mut changed)?;
            }
        }
    }
    Ok(changed)
}

/// `chmod go=` through a descriptor, if `path` is still a plain file or directory of ours.
fn tighten_one(path: &Path, dir: bool, changed: &mut Vec<PathBuf>) -> Result<bool, StateError> {
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | if dir { libc::O_DIRECTORY } else { 0 };
    let f = match OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(f) => f,
        // A symlink (ELOOP) or something swapped in meanwhile: not ours to fix.
        Err(_) => return Ok(false),
    };
    let m = f.metadata().map_err(io(path))?;
    if m.uid() != euid() || m.is_dir() != dir || !(m.is_dir() || m.is_file()) {
        return Ok(false);
    }
    let mode = m.mode() & 0o7777;
    if mode & 0o077 != 0 {
        f.set_permissions(fs::Permissions::from_mode(mode & !0o077))
            .map_err(io(path))?;
        changed.push(path.to_owned());
    }
    Ok(true)
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map_err(io(path))?;
        ensure_mode(&file, 0o600).map_err(io(path))?;
        Ok(file)
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

/// The lock's descriptor: a process it is handed to (inherited across exec) holds the lock
/// with it until it closes it (the SSH holder, until its socket is in place).
impl AsRawFd for FileLock {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// Creates (or truncates) `path` as a file of ours with mode exactly 0600, not through a
/// symlink.
pub fn create_private_file(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)?;
    ensure_mode(&f, 0o600)?;
    Ok(f)
}

/// Gives a file of ours exactly `mode` (the umask may have narrowed it at creation).
pub fn ensure_mode(file: &File, mode: u32) -> std::io::Result<()> {
    if file.metadata()?.mode() & 0o7777 != mode {
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Writes `contents` to `path` with `mode`, atomically (temp file + rename).
pub fn write_private(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    replace_private(path, contents, mode, true)
}

/// [`write_private`] without the fsync, for a file that only spares work when it is there (a
/// hook writes one on every build; after a crash it may be empty, which its reader ignores).
pub fn write_private_cache(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    replace_private(path, contents, mode, false)
}

fn replace_private(path: &Path, contents: &[u8], mode: u32, durable: bool) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        if durable {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_nixdocks_state_dir_is_made_private() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("state");
        let mode = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m));
        fs::create_dir_all(root.join("locks")).unwrap();
        fs::write(root.join("instance-id"), "abcd1234\n").unwrap();
        fs::write(root.join("locks/builder-x.lock"), "").unwrap();
        let outside = d.path().join("outside");
        fs::write(&outside, "").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("locks/planted")).unwrap();
        for (p, m) in [
            (root.clone(), 0o755),
            (root.join("locks"), 0o755),
            (root.join("instance-id"), 0o644),
            (root.join("locks/builder-x.lock"), 0o644),
            (outside.clone(), 0o644),
        ] {
            mode(&p, m).unwrap();
        }
        assert!(matches!(
            StateDir::open(&root),
            Err(StateError::Insecure { .. })
        ));
        let changed = tighten_legacy_modes(&root).unwrap();
        assert_eq!(changed.len(), 4, "{changed:?}");
        // A symlink is never followed: what it points at keeps its mode.
        assert_eq!(fs::metadata(&outside).unwrap().mode() & 0o777, 0o644);
        fs::remove_file(root.join("locks/planted")).unwrap();
        let s = StateDir::open(&root).unwrap();
        assert_eq!(s.instance_id().unwrap(), "abcd1234");
        assert!(tighten_legacy_modes(&root).unwrap().is_empty());
    }

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
    fn private_subdir_and_files_pass_the_check() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path().join("state")).unwrap();
        let sub = s.private_subdir("image-build").unwrap();
        assert_eq!(fs::metadata(&sub).unwrap().mode() & 0o7777, 0o700);
        create_private_file(&sub.join("x.log")).unwrap();
        assert_eq!(
            fs::metadata(sub.join("x.log")).unwrap().mode() & 0o7777,
            0o600
        );
        StateDir::open(s.path()).unwrap();
        // A symlink is never followed.
        std::os::unix::fs::symlink("/nonexistent-target", sub.join("l.log")).unwrap();
        assert!(create_private_file(&sub.join("l.log")).is_err());
    }

    #[test]
    fn corrupt_instance_id_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path().join("state")).unwrap();
        fs::write(s.path().join("instance-id"), "NOT/VALID").unwrap();
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
