//! Opening paths beneath a directory whose contents another party controls — a builder's `/nix`
//! volume, written by the container's root — without following any symlink, so a link planted
//! there can never lead the (root) hook anywhere else on the host.
//!
//! On Linux this is `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS`; where the kernel lacks it (`ENOSYS`, or a seccomp filter's `EPERM`)
//! and on other systems, the path is walked one component at a time with `O_NOFOLLOW |
//! O_DIRECTORY`. Either way a symlink anywhere, `..`, or an absolute path is refused. Callers
//! then act through the descriptor they got, never through the path again; [`disk_usage_fd`]
//! walks such a tree the same way (descriptors only, no symlink followed, bounded).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What the last component must be opened as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A directory, opened for reading its entries.
    Dir,
    /// A regular file, opened for reading without blocking (a FIFO or device planted there
    /// can never make the reader wait) and refused if it is anything else.
    File,
    /// Any object but a symlink, as an `O_PATH` descriptor (Linux only): for `fstat` and for
    /// reaching the object through [`fd_path`] (e.g. connecting to a socket).
    Object,
}

/// Opens a trusted directory — one whose path the hook got from the engine or its own config,
/// not from the other party — to resolve paths beneath it.
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    owned(fd).map_err(|e| context(e, path))
}

/// Opens `rel` beneath the directory `root` without following any symlink on the way or at the
/// end. `rel` must be relative and made of plain names only (no `..`, no `.`).
pub fn open_beneath(root: BorrowedFd<'_>, rel: &Path, want: Want) -> io::Result<OwnedFd> {
    plain_names(rel)?;
    #[cfg(target_os = "linux")]
    match openat2_beneath(root, rel, want) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
            tracing::debug!("openat2 unavailable ({e}); resolving component by component");
        }
        r => return r.and_then(|fd| refuse_symlink(fd, rel, want)),
    }
    open_by_components(root, rel, want)
}

/// `O_PATH | O_NOFOLLOW` opens a final symlink itself instead of failing (with openat2 too,
/// even under `RESOLVE_NO_SYMLINKS`): refuse it. A file must be a regular one.
fn refuse_symlink(fd: OwnedFd, rel: &Path, want: Want) -> io::Result<OwnedFd> {
    if want == Want::Object && fstat(fd.as_fd())?.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(context(io::Error::from_raw_os_error(libc::ELOOP), rel));
    }
    if want == Want::File && fstat(fd.as_fd())?.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(context(io::Error::other("not a regular file"), rel));
    }
    Ok(fd)
}

/// `fstat` of a descriptor (works on `O_PATH` descriptors too).
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is written by fstat on success, read only then.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded.
    Ok(unsafe { st.assume_init() })
}

/// A path that names exactly the object behind `fd` for as long as `fd` stays open:
/// `/proc/self/fd/N`. Connecting a Unix socket to it reaches the socket `fd` was opened on,
/// whatever has since been renamed or planted at its old path.
#[cfg(target_os = "linux")]
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

pub fn is_socket(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

pub fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// The names `rel` is made of: plain names separated by single slashes, nothing else (no
/// leading `/`, no `.` or `..`, no empty name).
fn plain_names(rel: &Path) -> io::Result<Vec<&[u8]>> {
    let names: Vec<&[u8]> = rel.as_os_str().as_bytes().split(|b| *b == b'/').collect();
    if names.iter().any(|n| matches!(*n, b"" | b"." | b"..")) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "'{}': only plain names may be resolved beneath a directory",
                rel.display()
            ),
        ));
    }
    Ok(names)
}

fn last_flags(want: Want) -> io::Result<libc::c_int> {
    let base = libc::O_NOFOLLOW | libc::O_CLOEXEC;
    match want {
        Want::Dir => Ok(base | libc::O_RDONLY | libc::O_DIRECTORY),
        Want::File => Ok(base | libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY),
        #[cfg(target_os = "linux")]
        Want::Object => Ok(base | libc::O_PATH),
        #[cfg(not(target_os = "linux"))]
        Want::Object => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "opening a non-directory without reading it needs O_PATH (Linux)",
        )),
    }
}

#[cfg(target_os = "linux")]
fn openat2_beneath(root: BorrowedFd<'_>, rel: &Path, want: Want) -> io::Result<OwnedFd> {
    let c = cstring(rel.as_os_str().as_bytes())?;
    // The kernel's `struct open_how` (libc's is non-exhaustive, so it cannot be built here).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: last_flags(want)? as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: valid descriptor, NUL-terminated path and an `open_how` of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    owned(fd as RawFd).map_err(|e| context(e, rel))
}

/// The portable way: each directory opened with `O_NOFOLLOW | O_DIRECTORY` relative to the
/// one before, so a symlink anywhere fails the open (`ELOOP`/`ENOTDIR`).
pub(crate) fn open_by_components(
    root: BorrowedFd<'_>,
    rel: &Path,
    want: Want,
) -> io::Result<OwnedFd> {
    let names = plain_names(rel)?;
    #[cfg(target_os = "linux")]
    let dir_flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    #[cfg(not(target_os = "linux"))]
    let dir_flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let mut cur: Option<OwnedFd> = None;
    for (i, name) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        let flags = if last { last_flags(want)? } else { dir_flags };
        let at = cur.as_ref().map_or(root.as_raw_fd(), |f| f.as_raw_fd());
        let c = cstring(name)?;
        // SAFETY: valid descriptor and NUL-terminated name; the result is checked.
        let fd =
            owned(unsafe { libc::openat(at, c.as_ptr(), flags) }).map_err(|e| context(e, rel))?;
        cur = Some(if last {
            refuse_symlink(fd, rel, want)?
        } else {
            fd
        });
    }
    cur.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty path"))
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn context(e: io::Error, p: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", p.display()))
}

/// Disk usage (bytes in allocated blocks) of the directory `dir` and everything below it,
/// counting hard links once, never following a symlink, never leaving `dir`'s file system, and
/// never going deeper than `max_depth` directories (each level holds one descriptor) nor past
/// `max_entries` entries: too deep or too many is an error, not a partial count.
pub fn disk_usage_fd(dir: OwnedFd, max_depth: usize, max_entries: u64) -> io::Result<u64> {
    let top = fstat(dir.as_fd())?;
    if !is_dir(&top) {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    let mut walk = Walk {
        dev: top.st_dev,
        seen: std::collections::HashSet::new(),
        entries: 0,
        max_depth,
        max_entries,
    };
    Ok(walk.dir(dir, 0)? + top.st_blocks as u64 * 512)
}

struct Walk {
    dev: libc::dev_t,
    seen: std::collections::HashSet<libc::ino_t>,
    entries: u64,
    max_depth: usize,
    max_entries: u64,
}

impl Walk {
    fn dir(&mut self, fd: OwnedFd, depth: usize) -> io::Result<u64> {
        if depth >= self.max_depth {
            return Err(io::Error::other(format!(
                "deeper than {} directories",
                self.max_depth
            )));
        }
        let mut total = 0u64;
        for name in read_names(&fd)? {
            self.entries += 1;
            if self.entries > self.max_entries {
                return Err(io::Error::other(format!(
                    "more than {} entries",
                    self.max_entries
                )));
            }
            let Ok(st) = fstatat_nofollow(fd.as_fd(), &name) else {
                continue; // removed meanwhile
            };
            if st.st_dev != self.dev {
                continue;
            }
            if st.st_nlink > 1 && !is_dir(&st) && !self.seen.insert(st.st_ino) {
                continue;
            }
            total += st.st_blocks as u64 * 512;
            if is_dir(&st) {
                // O_NOFOLLOW: swapped for a symlink (or removed) since the fstatat → the open
                // fails and the entry is skipped.
                // SAFETY: valid descriptor and NUL-terminated name; the result is checked.
                let sub = unsafe {
                    libc::openat(
                        fd.as_raw_fd(),
                        name.as_ptr(),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    )
                };
                match owned(sub) {
                    Ok(sub) => total += self.dir(sub, depth + 1)?,
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ELOOP | libc::ENOTDIR | libc::ENOENT)
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(total)
    }
}

fn fstatat_nofollow(dir: BorrowedFd<'_>, name: &CString) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid descriptor and name; `st` is read only on success.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat succeeded.
    Ok(unsafe { st.assume_init() })
}

/// The names in a directory (without `.` and `..`), read through its descriptor.
fn read_names(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    // fdopendir takes ownership of the descriptor it gets: give it a duplicate.
    // SAFETY: valid descriptor; the result is checked.
    let dup = unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    let dup = owned(dup)?;
    // SAFETY: `dup` is a directory descriptor we own; on success the DIR owns it.
    let d = unsafe { libc::fdopendir(dup.as_raw_fd()) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dup);
    // fdopendir'd descriptors start where the original's offset is: rewind.
    // SAFETY: `d` is a valid DIR until closedir below.
    unsafe { libc::rewinddir(d) };
    let mut names = Vec::new();
    let result = loop {
        // readdir returns NULL both at the end and on error; errno tells them apart.
        // SAFETY: clearing errno is always fine.
        unsafe { *errno_location() = 0 };
        // SAFETY: `d` is valid.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            // SAFETY: reading errno.
            let err = unsafe { *errno_location() };
            break if err == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(err))
            };
        }
        // SAFETY: d_name is NUL-terminated within the entry readdir returned.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        let b = name.to_bytes();
        if b != b"." && b != b".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `d` is valid and closed once.
    unsafe { libc::closedir(d) };
    result.map(|()| names)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
unsafe fn errno_location() -> *mut libc::c_int {
    // SAFETY: always valid for the calling thread.
    unsafe { libc::__errno_location() }
}

#[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
unsafe fn errno_location() -> *mut libc::c_int {
    // SAFETY: always valid for the calling thread.
    unsafe { libc::__error() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A root with `a/b/` inside, a socket at `a/b/sock`, a file `a/b/file`, and a directory
    /// `outside/` beside the root holding a socket and a file of its own.
    struct Tree {
        _t: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        listeners: Vec<std::os::unix::net::UnixListener>,
    }

    fn tree() -> Tree {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("a/b/file"), b"x").unwrap();
        std::fs::write(outside.join("file"), b"x").unwrap();
        let l1 = std::os::unix::net::UnixListener::bind(root.join("a/b/sock")).unwrap();
        let l2 = std::os::unix::net::UnixListener::bind(outside.join("sock")).unwrap();
        Tree {
            root,
            outside,
            _t: t,
            listeners: vec![l1, l2],
        }
    }

    /// Both resolvers give the same answer.
    fn both(root: &Path, rel: &str, want: Want) -> Vec<io::Result<OwnedFd>> {
        let r = open_root(root).unwrap();
        vec![
            open_beneath(r.as_fd(), Path::new(rel), want),
            open_by_components(r.as_fd(), Path::new(rel), want),
        ]
    }

    fn all_refused(root: &Path, rel: &str, want: Want) {
        for (i, r) in both(root, rel, want).into_iter().enumerate() {
            assert!(r.is_err(), "resolver {i} followed {rel}");
        }
    }

    #[test]
    fn plain_paths_resolve() {
        let t = tree();
        for r in both(&t.root, "a/b", Want::Dir) {
            assert!(is_dir(&fstat(r.unwrap().as_fd()).unwrap()));
        }
        #[cfg(target_os = "linux")]
        for r in both(&t.root, "a/b/sock", Want::Object) {
            assert!(is_socket(&fstat(r.unwrap().as_fd()).unwrap()));
        }
    }

    #[test]
    fn symlink_in_the_middle_is_refused() {
        let t = tree();
        // Relative and absolute targets, inside and outside the root: all refused.
        symlink(&t.outside, t.root.join("abs")).unwrap();
        symlink("../outside", t.root.join("rel")).unwrap();
        symlink("a", t.root.join("inside")).unwrap();
        for link in ["abs", "rel"] {
            all_refused(&t.root, &format!("{link}/sock"), Want::Object);
            all_refused(&t.root, &format!("{link}/file"), Want::Object);
        }
        all_refused(&t.root, "inside/b/sock", Want::Object);
        all_refused(&t.root, "inside/b", Want::Dir);
    }

    #[test]
    fn final_symlink_is_refused() {
        let t = tree();
        symlink(t.outside.join("sock"), t.root.join("a/b/abs-sock")).unwrap();
        symlink("sock", t.root.join("a/b/same-sock")).unwrap();
        symlink(&t.outside, t.root.join("a/b/dir")).unwrap();
        all_refused(&t.root, "a/b/abs-sock", Want::Object);
        all_refused(&t.root, "a/b/same-sock", Want::Object);
        all_refused(&t.root, "a/b/dir", Want::Dir);
        all_refused(&t.root, "a/b/dir", Want::Object);
    }

    #[test]
    fn dot_dot_and_absolute_paths_are_refused() {
        let t = tree();
        all_refused(&t.root, "../outside/sock", Want::Object);
        all_refused(&t.root, "a/../../outside", Want::Dir);
        all_refused(&t.root, "a/./b", Want::Dir);
        all_refused(
            &t.root,
            t.outside.join("sock").to_str().unwrap(),
            Want::Object,
        );
        all_refused(&t.root, "", Want::Dir);
    }

    #[test]
    fn non_socket_and_non_directory_are_told_apart() {
        let t = tree();
        all_refused(&t.root, "a/b/file", Want::Dir);
        #[cfg(target_os = "linux")]
        for r in both(&t.root, "a/b/file", Want::Object) {
            // Opened, but fstat says what it is: the caller refuses a non-socket.
            assert!(!is_socket(&fstat(r.unwrap().as_fd()).unwrap()));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn connecting_through_the_descriptor_reaches_the_checked_socket() {
        let t = tree();
        let r = open_root(&t.root).unwrap();
        let fd = open_beneath(r.as_fd(), Path::new("a/b/sock"), Want::Object).unwrap();
        // The path is swapped for a symlink to another socket after the check: the descriptor
        // still leads to the one that was checked.
        std::fs::rename(t.root.join("a/b/sock"), t.root.join("a/b/moved")).unwrap();
        symlink(t.outside.join("sock"), t.root.join("a/b/sock")).unwrap();
        let _c = std::os::unix::net::UnixStream::connect(fd_path(fd.as_fd())).unwrap();
        let inside = &t.listeners[0];
        let outside = &t.listeners[1];
        inside.set_nonblocking(true).unwrap();
        outside.set_nonblocking(true).unwrap();
        assert!(
            inside.accept().is_ok(),
            "the checked socket got the connection"
        );
        assert!(outside.accept().is_err(), "the planted one did not");
    }

    #[test]
    fn disk_usage_counts_hard_links_once_and_follows_no_symlink() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("big"), vec![1u8; 1 << 20]).unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/a"), vec![1u8; 100_000]).unwrap();
        let usage = || disk_usage_fd(open_root(t.path()).unwrap(), 64, 1000).unwrap();
        let one = usage();
        assert!(one >= 100_000);
        std::fs::hard_link(t.path().join("d/a"), t.path().join("d/b")).unwrap();
        assert_eq!(usage(), one);
        symlink(outside.path(), t.path().join("d/link")).unwrap();
        assert!(usage() < one + (1 << 20));
        // Bounded: too deep or too many entries is an error.
        assert!(disk_usage_fd(open_root(t.path()).unwrap(), 1, 1000).is_err());
        assert!(disk_usage_fd(open_root(t.path()).unwrap(), 64, 2).is_err());
    }
}
