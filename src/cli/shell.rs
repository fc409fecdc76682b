//! `nixdock shell <system> [-- command…]`: a shell, or one command, inside a system's builder —
//! to look at a build directory kept by `--keep-failed`, or at the builder's store. The builder
//! is made ready the way the hook does it (`Builders::ensure_ready`: created or started if
//! need be, under the hook's builder lock).
//!
//! The command runs through the Engine API's exec, with a TTY when this command's stdin and
//! stdout are terminals: every engine has it (local socket, TLS, `ssh://`), the connection is
//! the one nixdock already authenticates, and no builder needs a published sshd for it (a
//! remote engine's builders have none by default). The docker CLI is not used: it would need
//! its own configuration for a TLS or SSH engine.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Context as _;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::builder::Builders;

use super::Env;
use super::builders::{self, Row};

/// Where `entry.sh` links the image's Nix tools (wherever the image keeps them), then the usual
/// places, so `nix-store`, `nix log` and the image's own tools are found.
const PATH: &str = "PATH=/etc/nixdock/bin:/root/.nix-profile/bin:\
/nix/var/nix/profiles/default/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The shell when no command is given: bash where the image has it.
const SHELL: &str = "command -v bash >/dev/null 2>&1 && exec bash || exec sh";

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Starts the builder if it is not running (as a build would). The command runs
as the container's root, with a terminal when this command's stdin and stdout
are terminals; its exit status is this command's. A build directory kept by
`nix-build -K` is inside the builder: the hook's note names it, e.g.

  nixdock shell x86_64-linux -- ls -la /tmp/nix-build-hello.drv-0

While the command runs it holds a connection to the builder's nix-daemon
open, so the builder does not stop itself as idle under it.

In a pool of engines a system may have a builder on several of them: pick one
with --engine.")]
pub struct Args {
    /// The system whose builder to enter (e.g. aarch64-linux)
    #[arg(value_name = "SYSTEM")]
    pub system: String,
    /// The builder's engine; needed when several serve SYSTEM
    #[arg(long, value_name = "NAME")]
    pub engine: Option<String>,
    /// The command to run instead of a shell
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

pub async fn run(env: &Env, args: Args) -> anyhow::Result<i32> {
    let loaded = builders::load(env, args.engine.as_deref()).await?;
    let rows = builders::select(loaded.rows.clone(), std::slice::from_ref(&args.system))?;
    let served: Vec<&Row> = rows.iter().filter(|r| r.spec.is_some()).collect();
    let row = match served.as_slice() {
        [one] => *one,
        [] => anyhow::bail!(
            "this installation's config serves no {} builder (a container is left from an \
             earlier config: see `nixdock status`)",
            args.system
        ),
        several => {
            let on: Vec<&str> = several.iter().map(|r| r.engine.as_str()).collect();
            anyhow::bail!(
                "{} has a builder on engines {}: pick one with --engine NAME",
                args.system,
                on.join(", ")
            );
        }
    };
    let Some(spec) = &row.spec else {
        unreachable!("filtered above")
    };
    let engine = loaded.engine_of(row)?.clone();
    let builders = Builders::new(engine, loaded.state.clone())?;
    let ready = builders
        .ensure_ready_with(spec, None, &PullNotice)
        .await
        .with_context(|| format!("cannot get the {} builder ready", spec.system))?;
    // `ready.daemon` stays open until the command ends: a nix-daemon worker in the builder,
    // which its idle stop counts as a running build.
    let code = exec(&builders.engine.docker, &ready.container, &args.command).await?;
    drop(ready);
    Ok(code)
}

/// Runs `command` (a shell when empty) in `container`, wired to this process's stdin, stdout
/// and stderr; returns its exit status.
async fn exec(
    docker: &bollard::Docker,
    container: &str,
    command: &[String],
) -> anyhow::Result<i32> {
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    // `sh -c 'exec "$@"'`: a missing command is sh's 127, as in a local shell.
    let cmd: Vec<String> = if command.is_empty() {
        vec!["/bin/sh".into(), "-c".into(), SHELL.into()]
    } else {
        ["/bin/sh", "-c", "exec \"$@\"", "sh"]
            .iter()
            .map(|s| s.to_string())
            .chain(command.iter().cloned())
            .collect()
    };
    let mut env_vars = vec![PATH.to_string()];
    if tty {
        env_vars.push(format!(
            "TERM={}",
            std::env::var("TERM").unwrap_or_else(|_| "xterm".into())
        ));
    }
    let api = |e| anyhow::anyhow!("exec in container {container}: {e}");
    let created = docker
        .create_exec(
            container,
            CreateExecOptions {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(tty),
                env: Some(env_vars),
                cmd: Some(cmd),
                ..Default::default()
            },
        )
        .await
        .map_err(api)?;
    let started = docker
        .start_exec(
            &created.id,
            Some(StartExecOptions {
                detach: false,
                tty,
                output_capacity: None,
            }),
        )
        .await
        .map_err(api)?;
    let StartExecResults::Attached {
        mut output,
        mut input,
    } = started
    else {
        anyhow::bail!("exec in container {container}: the engine did not attach the streams");
    };
    let _raw = if tty {
        let raw = RawTerminal::enter();
        // Once, at the start: enough for a debugging session.
        if let Some((width, height)) = window_size() {
            let _ = docker
                .resize_exec(&created.id, ResizeExecOptions { height, width })
                .await;
        }
        raw
    } else {
        None
    };
    // Stdin is copied until it ends, then the command's stdin is closed (half-close).
    let stdin_pump = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if input.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    let _ = input.flush().await;
                }
            }
        }
        let _ = input.shutdown().await;
    });
    while let Some(item) = output.next().await {
        let r = match item {
            Ok(LogOutput::StdErr { message }) => {
                let mut e = std::io::stderr().lock();
                e.write_all(&message).and_then(|_| e.flush())
            }
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                let mut o = std::io::stdout().lock();
                o.write_all(&message).and_then(|_| o.flush())
            }
            Ok(LogOutput::StdIn { .. }) => Ok(()),
            Err(e) => {
                stdin_pump.abort();
                anyhow::bail!("the engine's stream from container {container} broke: {e}");
            }
        };
        if r.is_err() {
            break; // our stdout/stderr closed: the command's output is unwanted
        }
    }
    stdin_pump.abort();
    exit_code(docker, &created.id, container).await
}

/// The command's exit status, once the engine says it has ended.
async fn exit_code(docker: &bollard::Docker, id: &str, container: &str) -> anyhow::Result<i32> {
    for _ in 0..50 {
        let r = docker
            .inspect_exec(id)
            .await
            .map_err(|e| anyhow::anyhow!("exec in container {container}: {e}"))?;
        match (r.running, r.exit_code) {
            (Some(false), Some(code)) => return Ok(i32::try_from(code).unwrap_or(1)),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    anyhow::bail!("the engine did not say how the command in {container} ended")
}

/// The terminal's width and height (stdout's), if it is one.
fn window_size() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills the winsize we own; a failure leaves it unread.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0)
            .then_some((ws.ws_col, ws.ws_row))
    }
}

/// This terminal in raw mode (every key goes to the builder's terminal, which echoes and
/// handles ^C itself) until dropped, when its previous mode comes back.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        // SAFETY: tcgetattr/tcsetattr on stdin with a termios we own.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawTerminal { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the mode read in `enter`.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved);
        }
    }
}

/// Says on stderr that the builder's image is being pulled (the first use of the default image
/// can take minutes), and when it is done.
struct PullNotice;

impl crate::builder::PullObserver for PullNotice {
    fn start(&self, image: &str, platform: Option<&str>) {
        match platform {
            Some(p) => eprintln!("nixdock: pulling builder image {image} ({p}) …"),
            None => eprintln!("nixdock: pulling builder image {image} …"),
        }
    }

    fn progress(&self, _done: u64, _expected: u64) {}

    fn stop(&self) {
        eprintln!("nixdock: pull ended");
    }
}
