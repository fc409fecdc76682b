//! `nixdock logs`: a builder container's log (through the Engine API), or the hook's own log
//! file in the state directory.

use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptions;
use futures_util::StreamExt;

use crate::builder::Engine;

use super::Env;
use super::builders::{self, Row};
use super::containers::Existing;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
A builder's container log holds its entry script's and sshd's messages
(start-up, the emulation check, idle stop). The hook's log (hook.log in the
state directory, rotated to hook.log.1 past 4 MiB) tells what the hook
decided for each build and why; NIXDOCK_LOG=debug in nix-daemon's
environment makes it say more.

In a pool of engines a system may have a builder on several of them: each
one's log is printed under a header naming its engine; --engine picks one
(--follow needs that when there are several).")]
pub struct Args {
    /// The system whose builder's log to print
    #[arg(
        value_name = "SYSTEM",
        required_unless_present = "hook",
        conflicts_with = "hook"
    )]
    pub system: Option<String>,
    /// Print the hook's log (hook.log) instead
    #[arg(long)]
    pub hook: bool,
    /// Print only the last N lines
    #[arg(short = 'n', long = "lines", value_name = "N")]
    pub lines: Option<usize>,
    /// Keep printing new lines as they come
    #[arg(short, long)]
    pub follow: bool,
    /// Only this engine's builder (`default`, [engines.NAME])
    #[arg(long, value_name = "NAME", conflicts_with = "hook")]
    pub engine: Option<String>,
}

pub async fn run(env: &Env, args: Args) -> anyhow::Result<i32> {
    if args.hook {
        return hook_log(&env.state_path, args.lines, args.follow).await;
    }
    let system = args.system.unwrap_or_default();
    let loaded = builders::load(env, args.engine.as_deref()).await?;
    let rows = builders::select(loaded.rows.clone(), std::slice::from_ref(&system))?;
    let found: Vec<(&Row, &Existing)> = rows
        .iter()
        .filter_map(|r| r.existing.as_ref().map(|e| (r, e)))
        .collect();
    if found.is_empty() {
        anyhow::bail!(
            "the {system} builder has no container yet (the first build for {system} creates it)"
        );
    }
    if args.follow && found.len() > 1 {
        let on: Vec<&str> = found.iter().map(|(r, _)| r.engine.as_str()).collect();
        anyhow::bail!(
            "{system} has a builder on engines {}: pick one with --engine NAME to follow it",
            on.join(", ")
        );
    }
    // In a pool, a header names the engine of each builder (like `tail` with several files).
    let headers = loaded.is_pool();
    let mut out = Shown::stdout();
    for (i, (row, ex)) in found.iter().enumerate() {
        let engine = loaded.engine_of(row)?;
        if headers {
            let sep = if i > 0 { "\n" } else { "" };
            let header = format!(
                "{sep}==> {system} on engine {} ({}): {} <==\n",
                engine.name, engine.addr, ex.name
            );
            if out.put(header.as_bytes()).is_err() {
                return Ok(0);
            }
        }
        if !print_container_log(&mut out, engine, &ex.name, args.lines, args.follow).await? {
            return Ok(0); // stdout closed (e.g. `| head`)
        }
    }
    // A builder of this system may be on an engine that did not answer (named above).
    Ok(if loaded.failed_engines > 0 { 1 } else { 0 })
}

/// Copies one container's log to `out`; false when `out` was closed.
async fn print_container_log(
    out: &mut Shown<impl Write>,
    engine: &Engine,
    container: &str,
    lines: Option<usize>,
    follow: bool,
) -> anyhow::Result<bool> {
    let opts = LogsOptions {
        follow,
        stdout: true,
        stderr: true,
        tail: lines.map(|n| n.to_string()).unwrap_or_else(|| "all".into()),
        ..Default::default()
    };
    let mut stream = engine.docker.logs(container, Some(opts));
    while let Some(item) = stream.next().await {
        match item {
            Ok(LogOutput::StdErr { message }) | Ok(LogOutput::StdOut { message }) => {
                if out.put(&message).is_err() {
                    return Ok(false);
                }
            }
            Ok(other) => {
                let _ = out.put(&other.into_bytes());
            }
            Err(e) => anyhow::bail!("{container} on engine {}: {e}", engine.name),
        }
        let _ = out.flush();
    }
    Ok(out.finish().is_ok())
}

/// Characters of one line shown on a terminal.
const TERMINAL_LINE_CHARS: usize = 4096;

/// Standard output for logs that others wrote (a container's; the hook's, which quotes
/// builders): a terminal gets each line made printable (no escape sequence, control or format
/// character; cut at [`TERMINAL_LINE_CHARS`]), a pipe or file the bytes as they are.
struct Shown<W: Write> {
    out: W,
    terminal: bool,
    /// A terminal's line not ended yet.
    partial: Vec<u8>,
}

impl Shown<std::io::StdoutLock<'static>> {
    fn stdout() -> Self {
        let out = std::io::stdout().lock();
        let terminal = out.is_terminal();
        Shown::new(out, terminal)
    }
}

impl<W: Write> Shown<W> {
    fn new(out: W, terminal: bool) -> Self {
        Shown {
            out,
            terminal,
            partial: Vec::new(),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if !self.terminal {
            return self.out.write_all(bytes);
        }
        self.partial.extend_from_slice(bytes);
        let partial = std::mem::take(&mut self.partial);
        let mut start = 0;
        while let Some(nl) = partial[start..].iter().position(|b| *b == b'\n') {
            self.line(&partial[start..start + nl])?;
            self.out.write_all(b"\n")?;
            start += nl + 1;
        }
        self.partial = partial;
        self.partial.drain(..start);
        // A line that never ends is shown cut, not kept whole.
        if self.partial.len() > 4 * TERMINAL_LINE_CHARS {
            let line = std::mem::take(&mut self.partial);
            self.line(&line)?;
            self.out.write_all(b"\n")?;
        }
        Ok(())
    }

    fn line(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let text = String::from_utf8_lossy(bytes);
        let shown = crate::printable::line(&text, TERMINAL_LINE_CHARS);
        self.out.write_all(shown.as_bytes())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// Shows what is left of an unended line.
    fn finish(&mut self) -> std::io::Result<()> {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line)?;
        }
        self.out.flush()
    }
}

/// The last `n` lines of `text` (all of it when `n` is `None`), and how many lines were
/// missing to reach `n`.
fn last_lines(text: &str, n: Option<usize>) -> (&str, usize) {
    let Some(n) = n else { return (text, 0) };
    if n == 0 {
        return ("", 0);
    }
    let body = text.strip_suffix('\n').unwrap_or(text);
    let mut count = 0;
    for (i, b) in body.bytes().enumerate().rev() {
        if b == b'\n' {
            count += 1;
            if count == n {
                return (&text[i + 1..], 0);
            }
        }
    }
    let have = if text.is_empty() { 0 } else { count + 1 };
    (text, n.saturating_sub(have))
}

async fn hook_log(state_dir: &Path, lines: Option<usize>, follow: bool) -> anyhow::Result<i32> {
    let path = state_dir.join("hook.log");
    let rotated = state_dir.join("hook.log.1");
    let current = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!(
                "no hook log at {} yet: the hook writes it at its first build. Is this the \
                 state directory the hook uses? (nix-daemon's hook runs as root: \
                 /var/lib/nixdock unless NIXDOCK_STATE_DIR is set in its environment)",
                path.display()
            );
        }
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    };
    let text = String::from_utf8_lossy(&current);
    let (tail, missing) = last_lines(&text, lines);
    let mut out = Shown::stdout();
    // Lines before the last rotation, when more are asked for than the current file holds.
    if (lines.is_none() || missing > 0)
        && let Ok(old) = std::fs::read(&rotated)
    {
        let old = String::from_utf8_lossy(&old);
        let (old_tail, _) = last_lines(&old, lines.map(|_| missing));
        let _ = out.put(old_tail.as_bytes());
    }
    if out.put(tail.as_bytes()).is_err() {
        return Ok(0);
    }
    let _ = out.flush();
    if !follow {
        let _ = out.finish();
        return Ok(0);
    }
    let mut pos = current.len() as u64;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Ok(mut f) = std::fs::File::open(&path) else {
            continue;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < pos {
            pos = 0; // rotated
        }
        if len == pos {
            continue;
        }
        if f.seek(SeekFrom::Start(pos)).is_err() {
            continue;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_ok() {
            pos += buf.len() as u64;
            if out.put(&buf).is_err() {
                return Ok(0);
            }
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_is_shown_printable_lines_and_a_pipe_the_bytes() {
        let raw = b"\x1b]0;owned\x07title\nred \x1b[31mtext\x1b[0m\r\npart";
        let mut t = Shown::new(Vec::new(), true);
        // Split inside an escape sequence and a line.
        t.put(&raw[..12]).unwrap();
        t.put(&raw[12..]).unwrap();
        t.finish().unwrap();
        assert_eq!(
            String::from_utf8(t.out).unwrap(),
            "0;owned?title\nred text?\npart"
        );
        let mut p = Shown::new(Vec::new(), false);
        p.put(raw).unwrap();
        p.finish().unwrap();
        assert_eq!(p.out, raw);
        let mut long = Shown::new(Vec::new(), true);
        long.put(&vec![b'x'; 5 * TERMINAL_LINE_CHARS]).unwrap();
        long.finish().unwrap();
        let shown = String::from_utf8(long.out).unwrap();
        assert!(
            shown
                .lines()
                .all(|l| l.chars().count() <= TERMINAL_LINE_CHARS + 1)
        );
    }

    #[test]
    fn tails() {
        assert_eq!(last_lines("a\nb\nc\n", Some(2)), ("b\nc\n", 0));
        assert_eq!(last_lines("a\nb\nc", Some(2)), ("b\nc", 0));
        assert_eq!(last_lines("a\nb\nc\n", Some(5)), ("a\nb\nc\n", 2));
        assert_eq!(last_lines("a\nb\nc\n", None), ("a\nb\nc\n", 0));
        assert_eq!(last_lines("", Some(3)), ("", 3));
        assert_eq!(last_lines("a\n", Some(0)), ("", 0));
    }
}
