//! The separately owned parts of a running command's channel: stdin, stdout, stderr and the
//! exit status. An SSH channel feeds them through the demultiplexer; a local Unix socket
//! (`transport::stream_channel`) feeds the same parts directly.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use super::SshError;

/// Stdout chunks (≤ one SSH packet each) queued between the demultiplexer and the reader.
pub(crate) const STDOUT_QUEUE: usize = 32;
/// Stderr chunks queued before further stderr is dropped.
pub(crate) const STDERR_QUEUE: usize = 256;

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
    pub(crate) fn new(
        rx: oneshot::Receiver<Result<ExitStatus, SshError>>,
        addr: SocketAddr,
    ) -> Self {
        Self { rx, addr }
    }

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
    pub(crate) fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
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
    /// Dropped without `shutdown()`, the writer is shut down in a task of its own: a writer
    /// whose drop alone ends nothing (an engine exec's half of a connection whose other half
    /// still reads the command's output).
    shut_down_on_drop: bool,
}

impl fmt::Debug for ExecStdin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecStdin")
            .field("shut_down", &self.shut_down)
            .finish_non_exhaustive()
    }
}

impl ExecStdin {
    /// `dropped` (if any) is told when the writer is dropped without `shutdown()`.
    pub(crate) fn new(
        writer: Box<dyn AsyncWrite + Send + Unpin>,
        dropped: Option<oneshot::Sender<()>>,
        closed: Arc<ClosedSignal>,
    ) -> Self {
        Self {
            writer,
            dropped,
            shut_down: false,
            closed,
            shut_down_on_drop: false,
        }
    }

    /// A writer that must be shut down to end the command's input, also when dropped.
    pub(crate) fn shut_down_on_drop(
        writer: Box<dyn AsyncWrite + Send + Unpin>,
        closed: Arc<ClosedSignal>,
    ) -> Self {
        let mut stdin = Self::new(writer, None, closed);
        stdin.shut_down_on_drop = true;
        stdin
    }

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
        if !self.shut_down
            && self.shut_down_on_drop
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let mut writer: Box<dyn AsyncWrite + Send + Unpin> =
                std::mem::replace(&mut self.writer, Box::new(tokio::io::sink()));
            rt.spawn(async move {
                let _ = tokio::time::timeout(DROP_SHUTDOWN_TIMEOUT, writer.shutdown()).await;
            });
        }
    }
}

/// How long a dropped writer's shutdown may take (a connection that no longer takes bytes).
const DROP_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Set once the channel is gone; wakes a writer waiting for window space.
#[derive(Default)]
pub(crate) struct ClosedSignal {
    flag: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl ClosedSignal {
    /// Whether closed; if not, registers `cx` to be woken when it closes.
    pub(crate) fn is_closed(&self, cx: &mut Context<'_>) -> bool {
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

    pub(crate) fn close(&self) {
        self.flag.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
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
}
