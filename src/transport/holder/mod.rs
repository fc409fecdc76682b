//! The SSH connection holder: a long-lived process per builder SSH destination that keeps one
//! authenticated session open and serves channels on it to hook processes over a Unix socket,
//! so a warm build over SSH pays no TCP connect, key exchange or authentication (OpenSSH's
//! ControlPersist, for nixdock's own client).
//!
//! The socket is `<state>/ssh-holders/<hash>.sock`, the hash over everything the session was
//! checked against ([`Target`]: container name and id, address, pinned host key), so a
//! recreated container, a new port or a new host key never reaches an old holder. The
//! directory is the state dir's (0700, this user's). A hook that finds no holder connects
//! directly as before and starts one ([`start`]) under a lock, without waiting for it; later
//! hooks use it ([`HolderLink`]). Anything wrong with a holder — none, refused, another
//! identity, gone mid-handshake — sends the hook the direct way, saying so only at debug level.
//!
//! The holder (`nixdock-hook --ssh-holder`, [`server`]) exits when no channel was open for
//! `ssh-persist` seconds, when its session is lost, when its socket is removed or replaced,
//! and on SIGTERM.

pub mod protocol;
pub mod server;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::net::UnixStream;

use self::protocol::{Hello, ProtocolError, Reply, Request};
use super::keys;
use super::ssh::ExecChannel;
use super::stream_channel::unix_stream_channel;
use crate::state::{FileLock, StateDir};

/// The state dir's subdirectory of holder sockets.
pub const HOLDERS_DIR: &str = "ssh-holders";

/// How long a holder may take to say who it is (it answers at once when alive).
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a holder may take to open the channel on its session.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a holder's session goes to and was checked against. Two targets are the same holder
/// exactly when all of it is equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub container: String,
    pub container_id: String,
    pub via: Via,
}

/// How a holder reaches its builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// One SSH session to the sshd at `addr`, which must prove `host_key`.
    Ssh {
        addr: SocketAddr,
        host_key: russh::keys::PublicKey,
    },
    /// One SSH session over the engine's exec: `engine` as the config names it, at `host` (its
    /// address), runs the builder's sshd on the exec's stdin and stdout (`sshd -i`), which
    /// must prove `host_key`. Every daemon connection and command of a hook is then a channel
    /// of that session (no process start in the container through the engine's runtime, which
    /// costs ~50–100 ms an exec), and nothing is published on any network.
    Engine {
        engine: String,
        host: String,
        host_key: russh::keys::PublicKey,
    },
}

impl Target {
    /// The SSH target of `container` (`id`) at `addr` with `host_key`.
    pub fn ssh(
        container: &str,
        id: &str,
        addr: SocketAddr,
        host_key: russh::keys::PublicKey,
    ) -> Target {
        Target {
            container: container.to_owned(),
            container_id: id.to_owned(),
            via: Via::Ssh { addr, host_key },
        }
    }

    /// Where its channels go, as the hello and the socket's name say it.
    fn addr_line(&self) -> String {
        match &self.via {
            Via::Ssh { addr, .. } => addr.to_string(),
            Via::Engine { engine, host, .. } => format!("engine {engine} {host}"),
        }
    }

    /// The public key the builder's sshd must prove.
    pub fn host_key(&self) -> &russh::keys::PublicKey {
        match &self.via {
            Via::Ssh { host_key, .. } | Via::Engine { host_key, .. } => host_key,
        }
    }

    fn host_key_line(&self) -> String {
        let key = self.host_key();
        key.to_openssh().unwrap_or_else(|_| keys::fingerprint(key))
    }

    fn host_key_fingerprint(&self) -> String {
        keys::fingerprint(self.host_key())
    }

    /// The socket's file name: a hash of everything the session depends on.
    pub fn socket_name(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            protocol::VERSION,
            &self.container,
            &self.container_id,
            &self.addr_line(),
            &self.host_key_line(),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let digest = h.finalize();
        let mut name = String::with_capacity(29);
        for b in &digest[..12] {
            name.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            name.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        name.push_str(".sock");
        name
    }

    fn hello(&self, pid: u32) -> Hello {
        Hello {
            container: self.container.clone(),
            container_id: self.container_id.clone(),
            addr: self.addr_line(),
            host_key: self.host_key_fingerprint(),
            pid,
        }
    }

    /// Whether a holder's hello says it holds a session to this target.
    fn matches(&self, h: &Hello) -> bool {
        h.container == self.container
            && h.container_id == self.container_id
            && h.addr == self.addr_line()
            && h.host_key == self.host_key_fingerprint()
    }
}

/// What the holder needs beside its target.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The SSH user.
    pub user: String,
    /// The daemon socket a `daemon` request reaches.
    pub daemon_socket: String,
    /// A subsystem started once after connecting (for its side effect), if any.
    pub nodelay_subsystem: Option<String>,
    /// Idle time after which the holder exits.
    pub persist: Duration,
    /// Through an engine's exec: the command that runs the builder's sshd on the exec's stdin
    /// and stdout.
    pub session_command: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("SSH holder {socket}: {what}")]
    Io {
        socket: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("SSH holder {socket}: {source}")]
    Protocol {
        socket: PathBuf,
        #[source]
        source: ProtocolError,
    },
    #[error("SSH holder {socket}: no answer within {secs} s")]
    Timeout { socket: PathBuf, secs: u64 },
    #[error("SSH holder {socket} belongs to uid {uid}, not to us")]
    NotOurs { socket: PathBuf, uid: u32 },
    #[error("SSH holder {socket} holds another session ({got:?})")]
    Mismatch { socket: PathBuf, got: Box<Hello> },
    #[error("SSH holder {socket}: {why}")]
    Refused { socket: PathBuf, why: String },
    #[error("the state directory: {0}")]
    State(#[from] crate::state::StateError),
    #[error("socket path {0} is too long for a Unix socket")]
    PathTooLong(PathBuf),
}

/// `sun_path`'s size less its terminating NUL, on the platforms nixdock runs on.
#[cfg(target_os = "linux")]
const MAX_SOCKET_PATH: usize = 107;
#[cfg(not(target_os = "linux"))]
const MAX_SOCKET_PATH: usize = 103;

/// Where the holder for `target` listens (the directory made and checked as the state's own).
pub fn socket_path(state: &StateDir, target: &Target) -> Result<PathBuf, HolderError> {
    let dir = state.private_subdir(HOLDERS_DIR)?;
    let path = dir.join(target.socket_name());
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(HolderError::PathTooLong(path));
    }
    Ok(path)
}

/// The peer's uid must be ours: the directory is private, but a socket is only as good as
/// the process behind it. tokio asks the kernel the portable way (SO_PEERCRED on Linux,
/// getpeereid on macOS and the BSDs).
fn check_peer(stream: &UnixStream, socket: &Path) -> Result<(), HolderError> {
    let cred = stream.peer_cred().map_err(|source| HolderError::Io {
        socket: socket.to_owned(),
        what: "asking who listens",
        source,
    })?;
    let me = euid();
    if cred.uid() != me {
        return Err(HolderError::NotOurs {
            socket: socket.to_owned(),
            uid: cred.uid(),
        });
    }
    Ok(())
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A way to a builder through its holder: each channel is a new connection to the holder's
/// socket, checked (peer uid, the holder's hello) before anything is asked.
#[derive(Debug, Clone)]
pub struct HolderLink {
    socket: PathBuf,
    target: Target,
    /// The holder that opened this link's first channel: its socket file (inode) and its pid.
    served_by: Arc<OnceLock<(u64, u32)>>,
}

impl HolderLink {
    pub fn new(socket: PathBuf, target: Target) -> HolderLink {
        HolderLink {
            socket,
            target,
            served_by: Arc::default(),
        }
    }

    /// Whether the holder that served this link's channels still does, or left in order.
    /// False when it died under them — its socket left behind and refusing (killed, or gone
    /// with the container it ran in), or replaced by another's (a hook replaces only a socket
    /// that refuses) —, so that the channels it carried ended without the builder ending them.
    /// True when its socket is the same and the same process answers there, when the socket
    /// is gone (a holder removes it when it exits idle — possible once a crashed worker closed
    /// the last channel — or with its session), and when it served nothing.
    pub async fn still_serving(&self) -> bool {
        let Some(&(ino, pid)) = self.served_by.get() else {
            return true;
        };
        match std::fs::symlink_metadata(&self.socket) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(_) => false,
            Ok(m) if m.ino() != ino => false,
            Ok(_) => hello_at(&self.socket, &self.target)
                .await
                .is_some_and(|h| h.pid == pid),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How the holder reaches the builder.
    pub fn via(&self) -> &Via {
        &self.target.via
    }

    /// A connection to the builder's daemon socket.
    pub async fn open_daemon(&self) -> Result<ExecChannel, HolderError> {
        self.open(&Request::Daemon).await
    }

    /// A command in the builder: its stdin and stdout (its stderr stays in the holder's log,
    /// its exit status is not reported).
    pub async fn exec(&self, command: &str) -> Result<ExecChannel, HolderError> {
        self.open(&Request::Exec(command.to_owned())).await
    }

    async fn open(&self, request: &Request) -> Result<ExecChannel, HolderError> {
        let socket = &self.socket;
        let proto = |source| HolderError::Protocol {
            socket: socket.clone(),
            source,
        };
        let timeout = |d: Duration| HolderError::Timeout {
            socket: socket.clone(),
            secs: d.as_secs(),
        };
        // Read before connecting: a socket replaced in between makes `still_serving` say no,
        // never yes wrongly.
        let ino = std::fs::symlink_metadata(socket).ok().map(|m| m.ino());
        let mut stream = UnixStream::connect(socket)
            .await
            .map_err(|source| HolderError::Io {
                socket: socket.clone(),
                what: "connecting",
                source,
            })?;
        check_peer(&stream, socket)?;
        let hello = tokio::time::timeout(HELLO_TIMEOUT, protocol::read_frame(&mut stream))
            .await
            .map_err(|_| timeout(HELLO_TIMEOUT))?
            .map_err(proto)?;
        let hello = Hello::parse(hello).map_err(proto)?;
        if !self.target.matches(&hello) {
            return Err(HolderError::Mismatch {
                socket: socket.clone(),
                got: Box::new(hello),
            });
        }
        protocol::write_frame(&mut stream, &request.fields())
            .await
            .map_err(proto)?;
        let reply = tokio::time::timeout(REPLY_TIMEOUT, protocol::read_frame(&mut stream))
            .await
            .map_err(|_| timeout(REPLY_TIMEOUT))?
            .map_err(proto)?;
        match Reply::parse(reply).map_err(proto)? {
            Reply::Ok => {
                if let Some(ino) = ino {
                    let _ = self.served_by.set((ino, hello.pid));
                }
                tracing::debug!(socket = %socket.display(), holder = hello.pid, ?request, "channel through the SSH holder");
                Ok(unix_stream_channel(stream))
            }
            Reply::Error(why) => Err(HolderError::Refused {
                socket: socket.clone(),
                why,
            }),
        }
    }
}

/// The hello of the holder answering at `socket` as `target`'s, if one does (nothing asked).
async fn hello_at(socket: &Path, target: &Target) -> Option<Hello> {
    let check = async {
        let mut stream = UnixStream::connect(socket).await.ok()?;
        check_peer(&stream, socket).ok()?;
        let hello = protocol::read_frame(&mut stream).await.ok()?;
        Hello::parse(hello).ok().filter(|h| target.matches(h))
    };
    tokio::time::timeout(HELLO_TIMEOUT, check)
        .await
        .ok()
        .flatten()
}

/// Starts a holder for `target` unless one is starting or answering: under the lock
/// `<state>/locks/ssh-holder-<hash>.lock`, taken without waiting (someone holding it is
/// starting one), a stale socket is removed and the holder spawned detached, the lock handed
/// on to it until its socket is in place. Best effort: failures are logged at debug level.
pub async fn start(state: &StateDir, target: &Target, settings: &Settings) {
    if let Err(e) = try_start(state, target, settings).await {
        tracing::debug!(container = %target.container, "no SSH holder started: {e}");
    }
}

async fn try_start(
    state: &StateDir,
    target: &Target,
    settings: &Settings,
) -> Result<(), StartError> {
    // The holder is told the state directory as text: another path would be another directory.
    if state.path().to_str().is_none() {
        return Err(StartError::StateNotUtf8(state.path().to_owned()));
    }
    let socket = socket_path(state, target)?;
    let Some(lock) =
        FileLock::try_exclusive(&start_lock_path(state, target)).map_err(HolderError::from)?
    else {
        return Ok(());
    };
    if std::fs::symlink_metadata(&socket).is_ok() && hello_at(&socket, target).await.is_some() {
        return Ok(());
    }
    sweep_stale(&socket).await;
    let exe = hook_binary()?;
    let params = server::Params {
        state_dir: state.path().to_owned(),
        target: target.clone(),
        settings: settings.clone(),
    };
    let frame = protocol::encode(&params.fields()).map_err(StartError::Params)?;
    spawn_detached(&exe, &frame, &lock)?;
    tracing::info!(container = %target.container, socket = %socket.display(), "started an SSH holder");
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Holder(#[from] HolderError),
    #[error("the state directory {0:?} is not named in UTF-8, as a holder's parameters must be")]
    StateNotUtf8(PathBuf),
    #[error("encoding its parameters: {0}")]
    Params(ProtocolError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The lock under which a holder for `target`'s container is started (and removes its socket
/// on exit): one per container name, so the lock files do not pile up with every new port.
pub(crate) fn start_lock_path(state: &StateDir, target: &Target) -> PathBuf {
    state.lock_path(&format!("ssh-holder-{}", target.container))
}

/// Removes the sockets in `socket`'s directory that nobody listens on (`ECONNREFUSED`: their
/// holder was killed before it could remove them), this one included: a recreated container's
/// holder never comes back for its old name. Only a hook about to start a holder does it.
/// A holder's temporary name (bound, not yet listening, renamed into place once it is) is
/// left alone, and a socket whose backlog is full is not waited for. (On macOS a full backlog
/// refuses too: that holder loses its name, sees its socket gone, finishes its channels and
/// exits, and the next hook starts another.)
async fn sweep_stale(socket: &Path) {
    let Some(dir) = socket.parent() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let is_socket = e.file_type().is_ok_and(|t| {
            use std::os::unix::fs::FileTypeExt;
            t.is_socket()
        });
        if !is_socket || path.extension().is_none_or(|x| x != "sock") {
            continue;
        }
        let tried = tokio::time::timeout(
            SWEEP_CONNECT_TIMEOUT,
            tokio::net::UnixStream::connect(&path),
        )
        .await;
        match tried {
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
                match remove_in_dir(&path) {
                    Ok(()) => {
                        tracing::debug!(socket = %path.display(), "removed a stale SSH holder socket")
                    }
                    Err(err) => tracing::debug!("{err}"),
                }
            }
            _ => {}
        }
    }
}

/// How long the sweep waits to learn whether a socket is listened on.
const SWEEP_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// Removes `path` from its directory (`unlinkat` through the directory's descriptor, opened
/// without following a symlink), so nothing outside the checked directory is touched.
fn remove_in_dir(path: &Path) -> Result<(), StartError> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| StartError::Io { what, source }
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let dir = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(io("opening the directory of"))?;
    let name = std::ffi::CString::new(name.as_bytes()).map_err(|_| StartError::Io {
        what: format!("removing {}", path.display()),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    let r = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(io("removing")(e));
        }
    }
    Ok(())
}

/// The `nixdock-hook` binary to run as the holder: this process's own, when it is the hook.
fn hook_binary() -> Result<PathBuf, StartError> {
    let exe = std::env::current_exe().map_err(|source| StartError::Io {
        what: "finding this program".into(),
        source,
    })?;
    if exe.file_name().and_then(|n| n.to_str()) != Some("nixdock-hook") {
        return Err(StartError::Io {
            what: format!("{} is not nixdock-hook", exe.display()),
            source: std::io::ErrorKind::Unsupported.into(),
        });
    }
    Ok(exe)
}

/// The descriptor number the start lock has in the holder.
pub(crate) const LOCK_FD: i32 = 3;

/// Runs `exe --ssh-holder` in a session of its own (Nix kills the hook's process group when
/// the build is over), with `params` on its stdin, nothing on its stdout and stderr (Nix
/// waits for EOF on the hook's stderr), no other descriptor of ours but the start lock as
/// [`LOCK_FD`]; never waits for it.
fn spawn_detached(exe: &Path, params: &[u8], lock: &FileLock) -> Result<(), StartError> {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let lock_fd = lock.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg("--ssh-holder")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/");
    // SAFETY: between fork and exec only async-signal-safe calls (setsid, dup2, fcntl,
    // getrlimit, and the close_range system call), no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if lock_fd == LOCK_FD {
                if libc::fcntl(LOCK_FD, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(lock_fd, LOCK_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            close_on_exec_from(LOCK_FD + 1);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| StartError::Io {
        what: format!("starting {} --ssh-holder", exe.display()),
        source,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(params).map_err(|source| StartError::Io {
            what: "passing the holder its parameters".into(),
            source,
        })?;
    }
    // The holder outlives this hook, which does not wait for it; a thread reaps it should it
    // end first (a holder that fails at its start), so it is no zombie while the hook runs.
    // After the hook exits, init does.
    let reaper = std::thread::Builder::new()
        .name("ssh-holder-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
    if let Err(e) = reaper {
        tracing::debug!("no thread to reap the SSH holder ({e}); init will once the hook exits");
    }
    Ok(())
}

/// Marks every descriptor from `first` on close-on-exec: the hook inherits descriptors from
/// Nix (its fd 4, the build log's pipe, among them) that the holder must not keep open.
/// Async-signal-safe (runs between fork and exec).
fn close_on_exec_from(first: i32) {
    #[cfg(target_os = "linux")]
    {
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        // SAFETY: close_range only changes descriptor flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            )
        };
        if r == 0 {
            return;
        }
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur.min(65536) as i32
    } else {
        1024
    };
    for fd in first..max {
        // SAFETY: fcntl on any number is harmless; EBADF for one not open.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        let key = keys::generate_host_key().unwrap();
        Target::ssh(
            "nixdock-abcd1234-x86_64-linux",
            "f00d",
            "127.0.0.1:32768".parse().unwrap(),
            key.public_key().clone(),
        )
    }

    fn with_via(t: &Target, via: Via) -> Target {
        Target { via, ..t.clone() }
    }

    #[test]
    fn the_socket_name_changes_with_everything_the_session_depends_on() {
        let t = target();
        let name = t.socket_name();
        assert!(name.ends_with(".sock") && name.len() == 24 + 5, "{name}");
        assert_eq!(name, t.clone().socket_name());
        let mut other = t.clone();
        other.container_id = "f00e".into();
        assert_ne!(other.socket_name(), name);
        let Via::Ssh { addr, host_key } = t.via.clone() else {
            unreachable!()
        };
        let other = with_via(
            &t,
            Via::Ssh {
                addr: "127.0.0.1:32769".parse().unwrap(),
                host_key: host_key.clone(),
            },
        );
        assert_ne!(other.socket_name(), name);
        let other = with_via(
            &t,
            Via::Ssh {
                addr,
                host_key: keys::generate_host_key().unwrap().public_key().clone(),
            },
        );
        assert_ne!(other.socket_name(), name);
        // Through an engine: another holder, one per engine.
        let engine = |e: &str| {
            with_via(
                &t,
                Via::Engine {
                    engine: e.into(),
                    host: "tcp://10.0.0.2:2376".into(),
                    host_key: t.host_key().clone(),
                },
            )
        };
        assert_ne!(engine("remote").socket_name(), name);
        assert_ne!(
            engine("remote").socket_name(),
            engine("other").socket_name()
        );
        assert!(engine("remote").matches(&engine("remote").hello(1)));
        assert!(!engine("remote").matches(&engine("other").hello(1)));
        assert!(!t.matches(&engine("remote").hello(1)));
        let mut other = t.clone();
        other.container = "nixdock-abcd1234-aarch64-linux".into();
        assert_ne!(other.socket_name(), name);
    }

    #[test]
    fn a_hello_matches_only_its_own_target() {
        let t = target();
        let h = t.hello(7);
        assert!(t.matches(&h));
        for change in [
            |h: &mut Hello| h.container.push('x'),
            |h: &mut Hello| h.container_id.push('x'),
            |h: &mut Hello| h.addr = "127.0.0.1:1".into(),
            |h: &mut Hello| h.host_key = "SHA256:other".into(),
        ] {
            let mut h = h.clone();
            change(&mut h);
            assert!(!t.matches(&h), "{h:?}");
        }
    }
}
