//! Finding the Docker engine.
//!
//! The hook usually runs as root under nix-daemon and writes into the store every user trusts,
//! so whoever serves the engine it talks to controls what it imports (the builder's private
//! host key is uploaded there, and the outputs come back from it). As root it therefore uses
//! only what root itself chose:
//! 1. the config's `docker-host` — only that one: an engine named there that does not answer
//!    is an error naming it, never a reason to try another;
//! 2. else `DOCKER_HOST` from the hook's own environment (nix-daemon's, which no client can
//!    set), honoured the same way: an explicit setting that does not answer is an error;
//! 3. else the system sockets `/var/run/docker.sock` and `/run/podman/podman.sock`, each only
//!    when it, and every directory on the way to it (symlinks resolved), belongs to root and
//!    no one else can write there ([`check_socket`]).
//!
//! Root never looks in `/home`, `/Users` or `/run/user`: a user who runs an engine there (or
//! anything that answers the API) would get the builders. A non-root hook (a single-user
//! install) also looks in its own home and `/run/user/<own uid>`, never another user's.
//! Docker Desktop, OrbStack and colima on a Mac live in a user's home: `nixdock install`
//! searches the homes once ([`install_time_candidates`]), shows what it found, and records
//! it as `docker-host`.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;

use crate::config::{Config, EngineAccess, Transport};
use crate::transport::engine_api::{self, EngineApiError, TlsFiles};

use super::known_engines::{self, Known};
use super::provision::{EnginePlace, Publish};
use super::systems;
use crate::transport::ssh::{self, HostKeys, SshError};
use crate::transport::{keys, parse_public_key};

/// What an `ssh://` engine's host runs to carry the Engine API, as the docker CLI does.
const DIAL_STDIO: &str = "docker system dial-stdio";
/// Connecting to an `ssh://` engine: TCP, key exchange and authentication.
const SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Engine calls that should be instant (inspect, ping) give up after this long.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound for any single engine request (container start under emulation is slow).
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// The system sockets root may use, in order.
pub const SYSTEM_SOCKETS: [(&str, HowFound); 2] = [
    ("/var/run/docker.sock", HowFound::SystemSocket),
    ("/run/podman/podman.sock", HowFound::PodmanRootful),
];

/// Sockets that engines put in their user's home, relative to it.
const HOME_SOCKETS: [(&str, HowFound); 4] = [
    (".docker/run/docker.sock", HowFound::DockerDesktop),
    (".orbstack/run/docker.sock", HowFound::OrbStack),
    (".colima/default/docker.sock", HowFound::Colima),
    (".colima/docker.sock", HowFound::Colima),
];

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "no Docker engine answered; tried:\n{}\n{}",
        .tried.iter().map(|(w, why)| format!("  {w}: {why}")).collect::<Vec<_>>().join("\n"),
        if *.as_root { ROOT_HINT } else { USER_HINT }
    )]
    NotFound {
        tried: Vec<(String, CandidateError)>,
        /// Whether discovery ran as root (and so looked only at the system sockets).
        as_root: bool,
    },
    /// An engine named explicitly (config `docker-host`, `DOCKER_HOST`) did not answer.
    #[error("{}", explicit_message(.addr, *.how, .why))]
    Explicit {
        addr: String,
        how: HowFound,
        why: CandidateError,
    },
    #[error("Docker engine at {addr}: {source}")]
    Api {
        addr: String,
        #[source]
        source: bollard::errors::Error,
    },
}

const ROOT_HINT: &str = "As root, nixdock uses only `docker-host` from its config, DOCKER_HOST, and \
the system sockets /var/run/docker.sock and /run/podman/podman.sock when they and every \
directory above them belong to root; it never looks in users' homes. For an engine elsewhere \
(Docker Desktop, OrbStack, colima, rootless Docker or Podman): start it and run \
`sudo nixdock install` (it records the engine it finds as docker-host), or set \
docker-host = \"unix:///path/to/docker.sock\" in the nixdock config (see `nixdock doctor`).";

const USER_HINT: &str =
    "Start Docker, or set `docker-host` in the nixdock config (see `nixdock doctor`).";

fn explicit_message(addr: &str, how: HowFound, why: &CandidateError) -> String {
    match how {
        HowFound::DockerHostEnv => format!(
            "the Docker engine DOCKER_HOST={addr} names does not answer: {why}. nixdock tries \
             no other engine when one is named: start that engine, or unset DOCKER_HOST (or \
             set docker-host in the nixdock config, which comes first)"
        ),
        _ => format!(
            "the Docker engine docker-host = \"{addr}\" in the nixdock config names does not \
             answer: {why}. nixdock tries no other engine when one is configured: start that \
             engine, or change docker-host in the nixdock config (`sudo nixdock install` \
             shows the engine it finds)"
        ),
    }
}

/// How an engine was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HowFound {
    /// `docker-host` in nixdock's config.
    ConfigDockerHost,
    /// `DOCKER_HOST` in the process's own environment.
    DockerHostEnv,
    /// `/var/run/docker.sock`.
    SystemSocket,
    /// `/run/podman/podman.sock`.
    PodmanRootful,
    DockerDesktop,
    OrbStack,
    Colima,
    /// `/run/user/<uid>/docker.sock`.
    DockerRootless,
    /// `/run/user/<uid>/podman/podman.sock`.
    PodmanRootless,
    /// Made by hand (tests, tools), not by discovery.
    Given,
}

impl HowFound {
    /// Named by the operator: used alone, and an error when it does not answer.
    pub fn is_explicit(self) -> bool {
        matches!(self, HowFound::ConfigDockerHost | HowFound::DockerHostEnv)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HowFound::ConfigDockerHost => "config docker-host",
            HowFound::DockerHostEnv => "DOCKER_HOST",
            HowFound::SystemSocket => "system socket",
            HowFound::PodmanRootful => "Podman (rootful)",
            HowFound::DockerDesktop => "Docker Desktop",
            HowFound::OrbStack => "OrbStack",
            HowFound::Colima => "colima",
            HowFound::DockerRootless => "Docker (rootless)",
            HowFound::PodmanRootless => "Podman (rootless)",
            HowFound::Given => "given",
        }
    }
}

impl std::fmt::Display for HowFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connected engine and where it was found.
#[derive(Clone)]
pub struct Engine {
    /// `default` for the top-level `docker-host`, else its `[engines.<name>]` table's name.
    pub name: String,
    pub docker: Docker,
    pub addr: String,
    pub how_found: HowFound,
    pub arch: String,
    pub os: String,
    /// Podman's Docker API (it applies default ulimits the engine may not be allowed to grant).
    pub podman: bool,
    /// The API version it gave ("1.41"; bollard's own when it gave none).
    pub api: String,
}

/// The name of the engine the top-level `docker-host` (or discovery) gives.
pub const DEFAULT_ENGINE: &str = "default";

/// What reaching an engine takes besides its address: TLS files for `tcp://`, the identity and
/// the pinned host key for `ssh://`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub tls: Option<TlsFiles>,
    pub ssh: Option<SshAccess>,
}

/// An `ssh://` engine's client identity (a private key file) and its host's public key, as in
/// a machines line: the base64 of an OpenSSH public key line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshAccess {
    pub key: PathBuf,
    pub host_key_base64: String,
}

/// An engine as the config names it (or leaves to discovery: `host` unset).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    pub name: String,
    pub host: Option<String>,
    pub access: Access,
}

impl EngineSettings {
    /// The top-level engine at `host`, or found by discovery when `None`.
    pub fn top_level(host: Option<String>) -> EngineSettings {
        EngineSettings {
            name: DEFAULT_ENGINE.to_string(),
            host,
            access: Access::default(),
        }
    }

    /// The engines the config names: the top-level one (`docker-host`, or discovery) first,
    /// then each `[engines.<name>]` by name.
    pub fn pool(cfg: &Config) -> Vec<EngineSettings> {
        let mut out = vec![EngineSettings {
            name: DEFAULT_ENGINE.to_string(),
            host: cfg.docker_host.clone(),
            access: access_of(&cfg.access()),
        }];
        out.extend(cfg.engines.iter().map(|(name, e)| EngineSettings {
            name: name.clone(),
            host: Some(e.docker_host.clone()),
            access: access_of(&e.access()),
        }));
        out
    }

    /// Whether its builders can be known without asking it: the top-level engine on a local
    /// socket (or discovered), whose architecture is this host's.
    pub fn is_local_default(&self) -> bool {
        self.name == DEFAULT_ENGINE
            && self
                .host
                .as_deref()
                .is_none_or(|h| remote_host(h).is_none())
    }
}

fn access_of(a: &EngineAccess) -> Access {
    Access {
        tls: match (&a.tls_ca, &a.tls_cert, &a.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        },
        ssh: match (&a.ssh_key, &a.ssh_host_key) {
            (Some(key), Some(host_key)) => Some(SshAccess {
                key: key.clone(),
                host_key_base64: host_key.clone(),
            }),
            _ => None,
        },
    }
}

impl Engine {
    /// What the builders on this engine take from it and from the config.
    pub fn place(&self, cfg: &Config) -> EnginePlace {
        let publish = publish_for(self.remote_host(), cfg.transport);
        let table = cfg.engines.get(&self.name);
        EnginePlace {
            name: self.name.clone(),
            arch: self.arch.clone(),
            local: self.is_local_socket() && systems::ENGINE_IS_LOCAL,
            publish,
            max_jobs: table.and_then(|t| t.max_jobs),
            speed_factor: table.and_then(|t| t.speed_factor),
            systems: table.and_then(|t| t.systems.clone()),
        }
    }

    /// The host a container's published port is reached on: the engine's own host for a
    /// `tcp://` or `ssh://` engine, `None` for a local socket (loopback).
    pub fn remote_host(&self) -> Option<String> {
        remote_host(&self.addr)
    }

    /// Where a container's published port is reached: loopback for a local engine, the
    /// engine's own host for a remote one (resolved within 5 s).
    pub async fn published_addr(&self, port: u16) -> Result<std::net::SocketAddr, UnresolvedHost> {
        let Some(host) = self.remote_host() else {
            return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        };
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(&target))
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|mut a| a.next())
            .ok_or(UnresolvedHost(target))
    }

    /// Whether the engine's containers and volumes are on this host's file system (a local
    /// socket; Docker Desktop's VM too, whose volumes the fast path then does not find).
    pub fn is_local_socket(&self) -> bool {
        unix_path(&self.addr).is_some()
    }
}

/// A remote engine's host name that did not resolve.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {0}")]
pub struct UnresolvedHost(pub String);

/// Where a builder's sshd is published: on loopback on a local engine, on the engine's own
/// address for a remote one with `transport = "ssh"`, nowhere where commands go through the
/// engine's exec (`engine-exec` on any engine, `auto` on a remote one).
pub fn publish_for(remote_host: Option<String>, transport: Transport) -> Publish {
    match (remote_host, transport) {
        (_, Transport::EngineExec) => Publish::Nothing,
        (None, Transport::Auto | Transport::Ssh) => Publish::Loopback,
        // On the engine's own address when it is one; a name may resolve to any of its host's
        // addresses, so then on all of them (sshd takes only our key).
        (Some(host), Transport::Ssh) => {
            Publish::Address(if host.parse::<std::net::IpAddr>().is_ok() {
                host
            } else {
                "0.0.0.0".into()
            })
        }
        (Some(_), Transport::Auto) => Publish::Nothing,
    }
}

/// The host part of a `tcp://`, `http://`, `https://` or `ssh://` address.
pub fn remote_host(addr: &str) -> Option<String> {
    let rest = ["tcp://", "http://", "https://", "ssh://"]
        .iter()
        .find_map(|p| addr.strip_prefix(p))?;
    let hostport = rest.split('/').next()?;
    let hostport = hostport.rsplit_once('@').map_or(hostport, |(_, h)| h);
    let host = match hostport.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => hostport.split(':').next()?,
    };
    (!host.is_empty()).then(|| host.to_string())
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("addr", &self.addr)
            .field("how_found", &self.how_found)
            .field("arch", &self.arch)
            .finish()
    }
}

/// One place an engine might answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub addr: String,
    pub how: HowFound,
    /// TLS or SSH material the config gives for this address.
    pub access: Access,
    /// For a socket nobody named: the uids that may own it and every directory above it
    /// ([`check_socket`]). `None`: used as given (named by the operator, or shown to them).
    pub owners: Option<Vec<u32>>,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Every place the hook may try, in order, without touching the network.
pub fn candidates(config_host: Option<&str>) -> Vec<Candidate> {
    let env_host = std::env::var("DOCKER_HOST").ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    candidates_for(config_host, env_host.as_deref(), euid(), home.as_deref())
}

/// [`candidates`] for a given environment.
pub fn candidates_for(
    config_host: Option<&str>,
    env_host: Option<&str>,
    euid: u32,
    home: Option<&Path>,
) -> Vec<Candidate> {
    // An explicit engine is the only one: falling back to another would hand the builders to
    // whoever answers there, and hide a misconfiguration.
    if let Some(h) = config_host {
        return vec![Candidate {
            addr: h.to_string(),
            how: HowFound::ConfigDockerHost,
            access: Access::default(),
            owners: None,
        }];
    }
    if let Some(h) = env_host.filter(|h| !h.is_empty()) {
        return vec![Candidate {
            addr: h.to_string(),
            how: HowFound::DockerHostEnv,
            access: Access::default(),
            owners: None,
        }];
    }
    let mut out = Vec::new();
    let system = |(path, how): (&str, HowFound)| Candidate {
        addr: format!("unix://{path}"),
        how,
        access: Access::default(),
        owners: Some(vec![0]),
    };
    out.push(system(SYSTEM_SOCKETS[0]));
    if euid != 0 {
        // A single-user install: this user's own engines, owned by them (or root).
        let mine = Some(vec![0, euid]);
        if let Some(home) = home.filter(|h| h.is_absolute()) {
            for (rel, how) in HOME_SOCKETS {
                let p = home.join(rel);
                if std::fs::symlink_metadata(&p).is_ok() {
                    out.push(Candidate {
                        addr: format!("unix://{}", p.display()),
                        how,
                        access: Access::default(),
                        owners: mine.clone(),
                    });
                }
            }
        }
        out.push(system(SYSTEM_SOCKETS[1]));
        let run = PathBuf::from(format!("/run/user/{euid}"));
        for (rel, how) in [
            ("podman/podman.sock", HowFound::PodmanRootless),
            ("docker.sock", HowFound::DockerRootless),
        ] {
            let p = run.join(rel);
            if std::fs::symlink_metadata(&p).is_ok() {
                out.push(Candidate {
                    addr: format!("unix://{}", p.display()),
                    how,
                    access: Access::default(),
                    owners: mine.clone(),
                });
            }
        }
    } else {
        out.push(system(SYSTEM_SOCKETS[1]));
    }
    out
}

/// Where `nixdock install` looks, once, with the operator watching: the search the hook made
/// before it trusted only root's own sockets. `DOCKER_HOST`, the system sockets, then the
/// sockets of Docker Desktop, OrbStack and colima in the homes of the invoking user
/// (`SUDO_USER`), the console user (macOS) and everyone under /home and /Users, then rootful,
/// rootless Podman and rootless Docker. None is checked for ownership: install shows what it
/// found and whose it is ([`socket_owner`]) before recording it.
pub fn install_time_candidates() -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut push = |addr: String, how: HowFound| {
        if !out.iter().any(|c: &Candidate| c.addr == addr) {
            out.push(Candidate {
                addr,
                how,
                access: Access::default(),
                owners: None,
            });
        }
    };
    if let Ok(h) = std::env::var("DOCKER_HOST")
        && !h.is_empty()
    {
        push(h, HowFound::DockerHostEnv);
    }
    push(
        format!("unix://{}", SYSTEM_SOCKETS[0].0),
        SYSTEM_SOCKETS[0].1,
    );
    for home in user_homes() {
        for (rel, how) in HOME_SOCKETS {
            let p = home.join(rel);
            if p.exists() {
                push(format!("unix://{}", p.display()), how);
            }
        }
    }
    push(
        format!("unix://{}", SYSTEM_SOCKETS[1].0),
        SYSTEM_SOCKETS[1].1,
    );
    if let Ok(dir) = std::fs::read_dir("/run/user") {
        let mut dirs: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for d in dirs {
            for (rel, how) in [
                ("podman/podman.sock", HowFound::PodmanRootless),
                ("docker.sock", HowFound::DockerRootless),
            ] {
                let p = d.join(rel);
                if p.exists() {
                    push(format!("unix://{}", p.display()), how);
                }
            }
        }
    }
    out
}

/// Home directories of the people who might run an engine: the invoking user, the console
/// user (macOS), then everyone under /home and /Users. Only `nixdock install` looks here.
fn user_homes() -> Vec<PathBuf> {
    let mut homes = Vec::new();
    if let Some(h) = std::env::var_os("HOME") {
        homes.push(PathBuf::from(h));
    }
    if let Ok(u) = std::env::var("SUDO_USER") {
        if let Some(h) = std::env::var("SUDO_UID")
            .ok()
            .and_then(|u| u.parse().ok())
            .and_then(home_of_uid)
        {
            homes.push(h);
        }
        homes.push(PathBuf::from("/home").join(&u));
        homes.push(PathBuf::from("/Users").join(&u));
    }
    if let Some(uid) = console_uid()
        && let Some(h) = home_of_uid(uid)
    {
        homes.push(h);
    }
    for root in ["/Users", "/home"] {
        if let Ok(dir) = std::fs::read_dir(root) {
            let mut v: Vec<_> = dir.flatten().map(|e| e.path()).collect();
            v.sort();
            homes.extend(v);
        }
    }
    let mut seen = std::collections::HashSet::new();
    homes.retain(|h| seen.insert(h.clone()));
    homes
}

/// The user logged in at the console (macOS: the owner of /dev/console), if not root.
pub fn console_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/dev/console").ok()?.uid();
    (uid != 0).then_some(uid)
}

fn home_of_uid(uid: u32) -> Option<PathBuf> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid)).then(|| PathBuf::from(f[5]))
    })
}

/// The owner of the socket an address names (symlinks followed), for a `unix://` address.
pub fn socket_owner(addr: &str) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(unix_path(addr)?).ok().map(|m| m.uid())
}

/// The socket path of a `unix://` address or a plain absolute path.
fn unix_path(addr: &str) -> Option<&str> {
    addr.strip_prefix("unix://").or_else(|| {
        Path::new(addr)
            .is_absolute()
            .then_some(addr)
            .filter(|_| !addr.contains("://"))
    })
}

/// Symlinks followed while resolving one socket path before giving up (Linux's own limit).
const MAX_SYMLINKS: u32 = 40;

/// Resolves `path` component by component, symlinks included, and returns the socket it
/// names when every directory passed through on the way (from `/` down, including those
/// holding a symlink that was followed) is owned by one of `owners` and writable by neither
/// group nor others, and the socket itself is owned by one of `owners` and not writable by
/// others. Otherwise says which path fails and why. Whoever can write a directory on the way
/// could put their own socket (or a symlink to it) there; whoever owns one could chmod it.
///
/// The socket's group-write bit is allowed: it is the engine's own access control over who
/// may connect (clients, not who serves), and Docker's `docker` group (`root:docker 0660`)
/// is root-equivalent by Docker's design, so it grants nothing root did not choose to grant.
/// A socket writable by others is refused: every local user could drive that engine.
pub fn check_socket(path: &Path, owners: &[u32]) -> Result<PathBuf, SocketError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if !path.is_absolute() {
        return Err(SocketError::NotAbsolute(path.into()));
    }
    let check_dir = |dir: &Path, m: &std::fs::Metadata| -> Result<(), SocketError> {
        if !owners.contains(&m.uid()) {
            return Err(SocketError::DirectoryOwner {
                dir: dir.into(),
                uid: m.uid(),
                owners: owner_names(owners),
            });
        }
        if m.mode() & 0o022 != 0 {
            return Err(SocketError::DirectoryWritable {
                dir: dir.into(),
                mode: m.mode() & 0o7777,
            });
        }
        Ok(())
    };
    let lstat = |p: &Path| {
        std::fs::symlink_metadata(p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                SocketError::NotFound
            } else {
                SocketError::Io {
                    path: p.into(),
                    source: e,
                }
            }
        })
    };
    let root = PathBuf::from("/");
    check_dir(&root, &lstat(&root)?)?;
    let mut cur = root.clone();
    // Components still to walk, front first; a symlink's target is put in front of the rest.
    let mut todo: std::collections::VecDeque<std::ffi::OsString> =
        std::collections::VecDeque::new();
    let push_front = |todo: &mut std::collections::VecDeque<std::ffi::OsString>, p: &Path| {
        let parts: Vec<std::ffi::OsString> = p
            .components()
            .map(|c| match c {
                Component::RootDir => "/".into(),
                other => other.as_os_str().to_os_string(),
            })
            .collect();
        for c in parts.into_iter().rev() {
            todo.push_front(c);
        }
    };
    push_front(&mut todo, path);
    let mut hops = 0;
    let mut last: Option<std::fs::Metadata> = None;
    while let Some(c) = todo.pop_front() {
        last = None;
        if c == "/" {
            cur = root.clone();
            continue;
        }
        if c == "." {
            continue;
        }
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let m = lstat(&next)?;
        let ft = m.file_type();
        if ft.is_symlink() {
            hops += 1;
            if hops > MAX_SYMLINKS {
                return Err(SocketError::TooManySymlinks(path.into()));
            }
            let target = std::fs::read_link(&next).map_err(|source| SocketError::Io {
                path: next.clone(),
                source,
            })?;
            // The directory holding the link was checked; the target is walked (and checked)
            // from `/` or from here.
            push_front(&mut todo, &target);
        } else if ft.is_dir() {
            check_dir(&next, &m)?;
            cur = next;
        } else if todo.is_empty() {
            cur = next;
            last = Some(m);
        } else {
            return Err(SocketError::NotADirectory(next));
        }
    }
    let Some(m) = last else {
        return Err(SocketError::NotASocket(cur));
    };
    if !m.file_type().is_socket() {
        return Err(SocketError::NotASocket(cur));
    }
    if !owners.contains(&m.uid()) {
        return Err(SocketError::SocketOwner {
            socket: cur,
            uid: m.uid(),
            owners: owner_names(owners),
        });
    }
    if m.mode() & 0o002 != 0 {
        return Err(SocketError::SocketWritable {
            socket: cur,
            mode: m.mode() & 0o7777,
        });
    }
    Ok(cur)
}

/// Why [`check_socket`] does not trust a socket path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{}: not an absolute path", .0.display())]
    NotAbsolute(PathBuf),
    #[error("no such socket")]
    NotFound,
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("directory {} is owned by uid {uid}, not {owners}", .dir.display())]
    DirectoryOwner {
        dir: PathBuf,
        uid: u32,
        owners: String,
    },
    #[error("directory {} is writable by group or others (mode {mode:o})", .dir.display())]
    DirectoryWritable { dir: PathBuf, mode: u32 },
    #[error("{}: too many symlinks", .0.display())]
    TooManySymlinks(PathBuf),
    #[error("{}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{} is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("socket {} is owned by uid {uid}, not {owners}", .socket.display())]
    SocketOwner {
        socket: PathBuf,
        uid: u32,
        owners: String,
    },
    #[error(
        "socket {} is writable by others (mode {mode:o}): any local user could drive that engine",
        .socket.display()
    )]
    SocketWritable { socket: PathBuf, mode: u32 },
}

/// Why one engine address did not give a working engine ([`Engine::try_one`]).
#[derive(Debug, thiserror::Error)]
pub enum CandidateError {
    #[error("not a unix socket address")]
    NotUnix,
    #[error(transparent)]
    Untrusted(#[from] SocketError),
    #[error("no such socket")]
    NoSuchSocket,
    #[error("unsupported address (use unix://, tcp:// or ssh://)")]
    Unsupported,
    #[error("https:// needs tls-ca, tls-cert and tls-key")]
    TlsFilesMissing,
    #[error(
        "an ssh:// engine needs ssh-key (the identity to log in with) and ssh-host-key (the \
         base64 of its host's public key line, e.g. of /etc/ssh/ssh_host_ed25519_key.pub): \
         nixdock never trusts a host key on first use"
    )]
    SshAccessMissing,
    #[error("ssh-host-key does not decode to an OpenSSH public key line")]
    BadHostKey,
    #[error("ssh-key {}: {reason}", .path.display())]
    Identity { path: PathBuf, reason: String },
    #[error(transparent)]
    Ssh(Box<SshError>),
    #[error(transparent)]
    Tls(#[from] EngineApiError),
    #[error("timed out")]
    TimedOut,
    /// The OS's reason ("Connection refused"), which says more than the HTTP client's.
    #[error(transparent)]
    Connect(std::io::Error),
    #[error(transparent)]
    Api(#[from] bollard::errors::Error),
}

fn owner_names(owners: &[u32]) -> String {
    owners
        .iter()
        .map(|u| {
            if *u == 0 {
                "root".to_string()
            } else {
                format!("uid {u}")
            }
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

/// How the Engine API is reached at one address, made once per engine (an `ssh://` engine's
/// SSH session is opened here); [`Route::docker`] then gives clients for any API version.
enum Route {
    Unix(String),
    Http(String),
    Tls { addr: String, files: TlsFiles },
    Ssh(Arc<ssh::SshSession>),
}

impl Route {
    async fn open(addr: &str, access: &Access) -> Result<Route, CandidateError> {
        if let Some(path) = unix_path(addr) {
            if !Path::new(path).exists() {
                return Err(CandidateError::NoSuchSocket);
            }
            return Ok(Route::Unix(path.to_string()));
        }
        if addr.starts_with("tcp://") || addr.starts_with("http://") || addr.starts_with("https://")
        {
            return Ok(match &access.tls {
                Some(files) => Route::Tls {
                    addr: addr.replacen("http://", "tcp://", 1),
                    files: files.clone(),
                },
                None if addr.starts_with("https://") => {
                    return Err(CandidateError::TlsFilesMissing);
                }
                None => Route::Http(addr.to_string()),
            });
        }
        if let Some(rest) = addr.strip_prefix("ssh://") {
            let access = access
                .ssh
                .as_ref()
                .ok_or(CandidateError::SshAccessMissing)?;
            return Ok(Route::Ssh(Arc::new(ssh_session(rest, access).await?)));
        }
        Err(CandidateError::Unsupported)
    }

    fn docker(&self, version: &bollard::ClientVersion) -> Result<Docker, CandidateError> {
        Ok(match self {
            Route::Unix(path) => Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, version)?,
            Route::Http(addr) => Docker::connect_with_http(addr, REQUEST_TIMEOUT_SECS, version)?,
            Route::Tls { addr, files } => {
                engine_api::tls_docker(addr, files, REQUEST_TIMEOUT_SECS, version)?
            }
            Route::Ssh(session) => {
                engine_api::ssh_docker(session.clone(), DIAL_STDIO, REQUEST_TIMEOUT_SECS, version)?
            }
        })
    }
}

/// The SSH session to an `ssh://[user@]host[:port]` engine's host: its identity from `ssh-key`,
/// its host key pinned from `ssh-host-key` (nothing from `~/.ssh`, no trust on first use).
async fn ssh_session(rest: &str, access: &SshAccess) -> Result<ssh::SshSession, CandidateError> {
    let hostport = rest.split('/').next().unwrap_or("");
    let (user, hostport) = match hostport.rsplit_once('@') {
        Some((u, h)) => (u.to_string(), h),
        None => ("root".to_string(), hostport),
    };
    let target = if hostport.starts_with('[') {
        if hostport.contains("]:") {
            hostport.to_string()
        } else {
            format!("{hostport}:22")
        }
    } else if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:22")
    };
    let line = hook_protocol::hash::base64_decode(access.host_key_base64.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(CandidateError::BadHostKey)?;
    let pinned = parse_public_key(line.trim()).map_err(|_| CandidateError::BadHostKey)?;
    let key = keys::load_identity(&access.key).map_err(|e| CandidateError::Identity {
        path: access.key.clone(),
        reason: e.to_string(),
    })?;
    let addr = tokio::time::timeout(PING_TIMEOUT, tokio::net::lookup_host(&target))
        .await
        .map_err(|_| CandidateError::TimedOut)?
        .map_err(CandidateError::Connect)?
        .next()
        .ok_or_else(|| {
            CandidateError::Connect(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{target}: no address"),
            ))
        })?;
    ssh::connect_with(
        addr,
        &user,
        &key,
        &HostKeys::pinned(pinned),
        SSH_CONNECT_TIMEOUT,
    )
    .await
    .map_err(|e| CandidateError::Ssh(Box::new(e)))
}

/// The API version a client speaks to an engine that gave `api`: that one, or bollard's own
/// when it is older (or when the engine gave none).
fn client_version(api: Option<&str>) -> bollard::ClientVersion {
    match api.and_then(parse_api_version) {
        Some(v) if v < *bollard::API_DEFAULT_VERSION => v,
        _ => *bollard::API_DEFAULT_VERSION,
    }
}

fn api_text(v: &bollard::ClientVersion) -> String {
    format!("{}.{}", v.major_version, v.minor_version)
}

/// The `host:port` of a `tcp://` (`http://`, `https://`) address that names its port.
fn tcp_hostport(addr: &str) -> Option<&str> {
    let rest = ["tcp://", "http://", "https://"]
        .iter()
        .find_map(|p| addr.strip_prefix(p))?;
    let hostport = rest.split('/').next()?;
    let port = match hostport.rsplit_once("]:") {
        Some((_, port)) => port,
        None if hostport.starts_with('[') => return None,
        None => hostport.rsplit_once(':')?.1,
    };
    port.parse::<u16>().ok().map(|_| hostport)
}

/// An engine's API version, "1.41".
fn parse_api_version(s: &str) -> Option<bollard::ClientVersion> {
    let (major, minor) = s.split_once('.')?;
    Some(bollard::ClientVersion {
        major_version: major.parse().ok()?,
        minor_version: minor.parse().ok()?,
    })
}

impl Engine {
    /// Whether the engine [`discover`](Self::discover) would pick is at least listening, without
    /// asking it anything: the first candidate on a local Unix socket that passes the same
    /// ownership checks and accepts a connection. `false` when that cannot be told so (no such
    /// candidate, or one that is not a Unix socket comes first): then the caller discovers it.
    /// This is what a hook checks before its `# accept`, while Nix's worker waits and every
    /// build of a `nix-build` queues behind it; the `/version` round trip comes after.
    pub async fn listening(settings: &EngineSettings) -> bool {
        for c in candidates(settings.host.as_deref()) {
            let Some(path) = unix_path(&c.addr) else {
                return false;
            };
            let path = match &c.owners {
                Some(owners) => match check_socket(Path::new(path), owners) {
                    Ok(p) => p,
                    Err(_) if !c.how.is_explicit() => continue,
                    Err(_) => return false,
                },
                None => PathBuf::from(path),
            };
            let connected =
                tokio::time::timeout(PING_TIMEOUT, tokio::net::UnixStream::connect(&path)).await;
            match connected {
                Ok(Ok(_)) => return true,
                // The next candidate, as `discover` would try it.
                Ok(Err(_)) if !c.how.is_explicit() => continue,
                _ => return false,
            }
        }
        false
    }

    /// Tries each candidate in turn ([`candidates`]); the first engine that answers wins. An
    /// explicit one (config `docker-host`, `DOCKER_HOST`) is the only candidate, and its
    /// failure is [`EngineError::Explicit`].
    pub async fn discover(settings: &EngineSettings) -> Result<Engine, EngineError> {
        Self::discover_hinted(settings, None).await
    }

    /// [`discover`](Self::discover), asking in API version `hint` first (see
    /// [`try_one_hinted`](Self::try_one_hinted)).
    pub async fn discover_hinted(
        settings: &EngineSettings,
        hint: Option<&str>,
    ) -> Result<Engine, EngineError> {
        let mut tried = Vec::new();
        let mut cands = candidates(settings.host.as_deref());
        if settings.host.is_some()
            && let Some(c) = cands.first_mut()
        {
            c.access = settings.access.clone();
        }
        for c in cands {
            match Self::try_one_hinted(&c, hint).await {
                Ok(mut e) => {
                    e.name = settings.name.clone();
                    tracing::info!(engine = %e.name, addr = %e.addr, how = %e.how_found, arch = %e.arch, "docker engine found");
                    return Ok(e);
                }
                Err(why) if c.how.is_explicit() => {
                    tracing::debug!(addr = %c.addr, %why, "the named docker engine failed");
                    return Err(EngineError::Explicit {
                        addr: c.addr,
                        how: c.how,
                        why,
                    });
                }
                Err(why) => {
                    tracing::debug!(addr = %c.addr, %why, "docker engine candidate failed");
                    tried.push((format!("{} ({})", c.addr, c.how), why));
                }
            }
        }
        Err(EngineError::NotFound {
            tried,
            as_root: euid() == 0,
        })
    }

    /// `nixdock install`'s search ([`install_time_candidates`]): the first engine that answers,
    /// and what failed before it (everything, when none answered).
    pub async fn search_at_install() -> (Option<Engine>, Vec<(String, CandidateError)>) {
        let mut tried = Vec::new();
        for c in install_time_candidates() {
            match Self::try_one(&c).await {
                Ok(e) => return (Some(e), tried),
                Err(why) => tried.push((format!("{} ({})", c.addr, c.how), why)),
            }
        }
        (None, tried)
    }

    /// Connects to one candidate: its ownership checked first when it has `owners`, then
    /// connected through the path that was checked.
    pub async fn try_one(c: &Candidate) -> Result<Engine, CandidateError> {
        Self::try_one_hinted(c, None).await
    }

    /// [`try_one`](Self::try_one), first asking in API version `hint` (what the engine gave
    /// last time), so an engine older than bollard's API needs no second connection.
    async fn try_one_hinted(c: &Candidate, hint: Option<&str>) -> Result<Engine, CandidateError> {
        let addr = match &c.owners {
            Some(owners) => {
                let path = unix_path(&c.addr).ok_or(CandidateError::NotUnix)?;
                format!(
                    "unix://{}",
                    check_socket(Path::new(path), owners)?.display()
                )
            }
            None => c.addr.clone(),
        };
        if let Some(path) = unix_path(&addr) {
            // The OS's reason ("Connection refused") says more than the HTTP client's.
            tokio::time::timeout(PING_TIMEOUT, tokio::net::UnixStream::connect(path))
                .await
                .map_err(|_| CandidateError::TimedOut)?
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => CandidateError::NoSuchSocket,
                    _ => CandidateError::Connect(e),
                })?;
        }
        let route = Route::open(&addr, &c.access).await?;
        let asked = client_version(hint);
        let docker = route.docker(&asked)?;
        // One `/version` answers everything: that the engine is up, its API version (what
        // bollard's `negotiate_version` would ask again), its architecture and OS. Every hook
        // asks it before its `# accept`, while Nix's worker waits, unless another hook had
        // the answer a moment ago (`known_engines`).
        let info = tokio::time::timeout(PING_TIMEOUT, docker.version())
            .await
            .map_err(|_| CandidateError::TimedOut)??;
        let api = info.api_version.clone();
        let wanted = client_version(api.as_deref());
        let docker = if wanted == asked {
            docker
        } else {
            route.docker(&wanted)?
        };
        let podman = info
            .components
            .iter()
            .flatten()
            .any(|c| c.name.contains("Podman"));
        Ok(Engine {
            podman,
            name: DEFAULT_ENGINE.to_string(),
            docker,
            addr: c.addr.clone(),
            how_found: c.how,
            arch: normalize_arch(info.arch.as_deref().unwrap_or("unknown")),
            os: info.os.unwrap_or_else(|| "linux".into()),
            api: api.unwrap_or_else(|| api_text(bollard::API_DEFAULT_VERSION)),
        })
    }

    /// The engine `settings` names, as it answered at `known.at`, without asking it again: only
    /// a `tcp://` engine (TLS or not) that still accepts a TCP connection. A Unix socket's
    /// `/version` costs no handshake, and an `ssh://` engine's route is its SSH session.
    pub async fn from_known(
        settings: &EngineSettings,
        known: &Known,
    ) -> Result<Engine, CandidateError> {
        let addr = settings
            .host
            .as_deref()
            .ok_or(CandidateError::Unsupported)?;
        let hostport = tcp_hostport(addr).ok_or(CandidateError::Unsupported)?;
        tokio::time::timeout(PING_TIMEOUT, tokio::net::TcpStream::connect(hostport))
            .await
            .map_err(|_| CandidateError::TimedOut)?
            .map_err(CandidateError::Connect)?;
        let route = Route::open(addr, &settings.access).await?;
        let docker = route.docker(&client_version(Some(&known.api)))?;
        Ok(Engine {
            name: settings.name.clone(),
            docker,
            addr: addr.to_string(),
            // What `candidates` says of a configured `docker-host`.
            how_found: HowFound::ConfigDockerHost,
            arch: known.arch.clone(),
            os: known.os.clone(),
            podman: known.podman,
            api: known.api.clone(),
        })
    }

    /// What to remember of its answer, as serving now.
    pub fn known(&self) -> Known {
        Known {
            addr: self.addr.clone(),
            at: known_engines::now_ms(),
            api: self.api.clone(),
            arch: self.arch.clone(),
            os: self.os.clone(),
            podman: self.podman,
        }
    }

    pub fn api_err(&self) -> impl FnOnce(bollard::errors::Error) -> EngineError + '_ {
        move |source| EngineError::Api {
            addr: self.addr.clone(),
            source,
        }
    }
}

/// Podman 4.3 reports a container whose process has just ended as "stopped" until its cleanup
/// has run (then "exited"), a state bollard's models do not know, so the whole answer fails to
/// parse. An inspect or list that fails so is asked again, every 100 ms for up to 2 s.
pub async fn podman_settled<T, F, Fut>(mut ask: F) -> Result<T, bollard::errors::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, bollard::errors::Error>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match ask().await {
            Err(bollard::errors::Error::JsonDataError { message, .. })
                if message.contains("`stopped`") && std::time::Instant::now() < deadline =>
            {
                tracing::debug!("container state \"stopped\" (Podman, cleaning up): asking again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// The engine reports `x86_64`/`aarch64` (Linux) or `amd64`/`arm64` (some VMs); Nix and
/// `uname -m` say `x86_64`/`aarch64`.
pub fn normalize_arch(a: &str) -> String {
    match a {
        "amd64" | "x86_64" => "x86_64".into(),
        "arm64" | "aarch64" => "aarch64".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn publish_follows_engine_and_transport() {
        let remote = || Some("10.0.0.2".to_string());
        assert_eq!(publish_for(None, Transport::Auto), Publish::Loopback);
        assert_eq!(publish_for(None, Transport::Ssh), Publish::Loopback);
        assert_eq!(publish_for(None, Transport::EngineExec), Publish::Nothing);
        assert_eq!(publish_for(remote(), Transport::Auto), Publish::Nothing);
        assert_eq!(
            publish_for(remote(), Transport::EngineExec),
            Publish::Nothing
        );
        assert_eq!(
            publish_for(remote(), Transport::Ssh),
            Publish::Address("10.0.0.2".into())
        );
        assert_eq!(
            publish_for(Some("builder.example".into()), Transport::Ssh),
            Publish::Address("0.0.0.0".into())
        );
    }

    #[test]
    fn api_versions_parse_and_compare() {
        let v = parse_api_version("1.41").unwrap();
        assert_eq!((v.major_version, v.minor_version), (1, 41));
        assert!(v < *bollard::API_DEFAULT_VERSION);
        assert!(parse_api_version("1").is_none());
        assert!(parse_api_version("x.y").is_none());
    }

    #[test]
    fn the_client_speaks_the_older_of_the_two_api_versions() {
        let v = client_version(Some("1.41"));
        assert_eq!(api_text(&v), "1.41");
        assert_eq!(client_version(Some("9.99")), *bollard::API_DEFAULT_VERSION);
        assert_eq!(client_version(None), *bollard::API_DEFAULT_VERSION);
        assert_eq!(client_version(Some("junk")), *bollard::API_DEFAULT_VERSION);
    }

    #[test]
    fn only_a_tcp_address_with_its_port_has_a_hostport() {
        assert_eq!(tcp_hostport("tcp://10.0.0.2:2376"), Some("10.0.0.2:2376"));
        assert_eq!(
            tcp_hostport("https://h.example:2376/"),
            Some("h.example:2376")
        );
        assert_eq!(tcp_hostport("tcp://[fd00::2]:2376"), Some("[fd00::2]:2376"));
        assert_eq!(tcp_hostport("tcp://h.example"), None);
        assert_eq!(tcp_hostport("tcp://[fd00::2]"), None);
        assert_eq!(tcp_hostport("tcp://h:port"), None);
        assert_eq!(tcp_hostport("ssh://u@h:22"), None);
        assert_eq!(tcp_hostport("unix:///run/docker.sock"), None);
    }

    /// An answer remembered for a `tcp://` engine whose port no longer accepts connections is
    /// not used (the hook then asks, and backs off), and an `ssh://` engine is always asked.
    #[tokio::test]
    async fn a_remembered_answer_needs_someone_listening() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("tcp://{}", listener.local_addr().unwrap());
        let settings = EngineSettings {
            name: "e".into(),
            host: Some(addr.clone()),
            access: Access::default(),
        };
        let known = Known {
            addr: addr.clone(),
            at: known_engines::now_ms(),
            api: "1.41".into(),
            arch: "aarch64".into(),
            os: "linux".into(),
            podman: false,
        };
        let e = Engine::from_known(&settings, &known).await.unwrap();
        assert_eq!(
            (e.name.as_str(), e.arch.as_str(), e.api.as_str()),
            ("e", "aarch64", "1.41")
        );
        assert_eq!(e.addr, addr);
        drop(listener);
        assert!(matches!(
            Engine::from_known(&settings, &known).await,
            Err(CandidateError::Connect(_))
        ));
        let ssh = EngineSettings {
            host: Some("ssh://u@127.0.0.1:22".into()),
            ..settings
        };
        assert!(matches!(
            Engine::from_known(&ssh, &known).await,
            Err(CandidateError::Unsupported)
        ));
    }

    #[test]
    fn an_explicit_engine_is_the_only_candidate() {
        let c = candidates_for(Some("unix:///srv/d.sock"), Some("tcp://x:1"), 0, None);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].how, HowFound::ConfigDockerHost);
        assert_eq!(c[0].owners, None);
        let c = candidates_for(None, Some("tcp://x:1"), 1000, None);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].how, HowFound::DockerHostEnv);
        // An empty DOCKER_HOST is unset.
        assert!(candidates_for(None, Some(""), 0, None).len() > 1);
    }

    /// As root: the system sockets only, each checked for root ownership; never a home, even
    /// the one in HOME, and never /run/user.
    #[test]
    fn root_tries_only_checked_system_sockets() {
        let home = tempfile::tempdir().unwrap();
        let sock = home.path().join(".docker/run/docker.sock");
        std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let c = candidates_for(None, None, 0, Some(home.path()));
        let addrs: Vec<_> = c.iter().map(|c| c.addr.as_str()).collect();
        assert_eq!(
            addrs,
            [
                "unix:///var/run/docker.sock",
                "unix:///run/podman/podman.sock"
            ]
        );
        assert!(c.iter().all(|c| c.owners == Some(vec![0])));
        // A non-root user may use the engine in their own home, owned by them or root.
        let c = candidates_for(None, None, 4242, Some(home.path()));
        let mine = c
            .iter()
            .find(|c| c.how == HowFound::DockerDesktop)
            .expect("own home's socket");
        assert_eq!(mine.addr, format!("unix://{}", sock.display()));
        assert_eq!(mine.owners, Some(vec![0, 4242]));
        assert!(c.iter().all(|c| !c.addr.contains("/home/")));
    }

    #[tokio::test]
    async fn a_named_engine_that_does_not_answer_is_an_error_naming_it() {
        let err = EngineError::Explicit {
            addr: "unix:///nonexistent/docker.sock".into(),
            how: HowFound::ConfigDockerHost,
            why: CandidateError::NoSuchSocket,
        };
        let text = err.to_string();
        assert!(text.contains("unix:///nonexistent/docker.sock"), "{text}");
        assert!(text.contains("change docker-host"), "{text}");
        let e = Engine::try_one(&Candidate {
            addr: "unix:///nonexistent/docker.sock".into(),
            how: HowFound::Given,
            access: Access::default(),
            owners: None,
        })
        .await
        .unwrap_err();
        assert!(matches!(e, CandidateError::NoSuchSocket), "{e}");
        let err = EngineError::NotFound {
            tried: vec![("unix:///x (test)".into(), CandidateError::NoSuchSocket)],
            as_root: true,
        };
        let text = err.to_string();
        assert!(text.contains("unix:///x (test): no such socket"), "{text}");
        assert!(text.contains("sudo nixdock install"), "{text}");
    }

    #[test]
    fn arch_names() {
        assert_eq!(normalize_arch("amd64"), "x86_64");
        assert_eq!(normalize_arch("arm64"), "aarch64");
    }

    fn chown(p: &Path, uid: u32) {
        std::os::unix::fs::lchown(p, Some(uid), None).unwrap();
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A root-owned tree `<dir>/a/b/s.sock` (directories 0755, socket 0660) under /run,
    /// whose ancestors belong to root and are not writable by others (/tmp is: sticky 1777).
    struct Tree {
        top: tempfile::TempDir,
        dir: PathBuf,
        sock: PathBuf,
        _listener: std::os::unix::net::UnixListener,
    }

    fn tree() -> Option<Tree> {
        if euid() != 0 || !Path::new("/run").is_dir() {
            eprintln!("!! the ownership tests need root (chown) and /run: skipped");
            return None;
        }
        let top = tempfile::Builder::new()
            .prefix("nixdock-trust-")
            .tempdir_in("/run")
            .unwrap();
        let dir = top.path().join("a/b");
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        chmod(&sock, 0o660);
        for p in [top.path(), &top.path().join("a"), &dir] {
            chmod(p, 0o755);
        }
        Some(Tree {
            top,
            dir,
            sock,
            _listener: listener,
        })
    }

    #[test]
    fn a_root_owned_socket_in_root_owned_directories_passes() {
        let Some(t) = tree() else { return };
        assert_eq!(check_socket(&t.sock, &[0]).unwrap(), t.sock);
        // Group-writable socket (Docker's root:docker 0660) is fine; reached through a
        // root-owned symlink in a root-owned directory too, and resolved to the socket.
        let link = t.top.path().join("link.sock");
        std::os::unix::fs::symlink("a/b/s.sock", &link).unwrap();
        assert_eq!(check_socket(&link, &[0]).unwrap(), t.sock);
        let up = t.top.path().join("a/up");
        std::os::unix::fs::symlink("../a/./b/s.sock", &up).unwrap();
        assert_eq!(check_socket(&up, &[0]).unwrap(), t.sock);
    }

    #[test]
    fn a_socket_under_a_group_or_other_writable_directory_is_refused() {
        let Some(t) = tree() else { return };
        for mode in [0o775, 0o757, 0o1777] {
            chmod(&t.dir, mode);
            let e = check_socket(&t.sock, &[0]).unwrap_err().to_string();
            assert!(e.contains(&t.dir.display().to_string()), "{e}");
            assert!(e.contains("writable by group or others"), "{e}");
        }
        chmod(&t.dir, 0o755);
        // A directory higher up counts as much.
        chmod(t.top.path(), 0o777);
        let e = check_socket(&t.sock, &[0]).unwrap_err().to_string();
        assert!(e.contains("writable by group or others"), "{e}");
        chmod(t.top.path(), 0o755);
        // The same through a symlink whose directory is writable: the link could be swapped.
        let other = t.top.path().join("open");
        std::fs::create_dir(&other).unwrap();
        chmod(&other, 0o777);
        let link = other.join("docker.sock");
        std::os::unix::fs::symlink(&t.sock, &link).unwrap();
        let e = check_socket(&link, &[0]).unwrap_err().to_string();
        assert!(e.contains(&other.display().to_string()), "{e}");
    }

    #[test]
    fn a_socket_or_directory_owned_by_someone_else_is_refused() {
        let Some(t) = tree() else { return };
        chown(&t.sock, 64123);
        let e = check_socket(&t.sock, &[0]).unwrap_err().to_string();
        assert!(e.contains("socket") && e.contains("uid 64123"), "{e}");
        // ... unless that user is who may own it (a non-root hook's own engine).
        check_socket(&t.sock, &[0, 64123]).unwrap();
        chown(&t.sock, 0);
        chown(&t.dir, 64123);
        let e = check_socket(&t.sock, &[0]).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "directory {} is owned by uid 64123",
                t.dir.display()
            )),
            "{e}"
        );
        chown(&t.dir, 0);
        // A symlink into a user-owned directory (Docker Desktop's /var/run/docker.sock on a
        // Mac points into the user's home) is refused at that directory.
        let home = t.top.path().join("home");
        std::fs::create_dir(&home).unwrap();
        chmod(&home, 0o755);
        let theirs = home.join("d.sock");
        let _l = std::os::unix::net::UnixListener::bind(&theirs).unwrap();
        chown(&home, 64123);
        let link = t.top.path().join("system.sock");
        std::os::unix::fs::symlink(&theirs, &link).unwrap();
        let e = check_socket(&link, &[0]).unwrap_err().to_string();
        assert!(e.contains("owned by uid 64123"), "{e}");
    }

    #[test]
    fn an_other_writable_socket_or_not_a_socket_is_refused() {
        let Some(t) = tree() else { return };
        chmod(&t.sock, 0o666);
        let e = check_socket(&t.sock, &[0]).unwrap_err().to_string();
        assert!(e.contains("writable by others"), "{e}");
        let file = t.dir.join("file");
        std::fs::write(&file, "").unwrap();
        let e = check_socket(&file, &[0]).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert!(matches!(
            check_socket(&t.dir.join("absent"), &[0]).unwrap_err(),
            SocketError::NotFound
        ));
        let e = check_socket(&t.dir, &[0]).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        let e = check_socket(Path::new("relative.sock"), &[0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
        // A symlink loop ends.
        let a = t.dir.join("loop1");
        std::os::unix::fs::symlink("loop2", &a).unwrap();
        std::os::unix::fs::symlink("loop1", t.dir.join("loop2")).unwrap();
        assert!(
            check_socket(&a, &[0])
                .unwrap_err()
                .to_string()
                .contains("too many symlinks")
        );
    }
}
