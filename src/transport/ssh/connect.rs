//! Connecting: TCP, key exchange with the host-key check, public-key authentication, all
//! under one deadline.

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKey};
use russh::{Preferred, compression};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::cipher::preferred_ciphers;
use super::host_keys::{ClientHandler, HostKeyVerdict, HostKeys};
use super::quick_ack::QuickAckStream;
use super::session::SshSession;
use super::{ConnectPhase, SshError, ms};
use crate::transport::keys::ClientKey;

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
    handshake(
        tcp, addr, user, client_key, host_keys, deadline, timeout, start, tcp_time,
    )
    .await
}

/// An SSH session over a byte stream that is already connected to an sshd (one running as
/// `sshd -i` at the other end of a container exec, say): key exchange with the pinned host key
/// check and authentication as in [`connect`], under `timeout`. `label` names the peer in
/// errors and logs (a stream has no address of its own).
pub async fn connect_stream<S>(
    stream: S,
    label: SocketAddr,
    user: &str,
    client_key: &ClientKey,
    pinned_host_key: &PublicKey,
    timeout: Duration,
) -> Result<SshSession, SshError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let host_keys = HostKeys::pinned(pinned_host_key.clone());
    handshake(
        stream,
        label,
        user,
        client_key,
        &host_keys,
        deadline,
        timeout,
        Instant::now(),
        Duration::ZERO,
    )
    .await
}

/// Key exchange and authentication on a connected stream.
#[allow(clippy::too_many_arguments)]
async fn handshake<S>(
    stream: S,
    addr: SocketAddr,
    user: &str,
    client_key: &ClientKey,
    host_keys: &HostKeys,
    deadline: tokio::time::Instant,
    timeout: Duration,
    start: Instant,
    tcp_time: Duration,
) -> Result<SshSession, SshError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timed_out = |phase| SshError::Timeout {
        addr,
        phase,
        limit: timeout,
    };
    let verdict = Arc::new(Mutex::new(HostKeyVerdict::default()));
    let handler = ClientHandler {
        host_keys: host_keys.clone(),
        verdict: verdict.clone(),
    };
    let config = Arc::new(client_config(host_keys));
    let kex_start = Instant::now();
    let handshake =
        tokio::time::timeout_at(deadline, client::connect_stream(config, stream, handler))
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
