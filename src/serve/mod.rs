//! `nixdock serve`: an ssh-ng endpoint for any Nix (stock `build-remote`, Lix, Determinate
//! Nix, other machines). The SSH user name selects the system; a session's
//! `nix-daemon --stdio` is bridged byte for byte to that system's builder daemon, which the
//! client's own worker protocol talks to. The builder is made ready as the hook makes it
//! (`Builders::ensure_ready`, or the local fast path), and a session holds one of its build
//! slots while it is open. See ARCHITECTURE.md, "nixdock serve".

pub mod keys;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::builder::engine::EngineSettings;
use crate::builder::pool::CONNECT_DEADLINE;
use crate::builder::provision::{self, BuilderSpec, EnginePlace};
use crate::builder::{Builders, Engine, slots};
use crate::config::{Config, Transport};
use crate::state::StateDir;
use crate::transport::{ExecChannel, Link};

/// How long a session waits for a free build slot before it is refused, by default. Nix picked this
/// endpoint by its own count of the line's max-jobs, so a full builder here means another
/// client (or the hook, with shared builders) is building: a build usually ends within
/// minutes, and refusing at once would fail the client's build outright.
pub const SLOT_WAIT: Duration = Duration::from_secs(300);
/// A connection that has not authenticated by then is dropped.
pub const AUTH_DEADLINE: Duration = Duration::from_secs(30);
/// A client that answers no keepalive for this long (interval × count) is dropped, which
/// ends its session and frees its slot; a silent build is not inactivity.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_MAX: usize = 4;
/// Session channels one connection may have open at once.
const MAX_CHANNELS: usize = 8;

/// The suffix of serve's own instance: its containers are `nixdock-<instance>-serve-<system>`,
/// its volumes and slots alike, never the hook's.
pub const INSTANCE_SUFFIX: &str = "serve";

/// The instance id serve's builders carry.
pub fn serve_instance(config: &Config, instance: &str) -> String {
    if config.serve_shares_builders {
        instance.to_string()
    } else {
        format!("{instance}-{INSTANCE_SUFFIX}")
    }
}

/// One builder serve may place a session on: its spec and its engine's builders.
pub struct Place {
    pub spec: BuilderSpec,
    pub builders: Arc<Builders>,
}

/// The builders serve places sessions on, over the config's pool of engines (those that
/// answered within the hook's deadline when loaded).
pub struct Served {
    pub places: Vec<Place>,
    /// Engines that did not answer: (name, why).
    pub unavailable: Vec<(String, String)>,
}

impl Served {
    pub async fn load(config: &Config, state: &StateDir, instance: &str) -> Served {
        let tries = EngineSettings::pool(config)
            .into_iter()
            .map(|s| async move {
                let r = tokio::time::timeout(CONNECT_DEADLINE, Engine::discover(&s)).await;
                (s, r)
            });
        let mut places = Vec::new();
        let mut unavailable = Vec::new();
        for (s, r) in futures_util::future::join_all(tries).await {
            let engine = match r {
                Ok(Ok(e)) => e,
                Ok(Err(e)) => {
                    unavailable.push((s.name.clone(), e.to_string()));
                    continue;
                }
                Err(_) => {
                    unavailable.push((s.name.clone(), "did not answer within 5 s".into()));
                    continue;
                }
            };
            // The local default engine's builders as the hook knows them, without asking it.
            let place = if s.is_local_default() {
                EnginePlace::local_default(config)
            } else {
                engine.place(config)
            };
            let specs = BuilderSpec::on_engine(config, instance, &place);
            let builders = match Builders::new(engine, state.clone()) {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    unavailable.push((s.name.clone(), e.to_string()));
                    continue;
                }
            };
            places.extend(specs.into_iter().map(|spec| Place {
                spec,
                builders: builders.clone(),
            }));
        }
        Served {
            places,
            unavailable,
        }
    }

    /// The systems served, each once, in order.
    pub fn systems(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in &self.places {
            if !out.contains(&p.spec.system) {
                out.push(p.spec.system.clone());
            }
        }
        out
    }

    fn serves(&self, system: &str) -> bool {
        self.places.iter().any(|p| p.spec.system == system)
    }

    /// A free slot on a builder for `system`: natively built first, then in the pool's order.
    fn try_slot(
        &self,
        state: &StateDir,
        system: &str,
    ) -> Result<Option<(slots::Slot, &Place)>, crate::state::StateError> {
        let mut candidates: Vec<&Place> = self
            .places
            .iter()
            .filter(|p| p.spec.system == system)
            .collect();
        candidates.sort_by_key(|p| p.spec.emulated);
        for p in candidates {
            let (slot, _busy) =
                slots::try_acquire(&state.load_dir(), &p.spec.container_name(), p.spec.max_jobs)?;
            if let Some(slot) = slot {
                return Ok(Some((slot, p)));
            }
        }
        Ok(None)
    }
}

/// What every connection shares.
pub struct Shared {
    pub config: Config,
    pub state: StateDir,
    pub served: Served,
    /// How long a session waits for a free slot ([`SLOT_WAIT`] unless the operator says).
    pub slot_wait: Duration,
}

impl Shared {
    /// Whether `key` may have sessions as `user`: the user names a served system and the key
    /// is in `authorized_keys` (read at every attempt, so `--authorize` needs no restart).
    fn allowed(&self, user: &str, key: &russh::keys::PublicKey) -> bool {
        if !self.served.serves(user) {
            tracing::info!(user, "refused: no builder serves this system");
            return false;
        }
        match keys::authorized_keys(&self.state) {
            Ok(list) => {
                let ok = list
                    .iter()
                    .any(|k| crate::transport::keys::same_key(k, key));
                if !ok {
                    tracing::info!(
                        user,
                        key = %crate::transport::keys::fingerprint(key),
                        "refused: key not in authorized_keys"
                    );
                }
                ok
            }
            Err(e) => {
                tracing::warn!("refusing every key: {e}");
                false
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Keys(#[from] keys::ServeKeyError),
    #[error("the host key cannot be used: {0}")]
    HostKey(String),
}

/// Listens on `listener` until the process ends; each connection is served on its own task.
pub async fn run(shared: Arc<Shared>, listener: tokio::net::TcpListener) -> Result<(), ServeError> {
    let host_key = keys::load_or_create_host_key(&shared.state)?;
    let private = russh::keys::PrivateKey::from_openssh(host_key.private_openssh())
        .map_err(|e| ServeError::HostKey(e.to_string()))?;
    let config = Arc::new(russh::server::Config {
        keys: vec![private],
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(300),
        // OpenSSH first asks with "none" to learn the methods: no delay for that.
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        nodelay: true,
        ..Default::default()
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let authed = Arc::new(AtomicBool::new(false));
            let conn = Conn {
                shared,
                peer,
                system: None,
                authed: authed.clone(),
                channels: HashMap::new(),
            };
            match russh::server::run_stream(config, stream, conn).await {
                Ok(running) => {
                    let handle = running.handle();
                    let deadline = tokio::spawn(async move {
                        tokio::time::sleep(AUTH_DEADLINE).await;
                        if !authed.load(Ordering::Relaxed) {
                            tracing::info!(%peer, "no authentication within the deadline");
                            let _ = handle
                                .disconnect(
                                    russh::Disconnect::ByApplication,
                                    "authentication timed out".into(),
                                    String::new(),
                                )
                                .await;
                        }
                    });
                    if let Err(e) = running.await {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                    deadline.abort();
                }
                Err(e) => tracing::debug!(%peer, "connection failed: {e}"),
            }
        });
    }
}

/// One client connection.
struct Conn {
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// The system its sessions build for, once authenticated.
    system: Option<String>,
    authed: Arc<AtomicBool>,
    /// Session channels opened but not yet given a command.
    channels: HashMap<ChannelId, Channel<Msg>>,
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.shared.allowed(user, offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.shared.allowed(user, key.public_key) {
            tracing::info!(peer = %self.peer, system = user, key = %crate::transport::keys::fingerprint(key.public_key), "client authenticated");
            self.system = Some(user.to_string());
            self.authed.store(true, Ordering::Relaxed);
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.system.is_none() || self.channels.len() >= MAX_CHANNELS {
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        }
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let system = match &self.system {
            Some(s) if is_daemon_stdio(data) => s.clone(),
            _ => {
                tracing::info!(peer = %self.peer, command = %String::from_utf8_lossy(data), "refused a command: only `nix-daemon --stdio` is served");
                session.channel_failure(id)?;
                return Ok(());
            }
        };
        let Some(channel) = self.channels.remove(&id) else {
            session.channel_failure(id)?;
            return Ok(());
        };
        session.channel_success(id)?;
        tokio::spawn(bridge(self.shared.clone(), system, channel, self.peer));
        Ok(())
    }

    async fn shell_request(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(id)?;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        id: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(id)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        id: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(id)?;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&id);
        Ok(())
    }
}

/// Whether an exec request is the store protocol's: `nix-daemon --stdio`, as every ssh-ng
/// client sends it (Nix 2.8 `"<remote-program> --stdio"`, 2.26+ the same words joined by the
/// ssh client), the program possibly a path to a `nix-daemon`. Nothing else runs: no shell,
/// no `--store` of the client's choosing.
pub fn is_daemon_stdio(command: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(command) else {
        return false;
    };
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    match words.as_slice() {
        [program, "--stdio"] => {
            let program = program.trim_matches('\'');
            program == "nix-daemon"
                || (program.starts_with('/') && program.ends_with("/nix-daemon"))
        }
        _ => false,
    }
}

/// Serves one `nix-daemon --stdio` session, then reports how it ended on the channel.
async fn bridge(shared: Arc<Shared>, system: String, channel: Channel<Msg>, peer: SocketAddr) {
    let (mut rx, tx) = channel.split();
    let t0 = Instant::now();
    let code = match session(&shared, &system, &mut rx, &tx, peer).await {
        Ok(()) => 0,
        Err(SessionEnd::ClientGone) => {
            tracing::info!(%peer, %system, secs = t0.elapsed().as_secs(), "client disconnected; session ended, its builder connection closed");
            return;
        }
        Err(SessionEnd::Failed(e)) => {
            tracing::warn!(%peer, %system, "session failed: {e}");
            let _ = tx
                .extended_data_bytes(1, Bytes::from(format!("nixdock serve: {e}\n")))
                .await;
            1
        }
    };
    tracing::info!(%peer, %system, secs = t0.elapsed().as_secs(), code, "session ended");
    let _ = tx.exit_status(code).await;
    let _ = tx.eof().await;
    let _ = tx.close().await;
}

enum SessionEnd {
    /// The client disconnected or closed the channel: nothing to report to.
    ClientGone,
    Failed(String),
}

/// What the client sent while the session was getting ready (its handshake comes at once).
#[derive(Default)]
struct Early {
    data: Vec<u8>,
    eof: bool,
}

/// Runs `fut` while keeping the client's channel read: its data is kept for the builder, and
/// a client that goes away ends the wait at once.
async fn watching<F: std::future::Future>(
    rx: &mut russh::ChannelReadHalf,
    early: &mut Early,
    fut: F,
) -> Result<F::Output, SessionEnd> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return Ok(out),
            msg = rx.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    // Bounded: a client that talks before the builder is there is not a Nix.
                    if early.data.len() + data.len() > 1 << 20 {
                        return Err(SessionEnd::Failed("the client sent over 1 MiB before the builder was ready".into()));
                    }
                    early.data.extend_from_slice(&data);
                }
                Some(ChannelMsg::Eof) => early.eof = true,
                Some(ChannelMsg::Close) | None => return Err(SessionEnd::ClientGone),
                Some(_) => {}
            },
        }
    }
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// A raw byte stream to a builder's daemon, and what must stay alive with it.
struct Duplex {
    read: BoxRead,
    write: BoxWrite,
    _link: Option<Link>,
    /// How the builder is reached, for the log.
    via: &'static str,
}

async fn session(
    shared: &Shared,
    system: &str,
    rx: &mut russh::ChannelReadHalf,
    tx: &russh::ChannelWriteHalf<Msg>,
    peer: SocketAddr,
) -> Result<(), SessionEnd> {
    let mut early = Early::default();
    let t0 = Instant::now();
    // One build slot for the session's whole life: a store connection is what a remote build
    // runs on, and Nix opens one per build.
    let (slot, place) = watching(rx, &mut early, async {
        loop {
            match shared.served.try_slot(&shared.state, system) {
                Ok(Some(got)) => return Ok(got),
                Ok(None) if t0.elapsed() < shared.slot_wait => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                Ok(None) => {
                    return Err(format!(
                        "every {system} build slot stayed busy for {} s",
                        shared.slot_wait.as_secs()
                    ));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await?
    .map_err(SessionEnd::Failed)?;
    let container = place.spec.container_name();
    let duplex = watching(rx, &mut early, open_duplex(shared, place, &slot))
        .await?
        .map_err(SessionEnd::Failed)?;
    tracing::info!(%peer, %system, %container, slot = slot.index, via = duplex.via, ms = t0.elapsed().as_millis() as u64, "session bridged to the builder");
    let Duplex {
        mut read,
        mut write,
        _link,
        ..
    } = duplex;
    let mut client_eof = early.eof;
    let up = async {
        let io = |e: std::io::Error| SessionEnd::Failed(format!("writing to the builder: {e}"));
        write.write_all(&early.data).await.map_err(io)?;
        write.flush().await.map_err(io)?;
        if client_eof {
            write.shutdown().await.map_err(io)?;
        }
        loop {
            match rx.wait().await {
                Some(ChannelMsg::Data { data }) if !client_eof => {
                    write.write_all(&data).await.map_err(io)?;
                    write.flush().await.map_err(io)?;
                }
                Some(ChannelMsg::Eof) if !client_eof => {
                    client_eof = true;
                    write.shutdown().await.map_err(io)?;
                }
                // After its EOF, a client that closes has simply finished.
                Some(ChannelMsg::Close) | None if client_eof => return Ok(()),
                Some(ChannelMsg::Close) | None => return Err(SessionEnd::ClientGone),
                Some(_) => {}
            }
        }
    };
    let down = async {
        let mut to_client = tx.make_writer();
        let r = tokio::io::copy(&mut read, &mut to_client).await;
        let _ = to_client.flush().await;
        r
    };
    let r = tokio::select! {
        r = up => r,
        r = down => r.map(|_| ()).map_err(|e| SessionEnd::Failed(format!("relaying the builder's bytes: {e}"))),
    };
    drop(slot);
    r
}

/// Makes the builder ready as the hook does and opens a raw stream to its daemon: straight to
/// its socket beneath the volume on a local engine (the fast path), else over its link (SSH to
/// its sshd, whose daemon socket is forwarded, or the engine's exec of `nix-daemon --stdio`).
async fn open_duplex(shared: &Shared, place: &Place, slot: &slots::Slot) -> Result<Duplex, String> {
    let direct = shared.config.transport == Transport::Auto;
    let b = &place.builders;
    let spec = &place.spec;
    if direct && let Some(d) = local_duplex(b, spec).await {
        return Ok(d);
    }
    let ready = b
        .ensure_ready(spec, Some(slot))
        .await
        .map_err(|e| format!("could not get the {} builder ready: {e}", spec.system))?;
    if direct && let Some(d) = local_duplex(b, spec).await {
        // A cold start: ready now, and reachable the fast way.
        return Ok(d);
    }
    let name = ready.container.clone();
    let link = ready.link;
    let open = async {
        match &link {
            Link::Ssh(s) => match s.open_unix_socket(provision::REMOTE_DAEMON_SOCKET).await {
                Ok(ch) => Ok(ch),
                Err(e) => {
                    tracing::debug!(container = %name, "no daemon socket ({e}); nix-daemon --stdio");
                    s.exec(provision::REMOTE_NIX_DAEMON)
                        .await
                        .map_err(|e| e.to_string())
                }
            },
            Link::Engine(e) => e
                .exec(provision::REMOTE_NIX_DAEMON)
                .await
                .map_err(|e| e.to_string()),
            Link::Holder(h) => h.open_daemon().await.map_err(|e| e.to_string()),
        }
    };
    let via = match &link {
        Link::Ssh(_) => "ssh",
        Link::Engine(_) => "engine exec",
        Link::Holder(_) => "ssh holder",
    };
    let ch = tokio::time::timeout(Duration::from_secs(30), open)
        .await
        .map_err(|_| format!("builder {name}: no daemon stream within 30 s"))?
        .map_err(|e| format!("builder {name}: {e}"))?;
    let ExecChannel {
        stdin,
        stdout,
        mut stderr,
        ..
    } = ch;
    tokio::spawn(async move {
        while let Some(Ok(chunk)) = stderr.next_chunk().await {
            tracing::debug!(container = %name, "builder nix-daemon stderr: {}", String::from_utf8_lossy(&chunk).trim_end());
        }
    });
    Ok(Duplex {
        read: Box::new(stdout),
        write: Box::new(stdin),
        _link: Some(link),
        via,
    })
}

/// The fast path: a running local builder's daemon socket, checked beneath its volume as the
/// hook checks it (`Builders::connect_local`), connected to again for raw bytes.
async fn local_duplex(b: &Builders, spec: &BuilderSpec) -> Option<Duplex> {
    let local = b.connect_local(spec).await?;
    // The handshake on `local.daemon` proved the daemon answers; the client does its own.
    drop(local.daemon);
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::UnixStream::connect(&local.socket),
    )
    .await
    .ok()?
    .ok()?;
    let (r, w) = stream.into_split();
    Some(Duplex {
        read: Box::new(r),
        write: Box::new(w),
        _link: None,
        via: "local socket",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_has_builders_of_its_own_unless_told_to_share() {
        let mut c = Config::default();
        assert_eq!(serve_instance(&c, "abcd1234"), "abcd1234-serve");
        let spec = BuilderSpec::served(&c, &serve_instance(&c, "abcd1234"));
        assert!(
            spec.iter()
                .all(|s| s.container_name().starts_with("nixdock-abcd1234-serve-")),
            "{spec:?}"
        );
        c.serve_shares_builders = true;
        assert_eq!(serve_instance(&c, "abcd1234"), "abcd1234");
    }

    #[test]
    fn only_the_daemon_is_served() {
        assert!(is_daemon_stdio(b"nix-daemon --stdio"));
        assert!(is_daemon_stdio(b"'nix-daemon' --stdio"));
        assert!(is_daemon_stdio(
            b"/nix/var/nix/profiles/default/bin/nix-daemon --stdio"
        ));
        for bad in [
            &b"nix-daemon --stdio --store /tmp/x"[..],
            b"nix-store --serve --write",
            b"sh -c 'nix-daemon --stdio'",
            b"nix-daemon",
            b"nix-daemon --stdio; rm -rf /",
            b"/tmp/evil-nix-daemon --stdio",
            b"\xff --stdio",
        ] {
            assert!(!is_daemon_stdio(bad), "{}", String::from_utf8_lossy(bad));
        }
    }
}
