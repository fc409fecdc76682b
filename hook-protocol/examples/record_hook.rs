//! A build hook that records what the calling Nix sends it, for `fixtures/hook-transcripts/`.
//!
//! Set it as `--option build-hook /path/to/record_hook` with `RECORD_DIR` in the environment.
//! It parses the stream with this crate's own readers while copying every byte it reads to
//! files in `RECORD_DIR` as it goes (so a SIGKILL from the parent loses nothing):
//!
//! * `stdin.bin`: everything read from stdin, in order;
//! * `preamble.bin`, `try-N.bin`, `post-accept.bin`: the same bytes split by phase;
//! * `reply-N.bin`: the reply written for the N-th `try`;
//! * `argv.txt` (one argument per line), `fds.txt` (open fds and what they are);
//! * `settings.txt`: the preamble as `name = value` lines, for reading.
//!
//! `RECORD_MODE` picks the answers: `accept` (default: accept the first `try`),
//! `decline-first` (decline the first `try`, accept the second), `decline` (decline all).
//! The machine name in the accept is `recorder`. With `RECORD_EMIT_LOG=1` a sample of every
//! `@nix` line this crate builds is written before each reply (to check how parents take them).
//! After the post-accept data it reads to EOF and exits 1, so the build fails.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use hook_protocol::hook::{self, HookRequest, Reply};
use hook_protocol::log::{ActivityIds, ActivityType, LogLine, Verbosity};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Copies every byte read to `all` and to the current phase file.
struct Tee<R> {
    inner: R,
    all: File,
    phase: Option<File>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Tee<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let new = &buf.filled()[before..];
            this.all.write_all(new)?;
            if let Some(p) = &mut this.phase {
                p.write_all(new)?;
            }
        }
        res
    }
}

fn create(dir: &Path, name: &str) -> File {
    File::create(dir.join(name)).unwrap_or_else(|e| panic!("creating {name}: {e}"))
}

/// `fd N -> what`, with pipes numbered in order of first appearance so runs compare.
fn describe_fds() -> String {
    let mut out = String::new();
    let mut pipes: Vec<String> = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return out;
    };
    let mut fds: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort();
    for fd in fds {
        let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else {
            continue; // the directory handle itself, already closed
        };
        let t = target.to_string_lossy().into_owned();
        let what = if t.starts_with("pipe:") {
            let i = pipes.iter().position(|p| *p == t).unwrap_or_else(|| {
                pipes.push(t.clone());
                pipes.len() - 1
            });
            let mode = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("flags:").map(|f| f.trim().to_owned()))
                })
                .and_then(|f| u32::from_str_radix(&f, 8).ok())
                .map(|f| if f & 3 == 0 { "read" } else { "write" })
                .unwrap_or("?");
            format!("pipe #{i} ({mode} end)")
        } else {
            t
        };
        out.push_str(&format!("fd {fd} -> {what}\n"));
    }
    out
}

fn emit_samples(ids: &ActivityIds, drv: &str) {
    let copy = ids.next_id();
    let build = ids.next_id();
    let lines = [
        LogLine::msg(Verbosity::Info, format!("recorder: try for {drv}")),
        LogLine::warn("recorder sample warning"),
        LogLine::Start {
            id: copy,
            level: Verbosity::Info,
            typ: ActivityType::CopyPaths.code(),
            text: "copying 0 paths (with a parent key)".into(),
            fields: vec![],
            parent: Some(12345),
        },
        LogLine::result_set_expected(copy, ActivityType::CopyPath, 0),
        LogLine::result_progress(copy, 0, 0, 0, 0),
        LogLine::start_copy_path(build + 1, "/nix/store/x-y", "local", "ssh://recorder"),
        LogLine::stop(build + 1),
        LogLine::stop(copy),
        LogLine::start_build(build, drv, "recorder-sample"),
        LogLine::build_log_line(build, &b"sample log line \xff\x1b[1m\n"[..]),
        LogLine::stop(build),
    ];
    let mut s = String::new();
    for l in &lines {
        s.push_str(&l.to_line());
    }
    std::io::stderr().write_all(s.as_bytes()).ok();
}

fn reply(dir: &Path, n: usize, r: &Reply) {
    let bytes = r.to_bytes();
    std::fs::write(dir.join(format!("reply-{n}.bin")), &bytes).ok();
    // One write for both lines of an accept.
    let mut err = std::io::stderr();
    err.write_all(&bytes).expect("writing the reply");
    err.flush().ok();
}

fn main() {
    // Before the runtime opens its own fds.
    let fds = describe_fds();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting tokio")
        .block_on(run(fds));
}

async fn run(fds: String) {
    let dir = PathBuf::from(std::env::var_os("RECORD_DIR").expect("RECORD_DIR is not set"));
    std::fs::create_dir_all(&dir).expect("creating RECORD_DIR");
    std::fs::write(dir.join("fds.txt"), fds).ok();
    let args: Vec<String> = std::env::args().collect();
    std::fs::write(
        dir.join("argv.txt"),
        args.iter().map(|a| format!("{a}\n")).collect::<String>(),
    )
    .ok();
    let mode = std::env::var("RECORD_MODE").unwrap_or_else(|_| "accept".into());
    let emit = std::env::var_os("RECORD_EMIT_LOG").is_some_and(|v| v == "1");
    let ids = ActivityIds::new();

    let mut r = Tee {
        inner: tokio::io::stdin(),
        all: create(&dir, "stdin.bin"),
        phase: Some(create(&dir, "preamble.bin")),
    };
    let settings = hook::read_settings(&mut r).await.expect("reading settings");
    let mut txt = String::new();
    for (k, v) in settings.iter() {
        txt.push_str(&format!("{k} = {v}\n"));
    }
    std::fs::write(dir.join("settings.txt"), txt).ok();

    let mut n = 0;
    loop {
        n += 1;
        r.phase = Some(create(&dir, &format!("try-{n}.bin")));
        let req = match hook::read_request(&mut r).await {
            Ok(HookRequest::Try(t)) => t,
            Ok(HookRequest::Exit) => {
                std::fs::remove_file(dir.join(format!("try-{n}.bin"))).ok();
                std::process::exit(0);
            }
            Err(e) => panic!("reading a request: {e}"),
        };
        if emit {
            emit_samples(&ids, &req.drv_path.to_absolute());
        }
        let accept = match mode.as_str() {
            "decline" => false,
            "decline-first" => n >= 2,
            _ => true,
        };
        if accept {
            r.phase = Some(create(&dir, "post-accept.bin"));
            reply(
                &dir,
                n,
                &Reply::Accept {
                    machine: "recorder".into(),
                },
            );
            break;
        }
        reply(&dir, n, &Reply::Decline);
    }

    let work = hook::read_accepted(&mut r)
        .await
        .expect("reading the accepted work");
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.expect("reading to EOF");
    std::fs::write(
        dir.join("accepted.txt"),
        format!("{work:#?}\ntrailing bytes: {}\n", rest.len()),
    )
    .ok();
    std::process::exit(1);
}
