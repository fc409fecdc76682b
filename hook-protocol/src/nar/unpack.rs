//! Unpacking a NAR onto disk: the async parser feeds a blocking worker thread through a bounded
//! channel, so disk writes overlap with reading and never block the async runtime.
//!
//! The NAR's SHA-256 is computed on a second blocking thread from the same chunks (shared, not
//! copied), so hashing, writing and reading/parsing each take a core of their own when there
//! are some: the hash is the one pass over every byte that costs real CPU (~0.1 s per 200 MB
//! even with SHA extensions).
//!
//! The worker creates every object with "create new" semantics (`mkdir`, `O_CREAT|O_EXCL`,
//! `symlink`), inside `dest` or directories it created itself, so it never writes through a
//! symlink and never touches anything that existed before. If the unpack fails or is cancelled,
//! the worker removes everything it created.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use super::parse::{NarSink, Parser};
use super::{CASE_HACK_SUFFIX, NarError, NarSummary, UnpackOptions, canonical_mtime, show};

/// Batches of commands in flight to the worker. A batch holds at most `BATCH_OPS` commands
/// and is sent once it carries `BATCH_BYTES` of file contents, so at most about 16 × 512 KiB
/// are buffered. Batching keeps the thread hand-offs per small file well below one.
const QUEUE: usize = 16;
const BATCH_OPS: usize = 256;
const BATCH_BYTES: usize = 256 * 1024;
/// Batches in flight to the hashing thread: at most about 8 × 256 KiB, shared with the
/// writer's (the same `Bytes`), so a lagging hasher holds at most 2 MiB more.
const HASH_QUEUE: usize = 8;

enum Op {
    Directory(Option<Vec<u8>>),
    DirectoryEnd,
    File {
        name: Option<Vec<u8>>,
        executable: bool,
    },
    Data(Bytes),
    FileEnd,
    Symlink {
        name: Option<Vec<u8>>,
        target: Vec<u8>,
    },
    /// Sent after the whole NAR parsed; without it the worker undoes everything.
    Finish,
}

/// Reads one NAR from `r` and recreates it at `dest`, which must not exist (its parent must).
///
/// Regular files get mode 0444 (0555 if executable), directories 0555 once filled, and files and
/// directories mtime 1 (Nix's canonical store metadata; symlinks keep their creation time, which
/// `nix-store --register-validity` canonicalises). Stops reading at the NAR's end.
///
/// On error nothing is left at `dest`. If the future is dropped midway, the worker thread removes
/// what was created in the background.
pub async fn unpack_nar<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    dest: &Path,
    opts: UnpackOptions,
) -> Result<NarSummary, NarError> {
    match fs::symlink_metadata(dest) {
        Ok(_) => return Err(NarError::DestinationExists(dest.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(NarError::Io {
                op: "checking",
                path: dest.to_owned(),
                source,
            });
        }
    }

    let (tx, rx) = mpsc::channel(QUEUE);
    let worker = Worker {
        dest: dest.to_owned(),
        case_hack: opts.case_hack,
        stack: Vec::new(),
        file: None,
        created_root: false,
        umask: None,
    };
    let handle = tokio::task::spawn_blocking(move || worker.run(rx));

    let (hash_tx, hash_rx) = mpsc::channel(HASH_QUEUE);
    let hasher = tokio::task::spawn_blocking(move || hash_all(hash_rx));

    let mut sink = UnpackSink {
        ops: Batcher::new(tx, "the unpacking thread stopped"),
        hash: Batcher::new(hash_tx, "the hashing thread stopped"),
    };
    // The parser hands every byte of the NAR, in order, to the sink (structure through `raw`,
    // contents through `file_data`), which passes them to the hashing thread.
    let parsed = Parser::new(r, true, false).run(&mut sink).await;
    let parsed = match parsed {
        Ok(summary) => async {
            sink.push(Op::Finish).await?;
            sink.ops.flush().await?;
            sink.hash.finish().await
        }
        .await
        .map(|()| summary),
        Err(e) => Err(e),
    };
    // Without `Finish`, closing the channel makes the worker clean up.
    drop(sink);
    let worked = match handle.await {
        Ok(r) => r,
        Err(e) => Err(NarError::Thread("unpacking", e)),
    };
    let parsed = match parsed {
        // The hash thread ends once its channel is closed (`finish` above, or the sink's drop).
        Ok(summary) => match hasher.await {
            Ok(digest) => Ok(NarSummary {
                nar_sha256: digest,
                ..summary
            }),
            Err(e) => Err(NarError::Thread("hashing", e)),
        },
        Err(e) => Err(e),
    };
    match (parsed, worked) {
        (Ok(summary), Ok(())) => Ok(summary),
        // The worker's own error explains why it stopped listening.
        (Err(NarError::Internal(_)), Err(e)) | (Ok(_), Err(e)) => Err(e),
        (Err(e), _) => Err(e),
    }
}

/// The hashing thread: SHA-256 of every piece it receives, in order, until the channel closes.
fn hash_all(mut rx: mpsc::Receiver<Vec<Bytes>>) -> [u8; 32] {
    let mut h = Sha256::new();
    while let Some(batch) = rx.blocking_recv() {
        for piece in batch {
            h.update(&piece);
        }
    }
    h.finalize().into()
}

/// Items on their way to a blocking thread, sent in batches of up to `BATCH_OPS` items or
/// `BATCH_BYTES` bytes, so the channel is crossed once per batch rather than per item.
struct Batcher<T> {
    /// `None` once finished.
    tx: Option<mpsc::Sender<Vec<T>>>,
    batch: Vec<T>,
    bytes: usize,
    /// What the thread does, for the error when it stopped listening.
    thread: &'static str,
}

impl<T> Batcher<T> {
    fn new(tx: mpsc::Sender<Vec<T>>, thread: &'static str) -> Self {
        Batcher {
            tx: Some(tx),
            batch: Vec::new(),
            bytes: 0,
            thread,
        }
    }

    /// Queues `item`, which counts `bytes` towards the batch's size.
    async fn push(&mut self, item: T, bytes: usize) -> Result<(), NarError> {
        self.bytes += bytes;
        self.batch.push(item);
        if self.batch.len() >= BATCH_OPS || self.bytes >= BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), NarError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.bytes = 0;
        let tx = self
            .tx
            .as_ref()
            .ok_or(NarError::Internal("a batch after the end"))?;
        tx.send(batch)
            .await
            .map_err(|_| NarError::Internal(self.thread))
    }

    /// Sends what is left and closes the channel, which ends the thread's loop.
    async fn finish(&mut self) -> Result<(), NarError> {
        self.flush().await?;
        self.tx = None;
        Ok(())
    }
}

/// Structure and contents to the writing thread, every byte of the NAR to the hashing thread.
struct UnpackSink {
    ops: Batcher<Op>,
    hash: Batcher<Bytes>,
}

impl UnpackSink {
    async fn push(&mut self, op: Op) -> Result<(), NarError> {
        let bytes = match &op {
            Op::Data(d) => d.len(),
            _ => 0,
        };
        self.ops.push(op, bytes).await
    }

    async fn hash(&mut self, piece: Bytes) -> Result<(), NarError> {
        if piece.is_empty() {
            return Ok(());
        }
        let n = piece.len();
        self.hash.push(piece, n).await
    }
}

impl NarSink for UnpackSink {
    async fn directory(&mut self, name: Option<&[u8]>) -> Result<(), NarError> {
        self.push(Op::Directory(name.map(<[u8]>::to_vec))).await
    }
    async fn directory_end(&mut self) -> Result<(), NarError> {
        self.push(Op::DirectoryEnd).await
    }
    async fn file(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        _size: u64,
    ) -> Result<(), NarError> {
        self.push(Op::File {
            name: name.map(<[u8]>::to_vec),
            executable,
        })
        .await
    }
    async fn file_data(&mut self, data: Bytes) -> Result<(), NarError> {
        // The same bytes, shared: one for the hash, one for the file.
        self.hash(data.clone()).await?;
        self.push(Op::Data(data)).await
    }
    async fn file_end(&mut self) -> Result<(), NarError> {
        self.push(Op::FileEnd).await
    }
    async fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), NarError> {
        self.push(Op::Symlink {
            name: name.map(<[u8]>::to_vec),
            target: target.to_vec(),
        })
        .await
    }
    async fn raw(&mut self, bytes: &mut BytesMut, _last: bool) -> Result<(), NarError> {
        self.hash(bytes.split().freeze()).await
    }
}

struct DirFrame {
    path: PathBuf,
    /// Case hack: ASCII-lowercased name → collisions so far (Nix's `names` map).
    names: HashMap<Vec<u8>, u64>,
}

struct Worker {
    dest: PathBuf,
    case_hack: bool,
    stack: Vec<DirFrame>,
    file: Option<(File, PathBuf, bool)>,
    created_root: bool,
    /// The process umask, if known: when it leaves the modes we want alone, files are created
    /// with their final mode and directories writable, saving a `chmod` each.
    umask: Option<u32>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> NarError + 'a {
    move |source| NarError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Vec<Op>>) -> Result<(), NarError> {
        self.umask = process_umask();
        let result = 'outer: loop {
            let Some(batch) = rx.blocking_recv() else {
                break Err(NarError::Internal("unpacking was abandoned"));
            };
            for op in batch {
                match op {
                    Op::Finish => break 'outer Ok(()),
                    op => {
                        if let Err(e) = self.apply(op) {
                            break 'outer Err(e);
                        }
                    }
                }
            }
        };
        if result.is_err() {
            self.file = None;
            let removed = match self.created_root {
                true => remove_tree(&self.dest),
                false => Ok(()),
            };
            if let Err(e) = removed {
                tracing::warn!(
                    "could not remove partly unpacked '{}': {e}",
                    self.dest.display()
                );
            }
        }
        result
    }

    /// Where the next node goes, applying the case hack.
    fn target(&mut self, name: Option<Vec<u8>>) -> Result<PathBuf, NarError> {
        let Some(mut name) = name else {
            return Ok(self.dest.clone());
        };
        let frame = self
            .stack
            .last_mut()
            .ok_or_else(|| NarError::Internal("entry outside a directory"))?;
        if self.case_hack {
            let key = name.to_ascii_lowercase();
            if let Some(n) = frame.names.get_mut(&key) {
                *n += 1;
                let original = name.clone();
                name.extend_from_slice(CASE_HACK_SUFFIX.as_bytes());
                name.extend_from_slice(n.to_string().as_bytes());
                if frame.names.contains_key(&name.to_ascii_lowercase()) {
                    return Err(NarError::CaseHackCollision {
                        path: frame.path.display().to_string(),
                        name: show(&original),
                        hacked: show(&name),
                    });
                }
            } else {
                frame.names.insert(key, 0);
            }
        }
        Ok(frame.path.join(OsStr::from_bytes(&name)))
    }

    fn apply(&mut self, op: Op) -> Result<(), NarError> {
        match op {
            Op::Directory(name) => {
                let path = self.target(name)?;
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(io_err("creating directory", &path))?;
                self.created_root = true;
                if self.umask.is_none_or(|m| m & 0o700 != 0) {
                    // Whatever the umask, we need to fill it.
                    fs::set_permissions(&path, Permissions::from_mode(0o700))
                        .map_err(io_err("setting permissions of", &path))?;
                }
                self.stack.push(DirFrame {
                    path,
                    names: HashMap::new(),
                });
            }
            Op::DirectoryEnd => {
                let frame = self
                    .stack
                    .pop()
                    .ok_or_else(|| NarError::Internal("unbalanced directory end"))?;
                let path = frame.path;
                fs::set_permissions(&path, Permissions::from_mode(0o555))
                    .map_err(io_err("setting permissions of", &path))?;
                File::open(&path)
                    .and_then(|d| d.set_times(FileTimes::new().set_modified(canonical_mtime())))
                    .map_err(io_err("setting the mtime of", &path))?;
            }
            Op::File { name, executable } => {
                let path = self.target(name)?;
                // Creating a file read-only still gives a writable descriptor.
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(file_mode(executable))
                    .open(&path)
                    .map_err(io_err("creating file", &path))?;
                self.created_root = true;
                self.file = Some((f, path, executable));
            }
            Op::Data(data) => {
                let (f, path, _) = self
                    .file
                    .as_mut()
                    .ok_or_else(|| NarError::Internal("data outside a file"))?;
                f.write_all(&data).map_err(io_err("writing", path))?;
            }
            Op::FileEnd => {
                let (f, path, executable) = self
                    .file
                    .take()
                    .ok_or_else(|| NarError::Internal("unbalanced file end"))?;
                f.set_times(FileTimes::new().set_modified(canonical_mtime()))
                    .map_err(io_err("setting the mtime of", &path))?;
                let mode = file_mode(executable);
                if self.umask.is_none_or(|m| m & mode != 0) {
                    f.set_permissions(Permissions::from_mode(mode))
                        .map_err(io_err("setting permissions of", &path))?;
                }
            }
            Op::Symlink { name, target } => {
                let path = self.target(name)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(io_err("creating symlink", &path))?;
                self.created_root = true;
            }
            Op::Finish => {}
        }
        Ok(())
    }
}

fn file_mode(executable: bool) -> u32 {
    if executable { 0o555 } else { 0o444 }
}

/// The process umask, from `/proc/self/status` (Linux ≥ 4.7); `None` if unknown.
fn process_umask() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(line.trim(), 8).ok()
}

pub use remove::remove_tree;

/// Deleting a tree in a directory others can write to (the store is group-writable by the
/// build users) the way Nix's own `deletePath` does: every step goes through a descriptor of
/// the directory it is in, never through a path, so swapping a subdirectory for a symlink
/// mid-way can make the removal fail but never makes it delete or chmod anything outside the
/// tree.
mod remove {
    use std::ffi::{CStr, CString};
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    /// Deeper than this is refused rather than held open one descriptor per level.
    const MAX_DEPTH: usize = 4096;
    /// How often one entry may change type under us before the removal gives up.
    const MAX_RETRIES: usize = 8;

    /// Removes a file, symlink or directory tree, making directories writable first (store
    /// trees are read-only). A missing path is not an error. The last component of `path` is
    /// never followed: a symlink there is removed, not its target. The directory `path` lies
    /// in is opened with `O_NOFOLLOW`; everything below is reached through descriptors only.
    pub fn remove_tree(path: &Path) -> io::Result<()> {
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a removable name", path.display()),
            )
        })?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let parent_fd = match open_dir_at(libc::AT_FDCWD, &cstring(parent.as_os_str().as_bytes())?)
        {
            Ok(fd) => fd,
            // No parent, so no path: nothing to remove.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(context(e, parent)),
        };
        let name = cstring(name.as_bytes())?;
        remove_at(&parent_fd, &name).map_err(|e| context(e, path))
    }

    /// A directory being emptied: its descriptor, the entries still to remove, its own name
    /// in the directory below it on the stack.
    struct Frame {
        fd: OwnedFd,
        names: std::vec::IntoIter<CString>,
        name: CString,
    }

    /// Depth-first with an explicit stack (no recursion, so no stack overflow however deep);
    /// each level holds one descriptor.
    fn remove_at(top: &OwnedFd, name: &CStr) -> io::Result<()> {
        let mut stack: Vec<Frame> = Vec::new();
        if let Some(f) = start(top, name)? {
            stack.push(f);
        }
        while let Some(frame) = stack.last_mut() {
            if let Some(child) = frame.names.next() {
                if let Some(f) = start(&frame.fd, &child)? {
                    if stack.len() >= MAX_DEPTH {
                        return Err(io::Error::other(format!(
                            "nested deeper than {MAX_DEPTH} directories"
                        )));
                    }
                    stack.push(f);
                }
                continue;
            }
            let Some(done) = stack.pop() else { break };
            drop(done.fd);
            let parent = stack.last().map_or(top, |f| &f.fd);
            match unlinkat(parent, &done.name, libc::AT_REMOVEDIR) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes `name` in `dir` if it is not a directory; if it is, opens it (never following
    /// a symlink), makes it writable through its descriptor and returns it with its entries.
    fn start(dir: &OwnedFd, name: &CStr) -> io::Result<Option<Frame>> {
        for _ in 0..MAX_RETRIES {
            let st = match fstatat_nofollow(dir, name) {
                Ok(st) => st,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(e) => return Err(e),
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                match unlinkat(dir, name, 0) {
                    Ok(()) => return Ok(None),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                    // Became a directory meanwhile (EPERM: unlink of a directory on macOS).
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EISDIR | libc::EPERM)) => {
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let fd = match open_dir_at(dir.as_raw_fd(), name) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                // Swapped for a symlink or a file since the fstatat: look again.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                    // Unreadable to a non-root owner: make it readable without following a
                    // symlink (fchmodat refuses one with AT_SYMLINK_NOFOLLOW), then retry.
                    let mode = (st.st_mode as libc::mode_t & 0o7777) | 0o700;
                    // SAFETY: valid descriptor and NUL-terminated name.
                    let r = unsafe {
                        libc::fchmodat(
                            dir.as_raw_fd(),
                            name.as_ptr(),
                            mode,
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    };
                    if r != 0 {
                        return Err(e);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let st = fstat(&fd)?;
            if st.st_mode & 0o700 != 0o700 {
                // SAFETY: a directory descriptor we own.
                if unsafe {
                    libc::fchmod(
                        fd.as_raw_fd(),
                        (st.st_mode as libc::mode_t & 0o7777) | 0o700,
                    )
                } != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            let names = read_names(&fd)?;
            return Ok(Some(Frame {
                fd,
                names: names.into_iter(),
                name: name.to_owned(),
            }));
        }
        Err(io::Error::other(format!(
            "{} kept changing while being removed",
            name.to_string_lossy()
        )))
    }

    fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
        // SAFETY: NUL-terminated name; the result is checked.
        let fd = unsafe {
            libc::openat(
                dir,
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        owned(fd)
    }

    fn unlinkat(dir: &OwnedFd, name: &CStr, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: valid descriptor and NUL-terminated name.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn fstatat_nofollow(dir: &OwnedFd, name: &CStr) -> io::Result<libc::stat> {
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

    fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: valid descriptor; `st` is read only on success.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat succeeded.
        Ok(unsafe { st.assume_init() })
    }

    /// The names in a directory (without `.` and `..`), read through its descriptor.
    fn read_names(dir: &OwnedFd) -> io::Result<Vec<CString>> {
        // fdopendir takes the descriptor it gets: give it a duplicate.
        // SAFETY: valid descriptor; the result is checked.
        let dup = owned(unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
        // SAFETY: a directory descriptor we own; on success the DIR owns it.
        let d = unsafe { libc::fdopendir(dup.as_raw_fd()) };
        if d.is_null() {
            return Err(io::Error::last_os_error());
        }
        std::mem::forget(dup);
        let mut names = Vec::new();
        let result = loop {
            // readdir returns NULL at the end and on error; errno tells them apart.
            set_errno(0);
            // SAFETY: `d` is valid until the closedir below.
            let ent = unsafe { libc::readdir(d) };
            if ent.is_null() {
                let err = io::Error::last_os_error();
                break match err.raw_os_error() {
                    Some(0) | None => Ok(()),
                    Some(_) => Err(err),
                };
            }
            // SAFETY: d_name is NUL-terminated within the entry readdir returned.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
            if !matches!(name.to_bytes(), b"." | b"..") {
                names.push(name.to_owned());
            }
        };
        // SAFETY: `d` is valid and closed once.
        unsafe { libc::closedir(d) };
        result.map(|()| names)
    }

    fn set_errno(v: libc::c_int) {
        // SAFETY: the calling thread's errno is always writable.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        unsafe {
            *libc::__errno_location() = v
        };
        // SAFETY: as above.
        #[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
        unsafe {
            *libc::__error() = v
        };
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
        io::Error::new(e.kind(), format!("removing {}: {e}", p.display()))
    }

    #[cfg(test)]
    mod tests {
        use super::remove_tree;
        use std::os::unix::fs::{PermissionsExt, symlink};

        #[test]
        fn removes_read_only_trees_files_and_missing_paths() {
            let t = tempfile::tempdir().unwrap();
            let d = t.path().join("tree");
            std::fs::create_dir_all(d.join("a/b/c")).unwrap();
            std::fs::write(d.join("a/b/c/f"), b"x").unwrap();
            symlink("/nonexistent", d.join("a/l")).unwrap();
            for p in ["a/b/c", "a/b", "a", ""] {
                std::fs::set_permissions(d.join(p), std::fs::Permissions::from_mode(0o555))
                    .unwrap();
            }
            remove_tree(&d).unwrap();
            assert!(!d.exists());
            remove_tree(&d).unwrap(); // missing: fine
            remove_tree(&d.join("a/b")).unwrap(); // missing parent: fine too
            std::fs::write(t.path().join("file"), b"x").unwrap();
            remove_tree(&t.path().join("file")).unwrap();
            assert!(std::fs::read_dir(t.path()).unwrap().next().is_none());
        }

        #[test]
        fn a_symlink_is_removed_not_followed() {
            let t = tempfile::tempdir().unwrap();
            let outside = tempfile::tempdir().unwrap();
            std::fs::write(outside.path().join("canary"), b"x").unwrap();
            std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o751))
                .unwrap();
            // As the path itself, and inside a tree.
            symlink(outside.path(), t.path().join("link")).unwrap();
            remove_tree(&t.path().join("link")).unwrap();
            std::fs::create_dir(t.path().join("tree")).unwrap();
            symlink(outside.path(), t.path().join("tree/link")).unwrap();
            remove_tree(&t.path().join("tree")).unwrap();
            assert!(outside.path().join("canary").exists());
            assert!(std::fs::read_dir(t.path()).unwrap().next().is_none());
            // Its mode is untouched too.
            let mode = std::fs::metadata(outside.path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o751);
        }

        #[test]
        fn a_symlinked_parent_is_refused() {
            let t = tempfile::tempdir().unwrap();
            let outside = tempfile::tempdir().unwrap();
            std::fs::write(outside.path().join("canary"), b"x").unwrap();
            symlink(outside.path(), t.path().join("link")).unwrap();
            assert!(remove_tree(&t.path().join("link/canary")).is_err());
            assert!(outside.path().join("canary").exists());
        }
    }
}
