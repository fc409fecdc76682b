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
//!
//! `connect` (TCP, key exchange, authentication under one deadline), `cipher` (cipher
//! choice), `host_keys` (which server keys are trusted), `session` (channels on a connection),
//! `channel` (a command's stdin/stdout/stderr/exit parts), `demux` (routing a channel's
//! messages to those parts), `quick_ack` (the TCP stream beneath), `error`.

mod channel;
mod cipher;
mod connect;
mod demux;
mod error;
mod host_keys;
mod quick_ack;
mod session;

use std::time::Duration;

pub(crate) use channel::{ClosedSignal, STDOUT_QUEUE};
pub use channel::{ExecChannel, ExecOutput, ExecStdin, ExitStatus, ExitWaiter};
pub use connect::{
    CHANNEL_WINDOW, KEEPALIVE_INTERVAL, KEEPALIVE_MAX, MAX_PACKET, connect, connect_stream,
    connect_with,
};
pub use error::{ConnectPhase, SshError};
pub use host_keys::HostKeys;
pub use session::SshSession;

/// Milliseconds, for the timing fields of debug logs.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
