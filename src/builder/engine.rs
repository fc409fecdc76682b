//! Finding the Docker engine. The hook usually runs as root under nix-daemon with none of the
//! user's environment, so it looks deliberately: the config's `docker-host`, `DOCKER_HOST`,
//! the system socket, then the sockets that Docker Desktop, OrbStack, colima and Podman put in
//! users' home directories.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;

/// Engine calls that should be instant (inspect, ping) give up after this long.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound for any single engine request (container start under emulation is slow).
const REQUEST_TIMEOUT_SECS: u64 = 120;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "no Docker engine answered; tried:\n{}\nStart Docker, or set `docker-host` in the nixdock config (see `nixdock doctor`).",
        .tried.iter().map(|(w, why)| format!("  {w}: {why}")).collect::<Vec<_>>().join("\n")
    )]
    NotFound { tried: Vec<(String, String)> },
    #[error("Docker engine at {addr}: {source}")]
    Api {
        addr: String,
        #[source]
        source: bollard::errors::Error,
    },
}

/// A connected engine and where it was found.
#[derive(Clone)]
pub struct Engine {
    pub docker: Docker,
    pub addr: String,
    pub how_found: &'static str,
    pub arch: String,
    pub os: String,
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
    pub how: &'static str,
}

/// Every place to try, in order, without touching the network.
pub fn candidates(config_host: Option<&str>) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut push = |addr: String, how: &'static str| {
        if !out.iter().any(|c: &Candidate| c.addr == addr) {
            out.push(Candidate { addr, how });
        }
    };
    if let Some(h) = config_host {
        push(h.to_string(), "config docker-host");
    }
    if let Ok(h) = std::env::var("DOCKER_HOST")
        && !h.is_empty()
    {
        push(h, "DOCKER_HOST");
    }
    push("unix:///var/run/docker.sock".into(), "system socket");
    for home in user_homes() {
        for (rel, how) in [
            (".docker/run/docker.sock", "Docker Desktop"),
            (".orbstack/run/docker.sock", "OrbStack"),
            (".colima/default/docker.sock", "colima"),
            (".colima/docker.sock", "colima"),
        ] {
            let p = home.join(rel);
            if p.exists() {
                push(format!("unix://{}", p.display()), how);
            }
        }
    }
    push("unix:///run/podman/podman.sock".into(), "Podman (rootful)");
    if let Ok(dir) = std::fs::read_dir("/run/user") {
        for e in dir.flatten() {
            let p = e.path().join("podman/podman.sock");
            if p.exists() {
                push(format!("unix://{}", p.display()), "Podman (rootless)");
            }
        }
    }
    out
}

/// Home directories of the people who might run an engine: the invoking user, the console
/// user (macOS), then everyone under /home and /Users.
fn user_homes() -> Vec<PathBuf> {
    let mut homes = Vec::new();
    if let Some(h) = std::env::var_os("HOME") {
        homes.push(PathBuf::from(h));
    }
    if let Ok(u) = std::env::var("SUDO_USER") {
        homes.push(PathBuf::from("/home").join(&u));
        homes.push(PathBuf::from("/Users").join(&u));
    }
    if let Ok(meta) = std::fs::metadata("/dev/console") {
        use std::os::unix::fs::MetadataExt;
        if meta.uid() != 0
            && let Some(h) = home_of_uid(meta.uid())
        {
            homes.push(h);
        }
    }
    for root in ["/Users", "/home"] {
        if let Ok(dir) = std::fs::read_dir(root) {
            let mut v: Vec<_> = dir.flatten().map(|e| e.path()).collect();
            v.sort();
            homes.extend(v);
        }
    }
    homes.dedup();
    homes
}

fn home_of_uid(uid: u32) -> Option<PathBuf> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid)).then(|| PathBuf::from(f[5]))
    })
}

fn connect(addr: &str, version: &bollard::ClientVersion) -> Result<Docker, String> {
    if let Some(path) = addr.strip_prefix("unix://").or_else(|| {
        Path::new(addr)
            .is_absolute()
            .then_some(addr)
            .filter(|_| !addr.contains("://"))
    }) {
        if !Path::new(path).exists() {
            return Err("no such socket".into());
        }
        Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, version).map_err(|e| e.to_string())
    } else if addr.starts_with("tcp://") || addr.starts_with("http://") {
        Docker::connect_with_http(addr, REQUEST_TIMEOUT_SECS, version).map_err(|e| e.to_string())
    } else {
        Err("unsupported address (use unix:// or tcp://)".into())
    }
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
    /// Tries each candidate in turn; the first engine that answers a ping wins.
    pub async fn discover(config_host: Option<&str>) -> Result<Engine, EngineError> {
        let mut tried = Vec::new();
        for c in candidates(config_host) {
            match Self::try_one(&c).await {
                Ok(e) => {
                    tracing::info!(addr = %e.addr, how = e.how_found, arch = %e.arch, "docker engine found");
                    return Ok(e);
                }
                Err(why) => {
                    tracing::debug!(addr = %c.addr, %why, "docker engine candidate failed");
                    tried.push((format!("{} ({})", c.addr, c.how), why));
                }
            }
        }
        Err(EngineError::NotFound { tried })
    }

    async fn try_one(c: &Candidate) -> Result<Engine, String> {
        let docker = connect(&c.addr, bollard::API_DEFAULT_VERSION)?;
        // One `/version` answers everything: that the engine is up, its API version (what
        // bollard's `negotiate_version` would ask again), its architecture and OS. Every hook
        // asks it before its `# accept`, while Nix's worker waits.
        let info = tokio::time::timeout(PING_TIMEOUT, docker.version())
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let docker = match info.api_version.as_deref().and_then(parse_api_version) {
            Some(v) if v < *bollard::API_DEFAULT_VERSION => connect(&c.addr, &v)?,
            _ => docker,
        };
        Ok(Engine {
            docker,
            addr: c.addr.clone(),
            how_found: c.how,
            arch: normalize_arch(info.arch.as_deref().unwrap_or("unknown")),
            os: info.os.unwrap_or_else(|| "linux".into()),
        })
    }

    pub fn api_err(&self) -> impl FnOnce(bollard::errors::Error) -> EngineError + '_ {
        move |source| EngineError::Api {
            addr: self.addr.clone(),
            source,
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

    #[test]
    fn api_versions_parse_and_compare() {
        let v = parse_api_version("1.41").unwrap();
        assert_eq!((v.major_version, v.minor_version), (1, 41));
        assert!(v < *bollard::API_DEFAULT_VERSION);
        assert!(parse_api_version("1").is_none());
        assert!(parse_api_version("x.y").is_none());
    }

    #[test]
    fn config_host_comes_first_and_duplicates_are_dropped() {
        let c = candidates(Some("unix:///var/run/docker.sock"));
        assert_eq!(c[0].how, "config docker-host");
        assert_eq!(
            c.iter()
                .filter(|c| c.addr == "unix:///var/run/docker.sock")
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn nothing_answering_lists_what_was_tried() {
        let e = Engine::try_one(&Candidate {
            addr: "unix:///nonexistent/docker.sock".into(),
            how: "test",
        })
        .await
        .unwrap_err();
        assert_eq!(e, "no such socket");
        let err = EngineError::NotFound {
            tried: vec![("unix:///x (test)".into(), "no such socket".into())],
        };
        let text = err.to_string();
        assert!(text.contains("unix:///x (test): no such socket"), "{text}");
        assert!(text.contains("docker-host"), "{text}");
    }

    #[test]
    fn arch_names() {
        assert_eq!(normalize_arch("amd64"), "x86_64");
        assert_eq!(normalize_arch("arm64"), "aarch64");
    }
}
