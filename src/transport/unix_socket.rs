//! A local Unix stream socket (a local builder's daemon socket) as the same separately owned
//! parts as an SSH command's channel, so the daemon client runs over either unchanged.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::ssh::{
    ClosedSignal, ExecChannel, ExecOutput, ExecStdin, ExitStatus, ExitWaiter, STDOUT_QUEUE,
};

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
        stdin: ExecStdin::new(Box::new(wr), None, closed),
        stdout: ExecOutput::new(stdout_rx),
        stderr: ExecOutput::new(stderr_rx),
        exit: ExitWaiter::new(exit_rx, SocketAddr::from(([127, 0, 0, 1], 0))),
    }
}
