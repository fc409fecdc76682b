//! This installation's containers as the engine reports them (found by label through the
//! Engine API), and commands run inside them.

use anyhow::Context as _;
use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};
use futures_util::StreamExt;

use crate::builder::engine::podman_settled;
use crate::builder::provision::{
    LABEL_HOST_KEY, LABEL_IMAGE, LABEL_INSTANCE, LABEL_MAX_JOBS, LABEL_SYSTEM,
};
use crate::builder::{Engine, lifecycle, sandbox};

use super::timestamps::parse_rfc3339;

pub fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// One container of this installation, as the engine reports it.
#[derive(Debug, Clone)]
pub struct Existing {
    pub name: String,
    pub system: String,
    pub inspect: ContainerInspectResponse,
}

impl Existing {
    pub fn label(&self, key: &str) -> Option<&str> {
        lifecycle::label(&self.inspect, key)
    }

    pub fn status(&self) -> Option<ContainerStateStatusEnum> {
        lifecycle::status(&self.inspect)
    }

    pub fn running(&self) -> bool {
        matches!(self.status(), Some(ContainerStateStatusEnum::RUNNING))
    }

    /// `running`, `exited`, `created`, … as the engine says.
    pub fn state_name(&self) -> String {
        self.status()
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into())
    }

    /// Seconds since the container started, while it runs.
    pub fn uptime_secs(&self, now: i64) -> Option<u64> {
        if !self.running() {
            return None;
        }
        let started = parse_rfc3339(self.inspect.state.as_ref()?.started_at.as_deref()?)?;
        Some(now.saturating_sub(started).max(0) as u64)
    }

    /// The loopback port the engine published for sshd.
    pub fn port(&self) -> Option<u16> {
        lifecycle::published_port(&self.inspect)
    }

    /// The volume mounted at `/nix`.
    pub fn volume(&self) -> Option<&str> {
        self.inspect
            .mounts
            .as_ref()?
            .iter()
            .find(|m| m.destination.as_deref() == Some("/nix"))?
            .name
            .as_deref()
    }

    pub fn image_id(&self) -> Option<&str> {
        self.label(LABEL_IMAGE)
    }

    pub fn max_jobs(&self) -> Option<u32> {
        self.label(LABEL_MAX_JOBS)?.parse().ok()
    }

    pub fn host_key(&self) -> Option<&str> {
        self.label(LABEL_HOST_KEY)
    }

    /// Whether its builds are sandboxed, and why: decided when it was created and recorded in
    /// its labels (a container of a nixdock before the setting has none: never sandboxed).
    pub fn sandbox(&self) -> (bool, String) {
        match self.label(sandbox::LABEL_SANDBOX) {
            Some(on) => (
                on == "on",
                self.label(sandbox::LABEL_SANDBOX_WHY)
                    .unwrap_or("no reason recorded")
                    .to_string(),
            ),
            None => (
                false,
                "made by a nixdock without the sandbox setting (the next build with a changed \
                 configuration recreates it)"
                    .to_string(),
            ),
        }
    }
}

/// Every container labelled with this instance, inspected.
pub async fn list_existing(engine: &Engine, instance: &str) -> anyhow::Result<Vec<Existing>> {
    let opts = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_INSTANCE}={instance}")],
        )])),
        ..Default::default()
    };
    let list = podman_settled(|| engine.docker.list_containers(Some(opts.clone())))
        .await
        .with_context(|| format!("Docker engine at {}", engine.addr))?;
    let mut out = Vec::new();
    for c in list {
        let Some(id) = c.id else { continue };
        let inspect = match podman_settled(|| {
            engine
                .docker
                .inspect_container(&id, None::<InspectContainerOptions>)
        })
        .await
        {
            Ok(i) => i,
            Err(e) if is_not_found(&e) => continue, // removed meanwhile
            Err(e) => anyhow::bail!("Docker engine at {}: {e}", engine.addr),
        };
        let name = inspect
            .name
            .as_deref()
            .unwrap_or(&id)
            .trim_start_matches('/')
            .to_string();
        let system = c
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SYSTEM))
            .cloned()
            .unwrap_or_default();
        out.push(Existing {
            name,
            system,
            inspect,
        });
    }
    Ok(out)
}

/// Runs `cmd` in a running container through the Engine API, passing its output to
/// `on_output` as it comes; returns its exit code.
pub async fn exec(
    docker: &Docker,
    container: &str,
    cmd: &[&str],
    timeout: Duration,
    mut on_output: impl FnMut(bool, &[u8]),
) -> anyhow::Result<i64> {
    let created = docker
        .create_exec(
            container,
            CreateExecOptions {
                cmd: Some(cmd.to_vec()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("cannot run {cmd:?} in {container}"))?;
    let run = async {
        match docker
            .start_exec(&created.id, None)
            .await
            .with_context(|| format!("cannot run {cmd:?} in {container}"))?
        {
            StartExecResults::Attached { mut output, .. } => {
                while let Some(item) = output.next().await {
                    match item {
                        Ok(LogOutput::StdErr { message }) => on_output(true, &message),
                        Ok(other) => on_output(false, &other.into_bytes()),
                        Err(e) => anyhow::bail!("{container}: {e}"),
                    }
                }
            }
            StartExecResults::Detached => {}
        }
        Ok(())
    };
    tokio::time::timeout(timeout, run).await.map_err(|_| {
        anyhow::anyhow!("{cmd:?} in {container} did not finish within {timeout:?}")
    })??;
    let inspect = docker
        .inspect_exec(&created.id)
        .await
        .with_context(|| container.to_string())?;
    Ok(inspect.exit_code.unwrap_or(-1))
}
