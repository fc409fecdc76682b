//! The build log of a remote build, handed to the calling Nix exactly as a local builder's.
//!
//! **What Nix does with a local builder's output** (`DerivationGoal::handleChildOutput` and
//! `flushLine` in 2.8 and 2.26, `BuildLog` in 2.34). The builder writes into a pty in raw mode
//! (`cfmakeraw`, so no byte is translated). For every chunk read, the parent
//! 1. counts it against `max-build-log-size`;
//! 2. appends the **raw bytes** to the derivation's log file (`nix log`, `nix-store --read-log`);
//! 3. splits lines: `\r` sets the write position back to column 0 so later bytes overwrite the
//!    line (2.8/2.26 keep the old line's longer tail: `long\rab\n` is `abng`; 2.34 cuts the line
//!    at the position: `ab`), `\n` ends a line; a partial last line is flushed at the end;
//! 4. hands each finished line to `handleJSONLogMessage(…, trusted = false)`: a line that starts
//!    with `@nix ` is parsed as JSON (a parse failure prints `bad JSON log message from builder`
//!    and the line is then a normal log line). Untrusted, only `start` of activity type 101
//!    (`actFileTransfer`) creates an activity (child of the build's), `stop`/`result` act on
//!    those, `setPhase` sets the phase of the build activity, `msg` is logged at its level.
//!    A 2.8 parent lets JSON type errors escape; 2.26 and 2.34 warn. Every other line becomes a
//!    `resBuildLogLine` result on the build's `actBuild` activity and enters the error tail.
//!
//! A hook's **fd 4** is read by the very same code (`isReadDesc`), so raw bytes written there are
//! handled exactly like a local builder's. Its **fd 2** is different: `@nix` lines there are
//! handled with `trusted = true` (any activity type), and a `result` of type 101 or 104 there
//! is also written to the log file. So nothing a builder wrote may ever reach fd 2.
//!
//! **What a remote (builder) daemon does before anything reaches the hook.** Its own
//! `handleChildOutput` already did steps 2–4 with *its* Nix version: the hook receives the
//! processed lines as `STDERR_RESULT` type 101 on the remote `actBuild`, the builder's `@nix msg`
//! lines and the daemon's "bad JSON" complaints as `STDERR_NEXT` (indistinguishable from the
//! daemon's own messages), its type-101 activities as `STDERR_START_ACTIVITY`, and `setPhase` as
//! `STDERR_RESULT` type 104. Overwritten text and the `@nix` lines themselves are gone. Relaying
//! those events (as nixdock did) therefore cannot be exact: `a\rb\n` was logged as `b`, and a line
//! starting with `@nix ` went through JSON handling twice (on the builder and again in the
//! calling Nix from fd 4), so bad JSON was reported twice, once as a log line.
//!
//! **So the hook relays the raw bytes**: the builder's daemon keeps them in its log file (this
//! connection sets `keep-build-log = true` and `compress-build-log = false`), and the hook
//! copies that file unchanged to fd 4. The calling Nix then does steps 1–4 itself, as for a
//! local build. The daemon's processed events are only used to know that the builder ran (the
//! remote `actBuild` started, so its log file was truncated and is rewritten for this build), to
//! keep `max-silent-time`, and as a last resort when the file cannot be read (those lines then
//! go to fd 4 too, so still untrusted).
//!
//! **Live, and still exact** ([`Live`]). Once the remote `actBuild` started, the file is
//! followed while the build runs: in a local builder's volume it is opened beneath the volume
//! and polled every [`POLL`]; over SSH one `tail -c +1 -f` runs in the builder (ended through its
//! standard input when the build is over). Each newly appended byte range goes to fd 4 and
//! `forwarded` counts it. When `BuildDerivation` returns, the daemon has closed (so flushed) the
//! file: the rest is read from `forwarded` to the file's size then, so every byte is written
//! once and in order, whatever stopped the following. A file that shrank below `forwarded` or
//! was replaced ends the relay with a warning (nothing is written twice); if nothing of it could
//! be read, the daemon's lines are the fallback. The builder's Nix writes the file through a
//! 32 KiB buffer (`FdSink`), so a chatty build's log arrives in 32 KiB steps and a quiet build's
//! when it ends. A user's own machine is read with `nix-store --read-log` when the build ends.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use hook_protocol::store_path::StorePath;
use hook_protocol::worker::{ActivityType, Code, Field, LogEvent, ResultType};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::hook::parent::Parent;
use crate::transport::ssh::{ExecChannel, ExitStatus, SshError};
use crate::transport::{Link, LinkError, Reopen};

/// Lines kept from the daemon's events for when the raw log cannot be read.
const FALLBACK_BYTES: usize = 4 << 20;
/// Longest wait for the next piece of the raw log once the build is over.
const READ_IDLE: Duration = Duration::from_secs(60);
/// How often a local builder's log file is looked at while the build runs.
const POLL: Duration = Duration::from_millis(150);
/// The most read (and written to fd 4) at once.
const CHUNK: usize = 64 * 1024;
/// The log's end, read after the build, must come at least this fast (bytes per second)
/// once [`READ_IDLE`] has passed.
const MIN_REST_RATE: u64 = 64 * 1024;
/// The most of a log read after the build (the builder enforces `max-build-log-size` when the
/// caller sets it; this bounds it when not).
const MAX_REST: u64 = 1 << 30;
/// The builder's Nix keeps its logs here (`NIX_LOG_DIR`); its `/nix` is the builder's volume.
const REMOTE_LOG_DIR: &str = "/nix/var/log/nix";

/// Settings sent with the build so that the builder's daemon keeps the raw log uncompressed.
/// A daemon that does not trust us ignores them with a warning (a user's own machine): its
/// `nix-store --read-log` reads a compressed log too.
pub(super) const OVERRIDES: [(&str, &str); 2] =
    [("keep-build-log", "true"), ("compress-build-log", "false")];

/// What the daemon's events during `BuildDerivation` tell about the log.
#[derive(Debug, Default)]
pub(super) struct Capture {
    /// The remote `actBuild` activity, once the builder was started.
    build_act: Option<u64>,
    /// The build's log lines as the builder's Nix split them (newest kept), for the fallback.
    lines: VecDeque<String>,
    bytes: usize,
    dropped: bool,
    /// The build directory the builder's Nix kept (`--keep-failed`), as it said in a note to
    /// the daemon connection; display only (see `hook::kept_dir`).
    pub(super) kept_dir: Option<String>,
}

impl Capture {
    pub(super) fn event(&mut self, ev: &LogEvent) {
        match ev {
            LogEvent::StartActivity {
                id,
                typ: Code::Known(ActivityType::Build),
                ..
            } => {
                self.build_act.get_or_insert(*id);
            }
            LogEvent::Result {
                id,
                typ: Code::Known(ResultType::BuildLogLine),
                fields,
            } if Some(*id) == self.build_act => {
                if let Some(Field::Str(line)) = fields.first() {
                    self.bytes += line.len() + 1;
                    self.lines.push_back(line.clone());
                    while self.bytes > FALLBACK_BYTES {
                        let Some(old) = self.lines.pop_front() else {
                            break;
                        };
                        self.bytes -= old.len() + 1;
                        self.dropped = true;
                    }
                }
            }
            // The builder's `@nix msg` lines and the daemon's own notes: the former are in the
            // raw log (Nix shows them from there), the latter are not the build's output.
            LogEvent::Next(msg) => {
                tracing::debug!(message = %msg, "builder daemon says");
                // The last one: the daemon's own note comes after the builder has exited, so
                // a build printing a fake one earlier does not hide it.
                if let Some(dir) = crate::hook::kept_dir::parse_note(msg) {
                    self.kept_dir = Some(dir);
                }
            }
            _ => {}
        }
    }

    /// Whether the builder was started, so a log of this build exists.
    pub(super) fn started(&self) -> bool {
        self.build_act.is_some()
    }
}

/// Where the raw log can be read.
#[derive(Clone)]
enum Source {
    /// A local builder: the file inside its `/nix` volume on this host, followed while the
    /// build runs.
    Volume(PathBuf),
    /// A builder container over SSH: the file at this path there, followed while the build
    /// runs.
    Container(String),
    /// A user's machine: a command whose standard output is the whole log, run when the build
    /// is over.
    ReadLog(String),
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Reads the log file at `path` from a 1-based offset given as the first line of its standard
/// input: its size (one line), then the bytes from there. Started before the offset is known
/// (on an engine's exec, beside the build); no offset, no reading.
fn rest_command(path: &str) -> String {
    let q = shell_quote(path);
    format!(
        "IFS= read -r n || exit 0; case $n in ''|*[!0-9]*) exit 64 ;; esac; wc -c < {q} && tail -c +\"$n\" -- {q}"
    )
}

/// The log file's components beneath the builder's `/nix`.
fn log_components(drv: &StorePath) -> Vec<String> {
    let mut comps: Vec<String> = ["var", "log", "nix"].map(String::from).into();
    comps.extend(hook_protocol::log::build_log_rel_path(drv));
    comps
}

fn source_for(reopen: &Reopen, drv: &StorePath) -> Option<Source> {
    match reopen {
        Reopen::LocalSocket { volume, .. } => Some(Source::Volume(volume.clone())),
        // A builder container writes it uncompressed (we are trusted there).
        Reopen::Builder => Some(Source::Container(format!(
            "{REMOTE_LOG_DIR}/{}",
            hook_protocol::log::build_log_rel_path(drv).join("/")
        ))),
        // A user's machine: `<dir>/nix-daemon --stdio [--store X]` becomes
        // `<dir>/nix-store [--store X] --read-log <drv>`, which also reads a `.bz2` log.
        Reopen::Exec(command) => {
            let (program, rest) = command.split_once(" --stdio")?;
            let nix_store = match program.strip_suffix("nix-daemon") {
                Some(dir) if dir.is_empty() || dir.ends_with('/') => format!("{dir}nix-store"),
                _ => "nix-store".to_owned(),
            };
            Some(Source::ReadLog(format!(
                "{nix_store}{rest} --read-log {}",
                shell_quote(&drv.to_absolute())
            )))
        }
    }
}

/// Opens `<root>/<components…>` for reading without following a symlink or leaving `root`
/// (the volume's content is the container's to shape); the last must be a regular file.
fn open_beneath(root: &Path, components: &[&str]) -> std::io::Result<std::fs::File> {
    use crate::fs_beneath::{Want, open_beneath, open_root};
    use std::os::fd::AsFd;
    let dir = open_root(root)?;
    let rel: PathBuf = components.iter().collect();
    Ok(std::fs::File::from(open_beneath(
        dir.as_fd(),
        &rel,
        Want::File,
    )?))
}

#[cfg(unix)]
fn file_id(f: &std::fs::File) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_f: &std::fs::File) -> std::io::Result<(u64, u64)> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// What one look at the followed file found.
enum Chunk {
    Data(Vec<u8>),
    /// Nothing new yet.
    Nothing,
}

/// Reads what the file holds at `offset` (at most [`CHUNK`] bytes). A file now shorter than
/// `offset` was truncated or rewritten: its bytes are no longer the ones forwarded.
#[cfg(unix)]
fn read_chunk(f: &std::fs::File, offset: u64) -> std::io::Result<Chunk> {
    use std::os::unix::fs::FileExt;
    let size = f.metadata()?.len();
    if size < offset {
        return Err(std::io::Error::other(format!(
            "the log file shrank to {size} bytes after {offset} were shown"
        )));
    }
    let want = usize::try_from(size - offset).unwrap_or(CHUNK).min(CHUNK);
    if want == 0 {
        return Ok(Chunk::Nothing);
    }
    let mut buf = vec![0u8; want];
    let n = f.read_at(&mut buf, offset)?;
    buf.truncate(n);
    Ok(if n == 0 {
        Chunk::Nothing
    } else {
        Chunk::Data(buf)
    })
}

#[cfg(not(unix))]
fn read_chunk(_f: &std::fs::File, _offset: u64) -> std::io::Result<Chunk> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// A remote build's raw log on its way to fd 4: followed while the build runs
/// ([`Live::follow`]), then read to its end ([`Live::finish`]). `forwarded` counts the bytes
/// written to fd 4, so each byte of the file is written once, in order: whatever stops the
/// following, the end read continues at that offset.
pub(super) struct Live<'a> {
    parent: &'a Parent,
    session: Option<&'a Link>,
    builder: &'a str,
    drv: &'a StorePath,
    source: Option<Source>,
    forwarded: u64,
    /// `(dev, ino)` of the file followed in a local builder's volume, to notice at the end
    /// that the path now names another file.
    followed: Option<(u64, u64)>,
    /// Through an engine's exec (each command a process start in the container, ~50 ms on a
    /// remote engine) or a holder (a round trip more): the end read's command, started beside
    /// the build and waiting for its offset on standard input ([`rest_command`]).
    rest_reader: Option<tokio::task::JoinHandle<Result<ExecChannel, LinkError>>>,
}

impl<'a> Live<'a> {
    pub(super) fn new(
        parent: &'a Parent,
        session: Option<&'a Link>,
        reopen: &Reopen,
        builder: &'a str,
        drv: &'a StorePath,
    ) -> Self {
        let source = source_for(reopen, drv);
        // Dropped unused (no build started, the build failed), its input ends and so does the
        // command, before it read anything.
        let rest_reader = match (session, &source) {
            (Some(Link::Engine(exec)), Some(Source::Container(path))) => {
                let (exec, command) = (exec.clone(), rest_command(path));
                Some(tokio::spawn(async move {
                    exec.exec(&command).await.map_err(LinkError::from)
                }))
            }
            (Some(Link::Holder(held)), Some(Source::Container(path))) => {
                let (held, command) = (held.clone(), rest_command(path));
                Some(tokio::spawn(async move {
                    held.exec(&command).await.map_err(LinkError::from)
                }))
            }
            _ => None,
        };
        Live {
            parent,
            session,
            builder,
            drv,
            source,
            forwarded: 0,
            followed: None,
            rest_reader,
        }
    }

    fn forward(&mut self, bytes: &[u8]) {
        self.parent.build_log_bytes(bytes);
        self.forwarded += bytes.len() as u64;
    }

    /// Follows the log while the build runs; never returns (it is dropped when the build
    /// ends, which also ends a remote follower). Starts once the builder's daemon started the
    /// build, as its log file was truncated and is being rewritten for this build from then on.
    pub(super) async fn follow(&mut self, cap: &std::sync::Mutex<Capture>) -> Infallible {
        while !cap.lock().unwrap_or_else(|p| p.into_inner()).started() {
            tokio::time::sleep(POLL).await;
        }
        let r = match self.source.clone() {
            Some(Source::Volume(root)) => self.follow_volume(&root).await,
            Some(Source::Container(path)) => self.follow_container(&path).await,
            Some(Source::ReadLog(_)) | None => Ok(()),
        };
        if let Err(why) = r {
            // The end read takes over from the forwarded offset, and says what is missing.
            tracing::debug!(drv = %self.drv, forwarded = self.forwarded, "stopped following the build log: {why}");
        }
        std::future::pending().await
    }

    /// Polls the file in the builder's volume (opened beneath it, a regular file).
    async fn follow_volume(&mut self, root: &Path) -> Result<(), LogError> {
        let comps = log_components(self.drv);
        let comps: Vec<&str> = comps.iter().map(String::as_str).collect();
        let file = loop {
            match open_beneath(root, &comps) {
                Ok(f) => break Arc::new(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tokio::time::sleep(POLL).await
                }
                Err(e) => return Err(LogError::Open(e)),
            }
        };
        let id = file_id(&file)?;
        if self.followed.is_some_and(|old| old != id) {
            return Err(LogError::Replaced);
        }
        self.followed = Some(id);
        loop {
            let (f, offset) = (file.clone(), self.forwarded);
            let chunk = tokio::task::spawn_blocking(move || read_chunk(&f, offset)).await??;
            match chunk {
                Chunk::Data(bytes) => self.forward(&bytes),
                Chunk::Nothing => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// One remote `tail -f` from the first byte. Its input is held open: when this future is
    /// dropped, the input's EOF ends the `cat`, which ends the `tail` (a connection that dies
    /// closes the input too), so no follower is left behind in the builder.
    async fn follow_container(&mut self, path: &str) -> Result<(), LogError> {
        let session = self.session.ok_or(LogError::NoSession)?;
        let command = format!(
            "tail -c +1 -f -- {} & t=$!; cat >/dev/null; kill $t",
            shell_quote(path)
        );
        let ExecChannel {
            stdin: _stdin,
            mut stdout,
            stderr,
            exit: _exit,
        } = session
            .exec(&command)
            .await
            .map_err(|source| LogError::Exec { command, source })?;
        drop(stderr);
        let mut buf = vec![0u8; CHUNK];
        loop {
            match stdout.read(&mut buf).await {
                Ok(0) => return Err(LogError::FollowerEnded),
                Ok(n) => self.forward(&buf[..n]),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// After `BuildDerivation` returned: the rest of the raw log to fd 4, or, if none of it
    /// could be had, the lines the builder's daemon sent (still through fd 4, so still handled
    /// as untrusted builder output).
    pub(super) async fn finish(mut self, cap: Capture) {
        if !cap.started() {
            return;
        }
        match self.read_rest().await {
            Ok(()) => {}
            Err(why) if self.forwarded > 0 => self.parent.warn(&format!(
                "the build log of '{}' on '{}' is incomplete: {why}",
                self.drv, self.builder
            )),
            Err(why) => {
                self.parent.warn(&format!(
                    "the exact build log of '{}' is not available from '{}' ({why}); showing \
                     the lines as the builder's Nix split them",
                    self.drv, self.builder
                ));
                fallback(self.parent, cap);
            }
        }
    }

    /// The build did not end normally (the watchdog stopped it, or the builder was lost): the
    /// builder may still be writing, so nothing more is read. If nothing of the raw log was
    /// shown yet, the daemon's lines are.
    pub(super) fn abandon(self, cap: Capture) {
        if self.forwarded == 0 {
            fallback(self.parent, cap);
        }
    }

    /// Everything from the forwarded offset to the end. The builder's daemon closed (and so
    /// flushed) the file before it answered, so its size now is the log's.
    async fn read_rest(&mut self) -> Result<(), LogError> {
        match self.source.clone() {
            None => Err(LogError::NoSource),
            Some(Source::Volume(root)) => {
                let comps = log_components(self.drv);
                let comps: Vec<&str> = comps.iter().map(String::as_str).collect();
                let file = open_beneath(&root, &comps).map_err(LogError::Open)?;
                if self.forwarded > 0 && self.followed != file_id(&file).ok() {
                    return Err(LogError::Replaced);
                }
                let size = file.metadata()?.len();
                if size < self.forwarded {
                    return Err(LogError::ShrankTo {
                        size,
                        shown: self.forwarded,
                    });
                }
                // The container writes the file: a sparse one can claim any size.
                if size - self.forwarded > MAX_REST {
                    return Err(LogError::TooLong);
                }
                let file = Arc::new(file);
                while self.forwarded < size {
                    let (f, offset) = (file.clone(), self.forwarded);
                    let chunk =
                        tokio::task::spawn_blocking(move || read_chunk(&f, offset)).await??;
                    match chunk {
                        Chunk::Data(mut bytes) => {
                            // Not past the size it had when the build ended.
                            bytes.truncate(usize::try_from(size - offset).unwrap_or(usize::MAX));
                            self.forward(&bytes)
                        }
                        Chunk::Nothing => return Err(LogError::Shrank),
                    }
                }
                Ok(())
            }
            Some(Source::Container(path)) => {
                // Its size first (one line), then the bytes not shown yet.
                let command = rest_command(&path);
                let from = self.forwarded.saturating_add(1);
                // Its exit status tells nothing more: the bytes are counted.
                let ch = match self.rest_reader.take() {
                    Some(started) => started.await?.map_err(|source| LogError::Exec {
                        command: command.clone(),
                        source,
                    })?,
                    None => self.exec_channel(&command).await?,
                };
                let mut stdin = ch.stdin;
                stdin.write_all(format!("{from}\n").as_bytes()).await?;
                stdin.shutdown().await?;
                let mut out = tokio::io::BufReader::new(ch.stdout);
                let mut line = Vec::new();
                tokio::time::timeout(READ_IDLE, (&mut out).take(32).read_until(b'\n', &mut line))
                    .await
                    .map_err(|_| LogError::NoAnswer(command.clone()))??;
                let size: u64 = std::str::from_utf8(&line)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| LogError::NoSize(command.clone()))?;
                if size < self.forwarded {
                    return Err(LogError::ShrankTo {
                        size,
                        shown: self.forwarded,
                    });
                }
                self.copy_exact(&mut out, size).await
            }
            Some(Source::ReadLog(command)) => {
                let ch = self.exec_channel(&command).await?;
                let (mut out, exit) = (tokio::io::BufReader::new(ch.stdout), ch.exit);
                self.copy_exact(&mut out, u64::MAX).await?;
                // No log there prints nothing: only the status tells.
                drop(out);
                match tokio::time::timeout(READ_IDLE, exit.wait()).await {
                    Ok(Ok(s)) if s.success() => Ok(()),
                    Ok(Ok(status)) => Err(LogError::Failed { command, status }),
                    Ok(Err(source)) => Err(LogError::Wait { command, source }),
                    Err(_) => Err(LogError::NotEnded(command)),
                }
            }
        }
    }

    async fn exec_channel(&self, command: &str) -> Result<ExecChannel, LogError> {
        let session = self.session.ok_or(LogError::NoSession)?;
        session
            .exec(command)
            .await
            .map_err(|source| LogError::Exec {
                command: command.to_string(),
                source,
            })
    }

    /// Copies from `r` until the forwarded offset reaches `end` (or `r` ends, when `end` is
    /// `u64::MAX`).
    async fn copy_exact<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        end: u64,
    ) -> Result<(), LogError> {
        let from = self.forwarded;
        copy_rest(r, from, end, |bytes| self.forward(bytes)).await
    }
}

/// Copies from `r` to `forward`, from offset `from` until `end` (or `r` ends, when `end` is
/// `u64::MAX`): within [`READ_IDLE`] of silence, [`MIN_REST_RATE`] on average beyond the first
/// [`READ_IDLE`], [`MAX_REST`] bytes at most.
async fn copy_rest<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    from: u64,
    end: u64,
    mut forward: impl FnMut(&[u8]),
) -> Result<(), LogError> {
    if end != u64::MAX && end.saturating_sub(from) > MAX_REST {
        return Err(LogError::TooLong);
    }
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut at = from;
    while at < end {
        let copied = at - from;
        if copied >= MAX_REST {
            return Err(LogError::TooLong);
        }
        // Every byte buys time at MIN_REST_RATE beyond the first READ_IDLE: a builder that
        // trickles its log cannot hold the hook for ever.
        let allowed = READ_IDLE + Duration::from_secs(copied / MIN_REST_RATE);
        let Some(left) = allowed.checked_sub(start.elapsed()) else {
            return Err(LogError::TooSlow);
        };
        let want = usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK);
        match tokio::time::timeout(READ_IDLE.min(left), r.read(&mut buf[..want])).await {
            Err(_) if left < READ_IDLE => return Err(LogError::TooSlow),
            Err(_) => return Err(LogError::Idle),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(0)) if end == u64::MAX => return Ok(()),
            Ok(Ok(0)) => return Err(LogError::EndedEarly { got: at, end }),
            Ok(Ok(n)) => {
                forward(&buf[..n]);
                at += n as u64;
            }
        }
    }
    Ok(())
}

/// Why the raw build log could not be followed, or read to its end (the hook then says so and
/// shows what it has).
#[derive(Debug, thiserror::Error)]
enum LogError {
    #[error("no way to read it from this builder")]
    NoSource,
    #[error("no link to the builder")]
    NoSession,
    #[error("opening it in the builder's volume: {0}")]
    Open(#[source] std::io::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
    #[error("the log file was replaced during the build")]
    Replaced,
    #[error("the log file shrank to {size} bytes after {shown} were shown")]
    ShrankTo { size: u64, shown: u64 },
    #[error("the log file shrank")]
    Shrank,
    #[error("running `{command}`: {source}")]
    Exec { command: String, source: LinkError },
    #[error("the remote follower ended")]
    FollowerEnded,
    #[error("no answer from `{0}`")]
    NoAnswer(String),
    #[error("`{0}` did not say the log's size")]
    NoSize(String),
    #[error("`{command}` failed: {status}")]
    Failed { command: String, status: ExitStatus },
    #[error("`{command}`: {source}")]
    Wait { command: String, source: SshError },
    #[error("`{0}` did not end")]
    NotEnded(String),
    #[error("no data for {} s", READ_IDLE.as_secs())]
    Idle,
    #[error("it came slower than {} KiB/s", MIN_REST_RATE >> 10)]
    TooSlow,
    #[error("more than {} MiB of it were left to read after the build", MAX_REST >> 20)]
    TooLong,
    #[error("it ended after {got} of {end} bytes")]
    EndedEarly { got: u64, end: u64 },
}

/// The lines the builder's daemon sent, when nothing better can be had.
pub(super) fn fallback(parent: &Parent, cap: Capture) {
    if cap.dropped {
        parent.warn("only the end of the build log is kept");
    }
    for line in cap.lines {
        parent.build_log(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hook_protocol::worker::Verbosity;

    fn line(id: u64, s: &str) -> LogEvent {
        LogEvent::Result {
            id,
            typ: ResultType::BuildLogLine.into(),
            fields: vec![Field::Str(s.into())],
        }
    }

    /// A reader that gives one byte, then waits `every`, for ever.
    struct Trickle {
        every: Duration,
        sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }

    impl tokio::io::AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let every = self.every;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
            std::task::ready!(sleep.as_mut().poll(cx));
            self.sleep = None;
            buf.put_slice(b"x");
            std::task::Poll::Ready(Ok(()))
        }
    }

    use std::future::Future;

    #[tokio::test(start_paused = true)]
    async fn a_log_end_that_trickles_is_given_up() {
        // A byte every 59 s never stays silent for READ_IDLE, but is far below the rate.
        let mut r = Trickle {
            every: Duration::from_secs(59),
            sleep: None,
        };
        let mut got = 0;
        let t = Instant::now();
        let e = copy_rest(&mut r, 0, 1 << 20, |b| got += b.len()).await;
        assert!(matches!(e, Err(LogError::TooSlow)), "{e:?}");
        assert_eq!(got, 1);
        assert!(t.elapsed() <= READ_IDLE + Duration::from_secs(1));
        // A silent one is idle; a whole one is copied.
        let (mut silent, _w) = tokio::io::duplex(16);
        let e = copy_rest(&mut silent, 0, 10, |_| {}).await;
        assert!(matches!(e, Err(LogError::Idle)), "{e:?}");
        let mut whole: &[u8] = b"0123456789";
        let mut out = Vec::new();
        copy_rest(&mut whole, 4, 10, |b| out.extend_from_slice(b))
            .await
            .unwrap();
        assert_eq!(out, b"012345");
        // A log end larger than any read is refused before reading.
        let e = copy_rest(&mut whole, 0, MAX_REST + 1, |_| panic!("read")).await;
        assert!(matches!(e, Err(LogError::TooLong)), "{e:?}");
    }

    #[test]
    fn capture_keeps_only_the_build_activitys_lines() {
        let mut c = Capture::default();
        c.event(&line(1, "before the build"));
        assert!(!c.started());
        c.event(&LogEvent::StartActivity {
            id: 5,
            level: Verbosity::Info,
            typ: ActivityType::Build.into(),
            text: "building".into(),
            fields: vec![],
            parent: 0,
        });
        c.event(&line(5, "built"));
        // A builder's own activity of another type, and the daemon's messages: not log lines.
        c.event(&line(9, "in a builder activity"));
        c.event(&LogEvent::Next("injected".into()));
        assert!(c.started());
        assert_eq!(Vec::from(c.lines), vec!["built".to_string()]);
    }

    #[test]
    fn capture_keeps_the_newest_lines_within_its_bound() {
        let mut c = Capture::default();
        c.event(&LogEvent::StartActivity {
            id: 1,
            level: Verbosity::Info,
            typ: ActivityType::Build.into(),
            text: String::new(),
            fields: vec![],
            parent: 0,
        });
        let big = "x".repeat(1 << 20);
        for i in 0..6 {
            c.event(&line(1, &format!("{i}{big}")));
        }
        assert!(c.dropped);
        assert!(c.bytes <= FALLBACK_BYTES);
        assert!(c.lines.back().unwrap().starts_with('5'));
    }

    #[test]
    fn log_path_is_nixs_layout() {
        let drv =
            StorePath::from_absolute("/nix/store/84kq5j53z5m4p7w8fckf5b810ys083ig-x.drv").unwrap();
        assert_eq!(
            hook_protocol::log::build_log_rel_path(&drv).join("/"),
            "drvs/84/kq5j53z5m4p7w8fckf5b810ys083ig-x.drv"
        );
    }

    /// The end read's command, run by the `sh` builders run it with: size, then the bytes from
    /// the offset it is given; nothing read without an offset; no number, no reading.
    #[cfg(unix)]
    #[test]
    fn rest_command_reads_from_the_offset_it_is_given() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("it's a log");
        std::fs::write(&log, b"0123\r\n@nix x").unwrap();
        let run = |stdin: &[u8]| {
            let mut c = std::process::Command::new("/bin/sh")
                .args(["-c", &rest_command(log.to_str().unwrap())])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            c.stdin.take().unwrap().write_all(stdin).unwrap();
            let o = c.wait_with_output().unwrap();
            (o.status.code(), o.stdout)
        };
        assert_eq!(run(b"1\n"), (Some(0), b"12\n0123\r\n@nix x".to_vec()));
        assert_eq!(run(b"5\n"), (Some(0), b"12\n\r\n@nix x".to_vec()));
        assert_eq!(run(b"13\n"), (Some(0), b"12\n".to_vec()));
        assert_eq!(run(b""), (Some(0), Vec::new()));
        assert_eq!(run(b"1; cat /etc/passwd\n"), (Some(64), Vec::new()));
    }

    #[cfg(unix)]
    #[test]
    fn open_beneath_refuses_symlinks_and_non_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        std::fs::write(d.path().join("a/f"), b"raw\r\n").unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("l")).unwrap();
        std::os::unix::fs::symlink("f", d.path().join("a/lf")).unwrap();
        let mut s = String::new();
        use std::io::Read;
        open_beneath(d.path(), &["a", "f"])
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "raw\r\n");
        assert!(open_beneath(d.path(), &["l", "passwd"]).is_err());
        assert!(open_beneath(d.path(), &["a", "lf"]).is_err());
        assert!(open_beneath(d.path(), &["a"]).is_err());
    }

    /// A local builder's volume in a temporary directory, its log file, and a parent whose
    /// fd 4 is a file.
    #[cfg(unix)]
    struct Bed {
        dir: tempfile::TempDir,
        reopen: Reopen,
        drv: StorePath,
        out: tempfile::NamedTempFile,
    }

    #[cfg(unix)]
    impl Bed {
        fn new() -> Bed {
            let dir = tempfile::tempdir().unwrap();
            let drv = StorePath::from_absolute("/nix/store/84kq5j53z5m4p7w8fckf5b810ys083ig-x.drv")
                .unwrap();
            let socket = dir.path().join("var/nix/daemon-socket/socket");
            Bed {
                reopen: Reopen::LocalSocket {
                    socket,
                    volume: dir.path().to_owned(),
                },
                drv,
                dir,
                out: tempfile::NamedTempFile::new().unwrap(),
            }
        }
        fn log(&self) -> PathBuf {
            self.dir
                .path()
                .join("var/log/nix/drvs/84/kq5j53z5m4p7w8fckf5b810ys083ig-x.drv")
        }
        fn append(&self, bytes: &[u8]) {
            use std::io::Write;
            std::fs::create_dir_all(self.log().parent().unwrap()).unwrap();
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log())
                .unwrap();
            f.write_all(bytes).unwrap();
        }
        fn parent(&self) -> Parent {
            Parent::with_log(self.out.reopen().unwrap())
        }
        fn shown(&self) -> Vec<u8> {
            std::fs::read(self.out.path()).unwrap()
        }
    }

    #[cfg(unix)]
    fn started() -> Capture {
        Capture {
            build_act: Some(1),
            ..Default::default()
        }
    }

    /// Follows a file that appears late and grows, then reads the rest: every byte once, in
    /// order, some of them before the build ended.
    #[cfg(unix)]
    #[tokio::test]
    async fn follows_the_local_log_then_reads_the_rest() {
        let bed = Bed::new();
        let parent = bed.parent();
        let cap = std::sync::Mutex::new(started());
        let mut live = Live::new(&parent, None, &bed.reopen, "b", &bed.drv);
        let writer = async {
            tokio::time::sleep(POLL * 2).await;
            bed.append(b"first\r");
            tokio::time::sleep(POLL * 3).await;
            bed.append(&vec![b'x'; 3 * CHUNK]);
            tokio::time::sleep(POLL * 3).await;
        };
        tokio::select! {
            never = live.follow(&cap) => match never {},
            () = writer => {}
        }
        assert_eq!(live.forwarded, 6 + 3 * CHUNK as u64);
        assert_eq!(bed.shown().len(), 6 + 3 * CHUNK);
        bed.append(b"\n@nix last");
        live.finish(cap.into_inner().unwrap()).await;
        let mut want = b"first\r".to_vec();
        want.extend(vec![b'x'; 3 * CHUNK]);
        want.extend(b"\n@nix last");
        assert_eq!(bed.shown(), want);
    }

    /// A log file that shrinks or is replaced after some of it was shown: nothing is shown
    /// twice and nothing of the other content is shown (the daemon's lines neither).
    #[cfg(unix)]
    #[tokio::test]
    async fn a_shrunk_or_replaced_log_is_never_shown_twice() {
        for replace in [false, true] {
            let bed = Bed::new();
            let parent = bed.parent();
            let cap = std::sync::Mutex::new(started());
            let mut live = Live::new(&parent, None, &bed.reopen, "b", &bed.drv);
            bed.append(b"shown once\n");
            let change = async {
                tokio::time::sleep(POLL * 4).await;
                assert_eq!(bed.shown(), b"shown once\n");
                if replace {
                    std::fs::remove_file(bed.log()).unwrap();
                    bed.append(b"another file, longer than the first\n");
                } else {
                    std::fs::write(bed.log(), b"new\n").unwrap();
                }
                tokio::time::sleep(POLL * 4).await;
            };
            tokio::select! {
                never = live.follow(&cap) => match never {},
                () = change => {}
            }
            let mut c = cap.into_inner().unwrap();
            c.event(&line(1, "from the daemon"));
            live.finish(c).await;
            assert_eq!(bed.shown(), b"shown once\n", "replaced: {replace}");
        }
    }

    /// Nothing of the raw log could be read: the daemon's lines are shown instead.
    #[cfg(unix)]
    #[tokio::test]
    async fn an_unreadable_log_falls_back_to_the_daemons_lines() {
        let bed = Bed::new();
        let parent = bed.parent();
        std::fs::create_dir_all(bed.log().parent().unwrap()).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", bed.log()).unwrap();
        let cap = std::sync::Mutex::new(started());
        let mut live = Live::new(&parent, None, &bed.reopen, "b", &bed.drv);
        tokio::select! {
            never = live.follow(&cap) => match never {},
            () = tokio::time::sleep(POLL * 3) => {}
        }
        let mut c = cap.into_inner().unwrap();
        c.event(&line(1, "from the daemon"));
        live.finish(c).await;
        assert_eq!(bed.shown(), b"from the daemon\n");
    }
}
