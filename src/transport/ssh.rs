//! SSH client to a builder container's sshd, built on russh.
//!
//! One [`SshSession`] per builder; [`SshSession::exec`] opens a session channel
//! running one command (typically `nix-daemon --stdio`) and hands back its
//! stdin, stdout, stderr and exit status as separate owned, `Send` parts.
//! Several exec channels may run over one session at the same time.
//!
//! Flow control: russh returns window space to the server as soon as data
//! arrives, not when the application reads it, so backpressure works by
//! bounded queues: when a channel's stdout is not read, its queue fills and the
//! connection's reader stops reading the socket — for **every** channel of the
//! session. Read each channel's stdout (or drop it, which discards the rest)
//! independently, e.g. from its own task. Unread stderr never blocks: past a
//! bound, excess stderr is dropped with a warning.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use russh::client::{self, Msg};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Preferred, Sig, cipher, compression};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::keys::{ClientKey, fingerprint, same_key};

/// Receive window per channel: how much the server may send before waiting.
pub const CHANNEL_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest packet we accept from the server (russh warns above 64 KiB − 1).
pub const MAX_PACKET: u32 = 65535;
/// Keepalive probe interval when the server is silent.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered keepalives before the connection is declared dead.
pub const KEEPALIVE_MAX: usize = 3;

/// Messages buffered per channel inside russh before its reader stops reading.
const RUSSH_CHANNEL_BUFFER: usize = 128;
/// Stdout chunks (≤ one SSH packet each) queued between the demultiplexer and the reader.
const STDOUT_QUEUE: usize = 32;
/// Stderr chunks queued before further stderr is dropped.
const STDERR_QUEUE: usize = 256;

/// Phase of connection setup, named in timeout errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectPhase {
    /// TCP connect.
    Tcp,
    /// SSH banner exchange and key exchange (including the host key check).
    KeyExchange,
    /// Public-key user authentication.
    Authentication,
}

impl fmt::Display for ConnectPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectPhase::Tcp => "TCP connect",
            ConnectPhase::KeyExchange => "SSH key exchange",
            ConnectPhase::Authentication => "SSH authentication",
        })
    }
}

/// Errors of the SSH transport. Each message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(
        "connection to {addr} refused: is the builder running? (port {port}; check `docker ps` and the published sshd port)",
        port = addr.port()
    )]
    ConnectionRefused { addr: SocketAddr },

    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error(
        "timed out during {phase} with {addr} (whole connect limited to {limit:?}): \
         is the builder container up and its sshd responsive?"
    )]
    Timeout {
        addr: SocketAddr,
        phase: ConnectPhase,
        limit: Duration,
    },

    #[error(
        "host key mismatch at {addr}: expected {expected}, the server presented {got}. \
         The port may now belong to another container, or the builder was re-created without \
         updating its pinned key: re-provision the builder (nothing was sent to it)"
    )]
    HostKeyMismatch {
        addr: SocketAddr,
        /// `SHA256:` fingerprint of the pinned key.
        expected: String,
        /// `SHA256:` fingerprint of the key the server presented (or a description).
        got: String,
    },

    #[error(
        "host key at {addr} is not trusted: the server presented {got}, but only {trusted} \
         is accepted (or the key is @revoked). If the machine's key really changed, check the new \
         key out of band and put it in the machine's builders entry (8th field, base64 of the \
         public key line) or in known_hosts; nothing was sent to it"
    )]
    HostKeyNotTrusted {
        addr: SocketAddr,
        trusted: String,
        got: String,
    },

    #[error(
        "no trusted host key for {addr} (looked in {looked_in}): nixdock never trusts a key on \
         first use. Put the base64 of the machine's public host key line in the 8th field of its \
         builders entry, or add it to known_hosts (e.g. `ssh-keyscan` and check the fingerprint)"
    )]
    NoHostKey { addr: SocketAddr, looked_in: String },

    #[error(
        "{addr} closed the connection during the SSH handshake: the builder's sshd is probably \
         not running yet or crashed (a published Docker port accepts connections even when \
         nothing listens in the container); retry, or check the container's logs"
    )]
    ClosedDuringHandshake { addr: SocketAddr },

    #[error("SSH handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: russh::Error,
    },

    #[error(
        "authentication as {user:?} at {addr} was rejected for client key {fingerprint} ({key}): \
         the builder's authorized_keys must hold this key's public line; if the key file was \
         replaced or deleted since the builder was provisioned, re-provision the builder",
        key = key_file.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "in-memory key".into())
    )]
    AuthFailed {
        addr: SocketAddr,
        user: String,
        fingerprint: String,
        key_file: Option<std::path::PathBuf>,
    },

    #[error("cannot open an SSH session channel to {addr}: {source}")]
    ChannelOpen {
        addr: SocketAddr,
        #[source]
        source: russh::Error,
    },

    #[error("the sshd at {addr} refused to execute {command:?}")]
    ExecRefused { addr: SocketAddr, command: String },

    #[error(
        "SSH connection to {addr} lost{during}: the builder container may have stopped or become unresponsive",
        during = if context.is_empty() { String::new() } else { format!(" {context}") }
    )]
    ConnectionLost {
        addr: SocketAddr,
        context: &'static str,
    },
}

/// An authenticated SSH connection to one builder. Share it (e.g. in an `Arc`)
/// to run several commands at once. Dropping it leaves running channels working;
/// the connection ends when the last of them closes (or at once with [`close`](Self::close)).
pub struct SshSession {
    handle: client::Handle<ClientHandler>,
    addr: SocketAddr,
}

impl fmt::Debug for SshSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshSession")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn preferred_ciphers() -> &'static [cipher::Name] {
    const AES_FIRST: &[cipher::Name] = &[
        cipher::AES_256_GCM,
        cipher::AES_128_GCM,
        cipher::CHACHA20_POLY1305,
    ];
    const CHACHA_FIRST: &[cipher::Name] = &[
        cipher::CHACHA20_POLY1305,
        cipher::AES_256_GCM,
        cipher::AES_128_GCM,
    ];
    if cpu_has_aes() {
        AES_FIRST
    } else {
        CHACHA_FIRST
    }
}

fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

fn client_config(host_keys: &HostKeys) -> client::Config {
    client::Config {
        window_size: CHANNEL_WINDOW,
        maximum_packet_size: MAX_PACKET,
        channel_buffer_size: RUSSH_CHANNEL_BUFFER,
        preferred: Preferred {
            // Only the accepted keys' algorithms: the server must prove one of those keys.
            key: Cow::Owned(host_keys.algorithms()),
            cipher: Cow::Borrowed(preferred_ciphers()),
            compression: Cow::Borrowed(&[compression::NONE]),
            ..Preferred::DEFAULT
        },
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    }
}

/// What the host key check saw, for the error after russh gives up.
#[derive(Default)]
struct HostKeyVerdict {
    rejected: Option<String>,
}

/// The host keys a server may present: exactly one pinned key (builder containers), or the
/// keys a user's remote builder is known by (its machines entry, or known_hosts), never any
/// key seen for the first time.
#[derive(Debug, Clone)]
pub struct HostKeys {
    accept: Vec<PublicKey>,
    revoked: Vec<PublicKey>,
    /// Where the accepted keys come from, for messages; `None` for a builder container's
    /// pinned key.
    source: Option<String>,
}

impl HostKeys {
    /// Exactly this key (a builder container's pinned key).
    pub fn pinned(key: PublicKey) -> HostKeys {
        HostKeys {
            accept: vec![key],
            revoked: Vec::new(),
            source: None,
        }
    }

    /// Any of `accept` but none of `revoked`; `source` says where they come from (e.g. "the
    /// host key in its builders entry", "~/.ssh/known_hosts").
    pub fn any_of(accept: Vec<PublicKey>, revoked: Vec<PublicKey>, source: String) -> HostKeys {
        HostKeys {
            accept,
            revoked,
            source: Some(source),
        }
    }

    pub fn accepted(&self) -> &[PublicKey] {
        &self.accept
    }

    fn accepts(&self, key: &PublicKey) -> bool {
        self.accept.iter().any(|k| same_key(k, key))
            && !self.revoked.iter().any(|k| same_key(k, key))
    }

    /// Host key algorithms to offer: those of the accepted keys.
    fn algorithms(&self) -> Vec<russh::keys::Algorithm> {
        if self.source.is_none() {
            return self.accept.iter().map(PublicKey::algorithm).collect();
        }
        let mut out: Vec<russh::keys::Algorithm> = Vec::new();
        for a in Preferred::DEFAULT.key.iter() {
            let wanted = self.accept.iter().any(|k| {
                std::mem::discriminant(&k.algorithm()) == std::mem::discriminant(a)
                    && (matches!(a, russh::keys::Algorithm::Rsa { .. }) || k.algorithm() == *a)
            });
            if wanted && !out.contains(a) {
                out.push(a.clone());
            }
        }
        for k in &self.accept {
            let a = k.algorithm();
            if !out
                .iter()
                .any(|o| std::mem::discriminant(o) == std::mem::discriminant(&a))
            {
                out.push(a);
            }
        }
        out
    }

    fn describe(&self) -> String {
        let fps: Vec<String> = self.accept.iter().map(fingerprint).collect();
        match &self.source {
            Some(src) => format!("{} from {src}", fps.join(", ")),
            None => fps.join(", "),
        }
    }
}

struct ClientHandler {
    host_keys: HostKeys,
    verdict: Arc<Mutex<HostKeyVerdict>>,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let got = match server {
            PublicKeyOrCertificate::PublicKey { key, .. } if self.host_keys.accepts(key) => {
                return Ok(true);
            }
            PublicKeyOrCertificate::PublicKey { key, .. } => fingerprint(key),
            PublicKeyOrCertificate::Certificate(cert) => {
                format!(
                    "a certificate for {}",
                    fingerprint(&PublicKey::from(cert.public_key().clone()))
                )
            }
        };
        self.verdict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rejected = Some(got);
        Ok(false)
    }

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        names: &russh::Names,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        tracing::debug!(
            kex = names.kex.as_ref(),
            cipher = names.cipher.as_ref(),
            host_key = %names.key,
            "SSH key exchange done"
        );
        Ok(())
    }
}

/// Connects to `addr`, checks that the server holds exactly `pinned_host_key`
/// (no TOFU, no known_hosts), and authenticates as `user` with `client_key`.
/// The whole of it (TCP, key exchange, authentication) is bounded by `timeout`.
pub async fn connect(
    addr: SocketAddr,
    user: &str,
    client_key: &ClientKey,
    pinned_host_key: &PublicKey,
    timeout: Duration,
) -> Result<SshSession, SshError> {
    connect_with(
        addr,
        user,
        client_key,
        &HostKeys::pinned(pinned_host_key.clone()),
        timeout,
    )
    .await
}

/// Like [`connect`], accepting any of `host_keys` (see [`HostKeys`]).
pub async fn connect_with(
    addr: SocketAddr,
    user: &str,
    client_key: &ClientKey,
    host_keys: &HostKeys,
    timeout: Duration,
) -> Result<SshSession, SshError> {
    if host_keys.accept.is_empty() {
        return Err(SshError::NoHostKey {
            addr,
            looked_in: host_keys.source.clone().unwrap_or_default(),
        });
    }
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = |phase| SshError::Timeout {
        addr,
        phase,
        limit: timeout,
    };

    let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out(ConnectPhase::Tcp))?
        .map_err(|source| match source.kind() {
            io::ErrorKind::ConnectionRefused => SshError::ConnectionRefused { addr },
            _ => SshError::Connect { addr, source },
        })?;
    tcp.set_nodelay(true)
        .map_err(|source| SshError::Connect { addr, source })?;
    let tcp = QuickAckStream::new(tcp).map_err(|source| SshError::Connect { addr, source })?;
    let tcp_time = start.elapsed();

    let verdict = Arc::new(Mutex::new(HostKeyVerdict::default()));
    let handler = ClientHandler {
        host_keys: host_keys.clone(),
        verdict: verdict.clone(),
    };
    let config = Arc::new(client_config(host_keys));
    let kex_start = Instant::now();
    let handshake = tokio::time::timeout_at(deadline, client::connect_stream(config, tcp, handler))
        .await
        .map_err(|_| timed_out(ConnectPhase::KeyExchange))?;
    let mut handle = match handshake {
        Ok(handle) => handle,
        Err(source) => {
            let rejected = verdict
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .rejected
                .take();
            return Err(match rejected {
                Some(got) if host_keys.source.is_some() => SshError::HostKeyNotTrusted {
                    addr,
                    trusted: host_keys.describe(),
                    got,
                },
                Some(got) => SshError::HostKeyMismatch {
                    addr,
                    expected: host_keys.describe(),
                    got,
                },
                None => handshake_error(addr, source),
            });
        }
    };
    let kex_time = kex_start.elapsed();

    let auth_start = Instant::now();
    let key = PrivateKeyWithHashAlg::new(client_key.private_key().clone(), None);
    let auth = tokio::time::timeout_at(deadline, handle.authenticate_publickey(user, key))
        .await
        .map_err(|_| timed_out(ConnectPhase::Authentication))?
        .map_err(|source| handshake_error(addr, source))?;
    if !auth.success() {
        return Err(SshError::AuthFailed {
            addr,
            user: user.to_owned(),
            fingerprint: client_key.fingerprint(),
            key_file: client_key.path().map(ToOwned::to_owned),
        });
    }
    let auth_time = auth_start.elapsed();

    tracing::debug!(
        %addr,
        user,
        tcp_ms = ms(tcp_time),
        kex_ms = ms(kex_time),
        auth_ms = ms(auth_time),
        total_ms = ms(start.elapsed()),
        "SSH connected"
    );
    Ok(SshSession { handle, addr })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn handshake_error(addr: SocketAddr, source: russh::Error) -> SshError {
    match &source {
        russh::Error::Disconnect | russh::Error::HUP => SshError::ClosedDuringHandshake { addr },
        russh::Error::IO(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            SshError::ClosedDuringHandshake { addr }
        }
        _ => SshError::Handshake { addr, source },
    }
}

impl SshSession {
    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the connection is gone (closed, failed, or keepalives unanswered).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Opens a session channel and executes `command` (the server runs it through the
    /// user's shell). Returns its stdin, stdout, stderr and exit status as separate parts.
    pub async fn exec(&self, command: &str) -> Result<ExecChannel, SshError> {
        let start = Instant::now();
        let addr = self.addr;
        let mut channel =
            self.handle
                .channel_open_session()
                .await
                .map_err(|source| match source {
                    russh::Error::Disconnect | russh::Error::SendError => {
                        SshError::ConnectionLost {
                            addr,
                            context: "while opening a channel",
                        }
                    }
                    source => SshError::ChannelOpen { addr, source },
                })?;
        let open_time = start.elapsed();
        let lost = || SshError::ConnectionLost {
            addr,
            context: "while starting a command",
        };
        channel.exec(true, command).await.map_err(|_| lost())?;

        // Wait for the server's answer to the exec request; keep anything that
        // (unusually) arrives before it, in order.
        let mut early = Vec::new();
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) => {
                    let _ = channel.close().await;
                    return Err(SshError::ExecRefused {
                        addr,
                        command: command.to_owned(),
                    });
                }
                Some(ChannelMsg::WindowAdjusted { .. }) => {}
                Some(msg @ ChannelMsg::Close) => {
                    early.push(msg);
                    break;
                }
                Some(msg) => early.push(msg),
                None => return Err(lost()),
            }
        }
        tracing::debug!(
            %addr,
            command,
            channel = %channel.id(),
            open_ms = ms(open_time),
            exec_ms = ms(start.elapsed() - open_time),
            "SSH exec started"
        );
        Ok(self.streams(channel, early))
    }

    /// Opens a `direct-streamlocal@openssh.com` channel to the Unix socket `path` on the server
    /// (needs `AllowStreamLocalForwarding local` there). No process is started: the bytes go
    /// straight to whatever listens on the socket. The returned stderr is always empty and the
    /// exit status is [`ExitStatus::Unreported`].
    pub async fn open_unix_socket(&self, path: &str) -> Result<ExecChannel, SshError> {
        let start = Instant::now();
        let addr = self.addr;
        let channel = self
            .handle
            .channel_open_direct_streamlocal(path)
            .await
            .map_err(|source| match source {
                russh::Error::Disconnect | russh::Error::SendError => SshError::ConnectionLost {
                    addr,
                    context: "while opening a socket channel",
                },
                source => SshError::ChannelOpen { addr, source },
            })?;
        tracing::debug!(%addr, path, channel = %channel.id(), open_ms = ms(start.elapsed()), "SSH socket channel open");
        Ok(self.streams(channel, Vec::new()))
    }

    /// Starts the server's subsystem `name` on a session channel and closes the channel again
    /// at once. Used for its side effect: OpenSSH's sshd sets `TCP_NODELAY` on the connection
    /// only from its session code, and without it its small writes on other channels wait
    /// under Nagle for the peer's delayed ACKs (~40 ms each).
    pub async fn touch_subsystem(&self, name: &str) -> Result<(), SshError> {
        let addr = self.addr;
        let lost = || SshError::ConnectionLost {
            addr,
            context: "while starting a subsystem",
        };
        let mut channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(|source| SshError::ChannelOpen { addr, source })?;
        channel
            .request_subsystem(true, name)
            .await
            .map_err(|_| lost())?;
        let ok = loop {
            match channel.wait().await {
                Some(ChannelMsg::Success) => break true,
                Some(ChannelMsg::Failure) | Some(ChannelMsg::Close) | None => break false,
                Some(_) => {}
            }
        };
        let _ = channel.close().await;
        if ok {
            Ok(())
        } else {
            Err(SshError::ExecRefused {
                addr,
                command: format!("subsystem {name}"),
            })
        }
    }

    /// Splits an open channel into the separately owned parts of an [`ExecChannel`].
    fn streams(&self, channel: russh::Channel<client::Msg>, early: Vec<ChannelMsg>) -> ExecChannel {
        let addr = self.addr;
        let (read_half, write_half) = channel.split();
        let closed = Arc::new(ClosedSignal::default());
        let (stdout_tx, stdout_rx) = mpsc::channel(STDOUT_QUEUE);
        let (stderr_tx, stderr_rx) = mpsc::channel(STDERR_QUEUE);
        let (exit_tx, exit_rx) = oneshot::channel();
        let (stdin_dropped_tx, stdin_dropped_rx) = oneshot::channel();
        let writer = Box::new(write_half.make_writer());
        tokio::spawn(demultiplex(Demux {
            addr,
            rx: read_half,
            write_half,
            stdin_dropped: stdin_dropped_rx,
            early,
            stdout: Some(stdout_tx),
            stderr: Some(stderr_tx),
            stderr_dropped: 0,
            exit: exit_tx,
            closed: closed.clone(),
        }));

        ExecChannel {
            stdin: ExecStdin {
                writer,
                dropped: Some(stdin_dropped_tx),
                shut_down: false,
                closed,
            },
            stdout: ExecOutput::new(stdout_rx),
            stderr: ExecOutput::new(stderr_rx),
            exit: ExitWaiter { rx: exit_rx, addr },
        }
    }

    /// Ends the connection now; commands still running on it end with
    /// [`SshError::ConnectionLost`].
    pub async fn close(self) -> Result<(), SshError> {
        self.handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await
            .map_err(|_| SshError::ConnectionLost {
                addr: self.addr,
                context: "while disconnecting",
            })
    }
}

/// The same parts as an [`ExecChannel`], over a Unix stream socket instead of an SSH channel
/// (a local builder's daemon socket): stdout is what the socket sends, stderr is empty, and the
/// exit status is [`ExitStatus::Unreported`] once the peer closes.
pub fn unix_stream_channel(stream: tokio::net::UnixStream) -> ExecChannel {
    use tokio::io::AsyncReadExt;
    let (mut rd, wr) = stream.into_split();
    let closed = Arc::new(ClosedSignal::default());
    let (stdout_tx, stdout_rx) = mpsc::channel(STDOUT_QUEUE);
    let (stderr_tx, stderr_rx) = mpsc::channel(1);
    drop(stderr_tx);
    let (exit_tx, exit_rx) = oneshot::channel();
    let reader_closed = closed.clone();
    tokio::spawn(async move {
        let mut buf = bytes::BytesMut::new();
        loop {
            buf.reserve(64 * 1024);
            match rd.read_buf(&mut buf).await {
                Ok(0) => break,
                Ok(_) => {
                    if stdout_tx.send(Ok(buf.split().freeze())).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = stdout_tx.send(Err(e)).await;
                    break;
                }
            }
        }
        reader_closed.close();
        let _ = exit_tx.send(Ok(ExitStatus::Unreported));
    });
    ExecChannel {
        stdin: ExecStdin {
            writer: Box::new(wr),
            dropped: None,
            shut_down: false,
            closed,
        },
        stdout: ExecOutput::new(stdout_rx),
        stderr: ExecOutput::new(stderr_rx),
        exit: ExitWaiter {
            rx: exit_rx,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        },
    }
}

/// A running remote command. Destructure it into its parts:
/// `let ExecChannel { stdin, stdout, stderr, exit } = session.exec("…").await?;`
pub struct ExecChannel {
    /// The command's standard input. `shutdown()` (or dropping it) sends EOF.
    pub stdin: ExecStdin,
    /// The command's standard output; ends at the server's EOF. Dropping it discards
    /// the rest without blocking the connection.
    pub stdout: ExecOutput,
    /// The command's standard error (SSH extended data). Never blocks the connection:
    /// if left unread, stderr past a bound is dropped with a warning.
    pub stderr: ExecOutput,
    /// How the command ended.
    pub exit: ExitWaiter,
}

impl fmt::Debug for ExecChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecChannel").finish_non_exhaustive()
    }
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(u32),
    /// It was killed by a signal (`signal` without the `SIG` prefix, e.g. `KILL`).
    Signaled {
        signal: String,
        core_dumped: bool,
        message: String,
    },
    /// The channel closed without the server saying how the command ended.
    Unreported,
}

impl ExitStatus {
    /// The exit code, if the command exited normally.
    pub fn code(&self) -> Option<u32> {
        match self {
            ExitStatus::Exited(c) => Some(*c),
            _ => None,
        }
    }

    /// Whether the command exited with code 0.
    pub fn success(&self) -> bool {
        self.code() == Some(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Exited(c) => write!(f, "exit code {c}"),
            ExitStatus::Signaled {
                signal,
                core_dumped,
                message,
            } => {
                write!(f, "killed by SIG{signal}")?;
                if *core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            ExitStatus::Unreported => f.write_str("no exit status reported"),
        }
    }
}

/// Resolves once the channel is closed, with the command's exit status.
pub struct ExitWaiter {
    rx: oneshot::Receiver<Result<ExitStatus, SshError>>,
    addr: SocketAddr,
}

impl fmt::Debug for ExitWaiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExitWaiter").finish_non_exhaustive()
    }
}

impl ExitWaiter {
    /// Waits until the channel closes and returns how the command ended, or
    /// [`SshError::ConnectionLost`] if the connection died first.
    ///
    /// Like a child process's `wait()`, this completes only once the command's
    /// output has been delivered: read `stdout` to its end (or drop it) too.
    pub async fn wait(self) -> Result<ExitStatus, SshError> {
        self.rx.await.unwrap_or(Err(SshError::ConnectionLost {
            addr: self.addr,
            context: "while waiting for the command to end",
        }))
    }
}

impl std::future::IntoFuture for ExitWaiter {
    type Output = Result<ExitStatus, SshError>;
    type IntoFuture = Pin<Box<dyn std::future::Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

/// A stream of output from the remote command (stdout or stderr).
pub struct ExecOutput {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl fmt::Debug for ExecOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecOutput").finish_non_exhaustive()
    }
}

impl ExecOutput {
    fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Self {
            rx,
            chunk: Bytes::new(),
        }
    }

    /// The next chunk as it arrived (no copy), or `None` at end of stream.
    pub async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        if !self.chunk.is_empty() {
            return Some(Ok(std::mem::take(&mut self.chunk)));
        }
        self.rx.recv().await
    }
}

impl AsyncRead for ExecOutput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.chunk.is_empty() {
            match ready!(this.rx.poll_recv(cx)) {
                Some(Ok(chunk)) => this.chunk = chunk,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(this.chunk.len());
        buf.put_slice(&this.chunk.split_to(n));
        Poll::Ready(Ok(()))
    }
}

/// The remote command's standard input.
///
/// Writes respect the server's channel window. `shutdown()` sends EOF; dropping
/// without it sends EOF too. Once the channel is closed, writes fail with
/// `BrokenPipe` instead of waiting forever for window space.
pub struct ExecStdin {
    writer: Box<dyn AsyncWrite + Send + Unpin>,
    /// Tells the demultiplexer to send EOF when dropped without `shutdown()`.
    dropped: Option<oneshot::Sender<()>>,
    shut_down: bool,
    closed: Arc<ClosedSignal>,
}

impl fmt::Debug for ExecStdin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecStdin")
            .field("shut_down", &self.shut_down)
            .finish_non_exhaustive()
    }
}

impl ExecStdin {
    fn check_open(&self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.shut_down {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stdin already shut down",
            ));
        }
        if self.closed.is_closed(cx) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the remote command's channel is closed; it no longer reads input",
            ));
        }
        Ok(())
    }
}

impl AsyncWrite for ExecStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.check_open(cx)?;
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.shut_down {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.shut_down {
            return Poll::Ready(Ok(()));
        }
        if self.closed.is_closed(cx) {
            // Nothing to tell a closed channel.
            self.shut_down = true;
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.writer).poll_shutdown(cx))?;
        self.shut_down = true;
        Poll::Ready(Ok(()))
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        if !self.shut_down
            && let Some(tx) = self.dropped.take()
        {
            // The demultiplexer owns the channel's write half and sends the EOF,
            // after any data already queued by this writer.
            let _ = tx.send(());
        }
    }
}

/// Set once the channel is gone; wakes a writer waiting for window space.
#[derive(Default)]
struct ClosedSignal {
    flag: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl ClosedSignal {
    /// Whether closed; if not, registers `cx` to be woken when it closes.
    fn is_closed(&self, cx: &mut Context<'_>) -> bool {
        if self.flag.load(Ordering::Acquire) {
            return true;
        }
        let mut waker = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        match &*waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *waker = Some(cx.waker().clone()),
        }
        drop(waker);
        self.flag.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.flag.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
    }
}

struct Demux {
    addr: SocketAddr,
    rx: ChannelReadHalf,
    /// Kept until the channel closes: sends EOF for a dropped stdin, and keeps the
    /// connection alive for this channel even if the [`SshSession`] is dropped.
    write_half: ChannelWriteHalf<Msg>,
    stdin_dropped: oneshot::Receiver<()>,
    early: Vec<ChannelMsg>,
    stdout: Option<mpsc::Sender<io::Result<Bytes>>>,
    stderr: Option<mpsc::Sender<io::Result<Bytes>>>,
    stderr_dropped: u64,
    exit: oneshot::Sender<Result<ExitStatus, SshError>>,
    closed: Arc<ClosedSignal>,
}

/// Routes one channel's messages to its stdout/stderr queues and exit status.
async fn demultiplex(mut d: Demux) {
    let mut status = None;
    let mut eof = false;
    let mut early = std::mem::take(&mut d.early).into_iter();
    let mut watch_stdin = true;
    let outcome = loop {
        let msg = match early.next() {
            Some(msg) => Some(msg),
            None => {
                tokio::select! {
                    dropped = &mut d.stdin_dropped, if watch_stdin => {
                        watch_stdin = false;
                        if dropped.is_ok() {
                            let _ = d.write_half.eof().await;
                        }
                        continue;
                    }
                    msg = d.rx.wait() => msg,
                }
            }
        };
        match msg {
            Some(ChannelMsg::Data { data }) => {
                if let Some(tx) = &d.stdout
                    && tx.send(Ok(data)).await.is_err()
                {
                    // Reader dropped: discard the rest.
                    d.stdout = None;
                }
            }
            Some(ChannelMsg::ExtendedData { data, ext }) => {
                if ext != 1 {
                    continue;
                }
                if let Some(tx) = &d.stderr {
                    match tx.try_send(Ok(data)) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(Ok(data))) => {
                            if d.stderr_dropped == 0 {
                                tracing::warn!(addr = %d.addr, "remote stderr is not being read; dropping it");
                            }
                            d.stderr_dropped += data.len() as u64;
                        }
                        Err(_) => d.stderr = None,
                    }
                }
            }
            Some(ChannelMsg::Eof) => {
                eof = true;
                // End of stdout (and stderr): readers see EOF once drained.
                d.stdout = None;
                d.stderr = None;
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => {
                status = Some(ExitStatus::Exited(exit_status))
            }
            Some(ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                ..
            }) => {
                status = Some(ExitStatus::Signaled {
                    signal: signal_name_of(&signal_name),
                    core_dumped,
                    message: error_message,
                })
            }
            Some(ChannelMsg::Close) => break Ok(status.take().unwrap_or(ExitStatus::Unreported)),
            Some(_) => {}
            None => {
                break Err(SshError::ConnectionLost {
                    addr: d.addr,
                    context: "while a command was running",
                });
            }
        }
    };
    d.closed.close();
    if outcome.is_err() && !eof {
        let err = || {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("SSH connection to {} lost before the end of output", d.addr),
            )
        };
        if let Some(tx) = d.stdout.take() {
            let _ = tx.send(Err(err())).await;
        }
        if let Some(tx) = d.stderr.take() {
            let _ = tx.try_send(Err(err()));
        }
    }
    if d.stderr_dropped > 0 {
        tracing::warn!(addr = %d.addr, bytes = d.stderr_dropped, "dropped unread remote stderr");
    }
    // Close the output queues before reporting the status.
    drop(d.stdout.take());
    drop(d.stderr.take());
    tracing::debug!(addr = %d.addr, outcome = ?outcome.as_ref().map(|s| s.to_string()), "SSH channel closed");
    let _ = d.exit.send(outcome);
}

fn signal_name_of(sig: &Sig) -> String {
    match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name,
    }
    .to_owned()
}

/// A TCP stream that re-arms `TCP_QUICKACK` after every read (Linux).
///
/// sshd keeps Nagle's algorithm on until a command starts, and right after
/// authentication it sends an unsolicited `hostkeys-00@openssh.com` request; its
/// reply to our first channel open then waits for our ACK of that request, which
/// Linux delays by 40 ms. Acknowledging at once removes that stall (first exec
/// measured 45–55 ms → 10–16 ms) and any like it later; the cost is one
/// `setsockopt` per read.
struct QuickAckStream {
    stream: TcpStream,
    #[cfg(target_os = "linux")]
    control: std::net::TcpStream,
}

impl QuickAckStream {
    fn new(stream: TcpStream) -> io::Result<Self> {
        #[cfg(target_os = "linux")]
        {
            // A second handle on the same socket, for setsockopt from poll_read.
            let std_stream = stream.into_std()?;
            let control = std_stream.try_clone()?;
            let stream = TcpStream::from_std(std_stream)?;
            let this = Self { stream, control };
            this.quickack();
            Ok(this)
        }
        #[cfg(not(target_os = "linux"))]
        {
            Ok(Self { stream })
        }
    }

    fn quickack(&self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::TcpStreamExt;
            let _ = self.control.set_quickack(true);
        }
    }
}

impl AsyncRead for QuickAckStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let result = ready!(Pin::new(&mut self.stream).poll_read(cx, buf));
        self.quickack();
        Poll::Ready(result)
    }
}

impl AsyncWrite for QuickAckStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_helpers() {
        assert!(ExitStatus::Exited(0).success());
        assert_eq!(ExitStatus::Exited(3).code(), Some(3));
        let s = ExitStatus::Signaled {
            signal: "KILL".into(),
            core_dumped: false,
            message: String::new(),
        };
        assert_eq!(s.code(), None);
        assert_eq!(s.to_string(), "killed by SIGKILL");
    }

    #[test]
    fn cipher_order_follows_cpu() {
        let c = preferred_ciphers();
        if cpu_has_aes() {
            assert_eq!(c[0], cipher::AES_256_GCM);
        } else {
            assert_eq!(c[0], cipher::CHACHA20_POLY1305);
        }
    }
}
