//! What an engine holder holds: the builder's engine, and one daemon connection started ahead
//! through its exec, handed to the next hook that asks.
//!
//! A daemon started ahead must never outlive its holder. Closing the exec's attach stream
//! normally ends it (EOF on its stdin), but an exec whose client went away while the engine
//! was restarting was seen to keep its stdin open, leaving a `nix-daemon --stdio` behind.
//! So the spare does not start the daemon until told: it waits in a small shell loop
//! ([`spare_command`]) that the holder feeds a `ping` line every [`PING`]; without one for
//! [`WATCHDOG_SECS`] it exits, and the `go` line the holder sends when a hook takes it
//! starts the daemon on the same stdin (the shell's `read` takes exactly one line from a
//! pipe, so the hook's bytes follow untouched).

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

/// The spare's command: wait for `go` (each `ping` restarts the deadline; a missing line, EOF
/// or anything else ends it), then run `daemon_command`. Without `timeout(1)` in the image it
/// still waits for `go`, only with no deadline of its own.
pub(super) fn spare_command(daemon_command: &str, deadline_secs: u32) -> String {
    format!(
        "if command -v timeout >/dev/null 2>&1; then \
         while :; do timeout {deadline_secs} sh -c 'IFS= read -r w || exit 1; \
         [ \"$w\" = go ] && exit 3; [ \"$w\" = ping ] && exit 0; exit 1'; \
         case $? in 0) ;; 3) break ;; *) exit 0 ;; esac; done; \
         else IFS= read -r w && [ \"$w\" = go ] || exit 0; fi\n{daemon_command}"
    )
}

type Reply = oneshot::Sender<Result<ExecChannel, String>>;

/// A builder through its engine's exec, with one daemon connection (`daemon_command`, a
/// `nix-daemon --stdio`) started ahead: a hook's request takes it and another is started.
pub(super) struct EngineHeld {
    docker: Docker,
    pub(super) exec: EngineExec,
    container_id: String,
    daemon_command: String,
    /// Asks the task that holds the spare for it.
    spare: Mutex<Option<oneshot::Sender<Reply>>>,
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
            checked: Mutex::new(None),
            closing: AtomicBool::new(false),
        }
    }

    pub(super) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        // Dropping the request side ends the spare's task, which drops (closes) its exec.
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Starts the next daemon connection, kept waiting by pings until a hook takes it.
    pub(super) fn refill(&self) {
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        let (exec, command) = (
            self.exec.clone(),
            spare_command(&self.daemon_command, WATCHDOG_SECS),
        );
        let (ask, asked) = oneshot::channel::<Reply>();
        tokio::spawn(hold_spare(exec, command, asked));
        *self.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(ask);
    }

    /// A daemon connection: the one started ahead, else one of its own. The next is started
    /// once this one ends ([`Self::refill_if_empty`]), not beside the build it serves.
    pub(super) async fn daemon(&self) -> Result<ExecChannel, String> {
        let ask = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(ask) = ask {
            let (reply, replied) = oneshot::channel();
            if ask.send(reply).is_ok()
                && let Ok(Ok(ch)) = replied.await
            {
                return Ok(ch);
            }
        }
        // None ready (it failed, or two hooks came at once): one of this hook's own.
        self.exec
            .exec(&self.daemon_command)
            .await
            .map_err(|e| e.to_string())
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

/// Starts the spare, pings it until it is asked for, then sends `go` and hands it over. The
/// holder dropping the request side (closing, or exiting) ends the task and the exec with it.
async fn hold_spare(exec: EngineExec, command: String, mut asked: oneshot::Receiver<Reply>) {
    let mut ch = match exec.exec(&command).await {
        Ok(ch) => ch,
        Err(e) => {
            if let Ok(reply) = asked.await {
                let _ = reply.send(Err(e.to_string()));
            }
            return;
        }
    };
    let mut alive = true;
    let mut ping = tokio::time::interval(PING);
    loop {
        tokio::select! {
            r = &mut asked => {
                let Ok(reply) = r else { return };
                let handed = if !alive {
                    Err("the daemon started ahead ended".to_owned())
                } else {
                    match ch.stdin.write_all(b"go\n").await {
                        Ok(()) => Ok(ch),
                        Err(e) => Err(format!("the daemon started ahead: {e}")),
                    }
                };
                let _ = reply.send(handed);
                return;
            }
            _ = ping.tick(), if alive => {
                alive = ch.stdin.write_all(b"ping\n").await.is_ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};

    fn spawn_spare(deadline: u32) -> std::process::Child {
        Command::new("/bin/sh")
            .args(["-c", &spare_command("echo started; exec cat", deadline)])
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

    /// Without a ping it ends by itself, never having run the command; so does a wrong line
    /// and EOF.
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
            assert_eq!(out, b"", "{input:?}");
            drop(keep);
        }
    }
}
