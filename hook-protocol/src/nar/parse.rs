//! The streaming NAR parser shared by [`copy_nar`] and [`unpack_nar`](super::unpack_nar).
//!
//! Every read is exact: the length prefix of a string, then exactly its padded body; file
//! contents in chunks never larger than what is left of the file. So the parser never consumes a
//! byte past the NAR's final `)`, whatever the reader. (Callers reading from an unbuffered
//! source should wrap it in a `BufReader`, which is theirs to keep.)

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{
    MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN, NAR_MAGIC, NarError, NarSummary, invalid_name_reason,
    show,
};
use crate::wire::{self, WireError};

/// Longest keyword in the grammar is "nix-archive-1" (13 bytes).
const MAX_TAG_LEN: u64 = 16;
/// Largest piece of file contents read at once.
pub(super) const CHUNK: usize = 256 * 1024;
/// `copy_nar` writes structural tokens out once this many have accumulated.
const COPY_FLUSH: usize = 64 * 1024;

/// What the parser reports, in NAR order. `name` is `None` for the root node; otherwise it is an
/// entry of the innermost directory that was started and not yet ended.
pub(super) trait NarSink {
    async fn directory(&mut self, name: Option<&[u8]>) -> Result<(), NarError>;
    async fn directory_end(&mut self) -> Result<(), NarError>;
    async fn file(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        size: u64,
    ) -> Result<(), NarError>;
    async fn file_data(&mut self, data: Bytes) -> Result<(), NarError>;
    async fn file_end(&mut self) -> Result<(), NarError>;
    async fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), NarError>;
    /// NAR bytes other than file contents, in order (only if the parser was asked to keep them).
    /// `last` is set once, after the final byte.
    async fn raw(&mut self, bytes: &mut BytesMut, last: bool) -> Result<(), NarError>;
}

/// Wraps the input: counts (and, with a hasher, hashes) every byte read through it and, while
/// `keep` is set, appends it to `kept`.
struct Tee<'a, R: ?Sized> {
    inner: &'a mut R,
    hasher: Option<Sha256>,
    count: u64,
    keep: bool,
    kept: BytesMut,
}

impl<R: AsyncRead + Unpin + ?Sized> AsyncRead for Tee<'_, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut *this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if let Some(h) = &mut this.hasher {
            h.update(new);
        }
        this.count += new.len() as u64;
        if this.keep {
            this.kept.extend_from_slice(new);
        }
        Poll::Ready(Ok(()))
    }
}

/// One open directory: where its path ends in `Parser::path`, and its last entry name.
struct Frame {
    path_len: usize,
    prev: Option<Vec<u8>>,
}

pub(super) struct Parser<'a, R: ?Sized> {
    src: Tee<'a, R>,
    /// Location inside the NAR of the node being parsed: empty for the root, else "/a/b".
    path: Vec<u8>,
    chunk: BytesMut,
}

impl<'a, R: AsyncRead + Unpin + ?Sized> Parser<'a, R> {
    /// `keep_raw`: hand the structural bytes to [`NarSink::raw`] (for copying). `hash`: compute
    /// the SHA-256 here; without it the summary's hash is all zeros, and a sink that needs it
    /// computes it from what it is handed (`keep_raw` gives it every byte, in order).
    pub(super) fn new(r: &'a mut R, keep_raw: bool, hash: bool) -> Self {
        Parser {
            src: Tee {
                inner: r,
                hasher: hash.then(Sha256::new),
                count: 0,
                keep: keep_raw,
                kept: BytesMut::new(),
            },
            path: Vec::new(),
            chunk: BytesMut::new(),
        }
    }

    fn where_(&self) -> String {
        if self.path.is_empty() {
            "/".to_string()
        } else {
            String::from_utf8_lossy(&self.path).into_owned()
        }
    }

    fn wire_err(&self, source: WireError) -> NarError {
        NarError::Wire {
            path: self.where_(),
            source,
        }
    }

    /// Reads one string of at most `max` bytes; `what` names it in errors.
    async fn read_str(&mut self, max: usize, what: &'static str) -> Result<Vec<u8>, NarError> {
        match wire::read_bytes_limited(&mut self.src, max as u64).await {
            Ok(v) => Ok(v),
            Err(WireError::TooLong { len, max, .. }) => Err(NarError::TooLong {
                path: self.where_(),
                what,
                len,
                max,
            }),
            Err(e) => Err(self.wire_err(e)),
        }
    }

    /// Reads a keyword. A string too long to be any keyword is reported as unexpected.
    async fn read_tag(&mut self, expected: &'static str) -> Result<Vec<u8>, NarError> {
        match wire::read_bytes_limited(&mut self.src, MAX_TAG_LEN).await {
            Ok(v) => Ok(v),
            Err(WireError::TooLong { len, .. }) => Err(NarError::UnexpectedToken {
                path: self.where_(),
                expected,
                found: format!("a string of {len} bytes"),
            }),
            Err(e) => Err(self.wire_err(e)),
        }
    }

    async fn expect(&mut self, tag: &'static str, expected: &'static str) -> Result<(), NarError> {
        let got = self.read_tag(expected).await?;
        if got == tag.as_bytes() {
            Ok(())
        } else {
            Err(self.unexpected(expected, &got))
        }
    }

    fn unexpected(&self, expected: &'static str, got: &[u8]) -> NarError {
        NarError::UnexpectedToken {
            path: self.where_(),
            expected,
            found: show(got),
        }
    }

    async fn flush_raw<S: NarSink>(&mut self, sink: &mut S, last: bool) -> Result<(), NarError> {
        if self.src.keep && (last || self.src.kept.len() >= COPY_FLUSH) {
            sink.raw(&mut self.src.kept, last).await?;
        }
        Ok(())
    }

    /// Parses one whole NAR into `sink`.
    pub(super) async fn run<S: NarSink>(mut self, sink: &mut S) -> Result<NarSummary, NarError> {
        match wire::read_bytes_limited(&mut self.src, MAX_TAG_LEN).await {
            Ok(m) if m == NAR_MAGIC.as_bytes() => {}
            Ok(m) => return Err(NarError::BadMagic { found: show(&m) }),
            Err(WireError::TooLong { len, .. }) => {
                return Err(NarError::BadMagic {
                    found: format!("a string of {len} bytes"),
                });
            }
            Err(e @ WireError::NonZeroPadding) => {
                return Err(NarError::BadMagic {
                    found: e.to_string(),
                });
            }
            Err(e) => return Err(self.wire_err(e)),
        }

        let mut stack: Vec<Frame> = Vec::new();
        let mut name: Option<Vec<u8>> = None;
        'node: loop {
            // A node: "(" "type" <type> ...
            self.expect("(", "'('").await?;
            self.expect("type", "'type'").await?;
            let ty = self
                .read_tag("file type 'regular', 'directory' or 'symlink'")
                .await?;
            match &ty[..] {
                b"regular" => {
                    let mut tag = self.read_tag("'executable' or 'contents'").await?;
                    let executable = tag == b"executable";
                    if executable {
                        let marker = self.read_tag("''").await?;
                        if !marker.is_empty() {
                            return Err(NarError::BadExecutableMarker {
                                path: self.where_(),
                                found: show(&marker),
                            });
                        }
                        tag = self.read_tag("'contents'").await?;
                    }
                    if tag != b"contents" {
                        return Err(self.unexpected(
                            if executable {
                                "'contents'"
                            } else {
                                "'executable' or 'contents'"
                            },
                            &tag,
                        ));
                    }
                    let size = wire::read_u64(&mut self.src)
                        .await
                        .map_err(|e| self.wire_err(e))?;
                    sink.file(name.as_deref(), executable, size).await?;
                    self.contents(size, sink).await?;
                    sink.file_end().await?;
                    self.expect(")", "')'").await?;
                }
                b"symlink" => {
                    self.expect("target", "'target'").await?;
                    let target = self.read_str(MAX_TARGET_LEN, "symlink target").await?;
                    let reason = if target.is_empty() {
                        Some("it is empty")
                    } else if target.contains(&0) {
                        Some("it contains a NUL byte")
                    } else {
                        None
                    };
                    if let Some(reason) = reason {
                        return Err(NarError::InvalidTarget {
                            path: self.where_(),
                            target: show(&target),
                            reason,
                        });
                    }
                    sink.symlink(name.as_deref(), &target).await?;
                    self.expect(")", "')'").await?;
                }
                b"directory" => {
                    if stack.len() >= MAX_DEPTH {
                        return Err(NarError::TooDeep {
                            path: self.where_(),
                            max: MAX_DEPTH,
                        });
                    }
                    sink.directory(name.as_deref()).await?;
                    stack.push(Frame {
                        path_len: self.path.len(),
                        prev: None,
                    });
                }
                _ => {
                    return Err(
                        self.unexpected("file type 'regular', 'directory' or 'symlink'", &ty)
                    );
                }
            }
            self.flush_raw(sink, false).await?;

            // Find the next node: the next entry of the innermost open directory, closing
            // directories (and the entries holding them) as they end.
            let mut child_done = ty != b"directory";
            loop {
                let Some(top) = stack.last() else {
                    break 'node;
                };
                if child_done {
                    let len = top.path_len;
                    self.path.truncate(len);
                    self.expect(")", "')' closing the entry").await?;
                }
                let tag = self.read_tag("'entry' or ')'").await?;
                if tag == b")" {
                    stack.pop();
                    sink.directory_end().await?;
                    child_done = true;
                    continue;
                }
                if tag != b"entry" {
                    return Err(self.unexpected("'entry' or ')'", &tag));
                }
                self.expect("(", "'('").await?;
                self.expect("name", "'name'").await?;
                let entry = self.read_str(MAX_NAME_LEN, "entry name").await?;
                if let Some(reason) = invalid_name_reason(&entry) {
                    return Err(NarError::InvalidName {
                        path: self.where_(),
                        name: show(&entry),
                        reason,
                    });
                }
                let top = stack.last_mut().expect("checked above");
                if let Some(prev) = &top.prev {
                    if entry == *prev {
                        return Err(NarError::DuplicateName {
                            path: where_of(&self.path),
                            name: show(&entry),
                        });
                    }
                    if entry < *prev {
                        return Err(NarError::Unsorted {
                            path: where_of(&self.path),
                            prev: show(prev),
                            name: show(&entry),
                        });
                    }
                }
                top.prev = Some(entry.clone());
                self.path.push(b'/');
                self.path.extend_from_slice(&entry);
                self.expect("node", "'node'").await?;
                name = Some(entry);
                continue 'node;
            }
        }

        self.flush_raw(sink, true).await?;
        Ok(NarSummary {
            nar_size: self.src.count,
            nar_sha256: self
                .src
                .hasher
                .map(|h| h.finalize().into())
                .unwrap_or_default(),
        })
    }

    /// Streams `size` bytes of file contents and their padding.
    async fn contents<S: NarSink>(&mut self, size: u64, sink: &mut S) -> Result<(), NarError> {
        // Structural bytes before the contents go out first; the contents themselves are
        // handed over through `file_data` rather than copied into `kept`.
        if self.src.keep && !self.src.kept.is_empty() {
            sink.raw(&mut self.src.kept, false).await?;
        }
        let keep = std::mem::replace(&mut self.src.keep, false);
        let mut left = size;
        while left > 0 {
            let n = left.min(CHUNK as u64);
            self.chunk.reserve(n as usize);
            let got = (&mut self.src)
                .take(n)
                .read_buf(&mut self.chunk)
                .await
                .map_err(|e| self.wire_err(WireError::Io(e)))?;
            if got == 0 {
                return Err(self.wire_err(WireError::Truncated("file contents")));
            }
            left -= got as u64;
            let data = self.chunk.split().freeze();
            sink.file_data(data).await?;
        }
        self.src.keep = keep;
        wire::read_padding(&mut self.src, size)
            .await
            .map_err(|e| self.wire_err(e))
    }
}

fn where_of(path: &[u8]) -> String {
    if path.is_empty() {
        "/".to_string()
    } else {
        String::from_utf8_lossy(path).into_owned()
    }
}

/// Passes the NAR through to a writer.
struct CopySink<'w, W: ?Sized> {
    w: &'w mut W,
}

impl<W: AsyncWrite + Unpin + ?Sized> NarSink for CopySink<'_, W> {
    async fn directory(&mut self, _: Option<&[u8]>) -> Result<(), NarError> {
        Ok(())
    }
    async fn directory_end(&mut self) -> Result<(), NarError> {
        Ok(())
    }
    async fn file(&mut self, _: Option<&[u8]>, _: bool, _: u64) -> Result<(), NarError> {
        Ok(())
    }
    async fn file_data(&mut self, data: Bytes) -> Result<(), NarError> {
        self.w.write_all(&data).await.map_err(NarError::Write)
    }
    async fn file_end(&mut self) -> Result<(), NarError> {
        Ok(())
    }
    async fn symlink(&mut self, _: Option<&[u8]>, _: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
    async fn raw(&mut self, bytes: &mut BytesMut, last: bool) -> Result<(), NarError> {
        self.w.write_all(bytes).await.map_err(NarError::Write)?;
        bytes.clear();
        if last {
            self.w.flush().await.map_err(NarError::Write)?;
        }
        Ok(())
    }
}

/// Reads one NAR from `r`, checking its structure (the grammar in [`crate::nar`]), and writes
/// exactly the bytes read to `w` (flushing it at the end). Stops reading at the NAR's last byte:
/// whatever follows stays in `r`. Returns the NAR's SHA-256 and size.
///
/// On error, `w` may have received part of the NAR, and `r` is left somewhere inside it.
pub async fn copy_nar<R, W>(r: &mut R, w: &mut W) -> Result<NarSummary, NarError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    Parser::new(r, true, true).run(&mut CopySink { w }).await
}
