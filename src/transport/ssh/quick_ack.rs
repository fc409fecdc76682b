//! The TCP stream under an SSH connection: reads through a buffer of its own, acknowledging
//! every read from the socket at once.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream that re-arms `TCP_QUICKACK` after every read (Linux).
///
/// sshd keeps Nagle's algorithm on until a command starts, and right after
/// authentication it sends an unsolicited `hostkeys-00@openssh.com` request; its
/// reply to our first channel open then waits for our ACK of that request, which
/// Linux delays by 40 ms. Acknowledging at once removes that stall (first exec
/// measured 45–55 ms → 10–16 ms) and any like it later; the cost is one
/// `setsockopt` per read from the socket.
///
/// Reads are buffered ([`READ_BUFFER`]): russh reads each packet with two exact reads (its
/// first block, then the rest), straight from the stream, so without a buffer a bulk transfer
/// costs two `read`s and two `setsockopt`s per packet of at most 32–64 KiB. With it, one of each
/// per buffer-full of several packets.
pub(super) struct QuickAckStream {
    stream: TcpStream,
    #[cfg(target_os = "linux")]
    control: std::net::TcpStream,
    buf: Box<[u8]>,
    /// `buf[pos..len]` is read from the socket and not yet handed out.
    pos: usize,
    len: usize,
}

/// Bytes read from the socket at once, at most.
const READ_BUFFER: usize = 256 * 1024;

impl QuickAckStream {
    pub(super) fn new(stream: TcpStream) -> io::Result<Self> {
        #[cfg(target_os = "linux")]
        {
            // A second handle on the same socket, for setsockopt from poll_read.
            let std_stream = stream.into_std()?;
            let control = std_stream.try_clone()?;
            let stream = TcpStream::from_std(std_stream)?;
            let this = Self {
                stream,
                control,
                buf: vec![0; READ_BUFFER].into_boxed_slice(),
                pos: 0,
                len: 0,
            };
            this.quickack();
            Ok(this)
        }
        #[cfg(not(target_os = "linux"))]
        {
            Ok(Self {
                stream,
                buf: vec![0; READ_BUFFER].into_boxed_slice(),
                pos: 0,
                len: 0,
            })
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
        let this = &mut *self;
        if this.pos == this.len {
            if buf.remaining() >= this.buf.len() {
                // As big as ours: no point copying through it.
                let result = ready!(Pin::new(&mut this.stream).poll_read(cx, buf));
                this.quickack();
                return Poll::Ready(result);
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            let result = ready!(Pin::new(&mut this.stream).poll_read(cx, &mut rb));
            let filled = rb.filled().len();
            this.quickack();
            result?;
            this.pos = 0;
            this.len = filled;
        }
        let n = buf.remaining().min(this.len - this.pos);
        buf.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
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
