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
//! connection sets `keep-build-log = true` and `compress-build-log = false`), and once
//! `BuildDerivation` returns the hook copies that file unchanged to fd 4. The calling Nix then
//! does steps 1–4 itself, as for a local build. The daemon's processed events are only used to
//! know that the builder ran (the remote `actBuild` started, so its log file was truncated and
//! rewritten for this build), to keep `max-silent-time`, and as a last resort when the file
//! cannot be read (those lines then go to fd 4 too, so still untrusted). The price: the log
//! reaches Nix when the build ends, not line by line while it runs.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hook_protocol::store_path::StorePath;
use hook_protocol::worker::{Field, LogEvent, RES_BUILD_LOG_LINE};
use tokio::io::AsyncReadExt;

use crate::hook::parent::Parent;
use crate::transport::{RemoteStore, Reopen};

/// `ActivityType::actBuild`.
const ACT_BUILD: u64 = 105;
/// Lines kept from the daemon's events for when the raw log cannot be read.
const FALLBACK_BYTES: usize = 4 << 20;
/// Longest wait for the next piece of the raw log.
const READ_IDLE: Duration = Duration::from_secs(60);
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
}

impl Capture {
    pub(super) fn event(&mut self, ev: &LogEvent) {
        match ev {
            LogEvent::StartActivity { id, typ, .. } if *typ == ACT_BUILD => {
                self.build_act.get_or_insert(*id);
            }
            LogEvent::Result { id, typ, fields }
                if *typ == RES_BUILD_LOG_LINE && Some(*id) == self.build_act =>
            {
                if let Some(Field::String(line)) = fields.first() {
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
            LogEvent::Next(msg) => tracing::debug!(message = %msg, "builder daemon says"),
            _ => {}
        }
    }

    /// Whether the builder was started, so a log of this build exists.
    pub(super) fn started(&self) -> bool {
        self.build_act.is_some()
    }
}

/// Where the raw log can be read.
enum Source {
    /// A local builder: the file inside its `/nix` volume on this host.
    Volume(PathBuf),
    /// A command whose standard output is the log.
    Exec(String),
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn source_for(builder: &RemoteStore, drv: &StorePath) -> Option<Source> {
    let rel = hook_protocol::log::build_log_rel_path(drv).join("/");
    match &builder.reopen {
        // `<volume>/var/nix/daemon-socket/socket`: the volume is the builder's `/nix`.
        Reopen::LocalSocket(socket) => {
            let root = socket.ancestors().nth(4)?;
            let suffix = socket.strip_prefix(root).ok()?;
            (suffix == Path::new("var/nix/daemon-socket/socket"))
                .then(|| Source::Volume(root.to_path_buf()))
        }
        // A builder container writes it uncompressed (we are trusted there).
        Reopen::Builder => Some(Source::Exec(format!(
            "cat -- {}",
            shell_quote(&format!("{REMOTE_LOG_DIR}/{rel}"))
        ))),
        // A user's machine: `<dir>/nix-daemon --stdio [--store X]` becomes
        // `<dir>/nix-store [--store X] --read-log <drv>`, which also reads a `.bz2` log.
        Reopen::Exec(command) => {
            let (program, rest) = command.split_once(" --stdio")?;
            let nix_store = match program.strip_suffix("nix-daemon") {
                Some(dir) if dir.is_empty() || dir.ends_with('/') => format!("{dir}nix-store"),
                _ => "nix-store".to_owned(),
            };
            Some(Source::Exec(format!(
                "{nix_store}{rest} --read-log {}",
                shell_quote(&drv.to_absolute())
            )))
        }
    }
}

/// Opens `<root>/<components…>` for reading without following a symlink or leaving `root`
/// (the volume's content is the container's to shape): every component is opened relative to
/// the previous one with `O_NOFOLLOW`, and the last must be a regular file.
#[cfg(unix)]
fn open_beneath(root: &Path, components: &[&str]) -> std::io::Result<std::fs::File> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    let cstr = |s: &[u8]| {
        CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let c = cstr(root.as_os_str().as_bytes())?;
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let mut dir = unsafe { OwnedFd::from_raw_fd(fd) };
    for (i, comp) in components.iter().enumerate() {
        let last = i + 1 == components.len();
        let flags = libc::O_RDONLY
            | libc::O_NOFOLLOW
            | libc::O_CLOEXEC
            | if last {
                // Never wait on a FIFO or a device planted there.
                libc::O_NONBLOCK | libc::O_NOCTTY
            } else {
                libc::O_DIRECTORY
            };
        let c = cstr(comp.as_bytes())?;
        // SAFETY: `dir` is an open directory and `c` a valid C string; the result is checked.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        dir = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    let file = std::fs::File::from(dir);
    if !file.metadata()?.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

#[cfg(not(unix))]
fn open_beneath(_root: &Path, _components: &[&str]) -> std::io::Result<std::fs::File> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Why the raw log could not be relayed, and whether some of it already was.
struct Failed {
    why: String,
    sent_any: bool,
}

async fn copy_to_parent<R: tokio::io::AsyncRead + Unpin>(
    parent: &Parent,
    r: &mut R,
    sent_any: &mut bool,
) -> Result<(), String> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match tokio::time::timeout(READ_IDLE, r.read(&mut buf)).await {
            Err(_) => return Err(format!("no data for {} s", READ_IDLE.as_secs())),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(n)) => n,
        };
        parent.build_log_bytes(&buf[..n]);
        *sent_any = true;
    }
}

async fn relay_raw(parent: &Parent, builder: &RemoteStore, drv: &StorePath) -> Result<(), Failed> {
    let mut sent_any = false;
    let fail = |why: String, sent_any: bool| Failed { why, sent_any };
    match source_for(builder, drv) {
        None => Err(fail("no way to read it from this builder".into(), false)),
        Some(Source::Volume(root)) => {
            let rel = hook_protocol::log::build_log_rel_path(drv);
            let mut comps = vec!["var", "log", "nix"];
            comps.extend(rel.iter().map(String::as_str));
            let file = open_beneath(&root, &comps)
                .map_err(|e| fail(format!("opening it in the builder's volume: {e}"), false))?;
            let mut file = tokio::fs::File::from_std(file);
            copy_to_parent(parent, &mut file, &mut sent_any)
                .await
                .map_err(|e| fail(e, sent_any))
        }
        Some(Source::Exec(command)) => {
            let session = builder
                .session
                .as_ref()
                .ok_or_else(|| fail("no SSH session".into(), false))?;
            let ch = session
                .exec(&command)
                .await
                .map_err(|e| fail(format!("running `{command}`: {e}"), false))?;
            let crate::transport::ssh::ExecChannel {
                stdin,
                mut stdout,
                stderr,
                exit,
            } = ch;
            drop(stdin);
            drop(stderr);
            copy_to_parent(parent, &mut stdout, &mut sent_any)
                .await
                .map_err(|e| fail(e, sent_any))?;
            match tokio::time::timeout(READ_IDLE, exit.wait()).await {
                Ok(Ok(s)) if s.success() => Ok(()),
                Ok(Ok(s)) => Err(fail(format!("`{command}` failed: {s}"), sent_any)),
                Ok(Err(e)) => Err(fail(format!("`{command}`: {e}"), sent_any)),
                Err(_) => Err(fail(format!("`{command}` did not end"), sent_any)),
            }
        }
    }
}

/// After `BuildDerivation`: the builder's raw output to fd 4, or, if it cannot be had, the
/// lines its daemon sent (still through fd 4, so still handled as untrusted builder output).
pub(super) async fn relay(parent: &Parent, builder: &RemoteStore, drv: &StorePath, cap: Capture) {
    if !cap.started() {
        return;
    }
    match relay_raw(parent, builder, drv).await {
        Ok(()) => {}
        Err(Failed {
            why,
            sent_any: true,
        }) => parent.warn(&format!(
            "the build log of '{drv}' on '{}' is incomplete: {why}",
            builder.name
        )),
        Err(Failed {
            why,
            sent_any: false,
        }) => {
            parent.warn(&format!(
                "the exact build log of '{drv}' is not available from '{}' ({why}); showing \
                 the lines as the builder's Nix split them",
                builder.name
            ));
            fallback(parent, cap);
        }
    }
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
    use hook_protocol::worker::Field;

    fn line(id: u64, s: &str) -> LogEvent {
        LogEvent::Result {
            id,
            typ: RES_BUILD_LOG_LINE,
            fields: vec![Field::String(s.into())],
        }
    }

    #[test]
    fn capture_keeps_only_the_build_activitys_lines() {
        let mut c = Capture::default();
        c.event(&line(1, "before the build"));
        assert!(!c.started());
        c.event(&LogEvent::StartActivity {
            id: 5,
            level: 3,
            typ: ACT_BUILD,
            text: "building".into(),
            fields: vec![],
            parent: 0,
        });
        c.event(&line(5, "built"));
        // A builder's own type-101 activity, and the daemon's messages: not log lines.
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
            level: 3,
            typ: ACT_BUILD,
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
}
