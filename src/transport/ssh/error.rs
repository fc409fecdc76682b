//! Errors of the SSH transport, and the connect phase named in timeouts.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

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
