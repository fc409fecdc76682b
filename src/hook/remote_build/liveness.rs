//! Watching a Docker builder while a build uses it. A paused container, or a remote engine that
//! dropped off the network, leaves the build's connection open and silent: nothing on it ever
//! fails, and a build without `max-silent-time` would wait forever (measured: a paused builder
//! held a hook in its input copy or its build indefinitely). So every phase that talks to the
//! builder runs beside this watch, which asks the engine about the container every
//! [`CHECK_EVERY`] and ends the phase, naming the cause, when the container is paused, stopped
//! or gone, or when the engine that carries the build's connection stops answering.

use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use bollard::query_parameters::InspectContainerOptions;

use crate::builder::container_log;

/// How often the engine is asked about the container.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Deadline of one question to the engine.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an engine that carries the build's connection (a remote engine's exec) may leave
/// every question unanswered before the build is given up.
pub const ENGINE_SILENCE: Duration = Duration::from_secs(30);
/// Deadline of reading the container's log for an error message.
pub const LOG_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes kept of what removing partial inputs says.
const SAID_BYTES: usize = 8 << 10;
/// How long a failed phase waits for the engine to record what became of the container.
pub const EXPLAIN_WITHIN: Duration = Duration::from_secs(1);

/// Which container states are expected in the phase being watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Getting the builder ready: it may not exist yet, or be created or stopped (the
    /// lifecycle starts it and says so itself); paused never gets better.
    Starting,
    /// Copies and the build: anything but running ends the phase.
    Running,
}

/// One Docker builder and the engine it runs on.
#[derive(Clone)]
pub struct Liveness {
    pub docker: Docker,
    /// The engine as messages name it: its name and address (`default (tcp://…)`).
    pub engine: String,
    pub container: String,
    /// The build's daemon connection goes through this engine (its exec): when the engine is
    /// silent, so is the build. Otherwise (the local socket, SSH through the published port) a
    /// busy engine is no reason to stop a build.
    pub engine_carries_link: bool,
    /// Partial inputs to remove from the builder's full store once the build's connection is
    /// closed (see [`Liveness::discard_invalid`]).
    pub to_discard: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Liveness {
    /// One question to the engine about the container, within [`ASK_TIMEOUT`].
    async fn ask(
        &self,
    ) -> Result<Result<ContainerInspectResponse, bollard::errors::Error>, tokio::time::error::Elapsed>
    {
        let opts = None::<InspectContainerOptions>;
        tokio::time::timeout(
            ASK_TIMEOUT,
            self.docker.inspect_container(&self.container, opts),
        )
        .await
    }

    /// Resolves only when the builder cannot serve the phase any more, with why.
    pub async fn watch(&self, expect: Expect) -> String {
        let mut silent_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let problem = match self.ask().await {
                Ok(Ok(c)) => {
                    silent_since = None;
                    self.judge(&c, expect)
                }
                Ok(Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                })) => match expect {
                    Expect::Starting => None,
                    Expect::Running => Some(format!(
                        "builder container {} was removed (engine {})",
                        self.container, self.engine
                    )),
                },
                Ok(Err(e)) => self.silence(&mut silent_since, &e.to_string()),
                Err(_) => self.silence(
                    &mut silent_since,
                    &format!("no answer within {} s", ASK_TIMEOUT.as_secs()),
                ),
            };
            if let Some(why) = problem {
                tracing::warn!(container = %self.container, "{why}");
                return why;
            }
        }
    }

    fn silence(&self, since: &mut Option<tokio::time::Instant>, last: &str) -> Option<String> {
        let since = *since.get_or_insert_with(tokio::time::Instant::now);
        tracing::info!(engine = %self.engine, container = %self.container, "engine did not answer: {last}");
        (self.engine_carries_link && since.elapsed() >= ENGINE_SILENCE).then(|| {
            format!(
                "engine {} (which carries the connection to builder container {}) did not answer for {} s: {last}",
                self.engine,
                self.container,
                since.elapsed().as_secs()
            )
        })
    }

    fn judge(&self, c: &ContainerInspectResponse, expect: Expect) -> Option<String> {
        let state = c.state.as_ref();
        let status = state.and_then(|s| s.status);
        match (status, expect) {
            (Some(ContainerStateStatusEnum::RUNNING), _) => None,
            (Some(ContainerStateStatusEnum::PAUSED), _) => Some(format!(
                "builder container {} was paused (engine {}); unpause it (`docker unpause`) or stop it",
                self.container, self.engine
            )),
            (_, Expect::Starting) => None,
            (other, Expect::Running) => {
                let exit = state.and_then(|s| s.exit_code).unwrap_or(-1);
                let oom = if state.and_then(|s| s.oom_killed) == Some(true) {
                    ", killed for lack of memory"
                } else {
                    ""
                };
                Some(format!(
                    "builder container {} is no longer running ({}, exit code {exit}{oom}; engine {})",
                    self.container,
                    other
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "state unknown".into()),
                    self.engine
                ))
            }
        }
    }

    /// What the container's log says since `since`, routine lines left out, for an error about
    /// a connection that ended under a build; `None` when it says nothing (or the engine cannot
    /// say within [`LOG_TIMEOUT`]).
    pub async fn log_since(&self, since: SystemTime) -> Option<String> {
        let lines =
            container_log::tail(&self.docker, &self.container, 10, Some(since), LOG_TIMEOUT).await;
        (!lines.is_empty()).then(|| {
            format!(
                "the log of builder container {} since the build started:\n  {}",
                self.container,
                lines.join("\n  ")
            )
        })
    }

    /// Whether the engine says the container runs (one question, within [`ASK_TIMEOUT`]).
    pub async fn is_running(&self) -> bool {
        matches!(self.ask().await, Ok(Ok(c)) if c.state.as_ref().and_then(|s| s.status) == Some(ContainerStateStatusEnum::RUNNING))
    }

    /// For the error of a phase that failed on its own (a connection that broke): what became
    /// of the container, if anything did (`None` when it still runs or the engine cannot say).
    /// A killed container's connections close a moment before the engine records its exit, so
    /// a running one is asked about again, for up to [`EXPLAIN_WITHIN`].
    pub async fn explain(&self) -> Option<String> {
        let t = tokio::time::Instant::now();
        loop {
            match self.ask().await {
                Ok(Ok(c)) => {
                    if let Some(why) = self.judge(&c, Expect::Running) {
                        return Some(why);
                    }
                }
                Ok(Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404,
                    ..
                })) => {
                    return Some(format!(
                        "builder container {} was removed (engine {})",
                        self.container, self.engine
                    ));
                }
                // The connection broke and the engine does not answer either: the likeliest
                // cause is the engine stopping or restarting (which stops its containers,
                // measured with engine 2 restarted under a build), so say that rather than
                // nothing.
                Ok(Err(e)) => {
                    return Some(format!(
                        "engine {} does not answer about builder container {} either ({e}): \
                         is the engine stopping or restarting?",
                        self.engine, self.container
                    ));
                }
                Err(_) => {
                    return Some(format!(
                        "engine {} does not answer about builder container {} either (no answer \
                         within {} s): is the engine stopping or restarting?",
                        self.engine,
                        self.container,
                        ASK_TIMEOUT.as_secs()
                    ));
                }
            }
            if t.elapsed() >= EXPLAIN_WITHIN {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Deadline of removing partial inputs from a builder's full store.
pub const DISCARD_TIMEOUT: Duration = Duration::from_secs(60);

impl Liveness {
    /// Removes what a failed input copy left of `paths` in the builder's store: the builder's
    /// Nix (2.8 measured) leaves a path it could not finish writing on disk, invalid, and a
    /// store that filled up stays full for every later build until a garbage collection. Only
    /// paths still invalid there are deleted (`nix-store --delete` takes Nix's own locks), and
    /// only after the build's connection is closed (its daemon worker holds the path's lock).
    /// Returns what the builder said, for the log.
    pub async fn discard_invalid(&self, paths: &[String]) -> Result<String, String> {
        if paths.is_empty() {
            return Ok(String::new());
        }
        use bollard::exec::{CreateExecOptions, StartExecResults};
        use futures_util::StreamExt;
        let nix_store = "/etc/nixdock/bin/nix-store";
        let list: Vec<String> = paths.iter().map(|p| format!("'{p}'")).collect();
        // The daemon worker that was writing a path holds its lock until it notices the closed
        // connection: try again for a few seconds while the path is there.
        let script = format!(
            "for p in {}; do i=0; while [ -e \"$p\" ] && [ $i -lt 25 ] && \
             ! {nix_store} --check-validity \"$p\" 2>/dev/null; do \
             {nix_store} --delete \"$p\" 2>&1; [ -e \"$p\" ] && sleep 0.2; i=$((i+1)); done; done",
            list.join(" ")
        );
        let run = async {
            let created = self
                .docker
                .create_exec(
                    &self.container,
                    CreateExecOptions {
                        cmd: Some(vec!["sh", "-c", &script]),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            // What it says is the container's to write: the first SAID_BYTES are kept, the
            // rest read and dropped, and all of it made printable.
            let mut said = Vec::new();
            if let StartExecResults::Attached { mut output, .. } = self
                .docker
                .start_exec(&created.id, None)
                .await
                .map_err(|e| e.to_string())?
            {
                while let Some(item) = output.next().await {
                    let chunk = item.map_err(|e| e.to_string())?.into_bytes();
                    let room = SAID_BYTES.saturating_sub(said.len());
                    said.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
            }
            Ok(crate::printable::message(&String::from_utf8_lossy(&said)))
        };
        tokio::time::timeout(DISCARD_TIMEOUT, run)
            .await
            .map_err(|_| format!("no answer within {} s", DISCARD_TIMEOUT.as_secs()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::ContainerState;

    fn watch() -> Liveness {
        Liveness {
            // Never used: judging needs no engine.
            docker: Docker::connect_with_http("127.0.0.1:9", 1, bollard::API_DEFAULT_VERSION)
                .unwrap(),
            engine: "default".into(),
            container: "nixdock-x-x86_64-linux".into(),
            engine_carries_link: false,
            to_discard: Default::default(),
        }
    }

    fn inspect(status: ContainerStateStatusEnum, exit: i64, oom: bool) -> ContainerInspectResponse {
        ContainerInspectResponse {
            state: Some(ContainerState {
                status: Some(status),
                exit_code: Some(exit),
                oom_killed: Some(oom),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_paused_builder_ends_every_phase() {
        let w = watch();
        for expect in [Expect::Starting, Expect::Running] {
            let why = w
                .judge(&inspect(ContainerStateStatusEnum::PAUSED, 0, false), expect)
                .unwrap();
            assert!(
                why.contains("was paused") && why.contains(&w.container),
                "{why}"
            );
        }
    }

    #[test]
    fn a_stopped_builder_ends_a_running_phase_only() {
        let w = watch();
        let killed = inspect(ContainerStateStatusEnum::EXITED, 137, false);
        assert!(w.judge(&killed, Expect::Starting).is_none());
        let why = w.judge(&killed, Expect::Running).unwrap();
        assert!(
            why.contains("no longer running") && why.contains("exit code 137"),
            "{why}"
        );
        let oom = inspect(ContainerStateStatusEnum::EXITED, 137, true);
        assert!(
            w.judge(&oom, Expect::Running)
                .unwrap()
                .contains("lack of memory")
        );
        let running = inspect(ContainerStateStatusEnum::RUNNING, 0, false);
        assert!(w.judge(&running, Expect::Running).is_none());
    }

    #[test]
    fn engine_silence_counts_only_where_it_carries_the_connection() {
        let mut w = watch();
        let mut since = Some(tokio::time::Instant::now() - ENGINE_SILENCE);
        assert!(w.silence(&mut since, "timed out").is_none());
        w.engine_carries_link = true;
        let why = w.silence(&mut since, "timed out").unwrap();
        assert!(
            why.contains("engine default") && why.contains("did not answer"),
            "{why}"
        );
        let mut fresh = None;
        assert!(w.silence(&mut fresh, "timed out").is_none());
    }
}
