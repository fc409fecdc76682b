//! Transport from the hook to builder containers: SSH (russh) with pinned,
//! per-container host keys and one client key kept in the state directory.

pub mod engine_api;
pub mod engine_exec;
pub mod holder;
pub mod keys;
pub mod known_hosts;
pub mod ssh;
pub mod stream_channel;

pub use engine_exec::{EngineExec, EngineExecError};
pub use keys::{
    ClientKey, HostKey, KeyError, generate_host_key, load_or_create_client_key, parse_public_key,
};
pub use russh::keys::PublicKey;
pub use ssh::{
    ConnectPhase, ExecChannel, ExecOutput, ExecStdin, ExitStatus, ExitWaiter, HostKeys, SshError,
    SshSession, connect, connect_with,
};

/// A worker-protocol client over an SSH exec channel (`nix-daemon --stdio` on the far side).
pub type DaemonConnection = hook_protocol::worker::WorkerClient<ExecOutput, ExecStdin>;

/// A remote store ready for one build: where it is (for messages), the SSH session that
/// carries it, and the `nix-daemon --stdio` connection on it. Both builder containers and the
/// user's own remote builders provide one.
pub struct RemoteStore {
    pub name: String,
    /// What else carries commands there (the build log's follower, a second daemon
    /// connection); `None` for a local builder reached through its daemon socket on the host.
    pub link: Option<Link>,
    pub daemon: DaemonConnection,
    /// How to open another daemon connection on the same session.
    pub reopen: Reopen,
    /// A way around `link` for copies of many bytes, where one is faster: a builder reached
    /// through an engine holder's SSH session gets its large outputs over the engine's exec
    /// itself, without SSH's encryption inside the engine connection's (measured: ~0.3 s less
    /// per 200 MB on the test bed's second engine, BENCHMARKS.md).
    pub bulk: Option<Link>,
}

/// How commands reach a remote store: an SSH session (a user's machine, a builder whose sshd
/// this host reaches), the engine's exec (a builder on another machine's engine), or a
/// builder's SSH session held by an SSH holder process (`holder`).
pub enum Link {
    Ssh(SshSession),
    Engine(EngineExec),
    Holder(holder::HolderLink),
}

impl Link {
    /// Ends an SSH session politely; an engine link holds nothing to close.
    pub async fn close(self) -> Result<(), LinkError> {
        match self {
            Link::Ssh(s) => Ok(s.close().await?),
            Link::Engine(_) | Link::Holder(_) => Ok(()),
        }
    }

    /// Whether its bytes go through the engine's API (an exec stream, directly or through a
    /// holder), so that an engine that stops answering has taken the link with it.
    pub fn is_carried_by_engine(&self) -> bool {
        match self {
            Link::Ssh(_) => false,
            Link::Engine(_) => true,
            Link::Holder(h) => matches!(h.via(), holder::Via::Engine { .. }),
        }
    }

    /// Runs `command` there, its parts separately owned.
    pub async fn exec(&self, command: &str) -> Result<ExecChannel, LinkError> {
        Ok(match self {
            Link::Ssh(s) => s.exec(command).await?,
            Link::Engine(e) => e.exec(command).await?,
            Link::Holder(h) => h.exec(command).await?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Engine(#[from] EngineExecError),
    #[error(transparent)]
    Holder(#[from] holder::HolderError),
}

/// How a [`RemoteStore`] opens further daemon connections.
#[derive(Debug, Clone)]
pub enum Reopen {
    /// The builder container's way (`builder::lifecycle::open_daemon`).
    Builder,
    /// Run this command (`nix-daemon --stdio`, or the machine's `remote-program`).
    Exec(String),
    /// Connect to this daemon socket again (a local builder's, through the descriptor checked
    /// beneath its volume); `volume` is the builder's `/nix` on this host, as the engine
    /// reported it (trusted: the engine's own path), for reading files beneath it.
    LocalSocket {
        socket: std::path::PathBuf,
        volume: std::path::PathBuf,
    },
}
