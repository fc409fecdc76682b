//! A command run inside a container through the Engine API's exec (what `docker exec -i` does),
//! as the same separately owned parts as an SSH command's channel. It is how the hook reaches a
//! builder on an engine whose containers this host cannot reach on its own (a `tcp://` or
//! `ssh://` engine on another machine): the bytes ride the engine connection, which is already
//! authenticated (TLS client certificate, or the engine host's SSH key), and no sshd is
//! published on any network.

use std::net::SocketAddr;
use std::sync::Arc;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::ssh::{
    ClosedSignal, ExecChannel, ExecOutput, ExecStdin, ExitStatus, ExitWaiter, STDOUT_QUEUE,
};

/// The engine's frame buffer: large enough that a NAR stream arrives in few, large chunks.
const FRAME_CAPACITY: usize = 256 * 1024;
/// How long the engine may take to say how a command ended.
const INSPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Stderr chunks queued before further stderr is dropped (as for SSH channels).
const STDERR_QUEUE: usize = 256;

/// Commands in one container of one engine.
#[derive(Clone)]
pub struct EngineExec {
    docker: Docker,
    container: String,
}

impl std::fmt::Debug for EngineExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineExec")
            .field("container", &self.container)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineExecError {
    #[error("exec in container {container}: {source}")]
    Api {
        container: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("exec in container {container}: the engine did not attach the command's streams")]
    Detached { container: String },
}

impl EngineExec {
    pub fn new(docker: Docker, container: String) -> EngineExec {
        EngineExec { docker, container }
    }

    pub fn container(&self) -> &str {
        &self.container
    }

    /// Runs `command` with `/bin/sh -c` as the container's root, its stdin, stdout and stderr
    /// attached. Its exit status is asked of the engine once its output ends.
    pub async fn exec(&self, command: &str) -> Result<ExecChannel, EngineExecError> {
        let api = |source| EngineExecError::Api {
            container: self.container.clone(),
            source,
        };
        let created = self
            .docker
            .create_exec(
                &self.container,
                CreateExecOptions {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(false),
                    cmd: Some(vec!["/bin/sh", "-c", command]),
                    ..Default::default()
                },
            )
            .await
            .map_err(api)?;
        let started = self
            .docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: Some(FRAME_CAPACITY),
                }),
            )
            .await
            .map_err(api)?;
        let StartExecResults::Attached { output, input } = started else {
            return Err(EngineExecError::Detached {
                container: self.container.clone(),
            });
        };
        Ok(self.channel(created.id, output, input))
    }

    fn channel(
        &self,
        id: String,
        mut output: std::pin::Pin<
            Box<dyn futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
        >,
        input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    ) -> ExecChannel {
        let closed = Arc::new(ClosedSignal::default());
        let (stdout_tx, stdout_rx) = mpsc::channel(STDOUT_QUEUE);
        let (stderr_tx, stderr_rx) = mpsc::channel(STDERR_QUEUE);
        let (exit_tx, exit_rx) = oneshot::channel();
        let reader_closed = closed.clone();
        let docker = self.docker.clone();
        let container = self.container.clone();
        tokio::spawn(async move {
            while let Some(item) = output.next().await {
                match item {
                    Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                        if stdout_tx.send(Ok(message)).await.is_err() {
                            // Nobody reads stdout any more: the command's output is unwanted.
                            break;
                        }
                    }
                    Ok(LogOutput::StdErr { message }) => {
                        // Never block stdout on unread stderr.
                        let _ = stderr_tx.try_send(Ok(message));
                    }
                    Ok(LogOutput::StdIn { .. }) => {}
                    Err(e) => {
                        let _ = stdout_tx
                            .send(Err(std::io::Error::other(format!(
                                "the engine's stream from container {container} broke: {e}"
                            ))))
                            .await;
                        break;
                    }
                }
            }
            drop(stdout_tx);
            drop(stderr_tx);
            reader_closed.close();
            // The exit code is the engine's to tell, once the process has gone.
            let asked = tokio::time::timeout(INSPECT_TIMEOUT, docker.inspect_exec(&id)).await;
            let status = match asked {
                Ok(Ok(r)) => match (r.running, r.exit_code.map(u32::try_from)) {
                    (Some(false), Some(Ok(code))) => ExitStatus::Exited(code),
                    _ => ExitStatus::Unreported,
                },
                Ok(Err(e)) => {
                    tracing::debug!(%container, "cannot ask how exec {id} ended: {e}");
                    ExitStatus::Unreported
                }
                Err(_) => {
                    tracing::debug!(%container, "no answer on how exec {id} ended within {INSPECT_TIMEOUT:?}");
                    ExitStatus::Unreported
                }
            };
            let _ = exit_tx.send(Ok(status));
        });
        ExecChannel {
            // Its drop alone would leave the connection open (the reader above holds the
            // other half), so a command waiting for the end of its input would wait on.
            stdin: ExecStdin::shut_down_on_drop(Box::new(input), closed),
            stdout: ExecOutput::new(stdout_rx),
            stderr: ExecOutput::new(stderr_rx),
            exit: ExitWaiter::new(exit_rx, SocketAddr::from(([0, 0, 0, 0], 0))),
        }
    }
}
