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

/// Invisible characters that change how the text around them reads: bidirectional
/// overrides and isolates, zero-width characters, the byte-order mark.
fn reorders(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// `line` made printable: escape sequences dropped, every other control character (and every
/// character that reorders or hides text) a `?`, cut at [`MAX_LINE_CHARS`].
pub fn printable(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut kept = 0;
    while let Some(c) = chars.next() {
        if kept == MAX_LINE_CHARS {
            out.push('…');
            break;
        }
        if c == '\x1b' {
            // CSI (`ESC [` … final byte) and two-character escapes alike.
            if chars.next_if_eq(&'[').is_some() {
                for d in chars.by_ref() {
                    if ('\x40'..='\x7e').contains(&d) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
            continue;
        }
        out.push(if (c.is_control() && c != '\t') || reorders(c) {
            '?'
        } else {
            c
        });
        kept += 1;
    }
    out
}

/// The last `lines` lines of the container's log that are not routine, since `since` when
/// given, each [`printable`]; read within `deadline` (what arrived by then). Empty when the
/// engine cannot say.
pub async fn tail(
    docker: &Docker,
    container: &str,
    lines: usize,
    since: Option<SystemTime>,
    deadline: Duration,
) -> Vec<String> {
    let since = since.and_then(|t| t.duration_since(UNIX_EPOCH).ok());
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
    fn escape_sequences_and_control_characters_do_not_pass() {
        assert_eq!(printable("\x1b[31mred\x1b[0m plain"), "red plain");
        assert_eq!(printable("a\x1b]0;title\x07b"), "a0;title?b");
        assert_eq!(
            printable("bell\x07 cr\r nul\0 tab\tend"),
            "bell? cr? nul? tab\tend"
        );
        assert_eq!(printable("\u{9b}31m"), "?31m");
        assert_eq!(printable("abc\u{202e}fed\u{200b}"), "abc?fed?");
    }

    #[test]
    fn long_lines_are_cut() {
        let long = "x".repeat(MAX_LINE_CHARS * 3);
        let p = printable(&long);
        assert_eq!(p.chars().count(), MAX_LINE_CHARS + 1);
        assert!(p.ends_with('…'));
    }

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
        // No timestamp, or invalid UTF-8: kept whole, replaced, never passed through.
        assert_eq!(
            excerpt(b"bad \xff byte\n", 5, Some(since)),
            vec!["bad \u{fffd} byte".to_string()]
        );
    }
}
