//! Starting, reusing and recreating builder containers, and the readiness check: a builder is
//! ready only when an SSH handshake with its pinned host key succeeded and `nix-daemon
//! --stdio` answered. The ready connection is handed to the caller, so the check costs a
//! build nothing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bollard::errors::Error as DockerError;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, RemoveContainerOptions,
    StartContainerOptions, StopContainerOptions, UploadToContainerOptions,
};
use futures_util::StreamExt;
use hook_protocol::worker::WorkerClient;

use crate::state::{FileLock, StateDir, StateError};
use crate::transport::holder;
use crate::transport::keys::{self, ClientKey};
use crate::transport::ssh::{self, SshError, SshSession};
use crate::transport::stream_channel::unix_stream_channel;
use crate::transport::{EngineExec, EngineExecError, Link};

use super::engine::{Engine, EngineError};
use super::provision::{self, BuilderSpec, Publish, REMOTE_NIX_DAEMON, SSH_PORT};
use super::{container_log, sandbox, slots};

pub use crate::transport::DaemonConnection;

#[derive(Debug, thiserror::Error)]
pub enum BuilderError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("builder {container} stopped while starting ({status}); its last output:\n{logs}")]
    Exited {
        container: String,
        status: String,
        logs: String,
    },
    #[error("builder {container} did not become ready within {secs} s: {last}")]
    NotReady {
        container: String,
        secs: u64,
        last: String,
    },
    #[error("builder {container}: {what}")]
    Broken { container: String, what: String },
    #[error("builder {container}: SSH: {source}")]
    Ssh {
        container: String,
        #[source]
        source: Box<SshError>,
    },
    #[error("builder {container}: {source}")]
    Holder {
        container: String,
        #[source]
        source: Box<crate::transport::holder::HolderError>,
    },
    #[error("builder {container}: through the engine: {source}")]
    Exec {
        container: String,
        #[source]
        source: Box<EngineExecError>,
    },
    #[error("builder {container}: nix-daemon did not answer: {source}")]
    Daemon {
        container: String,
        #[source]
        source: Box<hook_protocol::worker::WorkerError>,
    },
    #[error("cannot make an SSH key: {0}")]
    Key(String),
    #[error("builder {container}: {why}")]
    Sandbox { container: String, why: String },
    #[error(transparent)]
    Pull(Box<PullError>),
}

impl BuilderError {
    pub fn is_host_key_mismatch(&self) -> bool {
        matches!(self, BuilderError::Ssh { source, .. } if matches!(**source, SshError::HostKeyMismatch { .. }))
    }
}

/// A builder image's pull failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot pull the builder image {image} for {system} ({platform}) from registry {registry}: {reason}\n\
     Without a registry, build an image from Debian packages (`nixdock image build --from-debian --system {system}`) \
     and set `image` for {system} in the nixdock config to it."
)]
pub struct PullError {
    pub image: String,
    pub system: String,
    pub platform: String,
    pub registry: String,
    pub reason: String,
}

/// Told about a builder image's pull, which happens only when the image is not on the engine
/// (the first build with the default image): the hook shows it as Nix progress.
pub trait PullObserver: Sync {
    /// The pull of `image` for `platform` begins.
    fn start(&self, image: &str, platform: Option<&str>);
    /// Bytes downloaded so far and expected, summed over the layers the engine reported.
    fn progress(&self, done: u64, expected: u64);
    /// The pull ended, either way.
    fn stop(&self);
}

/// Sees nothing.
pub struct NoPullObserver;

impl PullObserver for NoPullObserver {
    fn start(&self, _: &str, _: Option<&str>) {}
    fn progress(&self, _: u64, _: u64) {}
    fn stop(&self) {}
}

/// How long a builder's `/nix` volume of an earlier image stays after its container was
/// replaced (going back to that image finds its store).
pub const REPLACED_VOLUME_GRACE: Duration = Duration::from_secs(24 * 3600);
/// For tests only: seconds that replace [`REPLACED_VOLUME_GRACE`].
pub const REPLACED_VOLUME_GRACE_ENV: &str = "NIXDOCK_VOLUME_GRACE_SECS";

/// [`REPLACED_VOLUME_GRACE`], or the tests' [`REPLACED_VOLUME_GRACE_ENV`].
pub fn replaced_volume_grace() -> Duration {
    std::env::var(REPLACED_VOLUME_GRACE_ENV)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map_or(REPLACED_VOLUME_GRACE, Duration::from_secs)
}

/// No message from the engine about a pull for this long: the pull has stalled.
pub const PULL_STALL: Duration = Duration::from_secs(120);
/// The longest a whole pull may take.
pub const PULL_LIMIT: Duration = Duration::from_secs(3600);

/// Layers a pull's tally follows at most.
const MAX_LAYERS: usize = 1024;

/// A pull's bytes, from the engine's progress messages: each layer's `Downloading` progress
/// (current/total), complete at `Download complete`/`Pull complete`. Layers the engine already
/// has (`Already exists`) count for nothing.
#[derive(Debug, Default)]
pub struct PullTally {
    layers: std::collections::BTreeMap<String, (u64, u64)>,
}

impl PullTally {
    /// Takes one message; true when the totals changed.
    pub fn update(
        &mut self,
        id: Option<&str>,
        status: Option<&str>,
        current: Option<i64>,
        total: Option<i64>,
    ) -> bool {
        let (Some(id), Some(status)) = (id, status) else {
            return false;
        };
        let before = self.totals();
        let n = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
        match status {
            "Downloading" => {
                // An image has a few dozen layers; the engine's messages are its own to write.
                let known = self.layers.contains_key(id);
                if let Some(total) = n(total).filter(|t| *t > 0)
                    && (known || self.layers.len() < MAX_LAYERS)
                    && id.len() <= 128
                {
                    let cur = n(current).unwrap_or(0).min(total);
                    self.layers.insert(id.to_string(), (cur, total));
                }
            }
            "Download complete" | "Verifying Checksum" | "Pull complete" | "Extracting" => {
                if let Some(l) = self.layers.get_mut(id) {
                    l.0 = l.1;
                }
            }
            _ => {}
        }
        self.totals() != before
    }

    /// (done, expected) over all layers seen downloading.
    pub fn totals(&self) -> (u64, u64) {
        self.layers.values().fold((0u64, 0u64), |(d, e), (ld, le)| {
            (d.saturating_add(*ld), e.saturating_add(*le))
        })
    }
}

/// The registry an image reference names (Docker's rule: a first component with a `.` or `:`,
/// or `localhost`, is a registry; otherwise Docker Hub).
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// A builder that answered, with the connection that proved it.
pub struct ReadyBuilder {
    pub spec: BuilderSpec,
    pub container: String,
    /// SSH to its sshd, or the engine's exec.
    pub link: Link,
    pub daemon: DaemonConnection,
    /// Whether this call created or started the container (a cold start).
    pub started: bool,
}

/// Whether the container started less than 15 s ago (its sshd may not be up yet).
fn just_started(c: &ContainerInspectResponse) -> bool {
    c.state
        .as_ref()
        .and_then(|s| s.started_at.as_deref())
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .is_some_and(|t| (time::OffsetDateTime::now_utc() - t).whole_seconds() < 15)
}

/// How [`Builders::ensure_ready_local`] reached the builder.
pub enum Ready {
    /// Through its daemon socket beneath the volume, as [`Builders::connect_local`] does.
    Local {
        conn: Box<LocalConnection>,
        /// Whether this call created or started the container (a cold start).
        started: bool,
    },
    /// Over SSH or the engine's exec.
    Link(Box<ReadyBuilder>),
}

/// This installation's builders on one engine.
pub struct Builders {
    pub engine: Engine,
    pub state: StateDir,
    pub client_key: ClientKey,
    /// How long an SSH holder keeps a builder's session after its last channel; zero: no
    /// holder (see `transport::holder`).
    pub ssh_persist: Duration,
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn is_conflict(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 409,
            ..
        }
    )
}

/// The loopback port the engine published for sshd.
pub fn published_port(c: &ContainerInspectResponse) -> Option<u16> {
    c.network_settings
        .as_ref()?
        .ports
        .as_ref()?
        .get(SSH_PORT)?
        .as_ref()?
        .iter()
        .find_map(|b| b.host_port.as_deref()?.parse().ok())
}

/// A label of the container.
pub fn label<'a>(c: &'a ContainerInspectResponse, key: &str) -> Option<&'a str> {
    c.config
        .as_ref()?
        .labels
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The container's state as the engine reports it.
pub fn status(c: &ContainerInspectResponse) -> Option<ContainerStateStatusEnum> {
    c.state.as_ref()?.status
}

impl Builders {
    pub fn new(engine: Engine, state: StateDir) -> Result<Builders, BuilderError> {
        let client_key = keys::load_or_create_client_key(state.path())
            .map_err(|e| BuilderError::Key(e.to_string()))?;
        Ok(Builders {
            engine,
            state,
            client_key,
            ssh_persist: Duration::ZERO,
        })
    }

    /// Builders whose SSH sessions an SSH holder keeps for `persist` after use (zero: none).
    pub fn with_ssh_persist(mut self, persist: Duration) -> Builders {
        self.ssh_persist = persist;
        self
    }

    /// Makes sure the builder for `spec` runs with its current configuration and answers,
    /// creating, starting or recreating its container as needed. Concurrent callers (other
    /// hook processes) wait on a lock in the state dir, so one system never gets two
    /// containers and nobody connects to a half-started one.
    ///
    /// `own_slot` is the slot the caller already holds for its build: it does not count as a
    /// running build when deciding whether a changed container may be recreated.
    pub async fn ensure_ready(
        &self,
        spec: &BuilderSpec,
        own_slot: Option<&slots::Slot>,
    ) -> Result<ReadyBuilder, BuilderError> {
        self.ensure_ready_with(spec, own_slot, &NoPullObserver)
            .await
    }

    /// [`ensure_ready`](Self::ensure_ready), telling `pull` about a pull of the image.
    pub async fn ensure_ready_with(
        &self,
        spec: &BuilderSpec,
        own_slot: Option<&slots::Slot>,
        pull: &dyn PullObserver,
    ) -> Result<ReadyBuilder, BuilderError> {
        match self.ensure_ready_inner(spec, own_slot, pull, false).await? {
            Ready::Link(r) => Ok(*r),
            Ready::Local { .. } => Err(BuilderError::Broken {
                container: spec.container_name(),
                what: "internal error: a local-socket connection nobody asked for".into(),
            }),
        }
    }

    /// [`ensure_ready_with`](Self::ensure_ready_with) for a caller that can use the local
    /// socket (`transport = "auto"`): when this call starts the container on a local Linux
    /// engine, readiness is the builder daemon's socket beneath the `/nix` volume answering a
    /// worker handshake, as [`connect_local`](Self::connect_local) checks it — the daemon is up
    /// before sshd (the entry script starts it first), and no SSH handshake is made. Where the
    /// socket cannot be ours (a user-namespaced engine, a non-root hook) or does not answer in
    /// time, readiness is proved over SSH as before.
    pub async fn ensure_ready_local(
        &self,
        spec: &BuilderSpec,
        own_slot: Option<&slots::Slot>,
        pull: &dyn PullObserver,
    ) -> Result<Ready, BuilderError> {
        self.ensure_ready_inner(spec, own_slot, pull, true).await
    }

    async fn ensure_ready_inner(
        &self,
        spec: &BuilderSpec,
        own_slot: Option<&slots::Slot>,
        pull: &dyn PullObserver,
        want_local: bool,
    ) -> Result<Ready, BuilderError> {
        let name = spec.container_name();
        if let Some(why) = sandbox::refusal(spec.sandbox, spec.runs_under_emulation(), &spec.system)
        {
            return Err(BuilderError::Sandbox {
                container: name,
                why,
            });
        }
        let lock = self.lock_builder(&name).await?;

        let image_id = match self.local_image_id(spec).await? {
            Some(id) => id,
            None => {
                // One pull of an image at a time across hooks: two systems' pulls of the same
                // tag for different platforms would retag it under each other.
                let _pull_lock = self.lock_pull(&spec.image).await?;
                match self.local_image_id(spec).await? {
                    Some(id) => id,
                    None => self.pull(spec, pull).await?,
                }
            }
        };
        let hash = spec.config_hash(&image_id, self.client_key.public_openssh());
        let mut started = false;

        let existing = match self.inspect(&name).await? {
            Some(c) if label(&c, provision::LABEL_CONFIG) == Some(hash.as_str()) => Some(c),
            Some(c) => {
                // Configuration changed: recreate, but never under a running build.
                // Builds started under either configuration may hold slots up to the larger
                // max-jobs.
                let old_jobs: u32 = label(&c, provision::LABEL_MAX_JOBS)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(spec.max_jobs);
                let n = old_jobs.max(spec.max_jobs);
                match slots::try_acquire_all_except(
                    &self.state.load_dir(),
                    &name,
                    n,
                    own_slot.map(|s| s.index),
                )? {
                    Some(_all) => {
                        tracing::info!(container = %name, "configuration changed; recreating the builder");
                        self.remove(&name).await?;
                        None
                    }
                    None => {
                        tracing::warn!(container = %name, "configuration changed, but builds are running on it; reusing it until they finish");
                        Some(c)
                    }
                }
            }
            None => None,
        };
        let c = match existing {
            Some(c) => c,
            None => {
                started = true;
                self.create(spec, &image_id, &hash).await?
            }
        };
        if !matches!(status(&c), Some(ContainerStateStatusEnum::RUNNING)) {
            started = true;
            tracing::info!(container = %name, "starting builder");
            self.engine
                .docker
                .start_container(&name, None::<StartContainerOptions>)
                .await
                .map_err(self.engine.api_err())?;
        }
        if !started {
            // Running with the current configuration: connecting needs no lock, and holding it
            // through the SSH and daemon handshakes would make simultaneous builds queue.
            drop(lock);
        }
        // Also when another process started it a moment ago: that one did not wait for sshd.
        let local = if want_local {
            self.wait_local(spec, &name, &c).await
        } else {
            None
        };
        let ready = match local {
            Some(conn) => Ready::Local {
                conn: Box::new(conn),
                started,
            },
            // A running container just inspected needs no second inspect to be connected to.
            None => Ready::Link(Box::new(
                self.wait_ready(spec, &name, started, (!started).then(|| c.clone()))
                    .await?,
            )),
        };
        if started {
            // Still under the builder's lock, so no other process makes a container on one of
            // these volumes meanwhile; a cold start already takes a second or more.
            let volume = spec.volume_name(&image_id);
            let sweep = self.sweep_replaced_volumes(spec, &volume, c.created.as_deref());
            if tokio::time::timeout(Duration::from_secs(10), sweep)
                .await
                .is_err()
            {
                tracing::warn!(container = %name, "looking for replaced volumes took over 10 s; left for later");
            }
        }
        Ok(ready)
    }

    /// Removes this builder's `/nix` volumes of earlier images (`volume_name` has the image id)
    /// that no container mounts, once the current container is [`replaced_volume_grace`] old:
    /// it was made when the image (or the configuration) last changed, so an old volume waits
    /// that long in case the user goes back to its image, and no longer for `nixdock gc`.
    /// Failures are logged, never a build's.
    async fn sweep_replaced_volumes(
        &self,
        spec: &BuilderSpec,
        current: &str,
        container_created: Option<&str>,
    ) {
        let grace = replaced_volume_grace();
        let age = container_created
            .and_then(|c| {
                time::OffsetDateTime::parse(c, &time::format_description::well_known::Rfc3339).ok()
            })
            .map(|t| (time::OffsetDateTime::now_utc() - t).whole_seconds());
        let Some(age) = age else {
            tracing::debug!(container = %current, "no creation time; replaced volumes left alone");
            return;
        };
        if age < 0 || (age as u64) < grace.as_secs() {
            return;
        }
        let docker = &self.engine.docker;
        let labels = spec.volume_labels();
        let opts = bollard::query_parameters::ListVolumesOptions {
            filters: Some(std::collections::HashMap::from([(
                "label".to_string(),
                labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            )])),
        };
        let prefix = format!("{}-", spec.container_name());
        let volumes = match docker.list_volumes(Some(opts)).await {
            Ok(l) => l.volumes.unwrap_or_default(),
            Err(e) => {
                tracing::debug!(container = %spec.container_name(), "cannot list volumes: {e}");
                return;
            }
        };
        for v in volumes {
            if v.name == current || !v.name.starts_with(&prefix) {
                continue;
            }
            let in_use = docker
                .list_containers(Some(bollard::query_parameters::ListContainersOptions {
                    all: true,
                    filters: Some(std::collections::HashMap::from([(
                        "volume".to_string(),
                        vec![v.name.clone()],
                    )])),
                    ..Default::default()
                }))
                .await
                .map(|l| !l.is_empty())
                .unwrap_or(true);
            if in_use {
                continue;
            }
            match docker
                .remove_volume(
                    &v.name,
                    None::<bollard::query_parameters::RemoveVolumeOptions>,
                )
                .await
            {
                Ok(()) => {
                    tracing::info!(volume = %v.name, grace_secs = grace.as_secs(), "removed the /nix volume of a replaced image")
                }
                Err(e) => {
                    tracing::warn!(volume = %v.name, "cannot remove a replaced image's volume: {e}")
                }
            }
        }
    }

    /// The fast way to a builder on a local Linux engine: when its container is running with
    /// the current configuration, connect straight to its nix-daemon's socket through the
    /// `/nix` volume on the host — no SSH, no encryption, no sshd or userland proxy in between.
    /// `None` (after a debug line saying why) whenever that is not possible, and the caller
    /// goes the SSH way: another engine, a hook that is not root, a user-namespaced engine
    /// (the socket is not ours), a stopped or outdated container, a daemon that does not
    /// answer.
    pub async fn connect_local(&self, spec: &BuilderSpec) -> Option<LocalConnection> {
        let name = spec.container_name();
        match self.try_connect_local(spec, &name).await {
            Ok(r) => Some(r),
            Err(why) => {
                tracing::debug!(container = %name, "not through the local socket: {why}");
                None
            }
        }
    }

    async fn try_connect_local(
        &self,
        spec: &BuilderSpec,
        name: &str,
    ) -> Result<LocalConnection, NoLocalSocket> {
        if !(cfg!(target_os = "linux") && self.engine.addr.starts_with("unix://")) {
            return Err(NoLocalSocket::RemoteEngine(self.engine.addr.clone()));
        }
        let (image_id, c) = tokio::join!(self.local_image_id(spec), self.inspect(name));
        let image_id = image_id?.ok_or(NoLocalSocket::NoImage)?;
        let c = c?.ok_or(NoLocalSocket::NoContainer)?;
        let hash = spec.config_hash(&image_id, self.client_key.public_openssh());
        if label(&c, provision::LABEL_CONFIG) != Some(hash.as_str()) {
            return Err(NoLocalSocket::ConfigChanged);
        }
        if !matches!(status(&c), Some(ContainerStateStatusEnum::RUNNING)) {
            return Err(NoLocalSocket::NotRunning);
        }
        let volume = c
            .mounts
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|m| m.destination.as_deref() == Some("/nix"))
            .and_then(|m| m.source.clone())
            .ok_or(NoLocalSocket::NoVolume)?;
        let rel = provision::REMOTE_DAEMON_SOCKET
            .strip_prefix("/nix/")
            .unwrap_or(provision::REMOTE_DAEMON_SOCKET);
        let (socket, fd) = checked_volume_socket(std::path::Path::new(&volume), rel)?;
        let daemon =
            open_local_daemon(&socket, name)
                .await
                .map_err(|source| NoLocalSocket::Daemon {
                    socket: format!("{volume}/{rel}"),
                    source,
                })?;
        // The path names the checked socket only while its descriptor is open; a second
        // connection (`Reopen::LocalSocket`) may come later in this process.
        keep_open(fd);
        Ok(LocalConnection {
            socket,
            volume: volume.into(),
            daemon,
        })
    }

    /// Waits after a start for the builder daemon's socket beneath the container's `/nix`
    /// volume to answer a worker handshake (see [`ensure_ready_local`](Self::ensure_ready_local)).
    /// `None` (and a debug line saying why) when the socket cannot serve this hook — not a local
    /// Linux engine, a socket that is not ours — or has not answered within a sixth of the
    /// readiness limit; the caller then waits over SSH, which also reports a container that
    /// exited.
    async fn wait_local(
        &self,
        spec: &BuilderSpec,
        name: &str,
        c: &ContainerInspectResponse,
    ) -> Option<LocalConnection> {
        if !(cfg!(target_os = "linux") && self.engine.addr.starts_with("unix://")) {
            return None;
        }
        let volume = c
            .mounts
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|m| m.destination.as_deref() == Some("/nix"))
            .and_then(|m| m.source.clone())?;
        let rel = provision::REMOTE_DAEMON_SOCKET
            .strip_prefix("/nix/")
            .unwrap_or(provision::REMOTE_DAEMON_SOCKET);
        let t0 = Instant::now();
        let limit = if spec.runs_under_emulation() {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(10)
        };
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let why = match checked_volume_socket(std::path::Path::new(&volume), rel) {
                Ok((socket, fd)) => match open_local_daemon(&socket, name).await {
                    Ok(daemon) => {
                        keep_open(fd);
                        tracing::info!(container = %name, ms = t0.elapsed().as_millis() as u64, attempts, "builder ready (local socket)");
                        return Some(LocalConnection {
                            socket,
                            volume: volume.into(),
                            daemon,
                        });
                    }
                    // The last start's socket file (refused) until the new daemon replaces it.
                    Err(e) => e.to_string(),
                },
                // Not made yet (the entry script removes the old one first).
                Err(NoLocalSocket::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    "no socket yet".to_string()
                }
                Err(why) => {
                    tracing::debug!(container = %name, "not waiting for the local socket: {why}");
                    return None;
                }
            };
            if t0.elapsed() > limit {
                tracing::debug!(container = %name, "the local socket did not answer within {} s ({why}); waiting over SSH", limit.as_secs());
                return None;
            }
            // A container that exited is reported by the SSH wait, which reads its logs.
            if attempts.is_multiple_of(20)
                && !matches!(
                    self.inspect(name)
                        .await
                        .ok()
                        .flatten()
                        .as_ref()
                        .and_then(status),
                    Some(ContainerStateStatusEnum::RUNNING)
                )
            {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The per-builder lock: held while a container is created, started or recreated, and
    /// until the first connection to a container this process started succeeded.
    async fn lock_builder(&self, name: &str) -> Result<FileLock, BuilderError> {
        let lock_path = self.state.lock_path(&format!("builder-{name}"));
        let container = name.to_string();
        Ok(
            tokio::task::spawn_blocking(move || FileLock::exclusive(&lock_path))
                .await
                .map_err(|e| BuilderError::Broken {
                    container,
                    what: format!("lock task failed: {e}"),
                })??,
        )
    }

    /// The lock held while `image` is pulled on this engine.
    async fn lock_pull(&self, image: &str) -> Result<FileLock, BuilderError> {
        let name: String = format!("pull-{}-{image}", self.engine.name)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let lock_path = self.state.lock_path(&name);
        Ok(
            tokio::task::spawn_blocking(move || FileLock::exclusive(&lock_path))
                .await
                .map_err(|e| BuilderError::Broken {
                    container: image.to_string(),
                    what: format!("lock task failed: {e}"),
                })??,
        )
    }

    /// The image's id if the engine has it (never pulls): the spec's local image.
    async fn local_image_id(&self, spec: &BuilderSpec) -> Result<Option<String>, BuilderError> {
        match self.engine.docker.inspect_image(&spec.local_image()).await {
            Ok(i) => i.id.map(Some).ok_or_else(|| BuilderError::Broken {
                container: spec.container_name(),
                what: "image has no id".into(),
            }),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.engine.api_err()(e).into()),
        }
    }

    /// Pulls the image for the spec's platform through the engine, telling `observer` the bytes
    /// as the engine reports them; a stall of [`PULL_STALL`] or a pull longer than
    /// [`PULL_LIMIT`] fails. Returns the pulled image's id. Only here does a platform go to the
    /// engine: a local image runs as it is, whatever architecture its label claims.
    async fn pull(
        &self,
        spec: &BuilderSpec,
        observer: &dyn PullObserver,
    ) -> Result<String, BuilderError> {
        let platform = spec.platform.clone().unwrap_or_default();
        let failed = |reason: String| {
            BuilderError::Pull(Box::new(PullError {
                image: spec.image.clone(),
                system: spec.container_system().to_string(),
                platform: if platform.is_empty() {
                    "the engine's platform".into()
                } else {
                    platform.clone()
                },
                registry: registry_of(&spec.image).to_string(),
                reason,
            }))
        };
        tracing::info!(image = %spec.image, %platform, engine = %self.engine.name, "pulling builder image");
        let t0 = Instant::now();
        observer.start(&spec.image, spec.platform.as_deref());
        let opts = CreateImageOptions {
            from_image: Some(spec.image.clone()),
            platform: platform.clone(),
            ..Default::default()
        };
        let mut stream = self.engine.docker.create_image(Some(opts), None, None);
        let mut tally = PullTally::default();
        let outcome = loop {
            let left = PULL_LIMIT.saturating_sub(t0.elapsed());
            let next = match tokio::time::timeout(PULL_STALL.min(left), stream.next()).await {
                Ok(n) => n,
                Err(_) if left <= PULL_STALL => {
                    break Err(failed(format!(
                        "the pull took over {} s",
                        PULL_LIMIT.as_secs()
                    )));
                }
                Err(_) => {
                    break Err(failed(format!(
                        "the engine reported no progress for {} s",
                        PULL_STALL.as_secs()
                    )));
                }
            };
            match next {
                None => break Ok(()),
                Some(Err(e)) => break Err(failed(engine_message(&e))),
                Some(Ok(info)) => {
                    if let Some(e) = info.error_detail.and_then(|d| d.message) {
                        break Err(failed(e));
                    }
                    let (cur, total) = info
                        .progress_detail
                        .map(|p| (p.current, p.total))
                        .unwrap_or_default();
                    if tally.update(info.id.as_deref(), info.status.as_deref(), cur, total) {
                        let (done, expected) = tally.totals();
                        observer.progress(done, expected);
                    }
                }
            }
        };
        drop(stream);
        observer.stop();
        outcome?;
        let (done, expected) = tally.totals();
        tracing::info!(image = %spec.image, ms = t0.elapsed().as_millis() as u64, bytes = done, expected, "pulled builder image");
        let local = spec.local_image();
        if local != spec.image {
            // Kept under the platform's own tag (see `BuilderSpec::local_image`).
            let pulled = self
                .engine
                .docker
                .inspect_image(&spec.image)
                .await
                .map_err(|e| {
                    failed(format!(
                        "the pulled image is not there: {}",
                        engine_message(&e)
                    ))
                })?;
            let id = pulled
                .id
                .ok_or_else(|| failed("the pulled image has no id".into()))?;
            let (repo, tag) = provision::split_tag(&local)
                .ok_or_else(|| failed(format!("{local} is not a tag")))?;
            let opts = bollard::query_parameters::TagImageOptions {
                repo: Some(repo.to_string()),
                tag: Some(tag.to_string()),
            };
            self.engine
                .docker
                .tag_image(&id, Some(opts))
                .await
                .map_err(|e| failed(format!("cannot tag it {local}: {}", engine_message(&e))))?;
        }
        match self.local_image_id(spec).await? {
            Some(id) => Ok(id),
            None => Err(failed(
                "the engine reported success, but has no such image".into(),
            )),
        }
    }

    pub async fn inspect(
        &self,
        name: &str,
    ) -> Result<Option<ContainerInspectResponse>, BuilderError> {
        match super::engine::podman_settled(|| {
            self.engine
                .docker
                .inspect_container(name, None::<InspectContainerOptions>)
        })
        .await
        {
            Ok(c) => Ok(Some(c)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.engine.api_err()(e).into()),
        }
    }

    pub async fn remove(&self, name: &str) -> Result<(), BuilderError> {
        let opts = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match self.engine.docker.remove_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.engine.api_err()(e).into()),
        }
    }

    pub async fn stop(&self, name: &str) -> Result<(), BuilderError> {
        let opts = StopContainerOptions {
            t: Some(5),
            ..Default::default()
        };
        match self.engine.docker.stop_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(DockerError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(self.engine.api_err()(e).into()),
        }
    }

    async fn create(
        &self,
        spec: &BuilderSpec,
        image_id: &str,
        hash: &str,
    ) -> Result<ContainerInspectResponse, BuilderError> {
        let docker = &self.engine.docker;
        let name = spec.container_name();
        let volume = spec.volume_name(image_id);
        docker
            .create_volume(VolumeCreateRequest {
                name: Some(volume.clone()),
                labels: Some(spec.volume_labels()),
                ..Default::default()
            })
            .await
            .map_err(self.engine.api_err())?;
        let host_key = keys::generate_host_key().map_err(|e| BuilderError::Key(e.to_string()))?;
        let mut labels = spec.labels(hash, &host_key.public_openssh(), image_id);
        let facts = sandbox::EngineFacts::ask(&self.engine).await;
        let decision = sandbox::decide(spec.sandbox, spec.runs_under_emulation(), &facts);
        labels.insert(
            sandbox::LABEL_SANDBOX.into(),
            if decision.on { "on" } else { "off" }.into(),
        );
        labels.insert(sandbox::LABEL_SANDBOX_WHY.into(), decision.why.clone());
        let mut body = spec.container_body(image_id, &volume, labels);
        if facts.user_namespaced {
            set_env(&mut body, "NIXDOCK_BUILD_UID_BASE", USERNS_UID_BASE);
        }
        set_env(
            &mut body,
            "NIXDOCK_SANDBOX",
            if decision.on { "1" } else { "0" },
        );
        if decision.on
            && let Some(hc) = body.host_config.as_mut()
        {
            sandbox::apply(hc, self.engine.podman);
        }
        if self.engine.podman
            && let Some(hc) = body.host_config.as_mut()
        {
            hc.ulimits = Some(grantable_ulimits());
        }
        let opts = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        tracing::info!(container = %name, image = %spec.image, %volume, emulated = spec.runs_under_emulation(), extra_platforms = ?spec.extra_platforms, sandbox = decision.on, why = %decision.why, "creating builder");
        if let Err(e) = docker.create_container(Some(opts), body).await {
            if is_conflict(&e) {
                // Someone outside our lock (an older nixdock?) made it: use theirs.
                return self
                    .inspect(&name)
                    .await?
                    .ok_or_else(|| BuilderError::Broken {
                        container: name.clone(),
                        what: "name conflict, but no such container".into(),
                    });
            }
            return Err(self.engine.api_err()(e).into());
        }
        let tar = spec
            .provisioning_tar(host_key.private_openssh(), self.client_key.public_openssh())
            .map_err(|e| BuilderError::Broken {
                container: name.clone(),
                what: format!("cannot build the provisioning archive: {e}"),
            })?;
        let upload = docker
            .upload_to_container(
                &name,
                Some(UploadToContainerOptions {
                    path: "/".into(),
                    ..Default::default()
                }),
                bollard::body_full(tar.into()),
            )
            .await;
        if let Err(e) = upload {
            let _ = self.remove(&name).await;
            return Err(self.engine.api_err()(e).into());
        }
        self.inspect(&name)
            .await?
            .ok_or_else(|| BuilderError::Broken {
                container: name,
                what: "vanished right after creation".into(),
            })
    }

    async fn logs_tail(&self, name: &str, lines: usize) -> String {
        container_log::tail(
            &self.engine.docker,
            name,
            lines,
            None,
            Duration::from_secs(5),
        )
        .await
        .join("\n")
    }

    async fn wait_ready(
        &self,
        spec: &BuilderSpec,
        name: &str,
        mut started: bool,
        inspected: Option<ContainerInspectResponse>,
    ) -> Result<ReadyBuilder, BuilderError> {
        let t0 = Instant::now();
        let limit = if spec.runs_under_emulation() {
            Duration::from_secs(180)
        } else {
            Duration::from_secs(60)
        };
        let mut last;
        let mut patient = false;
        let mut delay = Duration::from_millis(20);
        // The container's state, asked again at most every 100 ms: polls after a start come
        // every 10 ms, and each inspect is a round trip to the engine.
        let mut seen: Option<(Instant, ContainerInspectResponse)> =
            inspected.map(|c| (Instant::now(), c));
        loop {
            let c = match seen.take() {
                Some((at, c)) if at.elapsed() < Duration::from_millis(100) => (at, c),
                _ => (
                    Instant::now(),
                    self.inspect(name)
                        .await?
                        .ok_or_else(|| BuilderError::Broken {
                            container: name.to_string(),
                            what: "the container disappeared".into(),
                        })?,
                ),
            };
            let c = &seen.insert(c).1;
            match status(c) {
                Some(ContainerStateStatusEnum::RUNNING) => {}
                other => {
                    let exit = c.state.as_ref().and_then(|s| s.exit_code).unwrap_or(-1);
                    return Err(BuilderError::Exited {
                        container: name.to_string(),
                        status: format!(
                            "{}, exit code {exit}",
                            other.map(|s| s.to_string()).unwrap_or_default()
                        ),
                        logs: self.logs_tail(name, 20).await,
                    });
                }
            }
            let pinned = label(c, provision::LABEL_HOST_KEY)
                .ok_or_else(|| BuilderError::Broken {
                    container: name.to_string(),
                    what: "no pinned host key label; remove the container".into(),
                })
                .and_then(|k| {
                    keys::parse_public_key(k).map_err(|e| BuilderError::Broken {
                        container: name.to_string(),
                        what: format!("bad pinned host key: {e}"),
                    })
                })?;
            let attempt = match &spec.publish {
                Publish::Nothing => Some(
                    self.connect_exec_or_held(name, c.id.as_deref(), &pinned, started)
                        .await,
                ),
                _ => match published_port(c) {
                    Some(port) => Some(
                        self.connect_published(name, c.id.as_deref(), port, &pinned, started)
                            .await,
                    ),
                    None => None,
                },
            };
            if let Some(attempt) = attempt {
                match attempt {
                    Ok((link, daemon)) => {
                        tracing::info!(container = %name, engine = %self.engine.name, ms = t0.elapsed().as_millis() as u64, started, "builder ready");
                        return Ok(ReadyBuilder {
                            spec: spec.clone(),
                            container: name.to_string(),
                            link,
                            daemon,
                            started,
                        });
                    }
                    // A mismatched host key never gets better by waiting.
                    Err(e @ BuilderError::Ssh { .. }) if e.is_host_key_mismatch() => return Err(e),
                    Err(e) if !started && !patient => {
                        // It may have idled out between our inspect and the connect: start it
                        // again rather than fail the build.
                        let now = self.inspect(name).await?;
                        let still_running = matches!(
                            now.as_ref().and_then(status),
                            Some(ContainerStateStatusEnum::RUNNING)
                        );
                        if still_running
                            && matches!(e, BuilderError::Ssh { .. })
                            && now.as_ref().is_some_and(just_started)
                        {
                            // Started by another process that was ready through the local
                            // socket, without waiting for sshd: wait for it as after a start.
                            // Only while SSH itself fails: a daemon that does not answer over
                            // a working SSH session is not a matter of waiting.
                            patient = true;
                            last = e.to_string();
                        } else if still_running {
                            return Err(e);
                        } else {
                            // Without the lock here (see `ensure_ready`): take it, so only one
                            // process starts it.
                            let _lock = self.lock_builder(name).await?;
                            let running = matches!(
                                self.inspect(name).await?.as_ref().and_then(status),
                                Some(ContainerStateStatusEnum::RUNNING)
                            );
                            if !running {
                                tracing::info!(container = %name, "builder stopped meanwhile; starting it again");
                                self.engine
                                    .docker
                                    .start_container(name, None::<StartContainerOptions>)
                                    .await
                                    .map_err(self.engine.api_err())?;
                            }
                            started = true;
                            seen = None; // its port may have changed
                            last = e.to_string();
                        }
                    }
                    Err(e) => last = e.to_string(),
                }
            } else {
                last = "no published ssh port yet".into();
            }
            if t0.elapsed() > limit {
                return Err(BuilderError::NotReady {
                    container: name.to_string(),
                    secs: limit.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(delay).await;
            // sshd is usually up within a second of the start: poll closely until then (a
            // doubling back-off overshot it by up to its last step), then back off.
            delay = if t0.elapsed() < Duration::from_secs(2) {
                // An exec attempt costs the engine a process start: not every 10 ms.
                match spec.publish {
                    Publish::Nothing => Duration::from_millis(25),
                    _ => Duration::from_millis(10),
                }
            } else {
                (delay * 2).min(Duration::from_millis(250))
            };
        }
    }

    /// SSH to the builder's published port: on loopback for a local engine, on the engine's
    /// host for a remote one. With `ssh-persist`, through the builder's SSH holder when one
    /// answers (not for a container just started: no holder can have its session), else
    /// directly, starting a holder for the next builds.
    async fn connect_published(
        &self,
        name: &str,
        id: Option<&str>,
        port: u16,
        pinned: &russh::keys::PublicKey,
        started: bool,
    ) -> Result<(Link, DaemonConnection), BuilderError> {
        let addr = self
            .engine
            .published_addr(port)
            .await
            .map_err(|e| BuilderError::Broken {
                container: name.to_string(),
                what: e.to_string(),
            })?;
        let target = id
            .filter(|_| !self.ssh_persist.is_zero())
            .map(|id| holder::Target::ssh(name, id, addr, pinned.clone()));
        if let Some(target) = &target
            && !started
        {
            match self.connect_holder(name, target).await {
                Ok(ready) => return Ok(ready),
                Err(e) => tracing::debug!(container = %name, "not through an SSH holder: {e}"),
            }
        }
        // A container just started serves SSH before its daemon's socket: wait for the socket
        // rather than start a second daemon (`--stdio`) beside the one starting.
        let patience = if started {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        };
        let ready = self.connect(name, addr, pinned, patience).await?;
        if let Some(target) = &target {
            holder::start(&self.state, target, &self.holder_settings()).await;
        }
        Ok(ready)
    }

    /// What a holder for one of these builders is started with.
    fn holder_settings(&self) -> holder::Settings {
        holder::Settings {
            user: "root".into(),
            daemon_socket: provision::REMOTE_DAEMON_SOCKET.into(),
            nodelay_subsystem: Some(provision::NODELAY_SUBSYSTEM.into()),
            persist: self.ssh_persist,
            session_command: exec_sshd_command(),
        }
    }

    /// Through the engine's exec, by way of the builder's holder when one answers (not for a
    /// container just started: no holder can serve it yet), else directly, starting a holder
    /// for the next builds: it keeps a daemon connection started ahead, so a warm build pays
    /// no exec of its own for it.
    async fn connect_exec_or_held(
        &self,
        name: &str,
        id: Option<&str>,
        pinned: &russh::keys::PublicKey,
        started: bool,
    ) -> Result<(Link, DaemonConnection), BuilderError> {
        let target = id
            .filter(|_| !self.ssh_persist.is_zero())
            .map(|id| holder::Target {
                container: name.to_string(),
                container_id: id.to_string(),
                via: holder::Via::Engine {
                    engine: self.engine.name.clone(),
                    host: self.engine.addr.clone(),
                    host_key: pinned.clone(),
                },
            });
        if let Some(target) = &target
            && !started
        {
            match self.connect_holder(name, target).await {
                Ok(ready) => return Ok(ready),
                Err(e) => tracing::debug!(container = %name, "not through a holder: {e}"),
            }
        }
        let ready = self.connect_exec(name).await?;
        if let Some(target) = &target {
            holder::start(&self.state, target, &self.holder_settings()).await;
        }
        Ok(ready)
    }

    /// The daemon connection through the builder's SSH holder.
    async fn connect_holder(
        &self,
        name: &str,
        target: &holder::Target,
    ) -> Result<(Link, DaemonConnection), BuilderError> {
        let err = |source| BuilderError::Holder {
            container: name.to_string(),
            source: Box::new(source),
        };
        let socket = holder::socket_path(&self.state, target).map_err(err)?;
        let link = Link::Holder(holder::HolderLink::new(socket, target.clone()));
        let daemon = open_daemon(&link, name).await?;
        Ok((link, daemon))
    }

    /// Through the engine's exec: a `nix-daemon --stdio` in the container (as root it serves
    /// the store itself), started only once the entry script's first set-up is done (before,
    /// the command exits and the handshake fails, so the caller polls again). Not the daemon's
    /// socket: a recreated container keeps its `/nix` volume, and with it the old container's
    /// socket file, while its own nix.conf (build users, `filter-syscalls`) is not written yet.
    async fn connect_exec(&self, name: &str) -> Result<(Link, DaemonConnection), BuilderError> {
        let exec = EngineExec::new(self.engine.docker.clone(), name.to_string());
        let ch = exec
            .exec(&exec_daemon_command())
            .await
            .map_err(|source| BuilderError::Exec {
                container: name.to_string(),
                source: Box::new(source),
            })?;
        let daemon = handshake(ch, name).await?;
        Ok((Link::Engine(exec), daemon))
    }

    /// One SSH connection plus a `nix-daemon --stdio` handshake on it.
    /// `patience`: how long the daemon's socket may be missing before a `nix-daemon --stdio`
    /// is started instead.
    pub async fn connect(
        &self,
        name: &str,
        addr: SocketAddr,
        pinned: &russh::keys::PublicKey,
        patience: Duration,
    ) -> Result<(Link, DaemonConnection), BuilderError> {
        let ssh_err = |source| BuilderError::Ssh {
            container: name.to_string(),
            source: Box::new(source),
        };
        let session = ssh::connect(
            addr,
            "root",
            &self.client_key,
            pinned,
            Duration::from_secs(10),
        )
        .await
        .map_err(ssh_err)?;
        // The subsystem first, the daemon's channel after it: sshd keeps Nagle's algorithm on
        // until it starts a command or subsystem, and right after authentication it has sent
        // a packet of its own (the host-key announcement), so replies to channels opened side
        // by side waited for a proxy's delayed ACK (Docker's userland proxy: the daemon's
        // channel opened in ~45 ms, as against ~2 ms after the subsystem).
        if let Err(e) = session.touch_subsystem(provision::NODELAY_SUBSYSTEM).await {
            tracing::debug!(container = %name, "no nodelay subsystem: {e}");
        }
        let daemon = open_daemon_over_ssh(&session, name, patience).await?;
        Ok((Link::Ssh(session), daemon))
    }
}

/// The builder's sshd serving one SSH session on the exec's stdin and stdout (inetd mode),
/// once the set-up is done. It logs to the exec's stderr (`-e`), and ends when its client has
/// answered none of its keepalives, one a second after a second of silence, three times (a
/// holder stopped, or its engine connection gone without an EOF reaching the exec): measured,
/// within ~8 s, so it cannot outlive the holder for long. A live holder answers them; they cost
/// a few bytes a second while it is idle.
fn exec_sshd_command() -> String {
    format!(
        "[ -e {done} ] || exit 75; exec {sshd} -i -e -f {config} -o ClientAliveInterval=1 -o ClientAliveCountMax=3",
        done = provision::SET_UP_MARKER,
        sshd = provision::SSHD,
        config = provision::SSHD_CONFIG,
    )
}

/// The daemon connection through an engine's exec (see `connect_exec`).
fn exec_daemon_command() -> String {
    format!(
        "[ -e {done} ] || exit 75; exec {REMOTE_NIX_DAEMON}",
        done = provision::SET_UP_MARKER
    )
}

/// Opens a store connection on an existing session: to the builder's persistent
/// `nix-daemon` through its socket (a fork in the builder, no process start), or, where that
/// socket is not there (an older provisioning, the daemon not up yet), a fresh
/// `nix-daemon --stdio`.
pub async fn open_daemon(link: &Link, name: &str) -> Result<DaemonConnection, BuilderError> {
    let ch = match link {
        Link::Ssh(session) => return open_daemon_over_ssh(session, name, Duration::ZERO).await,
        Link::Engine(exec) => {
            exec.exec(REMOTE_NIX_DAEMON)
                .await
                .map_err(|source| BuilderError::Exec {
                    container: name.to_string(),
                    source: Box::new(source),
                })?
        }
        Link::Holder(h) => h
            .open_daemon()
            .await
            .map_err(|source| BuilderError::Holder {
                container: name.to_string(),
                source: Box::new(source),
            })?,
    };
    handshake(ch, name).await
}

/// [`open_daemon`] on an SSH session of our own, trying the daemon's socket for up to
/// `patience` (every 10 ms).
async fn open_daemon_over_ssh(
    session: &SshSession,
    name: &str,
    patience: Duration,
) -> Result<DaemonConnection, BuilderError> {
    let t0 = Instant::now();
    let ch = loop {
        match session
            .open_unix_socket(provision::REMOTE_DAEMON_SOCKET)
            .await
        {
            Ok(ch) => break ch,
            Err(e @ SshError::ConnectionLost { .. }) => {
                return Err(BuilderError::Ssh {
                    container: name.to_string(),
                    source: Box::new(e),
                });
            }
            Err(_) if t0.elapsed() < patience => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => {
                tracing::debug!(container = %name, "no daemon socket ({e}); starting nix-daemon --stdio");
                break session.exec(REMOTE_NIX_DAEMON).await.map_err(|source| {
                    BuilderError::Ssh {
                        container: name.to_string(),
                        source: Box::new(source),
                    }
                })?;
            }
        }
    };
    handshake(ch, name).await
}

/// Build users' first uid on a user-namespaced engine: inside the 65536 uids such engines map by
/// default (the default base, 700000000, is outside any such mapping).
pub const USERNS_UID_BASE: &str = "10000";

/// Sets (or replaces) `key` in the container's environment.
fn set_env(body: &mut bollard::models::ContainerCreateBody, key: &str, value: &str) {
    let env = body.env.get_or_insert_with(Vec::new);
    env.retain(|e| !e.starts_with(&format!("{key}=")));
    env.push(format!("{key}={value}"));
}

/// Podman's Docker API gives a container without ulimits its own defaults (nofile 1048576,
/// nproc 32768), which an engine whose root lacks CAP_SYS_RESOURCE cannot grant ("error setting
/// rlimit type 7"). Ask for no more than those defaults and no more than this process's own hard
/// limits, which a root engine on this host (or one set up alike) can grant: never worse than
/// Podman's own choice.
pub fn grantable_ulimits() -> Vec<bollard::models::ResourcesUlimits> {
    let hard = |resource, name: &str, cap: i64| {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit to the pointer it is given.
        let ok = unsafe { libc::getrlimit(resource, &mut r) } == 0;
        let limit = if ok {
            i64::try_from(r.rlim_max).unwrap_or(cap).min(cap)
        } else {
            1024
        };
        bollard::models::ResourcesUlimits {
            name: Some(name.to_string()),
            soft: Some(limit),
            hard: Some(limit),
        }
    };
    vec![
        hard(libc::RLIMIT_NOFILE, "nofile", 1 << 20),
        hard(libc::RLIMIT_NPROC, "nproc", 32768),
    ]
}

/// What the engine said, without bollard's wrapping.
fn engine_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        DockerError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

/// The worker handshake on a command's channel; the remote daemon's own stderr (startup
/// warnings) goes to our log, never to the build.
async fn handshake(ch: ssh::ExecChannel, name: &str) -> Result<DaemonConnection, BuilderError> {
    let ssh::ExecChannel {
        stdin,
        stdout,
        mut stderr,
        ..
    } = ch;
    let n = name.to_string();
    tokio::spawn(async move {
        while let Some(Ok(chunk)) = stderr.next_chunk().await {
            tracing::debug!(container = %n, "builder nix-daemon stderr: {}", String::from_utf8_lossy(&chunk).trim_end());
        }
    });
    tokio::time::timeout(
        Duration::from_secs(30),
        WorkerClient::handshake(stdout, stdin),
    )
    .await
    .map_err(|_| BuilderError::Broken {
        container: name.to_string(),
        what: "nix-daemon --stdio did not answer the handshake within 30 s".into(),
    })?
    .map_err(|source| BuilderError::Daemon {
        container: name.to_string(),
        source: Box::new(source),
    })
}

/// This process's effective uid.
/// The builder daemon's socket `rel` beneath the volume's mount point `volume`, for the root
/// hook to connect to. Everything in the volume is the container's (its root is ours, without a
/// user namespace), so nothing there is trusted: `rel` is resolved without following any
/// symlink (a planted one could lead to the host's own daemon or the Docker socket), must be a
/// socket owned by our uid (under a user-namespaced engine it belongs to a mapped uid and the
/// daemon would not trust us), and is reached through the descriptor that was checked: the
/// returned path is `/proc/self/fd/N` of that descriptor, valid while it stays open.
#[cfg(target_os = "linux")]
fn checked_volume_socket(
    volume: &std::path::Path,
    rel: &str,
) -> Result<(std::path::PathBuf, std::os::fd::OwnedFd), NoLocalSocket> {
    use crate::fs_beneath::{self, Want};
    use std::os::fd::AsFd;
    let shown = || format!("{}/{rel}", volume.display());
    let io = |what: &'static str| {
        move |source| NoLocalSocket::Io {
            socket: shown(),
            what,
            source,
        }
    };
    let root = fs_beneath::open_root(volume).map_err(io("opening the volume"))?;
    let fd = fs_beneath::open_beneath(root.as_fd(), std::path::Path::new(rel), Want::Object)
        .map_err(io("resolving it without symlinks"))?;
    let st = fs_beneath::fstat(fd.as_fd()).map_err(io("stat"))?;
    if !fs_beneath::is_socket(&st) {
        return Err(NoLocalSocket::NotASocket(shown()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if st.st_uid != unsafe { libc::geteuid() } {
        return Err(NoLocalSocket::NotOurs(shown()));
    }
    Ok((fs_beneath::fd_path(fd.as_fd()), fd))
}

#[cfg(not(target_os = "linux"))]
fn checked_volume_socket(
    _volume: &std::path::Path,
    _rel: &str,
) -> Result<(std::path::PathBuf, std::os::fd::OwnedFd), NoLocalSocket> {
    Err(NoLocalSocket::NotLinux)
}

/// Why a builder is not reached through its daemon socket on the host (it is then reached over
/// SSH); logged, not shown as a failure.
#[derive(Debug, thiserror::Error)]
enum NoLocalSocket {
    #[error("engine {0} is not a local socket")]
    RemoteEngine(String),
    #[error("connecting through a checked descriptor needs Linux")]
    #[cfg_attr(target_os = "linux", allow(dead_code))]
    NotLinux,
    #[error(transparent)]
    Engine(#[from] BuilderError),
    #[error("the image is not on the engine")]
    NoImage,
    #[error("no container")]
    NoContainer,
    #[error("configuration changed")]
    ConfigChanged,
    #[error("not running")]
    NotRunning,
    #[error("no /nix volume")]
    NoVolume,
    #[error("{socket}: {what}: {source}")]
    Io {
        socket: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0} is not a socket")]
    NotASocket(String),
    #[error("{0} is not owned by us")]
    NotOurs(String),
    #[error("{socket}: {source}")]
    Daemon {
        socket: String,
        source: BuilderError,
    },
}

/// Keeps a descriptor open until the process exits (one per local-socket connection).
fn keep_open(fd: std::os::fd::OwnedFd) {
    static HELD: std::sync::Mutex<Vec<std::os::fd::OwnedFd>> = std::sync::Mutex::new(Vec::new());
    if let Ok(mut held) = HELD.lock() {
        held.push(fd);
    }
}

/// A worker-protocol connection to a builder's daemon socket reached on the host.
pub async fn open_local_daemon(
    socket: &std::path::Path,
    name: &str,
) -> Result<DaemonConnection, BuilderError> {
    let broken = |what: String| BuilderError::Broken {
        container: name.to_string(),
        what,
    };
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::UnixStream::connect(socket),
    )
    .await
    .map_err(|_| broken(format!("connecting to {} timed out", socket.display())))?
    .map_err(|e| broken(format!("connecting to {}: {e}", socket.display())))?;
    let ssh::ExecChannel { stdin, stdout, .. } = unix_stream_channel(stream);
    tokio::time::timeout(
        Duration::from_secs(30),
        WorkerClient::handshake(stdout, stdin),
    )
    .await
    .map_err(|_| broken("nix-daemon did not answer the handshake within 30 s".into()))?
    .map_err(|source| BuilderError::Daemon {
        container: name.to_string(),
        source: Box::new(source),
    })
}
/// A connection straight to a local builder's daemon socket (see `Builders::connect_local`).
pub struct LocalConnection {
    /// Names the socket checked beneath the volume (`/proc/self/fd/N`) for further connections.
    pub socket: std::path::PathBuf,
    /// The builder's `/nix` on this host, as the engine reported it.
    pub volume: std::path::PathBuf,
    pub daemon: DaemonConnection,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_docker_hub_unless_the_first_component_names_a_host() {
        assert_eq!(registry_of("nixos/nix:2.28.3"), "docker.io");
        assert_eq!(registry_of("ubuntu"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/nixos/nix:t"), "127.0.0.1:5000");
        assert_eq!(registry_of("ghcr.io/nixos/nix"), "ghcr.io");
        assert_eq!(registry_of("localhost/x"), "localhost");
    }

    #[test]
    fn tally_sums_downloading_layers_and_completes_them() {
        let mut t = PullTally::default();
        // Layers the engine has, and messages without sizes, count for nothing.
        assert!(!t.update(Some("a"), Some("Already exists"), None, None));
        assert!(!t.update(Some("b"), Some("Pulling fs layer"), None, None));
        assert!(!t.update(None, Some("Pulling from nixos/nix"), None, None));
        assert!(t.update(Some("b"), Some("Downloading"), Some(100), Some(1000)));
        assert!(t.update(Some("c"), Some("Downloading"), Some(5), Some(10)));
        assert_eq!(t.totals(), (105, 1010));
        // A current beyond the total (seen on retries) is capped.
        assert!(t.update(Some("c"), Some("Downloading"), Some(50), Some(10)));
        assert_eq!(t.totals(), (110, 1010));
        assert!(t.update(Some("b"), Some("Download complete"), None, None));
        assert_eq!(t.totals(), (1010, 1010));
        assert!(!t.update(Some("b"), Some("Pull complete"), None, None));
        // Negative sizes (never sent, but not ours to trust) are ignored.
        assert!(!t.update(Some("d"), Some("Downloading"), Some(-1), Some(-5)));
        // Sizes that would overflow a sum stay at the largest total, and the layers followed
        // are bounded.
        let mut big = PullTally::default();
        big.update(
            Some("x"),
            Some("Downloading"),
            Some(i64::MAX),
            Some(i64::MAX),
        );
        big.update(
            Some("y"),
            Some("Downloading"),
            Some(i64::MAX),
            Some(i64::MAX),
        );
        big.update(
            Some("z"),
            Some("Downloading"),
            Some(i64::MAX),
            Some(i64::MAX),
        );
        assert_eq!(big.totals(), (u64::MAX, u64::MAX));
        let mut many = PullTally::default();
        for i in 0..5000 {
            many.update(
                Some(&format!("l{i}")),
                Some("Downloading"),
                Some(1),
                Some(1),
            );
        }
        assert_eq!(many.totals(), (MAX_LAYERS as u64, MAX_LAYERS as u64));
    }
}
