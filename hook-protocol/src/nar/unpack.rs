//! Unpacking a NAR onto disk: the async parser feeds a blocking worker thread through a bounded
//! channel, so disk writes overlap with reading and never block the async runtime.
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

    let mut sink = UnpackSink {
        tx,
        batch: Vec::new(),
        batch_bytes: 0,
    };
    let parsed = Parser::new(r, false).run(&mut sink).await;
    let parsed = match parsed {
        Ok(summary) => async {
            sink.push(Op::Finish).await?;
            sink.flush().await
        }
        .await
        .map(|()| summary),
        Err(e) => Err(e),
    };
    // Without `Finish`, closing the channel makes the worker clean up.
    drop(sink);
    let worked = match handle.await {
        Ok(r) => r,
        Err(e) => Err(NarError::Internal(format!(
            "the unpacking thread failed: {e}"
        ))),
    };
    match (parsed, worked) {
        (Ok(summary), Ok(())) => Ok(summary),
        // The worker's own error explains why it stopped listening.
        (Err(NarError::Internal(_)), Err(e)) | (Ok(_), Err(e)) => Err(e),
        (Err(e), _) => Err(e),
    }
}

struct UnpackSink {
    tx: mpsc::Sender<Vec<Op>>,
    batch: Vec<Op>,
    batch_bytes: usize,
}

impl UnpackSink {
    async fn push(&mut self, op: Op) -> Result<(), NarError> {
        if let Op::Data(d) = &op {
            self.batch_bytes += d.len();
        }
        self.batch.push(op);
        if self.batch.len() >= BATCH_OPS || self.batch_bytes >= BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), NarError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.tx
            .send(batch)
            .await
            .map_err(|_| NarError::Internal("the unpacking thread stopped".into()))
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
        bytes.clear();
        Ok(())
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
                break Err(NarError::Internal("unpacking was abandoned".into()));
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
            .ok_or_else(|| NarError::Internal("entry outside a directory".into()))?;
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
                    .ok_or_else(|| NarError::Internal("unbalanced directory end".into()))?;
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
                    .ok_or_else(|| NarError::Internal("data outside a file".into()))?;
                f.write_all(&data).map_err(io_err("writing", path))?;
            }
            Op::FileEnd => {
                let (f, path, executable) = self
                    .file
                    .take()
                    .ok_or_else(|| NarError::Internal("unbalanced file end".into()))?;
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

/// Removes a file, symlink or directory tree, making directories writable first (store trees
/// are read-only). A missing path is not an error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if md.is_dir() {
        if md.permissions().mode() & 0o700 != 0o700 {
            fs::set_permissions(path, Permissions::from_mode(0o700))?;
        }
        for entry in fs::read_dir(path)? {
            remove_tree(&entry?.path())?;
        }
        fs::remove_dir(path)
    } else {
        fs::remove_file(path)
    }
}
