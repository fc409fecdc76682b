//! Copy progress as Nix's own copies report it, so `nix build`'s progress bar ("N copied
//! (x/y MiB)") and nix-output-monitor show the hook's copies: one `actCopyPaths` activity whose
//! expected `actCopyPath` total is the bytes to copy and whose progress counts paths, and one
//! `actCopyPath` activity per path whose progress counts its bytes (`copyPaths` and
//! `copyStorePath` in `src/libstore/store-api.cc`). A builder image's pull is shown the way Nix
//! shows its downloads: one `actFileTransfer` activity whose progress is the bytes.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hook_protocol::log::{ActivityType, LogLine};
use tokio::io::AsyncWrite;

use super::parent::Parent;

/// A path's byte progress goes out at most once per this many bytes.
const PROGRESS_STEP: u64 = 1 << 20;

/// One copy of several paths between two stores. Shared by parallel streams.
pub struct CopyProgress<'a> {
    parent: &'a Parent,
    act: u64,
    from: String,
    to: String,
    paths: u64,
    paths_done: AtomicU64,
    started: Instant,
    /// When a byte last moved or a path was last finished, in ms since `started`.
    moved_ms: AtomicU64,
}

impl<'a> CopyProgress<'a> {
    /// Starts the `actCopyPaths` activity for `paths` paths of `bytes` NAR bytes in all.
    pub fn start(
        parent: &'a Parent,
        text: String,
        from: &str,
        to: &str,
        paths: u64,
        bytes: u64,
    ) -> Self {
        let act = parent.ids.next_id();
        parent.send(&LogLine::start_copy_paths(act, text));
        parent.send(&LogLine::result_set_expected(
            act,
            ActivityType::CopyPath,
            bytes,
        ));
        parent.send(&LogLine::result_progress(act, 0, paths, 0, 0));
        CopyProgress {
            parent,
            act,
            from: from.to_string(),
            to: to.to_string(),
            paths,
            paths_done: AtomicU64::new(0),
            started: Instant::now(),
            moved_ms: AtomicU64::new(0),
        }
    }

    fn moved(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.moved_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `limit` (no byte of any path, no path finished):
    /// a copy whose other end stopped reading or answering without closing (nothing else
    /// notices: the container runs, the engine answers).
    pub async fn stalled(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.moved_ms.load(Ordering::Relaxed));
            let quiet = self.started.elapsed().saturating_sub(last);
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    }

    /// Starts the `actCopyPath` activity of one path.
    pub fn path(&self, path: &str, nar_size: u64) -> PathProgress<'_> {
        let id = self.parent.ids.next_id();
        self.parent.send(&LogLine::start_copy_path(
            id,
            path,
            self.from.as_str(),
            self.to.as_str(),
        ));
        PathProgress {
            copy: self,
            id,
            nar_size,
            done: 0,
            reported: 0,
            finished: false,
        }
    }
}

impl Drop for CopyProgress<'_> {
    fn drop(&mut self) {
        self.parent.send(&LogLine::stop(self.act));
    }
}

/// One path being copied; stops its activity when dropped.
pub struct PathProgress<'c> {
    copy: &'c CopyProgress<'c>,
    id: u64,
    nar_size: u64,
    done: u64,
    reported: u64,
    finished: bool,
}

impl PathProgress<'_> {
    /// `n` more bytes of this path went out.
    pub fn advance(&mut self, n: u64) {
        self.copy.moved();
        self.done += n;
        if self.done - self.reported >= PROGRESS_STEP {
            self.reported = self.done;
            self.copy.parent.send(&LogLine::result_progress(
                self.id,
                self.done,
                self.nar_size,
                0,
                0,
            ));
        }
    }

    /// The whole path arrived: its progress is complete and the copy counts one more path.
    pub fn finish(mut self) {
        self.finished = true;
        let p = self.copy;
        p.moved();
        p.parent.send(&LogLine::result_progress(
            self.id,
            self.nar_size,
            self.nar_size,
            0,
            0,
        ));
        let done = p.paths_done.fetch_add(1, Ordering::Relaxed) + 1;
        p.parent
            .send(&LogLine::result_progress(p.act, done, p.paths, 0, 0));
    }
}

impl Drop for PathProgress<'_> {
    fn drop(&mut self) {
        if !self.finished {
            tracing::debug!(id = self.id, "copy of a path ended unfinished");
        }
        self.copy.parent.send(&LogLine::stop(self.id));
    }
}

/// An [`AsyncWrite`] that reports what passes through it to a [`PathProgress`].
pub struct CountingWriter<'w, 'p, W: ?Sized> {
    pub inner: &'w mut W,
    pub progress: &'w mut PathProgress<'p>,
}

impl<W: AsyncWrite + Unpin + ?Sized> AsyncWrite for CountingWriter<'_, '_, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.progress.advance(n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// A builder image's pull as an `actFileTransfer` activity (bytes done/expected, summed over the
/// image's layers), so `nix build`'s bar shows "x/y MiB DL" and nix-output-monitor a download.
pub struct PullProgress<'a> {
    parent: &'a Parent,
    /// The activity while the pull runs, and the bytes last reported.
    state: Mutex<Option<(u64, u64, u64)>>,
}

impl<'a> PullProgress<'a> {
    pub fn new(parent: &'a Parent) -> Self {
        PullProgress {
            parent,
            state: Mutex::new(None),
        }
    }
}

impl crate::builder::PullObserver for PullProgress<'_> {
    fn start(&self, image: &str, platform: Option<&str>) {
        let id = self.parent.ids.next_id();
        let text = match platform {
            Some(p) => format!("pulling builder image '{image}' ({p})"),
            None => format!("pulling builder image '{image}'"),
        };
        self.parent
            .send(&LogLine::start_file_transfer(id, text, image));
        if let Ok(mut s) = self.state.lock() {
            *s = Some((id, 0, 0));
        }
    }

    fn progress(&self, done: u64, expected: u64) {
        let Ok(mut s) = self.state.lock() else { return };
        let Some((id, last_done, last_expected)) = s.as_mut() else {
            return;
        };
        // At most one line per PROGRESS_STEP bytes, but always when more layers are expected
        // and at the end.
        if expected != *last_expected
            || done >= last_done.saturating_add(PROGRESS_STEP)
            || done == expected
        {
            *last_done = done;
            *last_expected = expected;
            self.parent
                .send(&LogLine::result_progress(*id, done, expected, 0, 0));
        }
    }

    fn stop(&self) {
        if let Ok(mut s) = self.state.lock()
            && let Some((id, ..)) = s.take()
        {
            self.parent.send(&LogLine::stop(id));
        }
    }
}
