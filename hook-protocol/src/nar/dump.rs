//! Serialising a tree as a NAR, byte for byte like `nix-store --dump` (`dumpPath` in
//! `src/libutil/archive.cc`). The tree is walked on a blocking thread that hands chunks of NAR
//! to the async writer through a bounded channel.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::parse::CHUNK;
use super::{CASE_HACK_SUFFIX, DumpOptions, MAX_DEPTH, NAR_MAGIC, NarError, NarSummary};
use crate::wire::{padding_len, put_bytes, put_str, put_u64};

/// Chunks in flight to the writer.
const QUEUE: usize = 8;

/// Writes the NAR serialisation of `path` (not following a symlink at `path` itself) to `w`, and
/// flushes `w`. Entries are sorted byte-wise; a regular file is executable iff its owner-x bit is
/// set; with `case_hack`, the `~nix~case~hack~N` suffix is removed from names, as Nix does.
/// Sockets, FIFOs and devices are errors.
pub async fn dump_path<W: AsyncWrite + Unpin + ?Sized>(
    path: &Path,
    w: &mut W,
    opts: DumpOptions,
) -> Result<NarSummary, NarError> {
    let (nar_size, hash) = dump(path, w, opts, true).await?;
    Ok(NarSummary {
        nar_size,
        nar_sha256: hash.unwrap_or_default(),
    })
}

/// [`dump_path`] without the SHA-256, for a receiver that verifies the hash itself (a
/// nix-daemon does, for every path added to its store): returns the NAR's length only.
pub async fn dump_path_unhashed<W: AsyncWrite + Unpin + ?Sized>(
    path: &Path,
    w: &mut W,
    opts: DumpOptions,
) -> Result<u64, NarError> {
    Ok(dump(path, w, opts, false).await?.0)
}

async fn dump<W: AsyncWrite + Unpin + ?Sized>(
    path: &Path,
    w: &mut W,
    opts: DumpOptions,
    hash: bool,
) -> Result<(u64, Option<[u8; 32]>), NarError> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    let root = path.to_owned();
    let handle = tokio::task::spawn_blocking(move || {
        let mut d = Dumper {
            tx,
            buf: BytesMut::with_capacity(CHUNK + 1024),
            hasher: hash.then(Sha256::new),
            count: 0,
            case_hack: opts.case_hack,
        };
        put_str(&mut d.buf, NAR_MAGIC);
        d.dump(&root, 0)?;
        d.send()?;
        Ok::<_, NarError>((d.count, d.hasher.map(|h| h.finalize().into())))
    });

    let mut write_err = None;
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = w.write_all(&chunk).await {
            write_err = Some(e);
            break;
        }
    }
    // If writing failed, this makes the walker stop at its next chunk.
    drop(rx);
    let dumped = handle.await.map_err(|e| NarError::Thread("dumping", e))?;
    if let Some(e) = write_err {
        return Err(NarError::Write(e));
    }
    let summary = dumped?;
    w.flush().await.map_err(NarError::Write)?;
    Ok(summary)
}

struct Dumper {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
    hasher: Option<Sha256>,
    count: u64,
    case_hack: bool,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> NarError + 'a {
    move |source| NarError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

impl Dumper {
    /// Hands what is buffered to the writer.
    fn send(&mut self) -> Result<(), NarError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Some(h) = &mut self.hasher {
            h.update(&self.buf);
        }
        self.count += self.buf.len() as u64;
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK + 1024);
        self.tx.blocking_send(chunk).map_err(|_| {
            NarError::Write(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the NAR writer stopped",
            ))
        })
    }

    fn maybe_send(&mut self) -> Result<(), NarError> {
        if self.buf.len() >= CHUNK {
            self.send()
        } else {
            Ok(())
        }
    }

    fn dump(&mut self, path: &Path, depth: usize) -> Result<(), NarError> {
        let md = fs::symlink_metadata(path).map_err(io_err("getting the status of", path))?;
        let ft = md.file_type();
        put_str(&mut self.buf, "(");
        if ft.is_file() {
            put_str(&mut self.buf, "type");
            put_str(&mut self.buf, "regular");
            if md.mode() & 0o100 != 0 {
                put_str(&mut self.buf, "executable");
                put_str(&mut self.buf, "");
            }
            put_str(&mut self.buf, "contents");
            self.contents(path, &md)?;
        } else if ft.is_dir() {
            if depth >= MAX_DEPTH {
                return Err(NarError::DumpTooDeep {
                    path: path.to_owned(),
                    max: MAX_DEPTH,
                });
            }
            put_str(&mut self.buf, "type");
            put_str(&mut self.buf, "directory");
            // Sorted by (unhacked) name, byte-wise, like Nix's std::map<std::string, …>.
            let mut entries: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for entry in fs::read_dir(path).map_err(io_err("reading directory", path))? {
                let entry = entry.map_err(io_err("reading directory", path))?;
                let real = entry.file_name().as_bytes().to_vec();
                let mut name = real.clone();
                let hack_at = match self.case_hack {
                    true => find(&name, CASE_HACK_SUFFIX.as_bytes()),
                    false => None,
                };
                if let Some(pos) = hack_at {
                    name.truncate(pos);
                }
                if let Some(first) = entries.get(&name) {
                    return Err(NarError::CaseHackDumpCollision {
                        first: path.join(std::ffi::OsStr::from_bytes(first)),
                        second: path.join(std::ffi::OsStr::from_bytes(&real)),
                    });
                }
                entries.insert(name, real);
            }
            for (name, real) in entries {
                put_str(&mut self.buf, "entry");
                put_str(&mut self.buf, "(");
                put_str(&mut self.buf, "name");
                put_bytes(&mut self.buf, &name);
                put_str(&mut self.buf, "node");
                self.dump(&path.join(std::ffi::OsStr::from_bytes(&real)), depth + 1)?;
                put_str(&mut self.buf, ")");
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(path).map_err(io_err("reading symlink", path))?;
            put_str(&mut self.buf, "type");
            put_str(&mut self.buf, "symlink");
            put_str(&mut self.buf, "target");
            put_bytes(&mut self.buf, target.as_os_str().as_bytes());
        } else {
            let kind = if ft.is_socket() {
                "a socket"
            } else if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_block_device() {
                "a block device"
            } else if ft.is_char_device() {
                "a character device"
            } else {
                "of an unknown type"
            };
            return Err(NarError::UnsupportedFileType {
                path: path.to_owned(),
                kind,
            });
        }
        put_str(&mut self.buf, ")");
        self.maybe_send()
    }

    /// The size, the contents and the padding of a regular file.
    fn contents(&mut self, path: &Path, md: &fs::Metadata) -> Result<(), NarError> {
        let size = md.len();
        let mut f = File::open(path).map_err(io_err("opening", path))?;
        // `open` follows symlinks: make sure we opened what we lstat'ed.
        let md2 = f
            .metadata()
            .map_err(io_err("getting the status of", path))?;
        if !md2.is_file() || md2.dev() != md.dev() || md2.ino() != md.ino() {
            return Err(NarError::FileChanged {
                path: path.to_owned(),
                what: "it was replaced",
            });
        }
        put_u64(&mut self.buf, size);
        let mut left = size;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let start = self.buf.len();
            self.buf.resize(start + n, 0);
            f.read_exact(&mut self.buf[start..]).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    NarError::FileChanged {
                        path: path.to_owned(),
                        what: "it shrank",
                    }
                } else {
                    NarError::Io {
                        op: "reading",
                        path: path.to_owned(),
                        source: e,
                    }
                }
            })?;
            left -= n as u64;
            self.maybe_send()?;
        }
        let pad = padding_len(size);
        self.buf.extend_from_slice(&[0u8; 8][..pad]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
