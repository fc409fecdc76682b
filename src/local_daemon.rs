//! A worker-protocol connection to the local store the calling Nix uses (the preamble's
//! `store` setting): its daemon socket when one answers, else `nix-daemon --stdio` run by the
//! hook (single-user installs). Only reads go through it; outputs are never imported this way
//! because the parent holds their locks (see `local_store`).

use std::path::PathBuf;
use std::process::Stdio;

use hook_protocol::worker::WorkerClient;

use crate::transport::DaemonConnection;
use crate::transport::stream_channel::{stream_channel, unix_stream_channel};

/// The same client type as a builder's: one worker-protocol client in the program.
pub type LocalDaemon = DaemonConnection;

pub const DEFAULT_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

#[derive(Debug, thiserror::Error)]
pub enum LocalDaemonError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("local Nix store ({how}): {source}")]
    Protocol {
        how: String,
        #[source]
        source: hook_protocol::worker::WorkerError,
    },
    #[error(transparent)]
    NotFound(#[from] crate::nix_tools::NotFound),
}

/// Connects to the store named by `store` (`auto`, `daemon`, `unix://…`, `local`, a path…).
pub async fn connect(store: &str) -> Result<LocalDaemon, LocalDaemonError> {
    // The daemon that runs us may listen elsewhere (Nix honours NIX_DAEMON_SOCKET_PATH).
    let default_socket =
        std::env::var("NIX_DAEMON_SOCKET_PATH").unwrap_or_else(|_| DEFAULT_SOCKET.to_string());
    let socket = match store {
        "daemon" | "auto" | "" => Some(default_socket),
        s if s.starts_with("unix://") => Some(s.trim_start_matches("unix://").to_string()),
        _ => None,
    };
    if let Some(path) = &socket
        && let Ok(stream) = tokio::net::UnixStream::connect(path).await
    {
        let ch = unix_stream_channel(stream);
        return WorkerClient::handshake(ch.stdout, ch.stdin)
            .await
            .map_err(|source| LocalDaemonError::Protocol {
                how: format!("daemon socket {path}"),
                source,
            });
    }
    let program = crate::nix_tools::find("nix-daemon")?;
    let mut cmd = tokio::process::Command::new(&program);
    cmd.arg("--stdio");
    if !matches!(store, "auto" | "" | "daemon") && !store.starts_with("unix://") {
        cmd.args(["--store", store]);
    }
    // Never let the child inherit fd 2: the parent Nix reads it for replies and EOF on it
    // means the build is over.
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| LocalDaemonError::Spawn {
        program: program.clone(),
        source,
    })?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(LocalDaemonError::Spawn {
            program,
            source: std::io::Error::other("no pipes"),
        });
    };
    // The child lives as long as the process; kill_on_drop is moot once it is detached, so
    // keep it in a task that ends with the runtime.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    let ch = stream_channel(stdout, stdin);
    WorkerClient::handshake(ch.stdout, ch.stdin)
        .await
        .map_err(|source| LocalDaemonError::Protocol {
            how: format!("{} --stdio", program.display()),
            source,
        })
}

/// A connection to the local store opened on first use: a trivial build whose outputs are
/// missing on disk never needs one, and each one costs the local daemon a forked worker.
pub struct LazyLocalDaemon {
    store: String,
    conn: Option<LocalDaemon>,
}

impl LazyLocalDaemon {
    pub fn new(store: &str) -> Self {
        LazyLocalDaemon {
            store: store.to_string(),
            conn: None,
        }
    }

    /// The connection, opened now if it is not yet.
    pub async fn get(&mut self) -> Result<&mut LocalDaemon, LocalDaemonError> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => connect(&self.store).await?,
        };
        Ok(self.conn.insert(conn))
    }
}
