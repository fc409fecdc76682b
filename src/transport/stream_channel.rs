//! A local byte stream — a Unix socket (a local builder's daemon socket, the host's own daemon
//! socket) or a child's pipes (`nix-daemon --stdio`) — as the same separately owned parts as an
//! SSH command's channel, so one daemon client type runs over any of them unchanged.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::ssh::{
    ClosedSignal, ExecChannel, ExecOutput, ExecStdin, ExitStatus, ExitWaiter, STDOUT_QUEUE,
};

/// The same parts as an [`ExecChannel`], over a Unix stream socket instead of an SSH channel.
pub fn unix_stream_channel(stream: tokio::net::UnixStream) -> ExecChannel {
    let (rd, wr) = stream.into_split();
    stream_channel(rd, wr)
}

/// The same parts as an [`ExecChannel`] over a reader and a writer: stdout is what `rd` yields,
/// stderr is empty, and the exit status is [`ExitStatus::Unreported`] once `rd` ends.
pub fn stream_channel<R, W>(mut rd: R, wr: W) -> ExecChannel
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::AsyncReadExt;
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
        stdin: ExecStdin::new(Box::new(wr), None, closed),
        stdout: ExecOutput::new(stdout_rx),
        stderr: ExecOutput::new(stderr_rx),
        exit: ExitWaiter::new(exit_rx, SocketAddr::from(([127, 0, 0, 1], 0))),
    }
}
