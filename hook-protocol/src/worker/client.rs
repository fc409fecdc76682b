//! The worker-protocol client connection and its operations.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::derivation::BasicDerivation;
use crate::framed::FramedWriter;
use crate::nar::{NarError, NarSummary, copy_nar};
use crate::store_path::{StorePath, put_store_path, put_store_path_set, read_store_path_set};
use crate::wire::{self, MAX_COLLECTION_LEN, WireError};

use super::error::{Violation, WorkerError, WorkerErrorKind, is_closed_kind};
use super::stderr::{
    LogEvent, ReadSource, STDERR_ERROR, process_stderr, process_stderr_with_source, read_error,
};
use super::types::{
    BuildMode, BuildResult, ClientHandshakeInfo, ClientSettings, DerivedPath, KeyedBuildResult,
    Missing, ValidPathInfo,
};
use super::{
    FEATURE_REALISATION_WITH_PATH_NOT_HASH, Op, ProtocolVersion, WORKER_MAGIC_1, WORKER_MAGIC_2,
};

/// The first token of every NAR: the string "nix-archive-1" in wire form.
const NAR_PREFIX: [u8; 24] = *b"\x0d\0\0\0\0\0\0\0nix-archive-1\0\0\0";

/// Size of the read buffer in front of the daemon's output.
const READ_BUFFER: usize = 64 * 1024;

/// Supplies the NARs for [`WorkerClient::add_multiple_to_store`].
///
/// `write_nar` must write exactly the NAR of `info.path` (`info.nar_size` bytes) to `out`.
/// `out` forwards into the daemon connection; a write error on it means the connection
/// failed, and the implementation should just return it.
pub trait NarSource: Send {
    /// Writes the NAR of `info.path` to `out`.
    fn write_nar<W: AsyncWrite + Unpin + Send>(
        &mut self,
        info: &ValidPathInfo,
        out: &mut W,
    ) -> impl Future<Output = io::Result<()>> + Send;
}

/// A client connection to a Nix daemon speaking the worker protocol.
///
/// Created by [`handshake`](Self::handshake). Operations take `&mut self`, so one runs at a
/// time, as the protocol requires. Each takes a `logs` callback that receives the daemon's
/// messages while the operation runs (use [`discard_logs`](super::discard_logs) to ignore
/// them).
///
/// After an error that leaves the byte stream out of step (EOF, a malformed reply, a caller's
/// sink failing in the middle of a NAR, …) the client is marked broken and every later
/// operation fails with [`WorkerErrorKind::Broken`]; after [`WorkerErrorKind::Remote`] it remains
/// usable, as with Nix's own client. Dropping an operation's future before it completes (e.g.
/// on a timeout) also leaves the connection broken.
pub struct WorkerClient<R, W> {
    r: BufReader<R>,
    w: W,
    version: ProtocolVersion,
    daemon_version: ProtocolVersion,
    info: ClientHandshakeInfo,
    daemon_features: BTreeSet<String>,
    features: BTreeSet<String>,
    broken: bool,
    /// An operation is in progress (still set if its future was dropped midway).
    busy: bool,
}

impl<R, W> std::fmt::Debug for WorkerClient<R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerClient")
            .field("version", &self.version)
            .field("daemon_version", &self.daemon_version)
            .field("info", &self.info)
            .field("features", &self.features)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

fn log_to_tracing(e: LogEvent) {
    if let LogEvent::Next(s) = e {
        tracing::warn!(target: "nix-daemon", "{s}");
    }
}

impl<R, W> WorkerClient<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Performs the handshake offering protocol 1.38 and no features; startup messages from
    /// the daemon go to `tracing`.
    pub async fn handshake(r: R, w: W) -> Result<Self, WorkerError> {
        Self::handshake_with(r, w, ProtocolVersion::LATEST, &mut log_to_tracing).await
    }

    /// Performs the handshake offering `client_version` (1.21 to 1.38), handing the daemon's
    /// startup messages to `logs`.
    pub async fn handshake_with(
        r: R,
        w: W,
        client_version: ProtocolVersion,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<Self, WorkerError> {
        Self::handshake_inner(r, w, client_version, logs)
            .await
            .map_err(|e| e.with_context("handshake", None))
    }

    async fn handshake_inner(
        r: R,
        mut w: W,
        client_version: ProtocolVersion,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<Self, WorkerError> {
        let unsupported = |v: String| {
            WorkerError::from(WorkerErrorKind::UnsupportedVersion {
                version: v,
                min: ProtocolVersion::MIN,
                max: ProtocolVersion::LATEST,
            })
        };
        if client_version < ProtocolVersion::MIN || client_version > ProtocolVersion::LATEST {
            return Err(unsupported(format!("{client_version} (requested)")));
        }
        let mut r = BufReader::with_capacity(READ_BUFFER, r);

        let mut buf = BytesMut::new();
        wire::put_u64(&mut buf, WORKER_MAGIC_1);
        wire::put_u64(&mut buf, client_version.to_wire());
        send(&mut w, &buf).await?;

        let magic = wire::read_u64(&mut r).await?;
        if magic != WORKER_MAGIC_2 {
            return Err(WorkerError::protocol(Violation::Magic {
                expected: WORKER_MAGIC_2,
                got: magic,
            }));
        }
        let raw = wire::read_u64(&mut r).await?;
        let daemon_version = ProtocolVersion::from_wire(raw)
            .filter(|v| v.major() == 1)
            .ok_or_else(|| unsupported(format!("{raw:#x}")))?;
        if daemon_version < ProtocolVersion::MIN {
            return Err(unsupported(daemon_version.to_string()));
        }
        let version = daemon_version.min(client_version);

        let mut daemon_features = BTreeSet::new();
        if version.minor() >= 38 {
            let mut buf = BytesMut::new();
            // We offer no features.
            wire::put_strings(&mut buf, std::iter::empty::<&str>());
            send(&mut w, &buf).await?;
            daemon_features = wire::read_string_set(&mut r).await?;
        }
        // Features both sides offer; we offer none.
        let features = BTreeSet::new();

        let mut buf = BytesMut::new();
        if version.minor() >= 14 {
            wire::put_u64(&mut buf, 0); // obsolete CPU affinity
        }
        if version.minor() >= 11 {
            wire::put_u64(&mut buf, 0); // obsolete reserveSpace
        }
        send(&mut w, &buf).await?;

        let info = ClientHandshakeInfo::read(&mut r, version).await?;
        process_stderr(&mut r, version, logs).await?;

        Ok(WorkerClient {
            r,
            w,
            version,
            daemon_version,
            info,
            daemon_features,
            features,
            broken: false,
            busy: false,
        })
    }
}

impl<R, W> WorkerClient<R, W> {
    /// The negotiated protocol version (minimum of ours and the daemon's).
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// The version the daemon announced.
    pub fn daemon_version(&self) -> ProtocolVersion {
        self.daemon_version
    }

    /// The daemon's Nix version, e.g. `2.26.3` (negotiated ≥1.33).
    pub fn daemon_nix_version(&self) -> Option<&str> {
        self.info.daemon_nix_version.as_deref()
    }

    /// Whether the daemon trusts us (negotiated ≥1.35; `None` if unknown).
    pub fn trusted(&self) -> Option<bool> {
        self.info.trusted
    }

    /// Features the daemon offered (≥1.38).
    pub fn daemon_features(&self) -> &BTreeSet<String> {
        &self.daemon_features
    }

    /// Features in effect (offered by both sides; always empty for now).
    pub fn features(&self) -> &BTreeSet<String> {
        &self.features
    }

    /// True after an error that left the connection unusable, or after an operation's future
    /// was dropped before it finished.
    pub fn is_broken(&self) -> bool {
        self.broken || self.busy
    }

    /// The underlying streams. The reader is returned with its buffer, which may hold bytes
    /// the daemon sent that were not consumed yet.
    pub fn into_inner(self) -> (BufReader<R>, W) {
        (self.r, self.w)
    }

    fn path_not_hash(&self) -> bool {
        self.features
            .contains(FEATURE_REALISATION_WITH_PATH_NOT_HASH)
    }
}

async fn send<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, buf: &[u8]) -> Result<(), WorkerError> {
    w.write_all(buf).await.map_err(WorkerError::conn_io)?;
    w.flush().await.map_err(WorkerError::conn_io)
}

/// Who failed during an upload.
enum UploadError {
    /// The caller's data source (or the data it supplied).
    Local(io::Error),
    /// Writing to the daemon.
    Conn(io::Error),
}

/// Produces the payload of a framed upload.
trait Upload: Send {
    fn run<'a, O: AsyncWrite + Unpin + Send>(
        &'a mut self,
        out: &'a mut O,
    ) -> impl Future<Output = io::Result<()>> + Send + 'a;
}

/// `AddToStoreNar`: one NAR, copied (and checked for well-formedness) from a reader.
struct NarCopy<'a, N> {
    nar: &'a mut N,
}

impl<N: AsyncRead + Unpin + Send> Upload for NarCopy<'_, N> {
    async fn run<'a, O: AsyncWrite + Unpin + Send>(&'a mut self, out: &'a mut O) -> io::Result<()> {
        match copy_nar(&mut *self.nar, out).await {
            Ok(_) => Ok(()),
            // Writing to the daemon (the caller tells by the FramedWriter's state).
            Err(NarError::Write(e)) => Err(e),
            Err(NarError::Wire {
                source: WireError::Io(e),
                ..
            }) => Err(e),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
    }
}

/// `AddMultipleToStore`: `u64 count`, then per path its `ValidPathInfo` (format 1.16) and NAR.
struct MultiUpload<'a, S> {
    infos: &'a [ValidPathInfo],
    source: &'a mut S,
}

impl<S: NarSource> Upload for MultiUpload<'_, S> {
    async fn run<'a, O: AsyncWrite + Unpin + Send>(&'a mut self, out: &'a mut O) -> io::Result<()> {
        let mut buf = BytesMut::new();
        wire::put_u64(&mut buf, self.infos.len() as u64);
        out.write_all(&buf).await?;
        for info in self.infos {
            let mut buf = BytesMut::new();
            info.write(&mut buf, ProtocolVersion::new(1, 16));
            out.write_all(&buf).await?;
            let mut counted = CountingWriter::new(&mut *out);
            self.source.write_nar(info, &mut counted).await?;
            if counted.count != info.nar_size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the NAR supplied for {} has {} bytes, but its narSize is {}",
                        info.path, counted.count, info.nar_size
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Counts the bytes written through it.
struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W> CountingWriter<W> {
    fn new(inner: W) -> Self {
        CountingWriter { inner, count: 0 }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CountingWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
        this.count += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<R, W> WorkerClient<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Starts an operation: fails if the connection is broken, or if an earlier operation's
    /// future was dropped before it finished (the stream is then out of step).
    fn check(&mut self) -> Result<(), WorkerError> {
        if self.busy {
            self.broken = true;
        }
        if self.broken {
            return Err(WorkerErrorKind::Broken.into());
        }
        self.busy = true;
        Ok(())
    }

    /// Fails if `op` does not exist at the negotiated version.
    fn need(&self, op: Op) -> Result<(), WorkerError> {
        let needed = op.since();
        if self.version < needed {
            Err(WorkerErrorKind::TooOld {
                needed,
                negotiated: self.version,
            }
            .into())
        } else {
            Ok(())
        }
    }

    /// Adds context to an operation's outcome and marks the connection broken if needed.
    fn finish<T>(
        &mut self,
        res: Result<T, WorkerError>,
        op: Op,
        path: Option<&StorePath>,
    ) -> Result<T, WorkerError> {
        self.busy = false;
        res.map_err(|e| {
            if e.breaks_connection() {
                self.broken = true;
            }
            e.with_context(op.name(), path.map(|p| p.to_string()).as_deref())
        })
    }

    /// Sends a request. If the daemon has closed the connection, tries to read the error it
    /// may have sent before closing, which explains why.
    async fn request(
        &mut self,
        buf: &[u8],
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<(), WorkerError> {
        match send(&mut self.w, buf).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_connection_closed() => {
                self.broken = true;
                match process_stderr(&mut self.r, self.version, logs).await {
                    Err(remote) if remote.is_remote() => Err(remote),
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Sends a request and runs the stderr loop to `STDERR_LAST`.
    async fn simple(
        &mut self,
        buf: &[u8],
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<(), WorkerError> {
        self.request(buf, logs).await?;
        process_stderr(&mut self.r, self.version, logs).await
    }

    fn op_buf(op: Op) -> BytesMut {
        let mut buf = BytesMut::new();
        wire::put_u64(&mut buf, op.code());
        buf
    }

    /// The request/stderr-loop/reply pattern most operations follow: checks that the
    /// connection is usable and `op` exists at the negotiated version, sends the opcode and
    /// what `body` encodes, runs the stderr loop, decodes the reply with `reply`, and adds
    /// `op` and `path` as context to any error (marking the connection broken if needed).
    async fn call<T>(
        &mut self,
        op: Op,
        path: Option<&StorePath>,
        body: impl FnOnce(&mut BytesMut, ProtocolVersion) -> Result<(), WorkerError>,
        logs: &mut impl FnMut(LogEvent),
        reply: impl AsyncFnOnce(&mut BufReader<R>, ProtocolVersion) -> Result<T, WorkerError>,
    ) -> Result<T, WorkerError> {
        let res = async {
            self.check()?;
            self.need(op)?;
            let mut buf = Self::op_buf(op);
            body(&mut buf, self.version)?;
            self.simple(&buf, logs).await?;
            reply(&mut self.r, self.version).await
        }
        .await;
        self.finish(res, op, path)
    }

    /// `SetOptions`: sends client settings; the daemon applies what it allows.
    pub async fn set_options(
        &mut self,
        settings: &ClientSettings,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<(), WorkerError> {
        let body = |buf: &mut BytesMut, v| {
            settings.write(buf, v);
            Ok(())
        };
        self.call(Op::SetOptions, None, body, logs, async |_, _| Ok(()))
            .await
    }

    /// `IsValidPath`.
    pub async fn is_valid_path(
        &mut self,
        path: &StorePath,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<bool, WorkerError> {
        let body = |buf: &mut BytesMut, _| {
            put_store_path(buf, path);
            Ok(())
        };
        self.call(Op::IsValidPath, Some(path), body, logs, async |r, _| {
            Ok(wire::read_bool(r).await?)
        })
        .await
    }

    /// `QueryValidPaths`: the subset of `paths` that is valid. `substitute` (sent from 1.27
    /// on) asks the daemon to try substituting missing paths first.
    pub async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<BTreeSet<StorePath>, WorkerError> {
        let body = |buf: &mut BytesMut, v: ProtocolVersion| {
            put_store_path_set(buf, paths);
            if v.minor() >= 27 {
                wire::put_bool(buf, substitute);
            }
            Ok(())
        };
        self.call(Op::QueryValidPaths, None, body, logs, async |r, _| {
            Ok(read_store_path_set(r).await?)
        })
        .await
    }

    /// `QueryPathInfo`: `None` if the path is not valid.
    pub async fn query_path_info(
        &mut self,
        path: &StorePath,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<Option<ValidPathInfo>, WorkerError> {
        let body = |buf: &mut BytesMut, _| {
            put_store_path(buf, path);
            Ok(())
        };
        self.call(Op::QueryPathInfo, Some(path), body, logs, async |r, v| {
            // Every supported version (≥1.21) has the `valid` flag (≥1.17).
            if !wire::read_bool(r).await? {
                return Ok(None);
            }
            Ok(Some(ValidPathInfo::read_unkeyed(r, path.clone(), v).await?))
        })
        .await
    }

    /// `NarFromPath`: streams the NAR of `path` into `out` (never buffering it whole) and
    /// returns its size and hash. The NAR arrives unframed, so it is parsed to find its end.
    pub async fn nar_from_path<O: AsyncWrite + Unpin + Send>(
        &mut self,
        path: &StorePath,
        out: &mut O,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<NarSummary, WorkerError> {
        let res = async {
            self.check()?;
            let head = self.start_nar_from_path(path, logs).await?;
            let mut input = (&head[..]).chain(&mut self.r);
            match copy_nar(&mut input, out).await {
                Ok(summary) => Ok(summary),
                Err(e) => {
                    // The rest of the NAR is still in the stream.
                    self.broken = true;
                    Err(nar_stream_error(e))
                }
            }
        }
        .await;
        self.finish(res, Op::NarFromPath, Some(path))
    }

    /// Sends `NarFromPath` and reads the NAR's first 32 bytes: its magic and the root node's
    /// first field. The daemon sends STDERR_LAST before it starts dumping and writes the NAR
    /// magic before it looks at the path, so a path it cannot dump (e.g. one that is not valid)
    /// shows up as STDERR_ERROR right after "nix-archive-1", where the root node's "(" should
    /// be; then the daemon closes the connection. That is checked here, before the stream is
    /// handed on.
    async fn start_nar_from_path(
        &mut self,
        path: &StorePath,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<[u8; 32], WorkerError> {
        let mut buf = Self::op_buf(Op::NarFromPath);
        put_store_path(&mut buf, path);
        self.simple(&buf, logs).await?;
        let mut head = [0u8; 32];
        self.r
            .read_exact(&mut head)
            .await
            .map_err(WorkerError::conn_io)?;
        if head[..24] != NAR_PREFIX[..] {
            let mut got = [0u8; 24];
            got.copy_from_slice(&head[..24]);
            return Err(WorkerError::protocol(Violation::NotANar(got)));
        }
        let next = u64::from_le_bytes(head[24..].try_into().unwrap_or([0; 8]));
        if next == STDERR_ERROR {
            self.broken = true;
            return Err(read_error(&mut self.r, self.version).await?);
        }
        Ok(head)
    }

    /// `NarFromPath` for a path whose NAR size the caller has from `QueryPathInfo`: copies
    /// exactly `nar_size` bytes of the daemon's dump to `out` (and flushes it), straight from the
    /// connection's read buffer, without parsing or hashing them. Returns `nar_size`.
    ///
    /// For a caller that verifies every byte itself (the hook unpacks the NAR with
    /// [`unpack_nar`](crate::nar::unpack_nar) and checks its hash and size against the same path
    /// info) this saves a second parse and a second SHA-256 of the whole NAR. The connection is
    /// in step afterwards only if the NAR really was `nar_size` bytes long: when the caller's
    /// check fails, it must not use this connection again. A NAR shorter than announced, followed
    /// by nothing, shows up here as the daemon closing the connection.
    pub async fn nar_from_path_sized<O: AsyncWrite + Unpin + Send>(
        &mut self,
        path: &StorePath,
        nar_size: u64,
        out: &mut O,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<u64, WorkerError> {
        let res = async {
            self.check()?;
            let head_len = NAR_PREFIX.len() as u64 + 8;
            if nar_size < head_len {
                return Err(WorkerError::invalid_argument(format!(
                    "a NAR size of {nar_size} bytes is too small for any NAR"
                )));
            }
            let head = self.start_nar_from_path(path, logs).await?;
            // From here on the stream is inside the NAR: any failure leaves it out of step.
            self.broken = true;
            let write_err = |e| WorkerError::local("writing the NAR failed", e);
            out.write_all(&head).await.map_err(write_err)?;
            let mut left = nar_size - head_len;
            while left > 0 {
                let avail = self.r.fill_buf().await.map_err(WorkerError::conn_io)?;
                if avail.is_empty() {
                    return Err(WorkerError::connection_closed(format!(
                        "in the middle of the NAR ({} of {nar_size} bytes received)",
                        nar_size - left
                    )));
                }
                let n = avail.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                out.write_all(&avail[..n]).await.map_err(write_err)?;
                self.r.consume(n);
                left -= n as u64;
            }
            out.flush().await.map_err(write_err)?;
            self.broken = false;
            Ok(nar_size)
        }
        .await;
        self.finish(res, Op::NarFromPath, Some(path))
    }

    /// `AddToStoreNar`: adds `info.path` with the NAR read from `nar` (exactly one NAR is
    /// read; it must match `info.nar_hash`/`nar_size`, which the daemon checks). From 1.23 the
    /// NAR is sent as a framed stream while the daemon's messages are read concurrently;
    /// 1.21–1.22 answer the daemon's `STDERR_READ` requests.
    ///
    /// Untrusted clients get `dont_check_sigs` and `info.ultimate` forced to false by the
    /// daemon, so unsigned paths are then rejected.
    pub async fn add_to_store_nar<N: AsyncRead + Unpin + Send>(
        &mut self,
        info: &ValidPathInfo,
        nar: &mut N,
        repair: bool,
        dont_check_sigs: bool,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<(), WorkerError> {
        let res = async {
            self.check()?;
            let mut buf = Self::op_buf(Op::AddToStoreNar);
            put_store_path(&mut buf, &info.path);
            // Path + unkeyed info at 1.16 is exactly the request layout.
            info.write_unkeyed(&mut buf, ProtocolVersion::new(1, 16));
            wire::put_bool(&mut buf, repair);
            wire::put_bool(&mut buf, dont_check_sigs);
            self.request(&buf, logs).await?;
            let mut up = NarCopy { nar };
            if self.version.minor() >= 23 {
                self.framed_upload(&mut up, logs).await
            } else {
                self.read_request_upload(up.nar, logs).await
            }
        }
        .await;
        self.finish(res, Op::AddToStoreNar, Some(&info.path))
    }

    /// `AddMultipleToStore` (≥1.32): adds all `infos` in the given order (references before
    /// referrers, unless they are valid already), with NARs from `source`.
    pub async fn add_multiple_to_store<S: NarSource>(
        &mut self,
        infos: &[ValidPathInfo],
        source: &mut S,
        repair: bool,
        dont_check_sigs: bool,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<(), WorkerError> {
        let res = async {
            self.check()?;
            self.need(Op::AddMultipleToStore)?;
            let mut buf = Self::op_buf(Op::AddMultipleToStore);
            wire::put_bool(&mut buf, repair);
            wire::put_bool(&mut buf, dont_check_sigs);
            self.request(&buf, logs).await?;
            let mut up = MultiUpload { infos, source };
            self.framed_upload(&mut up, logs).await
        }
        .await;
        self.finish(res, Op::AddMultipleToStore, None)
    }

    /// `BuildDerivation`: builds `drv` (whose name is taken from `drv_path`) on the daemon's
    /// machine. Input-addressed derivations need a trusted connection.
    pub async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        mode: BuildMode,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<BuildResult, WorkerError> {
        let body = |buf: &mut BytesMut, _| {
            put_store_path(buf, drv_path);
            drv.write(buf);
            mode.write(buf);
            Ok(())
        };
        let pnh = self.path_not_hash();
        self.call(
            Op::BuildDerivation,
            Some(drv_path),
            body,
            logs,
            async |r, v| Ok(BuildResult::read_with(r, v, pnh).await?),
        )
        .await
    }

    /// `BuildPaths`: builds or substitutes `paths`; failures come back as
    /// [`WorkerErrorKind::Remote`].
    pub async fn build_paths(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<(), WorkerError> {
        let body = |buf: &mut BytesMut, v: ProtocolVersion| {
            put_derived_paths(buf, paths, v)?;
            if v.minor() >= 15 {
                mode.write(buf);
            } else if mode != BuildMode::Normal {
                return Err(WorkerError::invalid_argument(
                    "build modes other than Normal need protocol 1.15",
                ));
            }
            Ok(())
        };
        self.call(Op::BuildPaths, None, body, logs, read_ack).await
    }

    /// `BuildPathsWithResults` (≥1.34): one result per requested path.
    pub async fn build_paths_with_results(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<Vec<KeyedBuildResult>, WorkerError> {
        let body = |buf: &mut BytesMut, v| {
            put_derived_paths(buf, paths, v)?;
            mode.write(buf);
            Ok(())
        };
        let pnh = self.path_not_hash();
        self.call(Op::BuildPathsWithResults, None, body, logs, async |r, v| {
            let n = wire::read_len(r, "build results", MAX_COLLECTION_LEN).await?;
            let mut out = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                out.push(KeyedBuildResult::read_with(r, v, pnh).await?);
            }
            Ok(out)
        })
        .await
    }

    /// `AddTempRoot`: keeps `path` from being garbage-collected while the connection lives.
    pub async fn add_temp_root(
        &mut self,
        path: &StorePath,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<(), WorkerError> {
        let body = |buf: &mut BytesMut, _| {
            put_store_path(buf, path);
            Ok(())
        };
        self.call(Op::AddTempRoot, Some(path), body, logs, read_ack)
            .await
    }

    /// `QueryMissing`: what building `paths` would build, substitute, or cannot know.
    pub async fn query_missing(
        &mut self,
        paths: &[DerivedPath],
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<Missing, WorkerError> {
        let body = |buf: &mut BytesMut, v| put_derived_paths(buf, paths, v);
        self.call(Op::QueryMissing, None, body, logs, async |r, _| {
            Ok(Missing::read(r).await?)
        })
        .await
    }

    /// Sends a framed stream produced by `up` while running the stderr loop, so that neither
    /// side can block the other (the daemon logs while it reads; see `withFramedSink` in
    /// `2.26.3:src/libstore/remote-store.cc`). If the daemon reports an error before the
    /// upload is complete, the upload stops and the stream is terminated, as Nix's
    /// `FramedSink` does.
    async fn framed_upload<U: Upload>(
        &mut self,
        up: &mut U,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<(), WorkerError> {
        enum First {
            Upload(Result<(), UploadError>),
            Stderr(Result<(), WorkerError>),
        }

        let version = self.version;
        let WorkerClient { r, w, broken, .. } = self;
        let mut fw = FramedWriter::new(&mut *w);
        let stderr = process_stderr(&mut *r, version, logs);
        tokio::pin!(stderr);

        let first = {
            let upload = async {
                match up.run(&mut fw).await {
                    Ok(()) => fw.finish().await.map_err(UploadError::Conn),
                    Err(e) if fw.is_poisoned() => Err(UploadError::Conn(e)),
                    Err(e) => Err(UploadError::Local(e)),
                }
            };
            tokio::pin!(upload);
            tokio::select! {
                biased;
                s = &mut stderr => First::Stderr(s),
                u = &mut upload => First::Upload(u),
            }
        };

        match first {
            First::Upload(Ok(())) => stderr.await,
            First::Upload(Err(UploadError::Conn(e))) => {
                *broken = true;
                if is_closed_kind(e.kind()) {
                    // The daemon went away; it may have said why first.
                    if let Err(remote) = stderr.await
                        && remote.is_remote()
                    {
                        return Err(remote);
                    }
                }
                Err(WorkerError::conn_io(e))
            }
            First::Upload(Err(UploadError::Local(e))) => {
                // Terminate the stream so the daemon fails the operation and stays in step.
                if fw.finish().await.is_err() {
                    *broken = true;
                    return Err(WorkerError::local(
                        "the data to upload could not be read",
                        e,
                    ));
                }
                match stderr.await {
                    Err(e) if !e.is_remote() => *broken = true,
                    _ => {}
                }
                Err(WorkerError::local(
                    "the data to upload could not be read",
                    e,
                ))
            }
            First::Stderr(Err(e)) if e.is_remote() => {
                if fw.finish().await.is_err() {
                    *broken = true;
                }
                Err(e)
            }
            First::Stderr(Ok(())) => {
                if fw.is_terminated() && fw.finish().await.is_ok() {
                    Ok(())
                } else {
                    *broken = true;
                    Err(WorkerError::protocol(Violation::EarlyFinish))
                }
            }
            First::Stderr(Err(e)) => {
                *broken = true;
                Err(e)
            }
        }
    }

    /// The pre-1.23 `AddToStoreNar`: the daemon pulls the NAR with `STDERR_READ`.
    async fn read_request_upload<N: AsyncRead + Unpin + Send>(
        &mut self,
        nar: &mut N,
        logs: &mut impl FnMut(LogEvent),
    ) -> Result<(), WorkerError> {
        let version = self.version;
        let WorkerClient { r, w, .. } = self;
        let (mut pipe_r, mut pipe_w) = tokio::io::duplex(64 * 1024);
        let mut rs = ReadSource {
            w: &mut *w,
            src: &mut pipe_r,
            failed: None,
        };
        let mut produced = None;
        let outcome = {
            let stderr = process_stderr_with_source(&mut *r, Some(&mut rs), version, logs);
            tokio::pin!(stderr);
            let producer = async {
                let res = copy_nar(&mut *nar, &mut pipe_w).await;
                let _ = pipe_w.shutdown().await;
                res.map(|_| ()).map_err(|e| e.to_string())
            };
            tokio::pin!(producer);
            loop {
                tokio::select! {
                    biased;
                    s = &mut stderr => break s,
                    p = &mut producer, if produced.is_none() => produced = Some(p),
                }
            }
        };
        if let Some(e) = rs.failed.take() {
            return Err(WorkerError::local(
                "passing the NAR to the daemon failed",
                e,
            ));
        }
        if let Some(Err(msg)) = produced {
            return Err(WorkerError::local(
                "the data to upload could not be read",
                io::Error::new(io::ErrorKind::InvalidData, msg),
            ));
        }
        outcome
    }
}

/// An error from [`copy_nar`] while streaming a NAR from the daemon to the caller.
fn nar_stream_error(e: NarError) -> WorkerError {
    match e {
        NarError::Write(e) => WorkerError::local("writing the NAR failed", e),
        NarError::Wire {
            source: WireError::Io(e),
            ..
        } => WorkerError::conn_io(e),
        e if e.is_truncated() => {
            WorkerError::connection_closed(format!("in the middle of the NAR ({e})"))
        }
        e => WorkerError::protocol(Violation::BadNar(Box::new(e))),
    }
}

/// The reply of operations that answer with a u64 Nix ignores (always 1).
async fn read_ack<R: AsyncRead + Unpin + Send>(
    r: &mut BufReader<R>,
    _: ProtocolVersion,
) -> Result<(), WorkerError> {
    wire::read_u64(r).await?;
    Ok(())
}

/// Writes a list of derived paths; fails for one the version cannot express.
fn put_derived_paths(
    buf: &mut BytesMut,
    paths: &[DerivedPath],
    version: ProtocolVersion,
) -> Result<(), WorkerError> {
    wire::put_u64(buf, paths.len() as u64);
    for p in paths {
        p.write(buf, version)
            .map_err(|e| WorkerError::invalid_argument(e.to_string()))?;
    }
    Ok(())
}
