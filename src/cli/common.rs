//! What the commands share: the builders this installation serves, its existing containers
//! (found by label through the Engine API), locks, commands run inside containers, and
//! formatting for an 80-column terminal.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};
use futures_util::StreamExt;

use crate::builder::provision::{
    LABEL_HOST_KEY, LABEL_IMAGE, LABEL_INSTANCE, LABEL_MAX_JOBS, LABEL_SYSTEM,
};
use crate::builder::{BuilderSpec, Engine, lifecycle, slots};
use crate::config::Config;
use crate::state::{FileLock, StateDir};

/// The hook's own view of the host, so the CLI decides exactly as the hook does.
pub use crate::builder::systems::{ENGINE_IS_LOCAL, host_arch};

/// The builders the hook serves with this config: exactly what the hook computes.
pub fn served(cfg: &Config, instance: &str) -> Vec<BuilderSpec> {
    BuilderSpec::served(cfg, instance)
}

pub async fn engine(cfg: &Config) -> Result<Engine, String> {
    Engine::discover(cfg.docker_host.as_deref())
        .await
        .map_err(|e| e.to_string())
}

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
}

/// Every container labelled with this instance, inspected.
pub async fn list_existing(engine: &Engine, instance: &str) -> Result<Vec<Existing>, String> {
    let opts = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_INSTANCE}={instance}")],
        )])),
        ..Default::default()
    };
    let list = engine
        .docker
        .list_containers(Some(opts))
        .await
        .map_err(|e| format!("Docker engine at {}: {e}", engine.addr))?;
    let mut out = Vec::new();
    for c in list {
        let Some(id) = c.id else { continue };
        let inspect = match engine
            .docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
        {
            Ok(i) => i,
            Err(e) if is_not_found(&e) => continue, // removed meanwhile
            Err(e) => return Err(format!("Docker engine at {}: {e}", engine.addr)),
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

/// One builder: configured (a spec), existing (a container), or both.
#[derive(Debug, Clone)]
pub struct Row {
    pub system: String,
    pub spec: Option<BuilderSpec>,
    pub existing: Option<Existing>,
}

impl Row {
    pub fn container_name(&self) -> String {
        match (&self.existing, &self.spec) {
            (Some(e), _) => e.name.clone(),
            (None, Some(s)) => s.container_name(),
            (None, None) => String::new(),
        }
    }

    /// Build slots: the running container's, else the configured number.
    pub fn max_jobs(&self) -> u32 {
        self.existing
            .as_ref()
            .and_then(Existing::max_jobs)
            .or(self.spec.as_ref().map(|s| s.max_jobs))
            .unwrap_or(crate::config::DEFAULT_MAX_JOBS)
    }

    pub fn running(&self) -> bool {
        self.existing.as_ref().is_some_and(Existing::running)
    }
}

/// Configured builders and existing containers, merged by system, sorted by system.
pub fn merge(specs: Vec<BuilderSpec>, existing: Vec<Existing>) -> Vec<Row> {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for s in specs {
        rows.insert(
            s.system.clone(),
            Row {
                system: s.system.clone(),
                spec: Some(s),
                existing: None,
            },
        );
    }
    for e in existing {
        let key = if e.system.is_empty() {
            e.name.clone()
        } else {
            e.system.clone()
        };
        let row = rows.entry(key.clone()).or_insert_with(|| Row {
            system: key,
            spec: None,
            existing: None,
        });
        // Two containers for one system (a renamed instance?): keep the one named as the
        // spec names it, else the first.
        let keep_old = row.existing.is_some()
            && row
                .spec
                .as_ref()
                .is_none_or(|s| s.container_name() != e.name);
        if !keep_old {
            row.existing = Some(e);
        }
    }
    rows.into_values().collect()
}

/// The rows named by `systems` (all of them when `systems` is empty); an unknown name is an
/// error that lists the known ones.
pub fn select(rows: Vec<Row>, systems: &[String]) -> Result<Vec<Row>, String> {
    if systems.is_empty() {
        return Ok(rows);
    }
    let known: Vec<String> = rows.iter().map(|r| r.system.clone()).collect();
    for s in systems {
        if !known.contains(s) {
            return Err(format!(
                "no builder for {s} in this installation (known: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
    }
    Ok(rows
        .into_iter()
        .filter(|r| systems.contains(&r.system))
        .collect())
}

/// Loads config, state and engine, and merges served builders with existing containers.
pub struct Loaded {
    pub config: Config,
    pub state: StateDir,
    pub instance: String,
    pub engine: Engine,
    pub rows: Vec<Row>,
}

pub async fn load(env: &super::Env) -> Result<Loaded, String> {
    let config = env.config()?;
    let (state, instance) = env.instance()?;
    let engine = engine(&config).await?;
    let existing = list_existing(&engine, &instance).await?;
    let rows = merge(served(&config, &instance), existing);
    Ok(Loaded {
        config,
        state,
        instance,
        engine,
        rows,
    })
}

/// Takes the per-builder lock the hook takes while it creates or starts a container, so
/// nothing starts the builder under us.
pub async fn lock_builder(state: &StateDir, container: &str) -> Result<FileLock, String> {
    let path = state.lock_path(&format!("builder-{container}"));
    tokio::task::spawn_blocking(move || FileLock::exclusive(&path))
        .await
        .map_err(|e| format!("lock task failed: {e}"))?
        .map_err(|e| e.to_string())
}

/// Holds every build slot of a builder, so no build starts on it meanwhile; an error names
/// how many builds run.
pub fn hold_idle(state: &StateDir, row: &Row) -> Result<Vec<FileLock>, String> {
    let name = row.container_name();
    let max = row.max_jobs();
    match slots::try_acquire_all(&state.load_dir(), &name, max).map_err(|e| e.to_string())? {
        Some(all) => Ok(all),
        None => {
            let busy = slots::busy_count(&state.load_dir(), &name, max).unwrap_or(0);
            Err(format!(
                "{busy} build(s) running on {name}; wait for them, or pass --force (they fail)"
            ))
        }
    }
}

/// Runs `cmd` in a running container through the Engine API, passing its output to
/// `on_output` as it comes; returns its exit code.
pub async fn exec(
    docker: &Docker,
    container: &str,
    cmd: &[&str],
    timeout: Duration,
    mut on_output: impl FnMut(bool, &[u8]),
) -> Result<i64, String> {
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
        .map_err(|e| format!("cannot run {cmd:?} in {container}: {e}"))?;
    let run = async {
        match docker
            .start_exec(&created.id, None)
            .await
            .map_err(|e| format!("cannot run {cmd:?} in {container}: {e}"))?
        {
            StartExecResults::Attached { mut output, .. } => {
                while let Some(item) = output.next().await {
                    match item {
                        Ok(LogOutput::StdErr { message }) => on_output(true, &message),
                        Ok(other) => on_output(false, &other.into_bytes()),
                        Err(e) => return Err(format!("{container}: {e}")),
                    }
                }
            }
            StartExecResults::Detached => {}
        }
        Ok(())
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("{cmd:?} in {container} did not finish within {timeout:?}"))??;
    let inspect = docker
        .inspect_exec(&created.id)
        .await
        .map_err(|e| format!("{container}: {e}"))?;
    Ok(inspect.exit_code.unwrap_or(-1))
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Parses the engine's timestamps (`2024-05-01T12:34:56.123456789Z`, or with an offset) to
/// seconds since the epoch. The zero time (`0001-01-01T00:00:00Z`) is `None`.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if y < 1970 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        rest = r.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let offset = match rest {
        "Z" | "z" => 0,
        r if r.len() == 6 && (r.starts_with('+') || r.starts_with('-')) => {
            let oh: i64 = r[1..3].parse().ok()?;
            let om: i64 = r[4..6].parse().ok()?;
            let o = oh * 3600 + om * 60;
            if r.starts_with('-') { -o } else { o }
        }
        _ => return None,
    };
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// `512 B`, `8.4 MB`, `1.2 GB` (decimal units, like `docker system df`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v < 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.0} {}", UNITS[u])
    }
}

/// `45s`, `12m`, `3h04m`, `2d05h`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Shortens `s` to `width` characters, marking the cut with `…`.
pub fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The `nixdock-hook` installed next to this program.
pub fn hook_next_to_me() -> Result<std::path::PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let me = std::fs::canonicalize(&me).unwrap_or(me);
    let dir = me
        .parent()
        .ok_or_else(|| format!("{} has no directory", me.display()))?;
    Ok(dir.join("nixdock-hook"))
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `X.Y` (and patch) from `nix --version` output such as `nix (Nix) 2.26.3`.
pub fn parse_nix_version(s: &str) -> Option<(u32, u32)> {
    let word = s
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let mut it = word.split('.');
    let major = it.next()?.parse().ok()?;
    let minor: String = it
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some((major, minor.parse().ok()?))
}

/// Nix 2.25 to 2.33 overwrite `build-hook` from the system nix.conf with the default
/// (fixed in 2.34).
pub fn has_nix_conf_bug(v: (u32, u32)) -> bool {
    ((2, 25)..(2, 34)).contains(&v)
}

/// Runs `prog --version` and parses it.
pub fn nix_version_of(prog: &Path) -> Option<((u32, u32), String)> {
    let out = std::process::Command::new(prog)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Some((parse_nix_version(&text)?, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-05-01T12:34:56.123456789Z"),
            Some(1714566896)
        );
        assert_eq!(parse_rfc3339("2024-05-01T14:34:56+02:00"), Some(1714566896));
        assert_eq!(parse_rfc3339("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("garbage"), None);
    }

    #[test]
    fn formats() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(8_434_000), "8.4 MB");
        assert_eq!(human_bytes(123_000_000_000), "123 GB");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(3 * 3600 + 4 * 60), "3h04m");
        assert_eq!(human_duration(2 * 86400 + 5 * 3600), "2d05h");
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("abc", 4), "abc");
    }

    #[test]
    fn nix_versions() {
        assert_eq!(parse_nix_version("nix (Nix) 2.8.0"), Some((2, 8)));
        assert_eq!(parse_nix_version("nix (Nix) 2.26.3\n"), Some((2, 26)));
        assert_eq!(
            parse_nix_version("nix (Nix) 2.18pre20231020"),
            Some((2, 18))
        );
        assert!(!has_nix_conf_bug((2, 8)));
        assert!(has_nix_conf_bug((2, 25)));
        assert!(has_nix_conf_bug((2, 33)));
        assert!(!has_nix_conf_bug((2, 34)));
        assert!(!has_nix_conf_bug((3, 0)));
    }
}
