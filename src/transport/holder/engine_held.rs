//! What an engine holder holds: the builder's engine, one daemon connection started ahead
//! through its exec, and [`SHELL_SPARES`] shells started ahead for commands (the build log's
//! end read and `tail -f`), each handed to the next hook that asks: an exec is a process start
//! in the container through the engine's runtime (~50–100 ms on a remote engine), a spare's
//! hand-over one write.
//!
//! A spare must never outlive its holder. Closing the exec's attach stream normally ends it
//! (EOF on its stdin), but nothing in the engine promises that for a client that vanishes
//! mid-start or while the engine restarts. So every spare waits in a small shell loop
//! ([`WAIT`]) that the holder feeds a `ping` line every [`PING`]; without one for
//! [`WATCHDOG_SECS`] it exits, and the `go` line the holder sends when a hook takes it ends
//! the wait (the shell's `read` takes exactly one line from a pipe, so what follows is
//! untouched): the daemon's relay then passes the hook's bytes on; a shell reads one more
//! line, the command, and runs it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bollard::Docker;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use super::{Settings, Target};
use crate::transport::EngineExec;
use crate::transport::ssh::ExecChannel;

/// How often an engine holder asks whether its container still runs.
const CONTAINER_CHECK: Duration = Duration::from_secs(2);
/// How often the holder tells its spare it is still there.
const PING: Duration = Duration::from_secs(1);
/// How long a spare waits for a line before it ends by itself.
const WATCHDOG_SECS: u32 = 5;

/// Waits for `go` on stdin (each `ping` restarts the deadline); a missing line, EOF or
/// anything else exits. Without `timeout(1)` in the image it still waits for `go`, only with
/// no deadline of its own. `{deadline}` is replaced by the deadline in seconds.
const WAIT: &str = "if command -v timeout >/dev/null 2>&1; then \
    while :; do timeout {deadline} sh -c 'IFS= read -r w || exit 1; \
    [ \"$w\" = go ] && exit 3; [ \"$w\" = ping ] && exit 0; exit 1'; \
    case $? in 0) ;; 3) break ;; *) exit 0 ;; esac; done; \
    else IFS= read -r w && [ \"$w\" = go ] || exit 0; fi";

/// First in a spare's command line, so a look at the builder's processes can tell spares.
pub const SPARE_MARK: &str = ": nixdock-spare";

/// The daemon spare: `daemon_command` (the set-up marker check, then `nix-daemon --stdio`)
/// started at once (its start costs ~30 ms), reading from a pipe fed by [`WAIT`], which then
/// relays the rest of its input with `cat`; the wait ending ends the daemon's input.
pub(super) fn daemon_spare_command(daemon_command: &str, deadline_secs: u32) -> String {
    let wait = WAIT.replace("{deadline}", &deadline_secs.to_string());
    format!("{SPARE_MARK}\n{{ {wait}; exec cat; }} | {{\n{daemon_command}\n}}")
}

/// A shell spare: [`WAIT`], then one line, the command, run on the rest of its input.
pub(super) fn shell_spare_command(deadline_secs: u32) -> String {
    let wait = WAIT.replace("{deadline}", &deadline_secs.to_string());
    format!("{SPARE_MARK}\n{wait}\nIFS= read -r c || exit 0\neval \"$c\"")
}

/// How many shells are kept started ahead: a build's end read and its `tail -f`.
const SHELL_SPARES: usize = 2;

/// A hook's taking of a spare: the line(s) that end its wait, and where to send it.
struct Take {
    lines: Vec<u8>,
    reply: oneshot::Sender<Result<ExecChannel, String>>,
}

type Spare = oneshot::Sender<Take>;

/// A builder through its engine's exec, with one daemon connection (`daemon_command`, a
/// `nix-daemon --stdio`) started ahead: a hook's request takes it and another is started.
pub(super) struct EngineHeld {
    docker: Docker,
    exec: EngineExec,
    container_id: String,
    daemon_command: String,
    /// Asks the task that holds the daemon spare for it.
    spare: Mutex<Option<Spare>>,
    /// The same for the shell spares.
    shells: Mutex<Vec<Spare>>,
    checked: Mutex<Option<Instant>>,
    /// Set once the holder stops taking hooks: no daemon is started ahead any more.
    closing: AtomicBool,
}

impl EngineHeld {
    pub(super) fn new(docker: Docker, target: &Target, settings: &Settings) -> EngineHeld {
        EngineHeld {
            exec: EngineExec::new(docker.clone(), target.container.clone()),
            docker,
            container_id: target.container_id.clone(),
            daemon_command: settings.daemon_command.clone(),
            spare: Mutex::new(None),
            shells: Mutex::new(Vec::new()),
            checked: Mutex::new(None),
            closing: AtomicBool::new(false),
        }
    }

    pub(super) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        // Dropping the request side ends the spare's task, which drops (closes) its exec.
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.shells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Starts the next daemon connection, kept waiting by pings until a hook takes it.
    pub(super) fn refill(&self) {
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        let command = daemon_spare_command(&self.daemon_command, WATCHDOG_SECS);
        let spare = start_spare(self.exec.clone(), command);
        *self.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(spare);
    }

    /// Starts shell spares up to [`SHELL_SPARES`].
    pub(super) fn refill_shells(&self) {
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        let mut shells = self.shells.lock().unwrap_or_else(|p| p.into_inner());
        while shells.len() < SHELL_SPARES {
            shells.push(start_spare(
                self.exec.clone(),
                shell_spare_command(WATCHDOG_SECS),
            ));
        }
    }

    /// A daemon connection: the one started ahead, else one of its own. The next is started
    /// once this one ends ([`Self::refill_if_empty`]), not beside the build it serves.
    pub(super) async fn daemon(&self) -> Result<ExecChannel, String> {
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(ch) = take(spare, b"go\n".to_vec()).await {
            return Ok(ch);
        }
        // None ready (it failed, or two hooks came at once): one of this hook's own.
        self.exec
            .exec(&self.daemon_command)
            .await
            .map_err(|e| e.to_string())
    }

    /// `command` in a shell started ahead, else through an exec of its own (a command of
    /// more than one line always: the shell reads one). Shells are started again once the
    /// command ends ([`Self::refill_shells`]).
    pub(super) async fn command(&self, command: &str) -> Result<ExecChannel, String> {
        if !command.contains('\n') {
            let spare = self.shells.lock().unwrap_or_else(|p| p.into_inner()).pop();
            if let Some(ch) = take(spare, format!("go\n{command}\n").into_bytes()).await {
                return Ok(ch);
            }
        }
        self.exec.exec(command).await.map_err(|e| e.to_string())
    }

    pub(super) fn refill_if_empty(&self) {
        if self
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            self.refill();
        }
    }

    /// Why it can serve no more, if so (asked every tick; the engine at most every
    /// [`CONTAINER_CHECK`]).
    pub(super) async fn gone(&self) -> Option<&'static str> {
        {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            if checked.is_some_and(|t| t.elapsed() < CONTAINER_CHECK) {
                return None;
            }
            *checked = Some(Instant::now());
        }
        let asked = tokio::time::timeout(
            CONTAINER_CHECK,
            self.docker.inspect_container(self.exec.container(), None),
        );
        match asked.await.unwrap_or_else(|_| {
            Err(bollard::errors::Error::IOError {
                err: std::io::ErrorKind::TimedOut.into(),
            })
        }) {
            Ok(c) if c.id.as_deref() != Some(self.container_id.as_str()) => {
                Some("its container was replaced")
            }
            Ok(c) if c.state.as_ref().and_then(|s| s.running) == Some(true) => None,
            Ok(_) => Some("its container stopped"),
            Err(_) => Some("its engine does not answer about its container"),
        }
    }
}

/// Takes a spare, if there is one and it is still there.
async fn take(spare: Option<Spare>, lines: Vec<u8>) -> Option<ExecChannel> {
    let (reply, replied) = oneshot::channel();
    spare?.send(Take { lines, reply }).ok()?;
    replied.await.ok()?.ok()
}

/// Starts a spare running `command` in a task that pings it until it is taken.
fn start_spare(exec: EngineExec, command: String) -> Spare {
    let (ask, asked) = oneshot::channel::<Take>();
    tokio::spawn(hold_spare(exec, command, asked));
    ask
}

/// Starts the spare, pings it until it is asked for, then sends the lines that end its wait
/// and hands it over. The holder dropping the request side (closing, or exiting) ends the
/// task and the exec with it.
async fn hold_spare(exec: EngineExec, command: String, mut asked: oneshot::Receiver<Take>) {
    let mut ch = match exec.exec(&command).await {
        Ok(ch) => ch,
        Err(e) => {
            if let Ok(take) = asked.await {
                let _ = take.reply.send(Err(e.to_string()));
            }
            return;
        }
    };
    let mut alive = true;
    let mut ping = tokio::time::interval(PING);
    loop {
        tokio::select! {
            r = &mut asked => {
                let Ok(Take { lines, reply }) = r else { return };
                let handed = if !alive {
                    Err("the spare ended".to_owned())
                } else {
                    match write_line(&mut ch, &lines).await {
                        Ok(()) => Ok(ch),
                        Err(e) => Err(format!("the spare: {e}")),
                    }
                };
                let _ = reply.send(handed);
                return;
            }
            _ = ping.tick(), if alive => {
                alive = write_line(&mut ch, b"ping\n").await.is_ok();
            }
        }
    }
}

/// Written and flushed: the exec's input is a TLS stream that would keep the bytes until the
/// next write.
async fn write_line(ch: &mut ExecChannel, bytes: &[u8]) -> std::io::Result<()> {
    ch.stdin.write_all(bytes).await?;
    ch.stdin.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};

    fn spawn_spare(deadline: u32) -> std::process::Child {
        Command::new("/bin/sh")
            .args([
                "-c",
                &daemon_spare_command("echo started; exec cat", deadline),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Pings keep it waiting past its deadline; `go` starts the command, which gets exactly
    /// the bytes after the `go` line.
    #[test]
    fn spare_waits_while_pinged_and_hands_over_the_rest_of_stdin() {
        let mut c = spawn_spare(1);
        let mut stdin = c.stdin.take().unwrap();
        for _ in 0..4 {
            stdin.write_all(b"ping\n").unwrap();
            std::thread::sleep(Duration::from_millis(400));
        }
        assert!(c.try_wait().unwrap().is_none(), "ended while pinged");
        stdin.write_all(b"go\nping\n\x00bytes\n").unwrap();
        drop(stdin);
        let mut out = Vec::new();
        c.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        assert!(c.wait().unwrap().success());
        assert_eq!(out, b"started\nping\n\x00bytes\n");
    }

    /// Without a ping the relay ends by itself, and the daemon started ahead sees its input
    /// end having been given nothing; so does a wrong line, and EOF.
    #[test]
    fn spare_ends_by_itself_without_pings() {
        for input in [None, Some(&b"nonsense\n"[..]), Some(&b""[..])] {
            let mut c = spawn_spare(1);
            let stdin = c.stdin.take().unwrap();
            let keep = match input {
                None => Some(stdin),
                Some(bytes) => {
                    let mut stdin = stdin;
                    stdin.write_all(bytes).unwrap();
                    None
                }
            };
            let t = Instant::now();
            let mut out = Vec::new();
            c.stdout.take().unwrap().read_to_end(&mut out).unwrap();
            c.wait().unwrap();
            assert!(t.elapsed() < Duration::from_secs(4), "{input:?}");
            assert_eq!(out, b"started\n", "{input:?}");
            drop(keep);
        }
    }

    /// A shell spare runs the one line after `go` on the rest of its input, and nothing
    /// without a ping.
    #[test]
    fn shell_spare_runs_the_command_it_is_given() {
        let run = |input: &[u8], keep_open: bool| {
            let mut c = Command::new("/bin/sh")
                .args(["-c", &shell_spare_command(1)])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut stdin = c.stdin.take().unwrap();
            stdin.write_all(input).unwrap();
            let kept = keep_open.then_some(stdin);
            let mut out = Vec::new();
            c.stdout.take().unwrap().read_to_end(&mut out).unwrap();
            drop(kept);
            (c.wait().unwrap().code(), out)
        };
        assert_eq!(
            run(
                b"ping\ngo\nread -r n; echo \"got $n\"; cat\n7\nrest\n",
                false
            ),
            (Some(0), b"got 7\nrest\n".to_vec())
        );
        assert_eq!(run(b"go\nexit 64\n", false), (Some(64), Vec::new()));
        // Kept open without a ping: the watchdog ends it, the command never ran.
        let t = Instant::now();
        assert_eq!(run(b"", true), (Some(0), Vec::new()));
        assert!(t.elapsed() < Duration::from_secs(4));
        assert_eq!(run(b"echo no\n", false), (Some(0), Vec::new()));
    }
}
