//! The holder process, `nixdock-hook --ssh-holder`: reads its parameters from stdin, connects
//! (the same pinned host-key check as a hook), puts its socket in place, hands back the start
//! lock, and serves channels until it has been idle for `ssh-persist` seconds, its session is
//! lost, its socket is removed or replaced, or it gets SIGTERM.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::protocol::{self, Hello, ProtocolError, Reply, Request};
use super::{LOCK_FD, Settings, Target, Via, socket_path};
use crate::state::{FileLock, StateDir};
use crate::transport::keys;
use crate::transport::ssh::{self, ExecChannel, SshSession};
use bollard::Docker;

use crate::transport::EngineExec;

/// The SSH connect's deadline, as a hook's.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a hook may take to send its request once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the session, the socket and idleness are checked.
const TICK: Duration = Duration::from_millis(500);
/// How long a hook's side may stay open once its channel has ended.
const LINGER: Duration = Duration::from_secs(5);
/// How long the builder may take to open a channel (the hook waits as long for the reply).
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a bridge looks whether its hook has gone.
const HANGUP_CHECK: Duration = Duration::from_secs(1);

/// The holder's parameters, as the starting hook sends them on the holder's stdin (not in
/// argv or the environment, which other users can read).
#[derive(Debug, Clone)]
pub struct Params {
    pub state_dir: PathBuf,
    pub target: Target,
    pub settings: Settings,
}

impl Params {
    pub fn fields(&self) -> Vec<String> {
        let t = &self.target;
        let s = &self.settings;
        vec![
            protocol::VERSION.to_owned(),
            "params".to_owned(),
            self.state_dir.to_string_lossy().into_owned(),
            t.container.clone(),
            t.container_id.clone(),
        ]
        .into_iter()
        .chain(match &t.via {
            Via::Ssh { addr, .. } => ["ssh".to_owned(), addr.to_string(), "-".to_owned()],
            Via::Engine { engine, host, .. } => ["engine".to_owned(), engine.clone(), host.clone()],
        })
        .chain([
            t.host_key_line(),
            s.user.clone(),
            s.daemon_socket.clone(),
            s.nodelay_subsystem.clone().unwrap_or_default(),
            s.persist.as_secs().to_string(),
            s.session_command.clone(),
        ])
        .collect()
    }

    pub fn parse(fields: Vec<String>) -> Result<Params, ProtocolError> {
        let bad = |what: &str| ProtocolError::Unexpected(format!("parameters: {what}"));
        let Ok(
            [
                version,
                kind,
                state_dir,
                container,
                container_id,
                via,
                a,
                b,
                host_key,
                user,
                daemon_socket,
                nodelay,
                persist,
                session_command,
            ],
        ) = <[String; 14]>::try_from(fields)
        else {
            return Err(bad("wrong number of fields"));
        };
        if version != protocol::VERSION || kind != "params" {
            return Err(bad("another version"));
        }
        let host_key = keys::parse_public_key(&host_key).map_err(|_| bad("host key"))?;
        Ok(Params {
            state_dir: PathBuf::from(state_dir),
            target: Target {
                container,
                container_id,
                via: match via.as_str() {
                    "ssh" if b == "-" => Via::Ssh {
                        addr: a.parse().map_err(|_| bad("address"))?,
                        host_key,
                    },
                    "engine" => Via::Engine {
                        engine: a,
                        host: b,
                        host_key,
                    },
                    _ => return Err(bad("the way to the builder")),
                },
            },
            settings: Settings {
                user,
                daemon_socket,
                nodelay_subsystem: Some(nodelay).filter(|n| !n.is_empty()),
                persist: Duration::from_secs(persist.parse().map_err(|_| bad("persist"))?),
                session_command,
            },
        })
    }
}

/// `nixdock-hook --ssh-holder`: the process's exit status.
pub fn main(connect_engine: ConnectEngine) -> i32 {
    // First, before anything opens a file that could get its number: the start lock the hook
    // handed on, held until the socket is in place.
    let lock = take_lock_fd();
    let params = match read_params() {
        Ok(p) => p,
        Err(_) => return 2,
    };
    let state = match StateDir::open(&params.state_dir) {
        Ok(s) => s,
        Err(_) => return 2,
    };
    crate::logfile::init(&state.log_path(), "info");
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::warn!("SSH holder: cannot start: {e}");
            return 1;
        }
    };
    let code = rt.block_on(serve(params, state, lock, connect_engine));
    rt.shutdown_background();
    code
}

fn take_lock_fd() -> Option<OwnedFd> {
    // SAFETY: F_GETFD only asks whether the descriptor is open.
    if unsafe { libc::fcntl(LOCK_FD, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: it is open, and nothing else in this process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(LOCK_FD) };
    // Not to be inherited by anything we might run.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(LOCK_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(fd)
}

fn read_params() -> Result<Params, ProtocolError> {
    use std::io::Read;
    let mut stdin = std::io::stdin().lock();
    let mut len = [0u8; 4];
    stdin.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > protocol::MAX_FRAME {
        return Err(ProtocolError::TooLong(len));
    }
    let mut payload = vec![0u8; len];
    stdin.read_exact(&mut payload)?;
    Params::parse(protocol::decode(&payload)?)
}

/// (device, inode) of a path, not following a symlink.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Open channels, and when the last one ended.
struct Activity {
    active: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard {
            activity: self.clone(),
            used: false,
        }
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(
            self.last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed(),
        )
    }
}

/// One connection from a hook; a channel it used counts as activity when it ends (a hook
/// that only read the hello does not keep the holder alive).
struct ActiveGuard {
    activity: Arc<Activity>,
    used: bool,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.used {
            *self.activity.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        self.activity.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Connects to an engine by the name the config gives it. The hook binary passes the builder
/// layer's discovery (the same checks as a hook's); the holder itself reads no config.
pub type ConnectEngine =
    fn(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Docker, String>>>>;

async fn serve(
    p: Params,
    state: StateDir,
    lock: Option<OwnedFd>,
    connect_engine: ConnectEngine,
) -> i32 {
    let Params {
        target, settings, ..
    } = p;
    let pid = std::process::id();
    let container = target.container.clone();
    let t0 = Instant::now();
    let key = match keys::load_or_create_client_key(state.path()) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(%container, holder = pid, "SSH holder: {e}");
            return 1;
        }
    };
    let session = match &target.via {
        Via::Ssh { addr, host_key } => {
            let session =
                match ssh::connect(*addr, &settings.user, &key, host_key, CONNECT_TIMEOUT).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::info!(%container, holder = pid, "SSH holder not started: {e}");
                        return 1;
                    }
                };
            if let Some(sub) = &settings.nodelay_subsystem
                && let Err(e) = session.touch_subsystem(sub).await
            {
                tracing::debug!(%container, "no nodelay subsystem: {e}");
            }
            session
        }
        Via::Engine {
            engine, host_key, ..
        } => {
            match session_over_exec(
                engine,
                &container,
                host_key,
                &key,
                &settings,
                connect_engine,
            )
            .await
            {
                Ok(s) => s,
                Err(why) => {
                    tracing::info!(%container, holder = pid, "holder not started: {why}");
                    return 1;
                }
            }
        }
    };
    let socket = match socket_path(&state, &target) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%container, holder = pid, "SSH holder not started: {e}");
            return 1;
        }
    };
    let listener = match bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::info!(%container, holder = pid, socket = %socket.display(), "SSH holder cannot listen: {e}");
            return 1;
        }
    };
    let Some(bound) = file_id(&socket) else {
        return 1;
    };
    drop(lock);
    // Where tests and `ls -l /proc/<pid>/cwd` find which installation a holder serves; it
    // also keeps the state's file system from being unmounted under it.
    if let Some(dir) = socket.parent() {
        let _ = std::env::set_current_dir(dir);
    }
    tracing::info!(%container, addr = %target.addr_line(), holder = pid, persist_s = settings.persist.as_secs(), ms = t0.elapsed().as_millis() as u64, "SSH holder serving");

    let why = run(listener, &socket, bound, session, &target, &settings).await;
    // Under the start lock, so the socket removed is ours and not a successor's.
    let lock_path = super::start_lock_path(&state, &target);
    let mut guard = None;
    for _ in 0..20 {
        match FileLock::try_exclusive(&lock_path) {
            Ok(Some(l)) => {
                guard = Some(l);
                break;
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => break,
        }
    }
    if guard.is_some() && file_id(&socket) == Some(bound) {
        let _ = std::fs::remove_file(&socket);
    }
    tracing::info!(%container, holder = pid, "SSH holder exits: {why}");
    0
}

/// Binds at a temporary name, makes it 0600 and renames it into place, so a hook never finds
/// a socket nobody listens on yet.
fn bind(socket: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let name = socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = socket.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, socket));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Serves until a reason to stop; returns it.
async fn run(
    listener: UnixListener,
    socket: &Path,
    bound: (u64, u64),
    session: SshSession,
    target: &Target,
    settings: &Settings,
) -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let session = Arc::new(session);
    let hello = target.hello(std::process::id());
    let activity = Arc::new(Activity {
        active: AtomicUsize::new(0),
        last: Mutex::new(Instant::now()),
    });
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return "cannot handle signals";
    };
    let mut tick = tokio::time::interval(TICK);
    let mut listener = Some(listener);
    let mut draining = None;
    loop {
        let accept = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = accept => match r {
                Ok((stream, _)) => {
                    let guard = activity.enter();
                    tokio::spawn(handle(
                        stream,
                        session.clone(),
                        hello.clone(),
                        settings.daemon_socket.clone(),
                        guard,
                    ));
                }
                Err(e) => {
                    tracing::debug!(socket = %socket.display(), "SSH holder: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = tick.tick() => {
                if session.is_closed() {
                    // Its channels ended with it.
                    return "its SSH session ended";
                }
                if draining.is_none() && file_id(socket) != Some(bound) {
                    // A hook took it for stale, or someone removed it: no new channels, but
                    // the builds using ours finish.
                    draining = Some("its socket was removed or replaced");
                    listener = None;
                }
                match activity.idle_for() {
                    Some(_) if draining.is_some() => return draining.unwrap_or_default(),
                    Some(idle) if idle >= settings.persist => {
                        return "idle";
                    }
                    _ => {}
                }
            }
        }
    }
}

/// One hook's connection: our hello, its request, the channel, then bytes both ways.
async fn handle(
    mut stream: UnixStream,
    session: Arc<SshSession>,
    hello: Hello,
    daemon_socket: String,
    mut guard: ActiveGuard,
) {
    match stream.peer_cred() {
        Ok(c) if c.uid() == super::euid() => {}
        Ok(c) => {
            tracing::warn!(
                uid = c.uid(),
                "SSH holder: refused a connection from another user"
            );
            return;
        }
        Err(e) => {
            tracing::debug!("SSH holder: no peer credentials: {e}");
            return;
        }
    }
    if protocol::write_frame(&mut stream, &hello.fields())
        .await
        .is_err()
    {
        return;
    }
    let request =
        match tokio::time::timeout(REQUEST_TIMEOUT, protocol::read_frame(&mut stream)).await {
            Ok(Ok(f)) => match Request::parse(f) {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("SSH holder: {e}");
                    return;
                }
            },
            // Only looked at the hello, or went away.
            _ => return,
        };
    // A builder whose sshd keeps the session alive but never answers must not hold this task
    // (and keep the holder from ever going idle).
    let ch = tokio::time::timeout(CHANNEL_TIMEOUT, async {
        match &request {
            Request::Daemon => session.open_unix_socket(&daemon_socket).await,
            Request::Exec(command) => session.exec(command).await,
        }
        .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|_| {
        Err(format!(
            "the builder did not open the channel within {} s",
            CHANNEL_TIMEOUT.as_secs()
        ))
    });
    let ch = match ch {
        Ok(ch) => ch,
        Err(e) => {
            tracing::debug!(?request, "SSH holder: {e}");
            let _ = protocol::write_frame(&mut stream, &Reply::Error(e.to_string()).fields()).await;
            return;
        }
    };
    if protocol::write_frame(&mut stream, &Reply::Ok.fields())
        .await
        .is_err()
    {
        return;
    }
    guard.used = true;
    bridge(stream, ch).await;
}

/// The peer an SSH session over an exec is named by in its errors: it has no address.
const EXEC_PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// An SSH session with the builder's sshd, which the engine's exec runs on the exec's stdin
/// and stdout (`settings.session_command`): the exec is the session's byte stream, and the
/// sshd proves the container's pinned host key as a published one would.
async fn session_over_exec(
    engine: &str,
    container: &str,
    host_key: &russh::keys::PublicKey,
    key: &keys::ClientKey,
    settings: &Settings,
    connect_engine: ConnectEngine,
) -> Result<SshSession, String> {
    let docker =
        match tokio::time::timeout(CONNECT_TIMEOUT, connect_engine(engine.to_owned())).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return Err(format!("engine {engine}: {e}")),
            Err(_) => return Err(format!("engine {engine} did not answer")),
        };
    let exec = EngineExec::new(docker, container.to_owned());
    let ch = tokio::time::timeout(CONNECT_TIMEOUT, exec.exec(&settings.session_command))
        .await
        .map_err(|_| format!("engine {engine}: the exec of sshd did not start"))?
        .map_err(|e| e.to_string())?;
    let ExecChannel {
        stdin,
        stdout,
        mut stderr,
        exit: _,
    } = ch;
    let name = container.to_owned();
    tokio::spawn(async move {
        while let Some(Ok(chunk)) = stderr.next_chunk().await {
            tracing::debug!(container = %name, "the builder's sshd: {}", String::from_utf8_lossy(&chunk).trim_end());
        }
    });
    ssh::connect_stream(
        tokio::io::join(stdout, stdin),
        EXEC_PEER,
        &settings.user,
        key,
        host_key,
        CONNECT_TIMEOUT,
    )
    .await
    .map_err(|e| format!("SSH over the exec of sshd on engine {engine}: {e}"))
}

/// Whether the peer of a Unix stream socket has closed it entirely (not only its sending
/// side): `poll` reports a hang-up, without waiting. Asked with `POLLOUT`: Linux reports a
/// hang-up whatever is asked, macOS only for what is (and for `POLLIN` already at a
/// half-close).
fn hung_up(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call's duration; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// The hook's bytes to the channel's input and the channel's output to the hook, each until
/// its end; the hook's side is given [`LINGER`] once the channel's output has ended. A hook
/// that has gone ends the bridge although the channel's output has not, checked every
/// [`HANGUP_CHECK`] (a builder that never closes it, or stops taking its input, would
/// otherwise hold the task, and the holder, for ever).
async fn bridge(stream: UnixStream, ch: ExecChannel) {
    let ExecChannel {
        mut stdin,
        mut stdout,
        mut stderr,
        exit: _exit,
    } = ch;
    tokio::spawn(async move {
        while let Some(Ok(chunk)) = stderr.next_chunk().await {
            tracing::debug!(
                "SSH holder: remote stderr: {}",
                String::from_utf8_lossy(&chunk).trim_end()
            );
        }
    });
    let (mut rd, mut wr) = stream.into_split();
    let mut up = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Flushed at once: an engine exec's input is a TLS stream that keeps what it
            // could not send yet until the next write or flush, and the hook may write
            // nothing more until it has an answer.
            if stdin.write_all(&buf[..n]).await.is_err() || stdin.flush().await.is_err() {
                break;
            }
        }
        let _ = stdin.shutdown().await;
    });
    let mut check = tokio::time::interval(HANGUP_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            chunk = stdout.next_chunk() => match chunk {
                Some(Ok(chunk)) => {
                    if wr.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                _ => break,
            },
            _ = check.tick() => {
                // Also while the hook's last bytes are still on their way: a builder that
                // stops taking input would hold them (and `up`) for ever; `up` gets LINGER.
                if hung_up(wr.as_ref()) {
                    tracing::info!("SSH holder: the hook went away and the builder kept its channel open: closed it");
                    break;
                }
            }
        }
    }
    let _ = wr.shutdown().await;
    drop(stdout);
    if tokio::time::timeout(LINGER, &mut up).await.is_err() {
        up.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hook_that_has_gone_is_seen_and_one_that_only_stopped_sending_is_not() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        assert!(!hung_up(&ours));
        let (theirs_rd, mut theirs_wr) = theirs.into_split();
        theirs_wr.shutdown().await.unwrap();
        drop(theirs_wr);
        // Its sending side is shut: it may still read what the channel says.
        assert!(!hung_up(&ours));
        drop(theirs_rd);
        assert!(hung_up(&ours));
    }

    #[test]
    fn parameters_round_trip() {
        let p = Params {
            state_dir: "/var/lib/nixdock".into(),
            target: Target::ssh(
                "nixdock-abcd-x86_64-linux",
                "f00d",
                "127.0.0.1:2222".parse().unwrap(),
                keys::generate_host_key().unwrap().public_key().clone(),
            ),
            settings: Settings {
                user: "root".into(),
                daemon_socket: "/nix/var/nix/daemon-socket/socket".into(),
                nodelay_subsystem: None,
                persist: Duration::from_secs(60),
                session_command: "exec sshd -i".into(),
            },
        };
        let fields = p.fields();
        let back = Params::parse(fields.clone()).unwrap();
        assert_eq!(back.target, p.target);
        assert_eq!(back.state_dir, p.state_dir);
        assert_eq!(back.settings.persist, p.settings.persist);
        assert_eq!(back.settings.nodelay_subsystem, None);
        let mut short = fields.clone();
        short.pop();
        assert!(Params::parse(short).is_err());
        let mut bad = fields;
        bad[6] = "not an address".into();
        assert!(Params::parse(bad).is_err());
        let engine = Params {
            target: Target {
                via: Via::Engine {
                    engine: "remote".into(),
                    host: "tcp://10.0.0.2:2376".into(),
                    host_key: p.target.host_key().clone(),
                },
                ..p.target.clone()
            },
            ..p.clone()
        };
        let back = Params::parse(engine.fields()).unwrap();
        assert_eq!(back.target, engine.target);
        assert_eq!(back.settings.session_command, "exec sshd -i");
    }
}
