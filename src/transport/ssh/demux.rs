//! The demultiplexer: one task per SSH channel routing its messages to the stdout/stderr
//! queues and the exit status, and sending EOF for a dropped stdin.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::sync::{mpsc, oneshot};

use super::SshError;
use super::channel::{ClosedSignal, ExitStatus};

pub(super) struct Demux {
    pub(super) addr: SocketAddr,
    pub(super) rx: ChannelReadHalf,
    /// Kept until the channel closes: sends EOF for a dropped stdin, and keeps the
    /// connection alive for this channel even if the [`SshSession`](super::SshSession) is dropped.
    pub(super) write_half: ChannelWriteHalf<Msg>,
    pub(super) stdin_dropped: oneshot::Receiver<()>,
    pub(super) early: Vec<ChannelMsg>,
    pub(super) stdout: Option<mpsc::Sender<io::Result<Bytes>>>,
    pub(super) stderr: Option<mpsc::Sender<io::Result<Bytes>>>,
    pub(super) stderr_dropped: u64,
    pub(super) exit: oneshot::Sender<Result<ExitStatus, SshError>>,
    pub(super) closed: Arc<ClosedSignal>,
}

/// Routes one channel's messages to its stdout/stderr queues and exit status.
pub(super) async fn demultiplex(mut d: Demux) {
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
