//! The importer's staging directories in the store directory, and sweeping the ones whose
//! owner died.
//!
//! Each staging directory `<store>/.nixdock-tmp-<random>` has a lock file beside it,
//! `<store>/.nixdock-lock-<random>`, on which its owner holds an `flock` for the
//! directory's whole life. The kernel drops the lock with the process, so a lock anyone can
//! take proves the owner gone (a SIGKILLed hook leaves its directory behind, possibly hundreds
//! of megabytes). [`sweep`] removes such leftovers: it takes each lock without waiting, and only
//! with the lock held removes the directory (through descriptors, never following a symlink,
//! as [`remove_tree`]) and then the lock file.
//!
//! Races, and why they are harmless:
//! - The lock file is created already locked (an `O_TMPFILE` file, locked, then linked under
//!   its name), and before the directory, so a sweeper never sees a live owner's lock free, and
//!   a directory without a lock file is never swept (it is not ours to prove dead: a
//!   directory of an older nixdock, or one whose owner is removing it).
//! - The owner removes the directory first and the lock file last, so a crash in between
//!   leaves a lock file alone, which the next sweep removes.
//! - Two sweepers: the second gets the lock after the first released it and finds the name
//!   gone or pointing to another file (checked by device and inode), and leaves it.
//! - Locks belong to the open file description, so a sweeper never takes a lock its own
//!   process holds for a live importer.
//!
//! Bounded work: one pass over the store directory's entries, at most [`MAX_SWEPT`] leftovers
//! removed per sweep (the rest wait for the next import).
//!
//! A process that is about to exit without dropping its importers (the hook stopped by a
//! signal, `src/hook/signals.rs`) removes its own live staging directories with
//! [`remove_own_within`]: every [`StagingDir`] is listed in a process-wide registry while it
//! lives. That removal is bounded in time; what it did not finish keeps its lock file, so the
//! next sweep finishes it once this process is gone.

use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hook_protocol::nar::remove_tree;

use super::STAGING_PREFIX;

/// Prefix of the lock file beside each staging directory: `.nixdock-lock-<random>` locks
/// `.nixdock-tmp-<random>`.
pub const LOCK_PREFIX: &str = ".nixdock-lock-";

/// Leftovers removed by one [`sweep`] at most.
pub const MAX_SWEPT: usize = 8;

/// A staging directory and the lock that proves its owner alive. Dropping it removes the
/// directory (whatever is in it), then the lock file, then releases the lock.
#[derive(Debug)]
pub struct StagingDir {
    path: PathBuf,
    lock_path: PathBuf,
    /// Its entry in [`LIVE`].
    id: u64,
    /// Holds the `flock`; closed last.
    _lock: File,
}

/// This process's live staging directories (id, directory, lock file), for
/// [`remove_own_within`].
static LIVE: Mutex<Vec<(u64, PathBuf, PathBuf)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn live() -> std::sync::MutexGuard<'static, Vec<(u64, PathBuf, PathBuf)>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

impl StagingDir {
    /// Creates a fresh, empty, private (0700) staging directory in `store_dir`, its lock file
    /// created and locked first. `suffix` names it; an existing name is `AlreadyExists`.
    pub fn create(store_dir: &Path, suffix: &str) -> io::Result<StagingDir> {
        let path = store_dir.join(format!("{STAGING_PREFIX}{suffix}"));
        let lock_path = store_dir.join(format!("{LOCK_PREFIX}{suffix}"));
        let lock = create_locked(store_dir, &lock_path)?;
        if let Err(e) = fs::DirBuilder::new().mode(0o700).create(&path) {
            let _ = fs::remove_file(&lock_path);
            return Err(e);
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        live().push((id, path.clone(), lock_path.clone()));
        Ok(StagingDir {
            path,
            lock_path,
            id,
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        live().retain(|(id, _, _)| *id != self.id);
        if let Err(e) = remove_tree(&self.path) {
            // Keep the lock file: the directory is still there, and the next sweep (after this
            // process is gone) retries.
            tracing::warn!(
                "could not remove staging directory '{}': {e}",
                self.path.display()
            );
            return;
        }
        if let Err(e) = fs::remove_file(&self.lock_path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("could not remove '{}': {e}", self.lock_path.display());
        }
    }
}

/// What [`remove_own_within`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OwnRemoval {
    /// Staging directories removed, with their lock files.
    pub removed: Vec<PathBuf>,
    /// Staging directories not removed within the limit (or that could not be): each keeps
    /// its lock file, so the next sweep after this process has exited removes it.
    pub left: Vec<PathBuf>,
}

/// Removes every live staging directory of this process (through descriptors, as
/// [`remove_tree`]), then its lock file, giving up after `limit`: for a process about to exit
/// without dropping its [`StagingDir`]s. The locks stay held until the process exits (their
/// descriptors belong to the `StagingDir`s), so no sweeper touches them meanwhile.
///
/// The removal runs on a thread of its own and the caller waits for it at most `limit`: a
/// large tree cannot hold the caller past its bound, and what is not done by then is left, its
/// lock file last, for the next sweep. A writer still adding files to a directory (an unpack
/// the caller no longer feeds) may make one pass fail; it is retried until the limit.
pub fn remove_own_within(limit: Duration) -> OwnRemoval {
    let deadline = Instant::now() + limit;
    // Another thread may hold the registry for a moment (creating or dropping a directory).
    let entries = loop {
        if let Ok(g) = LIVE.try_lock() {
            break g.clone();
        }
        if Instant::now() >= deadline {
            return OwnRemoval::default();
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    if entries.is_empty() {
        return OwnRemoval::default();
    }
    let all: Vec<PathBuf> = entries.iter().map(|(_, d, _)| d.clone()).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("staging-removal".into())
        .spawn(move || {
            for (_, dir, lock) in entries {
                let removed = loop {
                    match remove_tree(&dir) {
                        Ok(()) => break true,
                        Err(_) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => {
                            tracing::warn!("could not remove '{}': {e}", dir.display());
                            break false;
                        }
                    }
                };
                if removed {
                    let _ = fs::remove_file(&lock);
                }
                if tx.send((dir, removed)).is_err() {
                    return;
                }
            }
        });
    let mut report = OwnRemoval::default();
    if spawned.is_err() {
        report.left = all;
        return report;
    }
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((dir, true)) => report.removed.push(dir),
            Ok((dir, false)) => report.left.push(dir),
            Err(_) => break,
        }
    }
    for d in all {
        if !report.removed.contains(&d) && !report.left.contains(&d) {
            report.left.push(d);
        }
    }
    report
}

/// Creates `lock_path` (which must not exist) holding an exclusive `flock` from the moment its
/// name appears: on Linux an unnamed `O_TMPFILE` file in `dir`, locked, then linked. Where that
/// is not possible (another system, a file system without `O_TMPFILE`, no `/proc`), the file is
/// created by name and locked at once; a sweep in that instant would take it for a dead
/// owner's and unlink it, and this directory would then be left unswept if this process died
/// too.
fn create_locked(dir: &Path, lock_path: &Path) -> io::Result<File> {
    #[cfg(target_os = "linux")]
    if let Some(file) = create_locked_linux(dir, lock_path)? {
        return Ok(file);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = dir;
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(lock_path)?;
    lock(&file, false)?;
    Ok(file)
}

/// The `O_TMPFILE` way of [`create_locked`]; `None` where it is not available.
#[cfg(target_os = "linux")]
fn create_locked_linux(dir: &Path, lock_path: &Path) -> io::Result<Option<File>> {
    let cdir = cstring(dir.as_os_str())?;
    // SAFETY: NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            cdir.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: a descriptor we just opened and own.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    lock(&file, false)?;
    let proc_path = cstring(OsStr::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))?;
    let target = cstring(lock_path.as_os_str())?;
    // SAFETY: NUL-terminated paths; the result is checked. AT_SYMLINK_FOLLOW links the file
    // the magic link stands for (an O_TMPFILE file opened without O_EXCL may be linked).
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        return Ok(Some(file));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // No /proc.
        Some(libc::ENOENT) if !Path::new("/proc/self/fd").is_dir() => Ok(None),
        _ => Err(e),
    }
}

/// `flock(LOCK_EX)`, without waiting if `nonblocking`; `Ok(false)` if someone else holds it.
fn lock(file: &File, nonblocking: bool) -> io::Result<bool> {
    let op = libc::LOCK_EX | if nonblocking { libc::LOCK_NB } else { 0 };
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if nonblocking => return Ok(false),
            _ => return Err(e),
        }
    }
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: contains a NUL byte", Path::new(s).display()),
        )
    })
}

/// What one [`sweep`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Staging directories removed (their owner gone).
    pub removed: Vec<PathBuf>,
    /// Lock files of live owners, left alone.
    pub live: usize,
    /// Leftovers not looked at because [`MAX_SWEPT`] were removed already.
    pub deferred: usize,
}

/// Removes the staging directories in `store_dir` whose owner is gone (its lock free), at most
/// [`MAX_SWEPT`]. Problems with one leftover are logged and skipped; only an unreadable store
/// directory is an error.
pub fn sweep(store_dir: &Path) -> io::Result<SweepReport> {
    let mut report = SweepReport::default();
    let cdir = cstring(store_dir.as_os_str())?;
    // SAFETY: NUL-terminated path; the result is checked.
    let dir_fd = unsafe {
        libc::open(
            cdir.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir_fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just opened and own.
    let dir_fd = unsafe { OwnedFd::from_raw_fd(dir_fd) };
    for entry in fs::read_dir(store_dir)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let bytes = name.as_bytes();
        let Some(suffix) = bytes.strip_prefix(LOCK_PREFIX.as_bytes()) else {
            continue;
        };
        if suffix.is_empty() {
            continue;
        }
        if report.removed.len() >= MAX_SWEPT {
            report.deferred += 1;
            continue;
        }
        let dir_name = [STAGING_PREFIX.as_bytes(), suffix].concat();
        match sweep_one(&dir_fd, store_dir, bytes, &dir_name) {
            Ok(Outcome::Removed(p)) => report.removed.push(p),
            Ok(Outcome::Live) => report.live += 1,
            Ok(Outcome::Skipped) => {}
            Err(e) => tracing::warn!(
                "could not sweep the staging leftover '{}': {e}",
                store_dir.join(OsStr::from_bytes(&dir_name)).display()
            ),
        }
    }
    if !report.removed.is_empty() {
        tracing::info!(removed = ?report.removed, "removed staging directories of dead importers");
    }
    Ok(report)
}

enum Outcome {
    Removed(PathBuf),
    Live,
    Skipped,
}

fn sweep_one(
    dir_fd: &OwnedFd,
    store_dir: &Path,
    lock_name: &[u8],
    dir_name: &[u8],
) -> io::Result<Outcome> {
    let clock = cstring(OsStr::from_bytes(lock_name))?;
    // SAFETY: NUL-terminated name relative to a directory descriptor we own; checked.
    let fd = unsafe {
        libc::openat(
            dir_fd.as_raw_fd(),
            clock.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        // Gone meanwhile, or a symlink (ELOOP): not a lock of ours.
        return match e.raw_os_error() {
            Some(libc::ENOENT | libc::ELOOP) => Ok(Outcome::Skipped),
            _ => Err(e),
        };
    }
    // SAFETY: a descriptor we just opened and own.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let md = file.metadata()?;
    if !md.is_file() {
        return Ok(Outcome::Skipped);
    }
    if !lock(&file, true)? {
        return Ok(Outcome::Live);
    }
    // Still the file under that name (another sweeper may have removed it since we opened it)?
    match fstatat_nofollow(dir_fd, &clock) {
        Ok((dev, ino)) if dev == md.dev() && ino == md.ino() => {}
        Ok(_) => return Ok(Outcome::Skipped),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Skipped),
        Err(e) => return Err(e),
    }
    let dir = store_dir.join(OsStr::from_bytes(dir_name));
    let removed = match fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {
            remove_tree(&dir)?;
            true
        }
        // Only a directory can be ours; anything else is left to Nix's garbage collector.
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    // SAFETY: NUL-terminated name relative to a directory descriptor we own; checked.
    if unsafe { libc::unlinkat(dir_fd.as_raw_fd(), clock.as_ptr(), 0) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::NotFound {
            return Err(e);
        }
    }
    // The lock is released when `file` closes, after its name is gone.
    drop(file);
    Ok(if removed {
        Outcome::Removed(dir)
    } else {
        Outcome::Skipped
    })
}

// `dev_t` and `ino_t` are not u64 everywhere.
#[allow(clippy::unnecessary_cast)]
fn fstatat_nofollow(dir_fd: &OwnedFd, name: &CStr) -> io::Result<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid descriptor, NUL-terminated name, and a buffer for one stat.
    let r = unsafe {
        libc::fstatat(
            dir_fd.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat succeeded, so the buffer is initialised.
    let st = unsafe { st.assume_init() };
    Ok((st.st_dev as u64, st.st_ino as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A staging directory comes with its lock file, and both go when it is dropped.
    #[test]
    fn create_and_drop() {
        let t = tempfile::tempdir().unwrap();
        let s = StagingDir::create(t.path(), "abc").unwrap();
        assert_eq!(entries(t.path()), [".nixdock-lock-abc", ".nixdock-tmp-abc"]);
        fs::write(s.path().join("f"), b"x").unwrap();
        assert!(matches!(
            StagingDir::create(t.path(), "abc").map_err(|e| e.kind()),
            Err(io::ErrorKind::AlreadyExists)
        ));
        drop(s);
        assert!(entries(t.path()).is_empty());
    }

    /// A live owner's directory is never swept, a dead owner's is (lock file last), a lock
    /// without its directory goes too, a directory without a lock stays, and a symlink named
    /// like a lock file is not followed.
    #[test]
    fn sweep_takes_only_what_it_can_lock() {
        let t = tempfile::tempdir().unwrap();
        let store = t.path();
        let live = StagingDir::create(store, "live").unwrap();
        // A dead owner: a lock file nobody holds, and a read-only tree.
        fs::create_dir_all(store.join(".nixdock-tmp-dead/out/sub")).unwrap();
        fs::write(store.join(".nixdock-tmp-dead/out/sub/f"), b"x").unwrap();
        fs::set_permissions(
            store.join(".nixdock-tmp-dead/out/sub"),
            std::os::unix::fs::PermissionsExt::from_mode(0o555),
        )
        .unwrap();
        fs::write(store.join(".nixdock-lock-dead"), b"").unwrap();
        fs::write(store.join(".nixdock-lock-orphan"), b"").unwrap();
        fs::create_dir(store.join(".nixdock-tmp-nolock")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::create_dir(outside.path().join("victim")).unwrap();
        fs::write(outside.path().join("victim.lock"), b"").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("victim.lock"),
            store.join(".nixdock-lock-evil"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("victim"),
            store.join(".nixdock-tmp-evil"),
        )
        .unwrap();

        let r = sweep(store).unwrap();
        assert_eq!(r.removed, [store.join(".nixdock-tmp-dead")]);
        assert_eq!(r.live, 1);
        assert_eq!(
            entries(store),
            [
                ".nixdock-lock-evil",
                ".nixdock-lock-live",
                ".nixdock-tmp-evil",
                ".nixdock-tmp-live",
                ".nixdock-tmp-nolock",
            ]
        );
        assert!(outside.path().join("victim").is_dir());
        assert!(outside.path().join("victim.lock").is_file());
        drop(live);
        assert_eq!(
            entries(store),
            [
                ".nixdock-lock-evil",
                ".nixdock-tmp-evil",
                ".nixdock-tmp-nolock"
            ]
        );
    }

    /// A process removes its own live staging directories and their lock files (holding the
    /// locks until the `StagingDir`s go), and a later drop finds nothing left to remove.
    #[test]
    fn remove_own_removes_live_directories() {
        let t = tempfile::tempdir().unwrap();
        let a = StagingDir::create(t.path(), "own-a").unwrap();
        let b = StagingDir::create(t.path(), "own-b").unwrap();
        fs::create_dir_all(a.path().join("out/sub")).unwrap();
        fs::write(a.path().join("out/sub/f"), b"x").unwrap();
        fs::set_permissions(
            a.path().join("out/sub"),
            std::os::unix::fs::PermissionsExt::from_mode(0o555),
        )
        .unwrap();
        let t0 = Instant::now();
        let r = remove_own_within(Duration::from_secs(5));
        assert!(t0.elapsed() < Duration::from_secs(5));
        // Other tests' directories may be live in this process too: look at ours only.
        for d in [a.path(), b.path()] {
            assert!(r.removed.iter().any(|p| p == d), "{r:?}");
        }
        assert!(entries(t.path()).is_empty());
        drop(a);
        drop(b);
        assert!(entries(t.path()).is_empty());
        assert!(!live().iter().any(|(_, d, _)| d.starts_with(t.path())));
    }

    /// At most MAX_SWEPT per sweep; the next one continues.
    #[test]
    fn sweep_is_bounded() {
        let t = tempfile::tempdir().unwrap();
        for i in 0..MAX_SWEPT + 3 {
            fs::create_dir(t.path().join(format!(".nixdock-tmp-{i}"))).unwrap();
            fs::write(t.path().join(format!(".nixdock-lock-{i}")), b"").unwrap();
        }
        let r = sweep(t.path()).unwrap();
        assert_eq!((r.removed.len(), r.deferred), (MAX_SWEPT, 3));
        let r = sweep(t.path()).unwrap();
        assert_eq!((r.removed.len(), r.deferred), (3, 0));
        assert!(entries(t.path()).is_empty());
    }
}
