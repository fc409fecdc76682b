//! Writing to the calling Nix: replies and `@nix` JSON lines on fd 2 (fd 1 is the same pipe),
//! the build log on fd 4 (the builder's raw bytes: see `remote_build::build_log`). After
//! `# accept` Nix drops plain text on fd 2, so everything the user should see is either an
//! `@nix` message or a log line on fd 4. Nix trusts `@nix` lines on fd 2 (any activity), so
//! nothing a builder wrote is ever written there.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::Mutex;

use hook_protocol::hook::Reply;
use hook_protocol::log::{ActivityIds, LogLine};

/// Lines kept for the failure message's tail.
const TAIL_LINES: usize = 25;

pub struct Parent {
    /// fd 2. Unbuffered: every line goes out in one write so lines never interleave.
    err: Mutex<std::io::Stderr>,
    /// fd 4, the build log; absent when run by hand.
    log: Mutex<Option<File>>,
    pub ids: ActivityIds,
    tail: Mutex<std::collections::VecDeque<String>>,
    /// Nix ≥ 2.26 understands the `parent` field; harmless to omit on every version.
    log_bytes: std::sync::atomic::AtomicU64,
}

impl Parent {
    pub fn new() -> Parent {
        // fd 4 is the build-log pipe the parent set up for us; if it is not open (run by
        // hand), log lines are only kept for the tail.
        // SAFETY: fcntl(F_GETFD) just probes the descriptor.
        let log = (unsafe { libc::fcntl(4, libc::F_GETFD) } != -1)
            // SAFETY: fd 4 is open and nobody else in this process owns it.
            .then(|| unsafe { File::from_raw_fd(4) });
        // fd 5 is the read side of the same pipe, passed for the stock hook's ssh; unused.
        // SAFETY: closing a descriptor we never use; errors (not open) are harmless.
        unsafe {
            if libc::fcntl(5, libc::F_GETFD) != -1 {
                libc::close(5);
            }
        }
        Parent {
            err: Mutex::new(std::io::stderr()),
            log: Mutex::new(log),
            ids: ActivityIds::new(),
            tail: Mutex::new(Default::default()),
            log_bytes: Default::default(),
        }
    }

    /// A parent whose fd 4 is `log` (unit tests).
    #[cfg(test)]
    pub fn with_log(log: File) -> Parent {
        Parent {
            err: Mutex::new(std::io::stderr()),
            log: Mutex::new(Some(log)),
            ids: ActivityIds::new(),
            tail: Mutex::new(Default::default()),
            log_bytes: Default::default(),
        }
    }

    fn write_err(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut e = self.err.lock().unwrap_or_else(|p| p.into_inner());
        e.write_all(bytes)?;
        e.flush()
    }

    /// A reply to `try`; `# accept` and the machine line go out as one write.
    pub fn reply(&self, r: &Reply) -> std::io::Result<()> {
        self.write_err(&r.to_bytes())
    }

    pub fn send(&self, line: &LogLine) {
        if let Err(e) = self.write_err(line.to_line().as_bytes()) {
            tracing::warn!("cannot write to the parent: {e}");
        }
    }

    // Messages carry text a builder, an engine or a remote machine wrote (a build's error, an
    // engine's answer): made printable and bounded before they reach the user's terminal.

    pub fn warn(&self, msg: &str) {
        let msg = crate::printable::message(msg);
        tracing::warn!("{msg}");
        self.send(&LogLine::warn(&msg));
    }

    pub fn error(&self, msg: &str) {
        let msg = crate::printable::message(msg);
        tracing::error!("{msg}");
        self.send(&LogLine::error(&msg));
    }

    pub fn info(&self, msg: &str) {
        let msg = crate::printable::message(msg);
        tracing::info!("{msg}");
        self.send(&LogLine::msg(hook_protocol::log::Verbosity::Info, &msg));
    }

    /// One build log line (without its newline) to fd 4, where Nix shows it under the
    /// derivation, stores it for `nix log` and keeps it for the error tail.
    pub fn build_log(&self, line: &str) {
        {
            let mut t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line.to_string());
        }
        self.log_bytes
            .fetch_add(line.len() as u64 + 1, std::sync::atomic::Ordering::Relaxed);
        let mut g = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = g.as_mut() {
            let mut buf = Vec::with_capacity(line.len() + 1);
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            if f.write_all(&buf).is_err() {
                *g = None;
            }
        }
    }

    /// The builder's raw output, unchanged, to fd 4: Nix splits it into lines, handles `@nix`
    /// lines as untrusted and stores the bytes for `nix log`, exactly as for a local builder.
    pub fn build_log_bytes(&self, bytes: &[u8]) {
        self.log_bytes
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut g = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = g.as_mut()
            && f.write_all(bytes).is_err()
        {
            *g = None;
        }
    }

    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn log_bytes(&self) -> u64 {
        self.log_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Default for Parent {
    fn default() -> Self {
        Self::new()
    }
}
