//! A builder container's own log (its entry script's, sshd's and its nix-daemon's stderr), read
//! for an error message: what a builder that did not start said, or what a daemon worker that
//! died under a build said (an emulator's `uncaught target signal`, say). The container writes
//! it, so what is shown is bounded (lines, characters, bytes read, time) and printable: no
//! escape sequence or control character reaches the user's terminal.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::query_parameters::LogsOptions;
use futures_util::StreamExt;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Characters kept of one line.
pub const MAX_LINE_CHARS: usize = 300;

/// `line` as it may be shown: see [`crate::printable::line`].
pub fn printable(line: &str) -> String {
    crate::printable::line(line, MAX_LINE_CHARS)
}
/// Bytes read of the log at most (the engine is asked for its last lines only, but a line can
/// be of any length).
const MAX_BYTES: usize = 64 << 10;
/// Lines asked of the engine: enough for the wanted ones among a builder's routine lines.
const ASKED_LINES: usize = 200;

/// What a working builder writes for every connection: left out of an excerpt about a failure.
fn routine(line: &str) -> bool {
    ["accepted connection from pid ", "Accepted publickey for "]
        .iter()
        .any(|p| line.starts_with(p))
}

/// The last `lines` lines of the container's log that are not routine, since `since` (this
/// host's time, moved onto the engine's clock) when given, each [`printable`]; read within
/// `deadline` (what arrived by then). Empty when the engine cannot say.
pub async fn tail(
    docker: &Docker,
    container: &str,
    lines: usize,
    since: Option<SystemTime>,
    deadline: Duration,
) -> Vec<String> {
    let asked = tokio::time::Instant::now();
    let since = match since {
        Some(t) => {
            let ahead = engine_clock_ahead(docker, CLOCK_TIMEOUT.min(deadline)).await;
            on_engine_clock(t, ahead.unwrap_or(0))
        }
        None => None,
    };
    let deadline = deadline.saturating_sub(asked.elapsed());
    let opts = LogsOptions {
        stdout: true,
        stderr: true,
        tail: ASKED_LINES.to_string(),
        // The engine takes whole seconds; each line's timestamp says the rest.
        since: since.map_or(0, |d| i32::try_from(d.as_secs()).unwrap_or(0)),
        timestamps: true,
        ..Default::default()
    };
    // The engine sends the oldest first: the newest MAX_BYTES are kept.
    let mut bytes = Vec::new();
    let mut cut = false;
    let read = async {
        let mut s = docker.logs(container, Some(opts));
        while let Some(Ok(chunk)) = s.next().await {
            bytes.extend_from_slice(&chunk.into_bytes());
            if bytes.len() > MAX_BYTES {
                bytes.drain(..bytes.len() - MAX_BYTES);
                cut = true;
            }
        }
    };
    let _ = tokio::time::timeout(deadline, read).await;
    // A line cut at its start is left out.
    let whole = match (cut, bytes.iter().position(|b| *b == b'\n')) {
        (true, Some(nl)) => &bytes[nl + 1..],
        (true, None) => &[][..],
        (false, _) => &bytes[..],
    };
    excerpt(whole, lines, since)
}

/// How long the engine's clock may take to answer, of a [`tail`]'s deadline.
const CLOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// How far the engine's clock is ahead of this host's, in nanoseconds (negative: behind), by
/// its `/info`; `None` when it does not say within `deadline`. A build's start is this host's
/// time and the log's stamps are the engine's: a remote engine's clock, or a laptop's Docker VM
/// after a sleep, can be minutes off. Measured against the answer's arrival, so the estimate
/// errs towards showing a line from before the build, never towards hiding one after it.
async fn engine_clock_ahead(docker: &Docker, deadline: Duration) -> Option<i128> {
    let info = tokio::time::timeout(deadline, docker.info())
        .await
        .ok()?
        .ok()?;
    let arrived = nanos_since_epoch(SystemTime::now())?;
    let engine = OffsetDateTime::parse(info.system_time.as_deref()?, &Rfc3339).ok()?;
    Some(engine.unix_timestamp_nanos() - arrived)
}

fn nanos_since_epoch(t: SystemTime) -> Option<i128> {
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_nanos() as i128)
}

/// This host's `t` on a clock `ahead` nanoseconds ahead of it, as a time since the epoch.
fn on_engine_clock(t: SystemTime, ahead: i128) -> Option<Duration> {
    let nanos = nanos_since_epoch(t)?.checked_add(ahead)?;
    u64::try_from(nanos).ok().map(Duration::from_nanos)
}

/// A log line's engine timestamp (RFC 3339, before the first space) and the rest; a line
/// without one is all rest.
fn split_timestamp(line: &str) -> (Option<Duration>, &str) {
    let Some((ts, rest)) = line.split_once(' ') else {
        return (None, line);
    };
    match OffsetDateTime::parse(ts, &Rfc3339) {
        Ok(t) => {
            let nanos = t.unix_timestamp_nanos();
            (u64::try_from(nanos).ok().map(Duration::from_nanos), rest)
        }
        Err(_) => (None, line),
    }
}

/// The last `lines` non-routine lines of `bytes` (engine-timestamped lines), those stamped
/// before `since` left out, printable.
fn excerpt(bytes: &[u8], lines: usize, since: Option<Duration>) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let kept: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let (at, rest) = split_timestamp(l);
            let early = matches!((at, since), (Some(a), Some(s)) if a < s);
            (!early).then_some(rest.trim_end_matches('\r'))
        })
        .filter(|l| !l.trim().is_empty() && !routine(l))
        .collect();
    kept[kept.len().saturating_sub(lines)..]
        .iter()
        .map(|l| printable(l))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_excerpt_is_the_last_lines_without_routine_ones() {
        let log = b"2026-12-06T21:49:50.9Z nixdock-entry: sshd started\n\
            2026-12-06T21:49:51.1Z accepted connection from pid 0, user root (trusted)\n\
            2026-12-06T21:49:51.2Z Accepted publickey for root from 172.17.0.1 port 1 ssh2\n\
            2026-12-06T21:49:51.3Z qemu: uncaught target signal 11 (Segmentation fault) - core dumped\r\n\
            2026-12-06T21:49:51.4Z \n\
            2026-12-06T21:49:51.5Z accepted connection from pid 12, user root (trusted)\n";
        assert_eq!(
            excerpt(log, 5, None),
            vec![
                "nixdock-entry: sshd started".to_string(),
                "qemu: uncaught target signal 11 (Segmentation fault) - core dumped".to_string(),
            ]
        );
        assert_eq!(excerpt(log, 1, None).len(), 1);
        assert!(excerpt(b"", 5, None).is_empty());
        // Stamped before `since`: left out (the engine's `since` is whole seconds).
        let since = OffsetDateTime::parse("2026-12-06T21:49:51Z", &Rfc3339).unwrap();
        let since = Duration::from_nanos(since.unix_timestamp_nanos() as u64);
        assert_eq!(
            excerpt(log, 5, Some(since)),
            vec!["qemu: uncaught target signal 11 (Segmentation fault) - core dumped".to_string()]
        );
        // The build's start on a clock that is behind the engine's by a minute.
        let host = UNIX_EPOCH + since - Duration::from_secs(60);
        assert_eq!(on_engine_clock(host, 60_000_000_000), Some(since));
        assert_eq!(
            on_engine_clock(host + Duration::from_secs(120), -60_000_000_000),
            Some(since)
        );
        assert_eq!(on_engine_clock(UNIX_EPOCH, -1), None);
        // No timestamp, or invalid UTF-8: kept whole, replaced, never passed through.
        assert_eq!(
            excerpt(b"bad \xff byte\n", 5, Some(since)),
            vec!["bad \u{fffd} byte".to_string()]
        );
    }
}
