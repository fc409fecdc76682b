//! Nix's framed byte streams (`FramedSink`/`FramedSource` in `src/libutil/serialise.hh`, the
//! same in 2.8, 2.26 and 2.35): repeated `u64 len` + `len` raw bytes (no padding), ended by a
//! frame of length 0. The worker protocol uses them for `AddToStoreNar` (≥1.23),
//! `AddMultipleToStore` and `AddBuildLog`.
//!
//! [`FramedReader`] reads the payload back and reports EOF at the terminator. The writing side,
//! `FramedWriter` (an [`AsyncWrite`] whose `finish` writes the terminator), is used by the
//! worker client's uploads and is not public.
//!
//! Both keep their progress inside the struct, so a future that drives them may be dropped at
//! any await point without corrupting the stream: a frame that was started is completed by the
//! next write, flush or `finish`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Default payload size of the frames [`FramedWriter`] emits.
pub(crate) const DEFAULT_FRAME_SIZE: usize = 256 * 1024;

/// Largest frame [`FramedReader`] accepts by default. Nix's own frames are the size of a
/// `BufferedSink` buffer (32 KiB); the limit only rejects garbage, since frames are streamed,
/// never allocated whole.
pub(crate) const DEFAULT_MAX_FRAME_LEN: u64 = 64 * 1024 * 1024;

/// An [`AsyncWrite`] that wraps everything written to it in frames.
///
/// Data is collected into frames of up to `frame_size` bytes; a full frame is written out on the
/// next write, a partial one on [`flush`](tokio::io::AsyncWriteExt::flush) (which then flushes the inner
/// writer). [`finish`](Self::finish) (or `shutdown`) writes any pending data and the `u64 0`
/// terminator and flushes, but does **not** shut down the inner writer, which usually carries
/// more protocol traffic afterwards.
///
/// An error from the inner writer poisons the `FramedWriter`: every later call fails with an
/// error of the same kind, and [`is_poisoned`](Self::is_poisoned) tells the caller that the
/// failure was on the inner writer rather than wherever its data came from.
#[derive(Debug)]
pub(crate) struct FramedWriter<W> {
    inner: W,
    frame_size: usize,
    /// Payload of the frame being assembled or written out.
    buf: Vec<u8>,
    /// `Some` while a frame (header + `buf`) is being written out.
    sending: Option<Sending>,
    /// The terminator has been queued (it may still be partly unwritten while `sending`).
    terminated: bool,
    poisoned: Option<(io::ErrorKind, String)>,
}

#[derive(Debug, Clone, Copy)]
struct Sending {
    header: [u8; 8],
    /// Bytes of `header` followed by `buf` already written.
    written: usize,
}

impl<W> FramedWriter<W> {
    pub fn new(inner: W) -> Self {
        Self::with_frame_size(inner, DEFAULT_FRAME_SIZE)
    }

    /// `frame_size` is clamped to at least 1 byte.
    pub(crate) fn with_frame_size(inner: W, frame_size: usize) -> Self {
        let frame_size = frame_size.max(1);
        FramedWriter {
            inner,
            frame_size,
            buf: Vec::with_capacity(frame_size.min(DEFAULT_FRAME_SIZE)),
            sending: None,
            terminated: false,
            poisoned: None,
        }
    }

    /// True once the inner writer has failed; the stream is then unusable.
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// True once the terminator has been queued by [`finish`](Self::finish) (it may not be
    /// fully written yet if that future was dropped; call `finish` again to complete it).
    pub(crate) fn is_terminated(&self) -> bool {
        self.terminated
    }

    fn poison_error(&self) -> Option<io::Error> {
        self.poisoned
            .as_ref()
            .map(|(kind, msg)| io::Error::new(*kind, format!("framed stream unusable: {msg}")))
    }
}

impl<W: AsyncWrite + Unpin> FramedWriter<W> {
    /// Writes pending data and the `u64 0` terminator, then flushes the inner writer. Calling it
    /// again (e.g. after the first call's future was dropped) completes the same terminator;
    /// it never writes a second one.
    pub async fn finish(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_finish(cx)).await
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.poison_error() {
            return Poll::Ready(Err(e));
        }
        if !self.terminated {
            // Complete the frame on the wire, then send out what is buffered, then queue 0.
            ready!(self.poll_send(cx))?;
            if !self.buf.is_empty() {
                self.start_frame();
                ready!(self.poll_send(cx))?;
            }
            self.terminated = true;
            self.sending = Some(Sending {
                header: [0; 8],
                written: 0,
            });
        }
        ready!(self.poll_send(cx))?;
        self.poll_inner_flush(cx)
    }

    /// Turns `buf` into the frame being sent.
    fn start_frame(&mut self) {
        debug_assert!(self.sending.is_none());
        self.sending = Some(Sending {
            header: (self.buf.len() as u64).to_le_bytes(),
            written: 0,
        });
    }

    /// Writes out the frame in `sending`, if any, and empties `buf`.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(mut s) = self.sending {
            let total = 8 + if self.terminated { 0 } else { self.buf.len() };
            if s.written >= total {
                self.sending = None;
                if !self.terminated {
                    self.buf.clear();
                }
                break;
            }
            let chunk = if s.written < 8 {
                &s.header[s.written..]
            } else {
                &self.buf[s.written - 8..]
            };
            match Pin::new(&mut self.inner).poll_write(cx, chunk) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "writer accepted no bytes");
                    self.poisoned = Some((e.kind(), e.to_string()));
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(n)) => {
                    s.written += n;
                    self.sending = Some(s);
                }
                Poll::Ready(Err(e)) => {
                    self.poisoned = Some((e.kind(), e.to_string()));
                    return Poll::Ready(Err(e));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_inner_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.inner).poll_flush(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => {
                self.poisoned = Some((e.kind(), e.to_string()));
                Poll::Ready(Err(e))
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for FramedWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.poison_error() {
            return Poll::Ready(Err(e));
        }
        if this.terminated {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write to a framed stream after its terminator",
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(this.poll_send(cx))?;
        let n = data.len().min(this.frame_size - this.buf.len());
        this.buf.extend_from_slice(&data[..n]);
        if this.buf.len() >= this.frame_size {
            // Sent by the next write, flush or finish; the data is accepted either way.
            this.start_frame();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.poison_error() {
            return Poll::Ready(Err(e));
        }
        ready!(this.poll_send(cx))?;
        if !this.terminated && !this.buf.is_empty() {
            this.start_frame();
            ready!(this.poll_send(cx))?;
        }
        this.poll_inner_flush(cx)
    }

    /// Same as [`FramedWriter::finish`]; the inner writer stays open.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_finish(cx)
    }
}

/// An [`AsyncRead`] over a framed stream: yields the frames' payload and reports EOF once the
/// zero-length terminator has been read. Nothing after the terminator is consumed.
///
/// A frame longer than the limit is an [`io::ErrorKind::InvalidData`] error; EOF of the inner
/// reader before the terminator is [`io::ErrorKind::UnexpectedEof`].
#[derive(Debug)]
pub struct FramedReader<R> {
    inner: R,
    max_frame_len: u64,
    /// Payload bytes left in the current frame.
    remaining: u64,
    header: [u8; 8],
    header_filled: usize,
    finished: bool,
}

impl<R> FramedReader<R> {
    /// Reads a framed stream from `inner`, refusing frames longer than 64 MiB.
    pub fn new(inner: R) -> Self {
        Self::with_max_frame_len(inner, DEFAULT_MAX_FRAME_LEN)
    }

    pub(crate) fn with_max_frame_len(inner: R, max_frame_len: u64) -> Self {
        FramedReader {
            inner,
            max_frame_len,
            remaining: 0,
            header: [0; 8],
            header_filled: 0,
            finished: false,
        }
    }

    /// True once the terminator has been read.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Direct access to the inner reader. Reading from it before the terminator has been read
    /// desynchronises the stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Gives back the inner reader, positioned wherever reading stopped.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: AsyncRead + Unpin> FramedReader<R> {
    /// Reads and discards everything up to and including the terminator, as Nix's
    /// `FramedSource` destructor does. Returns the number of payload bytes skipped.
    pub async fn drain(&mut self) -> io::Result<u64> {
        let mut sink = tokio::io::sink();
        tokio::io::copy(self, &mut sink).await
    }

    /// Reads the whole payload into memory, failing if it exceeds `max` bytes.
    pub async fn read_to_end_limited(&mut self, max: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let n = (&mut *self)
            .take(max as u64 + 1)
            .read_to_end(&mut out)
            .await?;
        if n > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("framed stream is longer than {max} bytes"),
            ));
        }
        Ok(out)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for FramedReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.finished || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.remaining == 0 {
                // Read (the rest of) a frame header.
                while this.header_filled < 8 {
                    let mut hb = ReadBuf::new(&mut this.header[this.header_filled..]);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut hb))?;
                    let n = hb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "framed stream ended before its terminator",
                        )));
                    }
                    this.header_filled += n;
                }
                this.header_filled = 0;
                let len = u64::from_le_bytes(this.header);
                if len == 0 {
                    this.finished = true;
                    return Poll::Ready(Ok(()));
                }
                if len > this.max_frame_len {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "frame of {len} bytes exceeds the limit of {}",
                            this.max_frame_len
                        ),
                    )));
                }
                this.remaining = len;
                continue;
            }
            let want = usize::try_from(this.remaining)
                .unwrap_or(usize::MAX)
                .min(buf.remaining());
            let mut sub = ReadBuf::new(buf.initialize_unfilled_to(want));
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut sub))?;
            let n = sub.filled().len();
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "framed stream ended in the middle of a frame",
                )));
            }
            buf.advance(n);
            this.remaining -= n as u64;
            return Poll::Ready(Ok(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Writes `data` as one framed stream (split into `frame_size` frames) plus terminator.
    /// Convenience for tests.
    async fn write_framed<W: AsyncWrite + Unpin>(
        w: &mut W,
        data: &[u8],
        frame_size: usize,
    ) -> io::Result<()> {
        let mut fw = FramedWriter::with_frame_size(w, frame_size);
        fw.write_all(data).await?;
        fw.finish().await
    }

    fn frames(data: &[u8], frame: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in data.chunks(frame) {
            out.extend_from_slice(&(c.len() as u64).to_le_bytes());
            out.extend_from_slice(c);
        }
        out.extend_from_slice(&0u64.to_le_bytes());
        out
    }

    #[tokio::test]
    async fn writer_emits_exact_frames() {
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        write_framed(&mut out, &data, 300).await.unwrap();
        assert_eq!(out, frames(&data, 300));
    }

    #[tokio::test]
    async fn empty_stream_is_just_the_terminator() {
        let mut out = Vec::new();
        let mut fw = FramedWriter::new(&mut out);
        fw.finish().await.unwrap();
        fw.finish().await.unwrap();
        assert!(fw.is_terminated());
        assert_eq!(out, 0u64.to_le_bytes());
    }

    #[tokio::test]
    async fn flush_emits_a_short_frame_and_no_padding() {
        let mut out = Vec::new();
        let mut fw = FramedWriter::new(&mut out);
        fw.write_all(b"abc").await.unwrap();
        fw.flush().await.unwrap();
        fw.write_all(b"de").await.unwrap();
        fw.finish().await.unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"abc");
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(b"de");
        want.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(out, want);
    }

    #[tokio::test]
    async fn write_after_finish_fails() {
        let mut out = Vec::new();
        let mut fw = FramedWriter::new(&mut out);
        fw.finish().await.unwrap();
        assert!(fw.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn reader_round_trip_and_stops_at_terminator() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let mut wire = frames(&data, 333);
        wire.extend_from_slice(b"TRAILER");
        let mut r = &wire[..];
        let mut fr = FramedReader::new(&mut r);
        let got = fr.read_to_end_limited(1 << 20).await.unwrap();
        assert_eq!(got, data);
        assert!(fr.is_finished());
        assert_eq!(r, b"TRAILER");
    }

    #[tokio::test]
    async fn reader_rejects_truncation_and_huge_frames() {
        let wire = frames(b"hello", 5);
        for cut in 0..wire.len() {
            let mut fr = FramedReader::new(&wire[..cut]);
            let err = fr.drain().await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
        let huge = u64::MAX.to_le_bytes();
        let err = FramedReader::new(&huge[..]).drain().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn dropped_writer_future_leaves_a_consistent_stream() {
        // A duplex with a tiny buffer makes writes pend half way through a frame.
        let (mut a, mut b) = tokio::io::duplex(16);
        let mut fw = FramedWriter::with_frame_size(&mut a, 10);
        let payload = vec![7u8; 95];
        // Write until it blocks, then drop that future.
        let r = tokio::time::timeout(std::time::Duration::from_millis(50), fw.write_all(&payload))
            .await;
        assert!(r.is_err(), "the tiny duplex should have blocked");
        let reader = tokio::spawn(async move {
            let mut fr = FramedReader::new(&mut b);
            fr.read_to_end_limited(1000).await
        });
        fw.finish().await.unwrap();
        let got = reader.await.unwrap().unwrap();
        // Whatever was accepted before the drop arrives intact, in whole frames.
        assert!(got.len() <= payload.len());
        assert!(got.iter().all(|&x| x == 7));
    }
}
