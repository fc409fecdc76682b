//! An authenticated SSH connection and the channels opened on it: exec, `direct-streamlocal`,
//! and the subsystem touch.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::ChannelMsg;
use russh::client;
use tokio::sync::{mpsc, oneshot};

use super::channel::{
    ClosedSignal, ExecChannel, ExecOutput, ExecStdin, ExitWaiter, STDERR_QUEUE, STDOUT_QUEUE,
};
use super::demux::{Demux, demultiplex};
use super::host_keys::ClientHandler;
use super::{SshError, ms};

/// How often [`SshSession::touch_subsystem`] sends a packet while it waits for sshd.
const NUDGE: Duration = Duration::from_millis(3);
/// How long [`SshSession::touch_subsystem`] waits for sshd at most (a server that keeps the
/// connection alive but never answers would otherwise hold it, nudged, for ever).
const SUBSYSTEM_TIMEOUT: Duration = Duration::from_secs(10);
// The error of a subsystem that does not start names this deadline as text.
const _: () = assert!(SUBSYSTEM_TIMEOUT.as_secs() == 10);

/// An authenticated SSH connection to one builder. Share it (e.g. in an `Arc`)
/// to run several commands at once. Dropping it leaves running channels working;
/// the connection ends when the last of them closes (or at once with [`close`](Self::close)).
pub struct SshSession {
    pub(super) handle: client::Handle<ClientHandler>,
    pub(super) addr: SocketAddr,
}

impl fmt::Debug for SshSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshSession")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
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
    ///
    /// Until that is done, sshd still runs Nagle's algorithm, and right after authentication
    /// it sends packets of its own (the host-key announcement, the key options as debug
    /// messages), so a reply of its waits for the ACK of those; a proxy between us (Docker's
    /// userland proxy for a published port) delays that ACK by 40 ms unless data goes its way.
    /// So while waiting, a keepalive that asks no reply goes out every [`NUDGE`]: its packet
    /// carries the ACK (measured: the first channel after connecting opened in ~45 ms without
    /// it, ~2 ms with it).
    pub async fn touch_subsystem(&self, name: &str) -> Result<(), SshError> {
        let start = self.start_subsystem(name);
        tokio::pin!(start);
        let deadline = tokio::time::sleep(SUBSYSTEM_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = &mut start => return r,
                () = &mut deadline => {
                    return Err(SshError::ConnectionLost {
                        addr: self.addr,
                        context: "(no answer within 10 s while starting a subsystem)",
                    });
                }
                () = tokio::time::sleep(NUDGE) => {
                    // A lost connection fails the subsystem's own wait as well.
                    let _ = self.handle.send_keepalive(false).await;
                }
            }
        }
    }

    async fn start_subsystem(&self, name: &str) -> Result<(), SshError> {
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
            stdin: ExecStdin::new(writer, Some(stdin_dropped_tx), closed),
            stdout: ExecOutput::new(stdout_rx),
            stderr: ExecOutput::new(stderr_rx),
            exit: ExitWaiter::new(exit_rx, addr),
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
