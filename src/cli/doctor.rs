//! `nixdock doctor`: checks everything between `nix build` and a builder container, and
//! prints a fix for every failed check. The most important question is whether Nix will
//! really start nixdock-hook, for the daemon and for direct builds: Nix 2.25–2.33 ignore
//! `build-hook` in the system nix.conf.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::builder::engine::HowFound;
use crate::builder::systems::{self, EmulationSupport};
use crate::builder::{Builders, Engine};
use crate::state::StateDir;
use crate::static_machines::{self, StaticError};
use crate::transport::SshError;
use crate::transport::keys;

use super::Env;
use super::nix_daemon_process::{listening_nix_daemon, proc_list, process_start};
use super::status::EngineInfo;
use super::{
    builders, containers, host,
    nix_version::{self, has_nix_conf_bug},
};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Checks, in order:
  - the config file, and nixdock-hook next to this program
  - the state directory: mode 0700, owned by you
  - the Docker engine, and how it was found
  - per served system: can this machine run it, is its image present
  - Nix's version, and the build-hook direct builds use
    (`nix show-config` / `nix config show`)
  - the build-hook the running nix-daemon uses: its command line, environment
    and config files, read from /proc (Nix 2.25-2.33 ignore build-hook in
    /etc/nix/nix.conf; this is flagged)
  - machines in Nix's `builders`: listed, and each checked (reachable, host
    key trusted, nix-daemon answering)
  - an SSH and nix-daemon handshake with every running builder
Every failed check prints its fix. Run it as root to see what nix-daemon's hook
sees. Exits 1 when any check fails; warnings do not fail.")]
pub struct Args {
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Info,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    ok: bool,
    config: String,
    state_dir: String,
    engine: Option<EngineInfo>,
    nix_version: Option<String>,
    daemon: Option<DaemonInfo>,
    checks: Vec<Check>,
}

#[derive(Debug, Default, Clone, Serialize)]
struct DaemonInfo {
    pid: u32,
    version: Option<String>,
    command_line: Vec<String>,
    build_hook: Option<String>,
    build_hook_source: String,
}

struct Checks(Vec<Check>);

impl Checks {
    fn push(&mut self, name: &str, status: Status, detail: impl Into<String>, fix: Option<String>) {
        self.0.push(Check {
            name: name.to_string(),
            status,
            detail: detail.into(),
            fix,
        });
    }
    fn ok(&mut self, name: &str, detail: impl Into<String>) {
        self.push(name, Status::Ok, detail, None);
    }
    fn info(&mut self, name: &str, detail: impl Into<String>) {
        self.push(name, Status::Info, detail, None);
    }
    fn warn(&mut self, name: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Status::Warn, detail, Some(fix.into()));
    }
    fn fail(&mut self, name: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Status::Fail, detail, Some(fix.into()));
    }
}

pub async fn run(env: &Env, args: Args) -> Result<i32, String> {
    let mut c = Checks(Vec::new());
    let hook = host::hook_next_to_me()?;

    // The config.
    let config = match env.config() {
        Ok(cfg) => {
            let what = if env.config_path.exists() {
                if cfg.builders.is_empty() {
                    "no [builders] table: serving the engine's own system and the emulated ones"
                        .to_string()
                } else {
                    format!("{} builder(s) configured", cfg.builders.len())
                }
            } else {
                "absent: defaults apply (`nixdock install` writes a commented one)".to_string()
            };
            c.ok("config", format!("{}: {what}", env.config_path.display()));
            cfg
        }
        Err(e) => {
            c.fail(
                "config",
                e,
                format!(
                    "edit {} (every key is listed in the file `nixdock install` writes)",
                    env.config_path.display()
                ),
            );
            Default::default()
        }
    };

    // The hook program.
    if host::is_executable(&hook) {
        c.ok("hook program", hook.display().to_string());
    } else {
        c.fail(
            "hook program",
            format!("{} is missing or not executable", hook.display()),
            "install nixdock-hook in the same directory as nixdock",
        );
    }

    // The state directory, looked at without creating it.
    let instance = check_state_dir(&mut c, env);

    // The engine.
    let engine = match builders::engine(&config).await {
        Ok(e) => {
            let version = e
                .docker
                .version()
                .await
                .ok()
                .and_then(|v| v.version)
                .unwrap_or_else(|| "?".into());
            c.ok(
                "engine",
                format!(
                    "{} (found via {}), Docker {version}, {} {}",
                    e.addr, e.how_found, e.os, e.arch
                ),
            );
            if e.how_found == HowFound::DockerHostEnv {
                c.warn(
                    "engine",
                    "found through DOCKER_HOST, which nix-daemon's environment usually lacks",
                    format!(
                        "set docker-host = \"{}\" in {}",
                        e.addr,
                        env.config_path.display()
                    ),
                );
            }
            if !host::is_root()
                && config.docker_host.is_none()
                && !matches!(
                    e.how_found,
                    HowFound::DockerHostEnv | HowFound::SystemSocket | HowFound::PodmanRootful
                )
            {
                // As root the hook looks at no one's home: it will not find this engine.
                c.warn(
                    "engine",
                    format!(
                        "found in your own home or /run/user ({}), where nix-daemon's hook, \
                         running as root, does not look",
                        e.how_found
                    ),
                    format!(
                        "run `sudo nixdock install` (it records the engine as docker-host), or \
                         set docker-host = \"{}\" in {}",
                        e.addr,
                        env.config_path.display()
                    ),
                );
            }
            if e.arch != host::host_arch() {
                c.warn(
                    "engine",
                    format!(
                        "the engine runs {} but this machine is {}; the hook decides what is \
                         emulated from this machine's architecture",
                        e.arch,
                        host::host_arch()
                    ),
                    "use an engine on this machine, or name each system's image in [builders]",
                );
            }
            Some(e)
        }
        Err(e) => {
            let fix = match (&config.docker_host, host::is_root()) {
                (Some(h), _) => format!(
                    "start the engine at {h}, or change docker-host in {} (nixdock tries no \
                     other engine when one is configured)",
                    env.config_path.display()
                ),
                // Root (so the hook) uses only the system sockets; an engine in a user's
                // home must be named.
                (None, true) => format!(
                    "start the Docker engine (e.g. `systemctl start docker`); for Docker \
                     Desktop, OrbStack, colima or a rootless engine, start it and run `sudo \
                     nixdock install` (it records the engine it finds), or set docker-host = \
                     \"unix:///path/to/docker.sock\" in {}",
                    env.config_path.display()
                ),
                (None, false) => format!(
                    "start the Docker engine (e.g. `systemctl start docker`), or set \
                     docker-host = \"unix:///path/to/docker.sock\" in {}; run doctor as root \
                     to see what nix-daemon's hook sees",
                    env.config_path.display()
                ),
            };
            c.fail("engine", e, fix);
            None
        }
    };

    // Systems and images.
    let specs = builders::served(&config, instance.as_deref().unwrap_or("none"));
    if specs.is_empty() {
        c.fail(
            "systems",
            "no system is served: the config names none and this machine can emulate none",
            "install qemu-user-static and binfmt-support (or run `docker run --privileged --rm \
             tonistiigi/binfmt --install all`), or add a [builders.\"<system>\"] table",
        );
    }
    for spec in &specs {
        let name = spec.system.as_str();
        match systems::emulation_support(name, host::host_arch(), host::ENGINE_IS_LOCAL) {
            EmulationSupport::Native => c.ok(name, "runs natively"),
            EmulationSupport::Binfmt => c.ok(name, "runs emulated (binfmt_misc qemu, flag F)"),
            EmulationSupport::EngineVm => c.ok(name, "runs emulated by the engine's VM"),
            EmulationSupport::Unknown => c.warn(
                name,
                "emulated, but binfmt_misc is not visible here to tell whether it works",
                "mount binfmt_misc (mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc); \
                 the builder's own `uname -m` check decides at its first start",
            ),
            EmulationSupport::Missing(why) => {
                c.fail(name, format!("cannot run {name} containers here"), why)
            }
        }
        let Some(e) = &engine else { continue };
        let default = spec.image == crate::builder::provision::default_image(name);
        match e.docker.inspect_image(&spec.image).await {
            Ok(i) => c.ok(
                name,
                format!(
                    "image {} present ({})",
                    spec.image,
                    i.id.as_deref()
                        .unwrap_or("?")
                        .trim_start_matches("sha256:")
                        .chars()
                        .take(12)
                        .collect::<String>()
                ),
            ),
            Err(err) if containers::is_not_found(&err) && default => c.fail(
                name,
                format!("image {} does not exist", spec.image),
                format!(
                    "nixdock image build --system {name}   (without a registry: nixdock image \
                     build --from-debian --system {name}), or set image for {name} in the config"
                ),
            ),
            Err(err) if containers::is_not_found(&err) => c.warn(
                name,
                format!(
                    "image {} is not present locally; the hook pulls it at the first build",
                    spec.image
                ),
                format!(
                    "docker pull {} (to check now that it can be pulled)",
                    spec.image
                ),
            ),
            Err(err) => c.fail(
                name,
                format!("cannot inspect image {}: {err}", spec.image),
                "see the engine's log",
            ),
        }
    }

    // Nix.
    let nix = crate::nix_tools::find("nix").ok();
    let nix_version = nix.as_deref().and_then(nix_version::nix_version_of);
    match (&nix, &nix_version) {
        (Some(p), Some((_, text))) => c.ok("nix", format!("{text} ({})", p.display())),
        (Some(p), None) => c.fail(
            "nix",
            format!("{} --version gave no version", p.display()),
            "reinstall Nix",
        ),
        (None, _) => c.fail(
            "nix",
            "no `nix` program found",
            "install Nix (2.8 or newer), or set NIX_BIN_DIR",
        ),
    }
    let settings = match &nix {
        Some(p) => nix_settings(p, nix_version.as_ref().map(|v| v.0)),
        None => None,
    };
    let conf_dir = std::env::var_os("NIX_CONF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/nix"));
    let system_conf = conf_dir.join("nix.conf");
    let system_line = conf_setting(&system_conf, "build-hook");

    if let (Some(p), None) = (&nix, &settings) {
        c.warn(
            "direct builds",
            format!(
                "cannot read Nix's settings from `{} show-config`",
                p.display()
            ),
            "run `nix show-config --extra-experimental-features nix-command` to see why",
        );
    }
    // Direct builds (root's nix-build opens the store itself; its hook is its own setting).
    if let (Some(s), Some((v, _))) = (&settings, &nix_version) {
        let value = s.build_hook.clone().unwrap_or_default();
        if !host::is_root() {
            c.info(
                "direct builds",
                format!(
                    "as a non-root user your builds go through nix-daemon (checked below); \
                     your own build-hook setting ({value}) is not used for them"
                ),
            );
        } else if is_nixdock_hook(&value) {
            c.ok("direct builds", format!("build-hook = {value}"));
        } else {
            let mut detail = format!("direct builds as root call {value}, not nixdock-hook");
            if let Some((line, file)) = &system_line
                && has_nix_conf_bug(*v)
                && is_nixdock_hook(line)
            {
                detail.push_str(&format!(
                    "\n`build-hook = {line}` is in {} but Nix {}.{} ignores build-hook in the \
                     system nix.conf (a bug of Nix 2.25–2.33, fixed in 2.34)",
                    file.display(),
                    v.0,
                    v.1
                ));
            }
            c.fail(
                "direct builds",
                detail,
                format!(
                    "sudo nixdock install (for Nix {}.{} it writes {})",
                    v.0,
                    v.1,
                    if has_nix_conf_bug(*v) {
                        "root's ~/.config/nix/nix.conf"
                    } else {
                        "/etc/nix/nix.conf"
                    }
                ),
            );
        }
    }

    // The running daemon.
    let daemon = check_daemon(&mut c, &hook);

    // Machines in `builders`.
    if let Some(s) = &settings {
        check_builders(
            &mut c,
            s.builders.as_deref().unwrap_or(""),
            s.system.as_deref(),
        )
        .await;
    }

    // SSH to running builders.
    if let (Some(e), Some(id)) = (&engine, &instance) {
        check_ssh(&mut c, e, env, id).await;
    }

    let ok = !c.0.iter().any(|x| x.status == Status::Fail);
    let report = Report {
        ok,
        config: env.config_path.display().to_string(),
        state_dir: env.state_path.display().to_string(),
        engine: engine.as_ref().map(EngineInfo::of),
        nix_version: nix_version.map(|v| v.1),
        daemon,
        checks: c.0,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print_report(&report);
    }
    Ok(if ok { 0 } else { 1 })
}

fn print_report(r: &Report) {
    for ch in &r.checks {
        let tag = match ch.status {
            Status::Ok => " ok ",
            Status::Info => "info",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        let first = format!("{}: ", ch.name);
        let mut out = Vec::new();
        for (i, l) in ch.detail.lines().enumerate() {
            let text = if i == 0 {
                format!("{first}{l}")
            } else {
                l.to_string()
            };
            out.extend(wrap(&text, 80 - 7));
        }
        if let Some(fix) = &ch.fix
            && ch.status != Status::Ok
        {
            let mut fix_lines = wrap(&format!("fix: {fix}"), 80 - 7).into_iter();
            out.extend(fix_lines.next());
            out.extend(fix_lines.map(|l| format!("     {l}")));
        }
        for (i, l) in out.iter().enumerate() {
            if i == 0 {
                println!("[{tag}] {l}");
            } else {
                println!("       {l}");
            }
        }
    }
    let fails = r.checks.iter().filter(|c| c.status == Status::Fail).count();
    let warns = r.checks.iter().filter(|c| c.status == Status::Warn).count();
    println!();
    if fails == 0 {
        println!("All checks passed ({warns} warning(s)).");
    } else {
        println!("{fails} check(s) failed, {warns} warning(s).");
    }
}

/// Breaks `text` into lines of at most `width` characters at spaces (a longer word stays
/// whole).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split(' ') {
        if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    lines.push(cur);
    lines
}

/// Checks the state directory without creating it; returns the instance id if there is one.
fn check_state_dir(c: &mut Checks, env: &Env) -> Option<String> {
    let p = &env.state_path;
    let explicit =
        std::env::var_os("NIXDOCK_STATE_DIR").is_some() || p != &StateDir::default_path();
    if !host::is_root() && !explicit {
        c.warn(
            "state dir",
            format!(
                "you are not root, so this is {}; nix-daemon's hook runs as root and uses \
                 /var/lib/nixdock",
                p.display()
            ),
            "run `sudo nixdock doctor` to check what the daemon's hook sees",
        );
    }
    let meta = match std::fs::metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            c.ok(
                "state dir",
                format!(
                    "{} does not exist yet; the hook makes it (mode 0700)",
                    p.display()
                ),
            );
            return None;
        }
        Err(e) => {
            c.fail(
                "state dir",
                format!("cannot read {}: {e}", p.display()),
                "run as the user the hook runs as (root under nix-daemon)",
            );
            return None;
        }
    };
    // The hook's own check (owner and mode of the directory, its parents and every entry),
    // so doctor and hook never disagree; it only adds the empty subdirectories it would add.
    let problem = if meta.is_dir() {
        StateDir::open(p).err().map(|e| e.to_string())
    } else {
        Some(format!("{} is not a directory; remove it", p.display()))
    };
    let id = std::fs::read_to_string(p.join("instance-id"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    match problem {
        None => c.ok(
            "state dir",
            format!(
                "{} (0700, yours), instance {}",
                p.display(),
                id.as_deref().unwrap_or("not made yet")
            ),
        ),
        Some(why) => c.fail(
            "state dir",
            why,
            "fix it as the message says: the hook refuses this directory and builds nothing remotely",
        ),
    }
    id
}

/// What `nix show-config` / `nix config show` says.
struct NixSettings {
    build_hook: Option<String>,
    builders: Option<String>,
    system: Option<String>,
}

fn nix_settings(nix: &Path, version: Option<(u32, u32)>) -> Option<NixSettings> {
    let sub: &[&str] = if version.is_some_and(|v| v >= (2, 20)) {
        &["config", "show"]
    } else {
        &["show-config"]
    };
    let out = std::process::Command::new(nix)
        .args(["--extra-experimental-features", "nix-command"])
        .args(sub)
        .arg("--json")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let value = |key: &str| -> Option<String> {
        match json.get(key)?.get("value")? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(a) => Some(
                a.iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            other => Some(other.to_string()),
        }
    };
    Some(NixSettings {
        build_hook: value("build-hook"),
        builders: value("builders"),
        system: value("system"),
    })
}

/// Whether a `build-hook` value runs nixdock-hook (its program's file name).
fn is_nixdock_hook(value: &str) -> bool {
    value
        .split_whitespace()
        .next()
        .and_then(|p| Path::new(p).file_name())
        .is_some_and(|n| n == "nixdock-hook")
}

/// The last assignment of `key` in a nix.conf, following `include`/`!include`; with the file
/// it came from.
pub fn conf_setting(path: &Path, key: &str) -> Option<(String, PathBuf)> {
    fn walk(path: &Path, key: &str, depth: u32, found: &mut Option<(String, PathBuf)>) {
        if depth > 8 {
            return;
        }
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("include" | "!include") => {
                    if let Some(inc) = words.next() {
                        let p = path.parent().unwrap_or(Path::new("/")).join(inc);
                        walk(&p, key, depth + 1, found);
                    }
                }
                _ => {
                    if let Some((k, v)) = line.split_once('=')
                        && k.trim() == key
                    {
                        *found = Some((v.trim().to_string(), path.to_path_buf()));
                    }
                }
            }
        }
    }
    let mut found = None;
    walk(path, key, 0, &mut found);
    found
}

fn mtime(p: &Path) -> Option<i64> {
    std::fs::metadata(p).ok().map(|m| m.mtime())
}

/// The user config files a process reads (`NIX_USER_CONF_FILES`, else the XDG config dirs),
/// highest priority first.
fn user_conf_files(env: &[(String, String)], uid: u32) -> Vec<PathBuf> {
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if let Some(files) = get("NIX_USER_CONF_FILES") {
        return files
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
    }
    let home = get("HOME").map(PathBuf::from).or_else(|| home_of(uid));
    let mut dirs = Vec::new();
    match get("XDG_CONFIG_HOME") {
        Some(x) => dirs.push(PathBuf::from(x)),
        None => {
            if let Some(h) = home {
                dirs.push(h.join(".config"));
            }
        }
    }
    let xdg_dirs = get("XDG_CONFIG_DIRS").unwrap_or_else(|| "/etc/xdg".into());
    dirs.extend(
        xdg_dirs
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
    );
    dirs.into_iter().map(|d| d.join("nix/nix.conf")).collect()
}

fn home_of(uid: u32) -> Option<PathBuf> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid)).then(|| PathBuf::from(f[5]))
    })
}

/// Works out which build-hook the running nix-daemon uses, from its command line,
/// environment and config files, as Nix applies them: `--option` over `NIX_CONFIG` over the
/// user config files over the system nix.conf (which 2.25–2.33 ignore) over the default.
fn check_daemon(c: &mut Checks, hook: &Path) -> Option<DaemonInfo> {
    let name = "nix-daemon";
    if !Path::new("/proc/self").exists() {
        c.info(
            name,
            "cannot inspect the running daemon here (no /proc); see `sudo launchctl print \
             system/org.nixos.nix-daemon` for its environment",
        );
        return None;
    }
    let Some(pid) = listening_nix_daemon() else {
        c.warn(
            name,
            "no nix-daemon runs on this machine; builds by non-root users need one",
            "start it: `systemctl start nix-daemon` (or `launchctl kickstart system/org.nixos.nix-daemon` on macOS)",
        );
        return None;
    };
    let args = proc_list(pid, "cmdline").unwrap_or_default();
    let environ = proc_list(pid, "environ");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let version = exe.as_deref().and_then(nix_version::nix_version_of);
    let uid = std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| m.uid())
        .unwrap_or(0);
    let mut info = DaemonInfo {
        pid,
        version: version.as_ref().map(|v| v.1.clone()),
        command_line: args.clone(),
        ..Default::default()
    };
    let Some(environ) = environ else {
        c.fail(
            name,
            format!(
                "pid {pid} ({}); cannot read its environment to tell which build-hook it uses",
                args.join(" ")
            ),
            "run `sudo nixdock doctor`",
        );
        return Some(info);
    };
    let env: Vec<(String, String)> = environ
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());

    // --option build-hook X (the last one wins).
    let mut from_option = None;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--option" && i + 2 < args.len() && args[i + 1] == "build-hook" {
            from_option = Some(args[i + 2].clone());
            i += 3;
        } else {
            i += 1;
        }
    }
    let from_env = get("NIX_CONFIG").and_then(|text| {
        text.lines().rev().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "build-hook").then(|| v.trim().to_string())
        })
    });
    let user_files = user_conf_files(&env, uid);
    // The first file has the highest priority (Nix applies the list in reverse).
    let from_user = user_files
        .iter()
        .find_map(|f| conf_setting(f, "build-hook"));
    let conf_dir = get("NIX_CONF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/nix"));
    let system_conf = conf_dir.join("nix.conf");
    let from_system = conf_setting(&system_conf, "build-hook");
    let v = version.as_ref().map(|v| v.0);
    let buggy = v.is_some_and(has_nix_conf_bug);

    let (value, source) = if let Some(x) = from_option {
        (Some(x), "set by --option on its command line".to_string())
    } else if let Some(x) = from_env {
        (Some(x), "set by NIX_CONFIG in its environment".to_string())
    } else if let Some((x, f)) = &from_user {
        (Some(x.clone()), format!("set in {}", f.display()))
    } else if let Some((x, f)) = from_system.as_ref().filter(|_| !buggy) {
        (Some(x.clone()), format!("set in {}", f.display()))
    } else {
        (None, "Nix's default".to_string())
    };
    info.build_hook = value.clone();
    info.build_hook_source = source.clone();
    let vtext = version
        .as_ref()
        .map(|v| v.1.clone())
        .unwrap_or_else(|| "version unknown".into());
    let head = format!("pid {pid} ({vtext})");
    match value.as_deref() {
        Some(x) if is_nixdock_hook(x) => {
            let prog = x.split_whitespace().next().unwrap_or(x);
            if host::is_executable(Path::new(prog)) {
                c.ok(name, format!("{head} calls {x} ({source})"));
            } else {
                c.fail(
                    name,
                    format!("{head} calls {x} ({source}), which is not an executable file"),
                    format!(
                        "sudo nixdock install --hook {} --restart-daemon",
                        hook.display()
                    ),
                );
            }
        }
        other => {
            let calls = other.unwrap_or("Nix's own build-remote");
            let mut detail = format!("{head} calls {calls} ({source}), not nixdock-hook");
            let mut fix = "sudo nixdock install --restart-daemon".to_string();
            if let Some((line, f)) = &from_system
                && buggy
                && is_nixdock_hook(line)
            {
                let (a, b) = v.unwrap_or_default();
                detail.push_str(&format!(
                    "\n`build-hook = {line}` is in {} but Nix {a}.{b} ignores build-hook in the \
                     system nix.conf (a bug of Nix 2.25–2.33, fixed in 2.34)",
                    f.display()
                ));
                fix = "sudo nixdock install --restart-daemon (for these versions it passes \
                       the hook in the daemon's environment: a systemd drop-in or the launchd \
                       plist)"
                    .to_string();
            }
            // Installed, but the daemon still runs with what it read at its start?
            let started = process_start(pid);
            let dropin = Path::new("/etc/systemd/system/nix-daemon.service.d/nixdock.conf");
            let plist = Path::new("/Library/LaunchDaemons/org.nixos.nix-daemon.plist");
            let mut candidates = vec![
                system_conf.clone(),
                dropin.to_path_buf(),
                plist.to_path_buf(),
            ];
            candidates.extend(user_files.iter().cloned());
            let changed: Vec<String> = candidates
                .iter()
                .filter(|p| {
                    started.is_some_and(|s| mtime(p).is_some_and(|m| m > s))
                        && std::fs::read_to_string(p).is_ok_and(|t| t.contains("nixdock-hook"))
                })
                .map(|p| p.display().to_string())
                .collect();
            if !changed.is_empty() {
                detail.push_str(&format!(
                    "\n{} changed after the daemon started: it has not read the change",
                    changed.join(", ")
                ));
                fix = if cfg!(target_os = "macos") {
                    "restart the daemon: sudo launchctl kickstart -k system/org.nixos.nix-daemon"
                        .into()
                } else {
                    "restart the daemon: sudo systemctl daemon-reload && sudo systemctl restart \
                     nix-daemon (or restart it however it was started)"
                        .into()
                };
            }
            c.fail(name, detail, fix);
        }
    }
    Some(info)
}

/// The user's own remote builders in Nix's `builders`: listed, and each checked the way the
/// hook will use it (TCP, host key, login, `nix-daemon --stdio` handshake).
async fn check_builders(c: &mut Checks, builders: &str, system: Option<&str>) {
    let name = "builders";
    let default: std::collections::BTreeSet<String> = system
        .map(str::to_string)
        .or_else(|| Some(format!("{}-linux", host::host_arch())))
        .into_iter()
        .collect();
    let machines = match hook_protocol::machines::parse_config_fs(&default, builders) {
        Ok(m) => m,
        Err(e) => {
            c.fail(
                name,
                format!("Nix's `builders` setting ({builders:?}) does not parse: {e}"),
                "fix the entry in /etc/nix/machines (or wherever `builders` points); \
                 the hook ignores all of them until then",
            );
            return;
        }
    };
    if machines.is_empty() {
        c.ok(name, "no remote machines in Nix's `builders` setting");
        return;
    }
    c.ok(
        name,
        format!(
            "{} remote machine(s) in Nix's `builders`, served beside the Docker builders: {}",
            machines.len(),
            machines
                .iter()
                .map(|m| format!(
                    "{} ({}, {} job(s), speed {})",
                    m.store_uri,
                    m.systems.iter().cloned().collect::<Vec<_>>().join(","),
                    m.max_jobs,
                    m.speed_factor
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    );
    let home = static_machines::home_dir();
    c.info(
        "builders",
        format!(
            "checked with the keys and known_hosts of {} (the hook uses its own user's: root's \
             under nix-daemon)",
            home.as_deref()
                .map(|h| h.display().to_string())
                .unwrap_or_else(|| "no home directory".into())
        ),
    );
    for m in &machines {
        let check = format!("machine {}", m.store_uri);
        if let Err(e) = static_machines::check_supported(m) {
            c.warn(
                &check,
                e.to_string(),
                "change the entry to ssh-ng:// (or remove it)",
            );
            continue;
        }
        let host_port = format!("{}:{}", m.store_uri.host, m.store_uri.port.unwrap_or(22));
        let reach = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(host_port.as_str()),
        )
        .await;
        match reach {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                c.fail(
                    &check,
                    format!("{host_port} is not reachable: {e}"),
                    "check that the machine is up and its sshd listens there (the port goes in the URI: ssh-ng://user@host:port)",
                );
                continue;
            }
            Err(_) => {
                c.fail(
                    &check,
                    format!("{host_port} did not answer within 10 s"),
                    "check the machine, the network and firewalls",
                );
                continue;
            }
        }
        let t = Instant::now();
        match static_machines::connect(m, home.as_deref()).await {
            Ok(r) => {
                c.ok(
                    &check,
                    format!(
                        "reachable, host key trusted, nix-daemon answered (protocol {}) in {} ms",
                        r.daemon.version(),
                        t.elapsed().as_millis()
                    ),
                );
                if let Some(s) = r.session {
                    let _ = s.close().await;
                }
            }
            Err(e) => {
                let fix = match &e {
                    StaticError::Ssh { source, .. }
                        if matches!(
                            **source,
                            SshError::HostKeyNotTrusted { .. } | SshError::NoHostKey { .. }
                        ) =>
                    {
                        "check the machine's host key out of band (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on it), then put `base64 -w0` of that .pub file in the 8th field of its entry, or add it to known_hosts".to_string()
                    }
                    StaticError::Ssh { source, .. }
                        if matches!(**source, SshError::AuthFailed { .. }) =>
                    {
                        "add the public half of the key (3rd field, or your ~/.ssh/id_*) to the machine's authorized_keys".to_string()
                    }
                    StaticError::Daemon { .. } => {
                        "install Nix on the machine, or give its nix-daemon's full path with ?remote-program= in the URI".to_string()
                    }
                    _ => "see the message; the hook skips this machine with a warning until it is fixed".to_string(),
                };
                c.fail(&check, e.to_string(), fix);
            }
        }
    }
}

/// An SSH handshake plus `nix-daemon --stdio` handshake with every running builder.
async fn check_ssh(c: &mut Checks, engine: &Engine, env: &Env, instance: &str) {
    let existing = match containers::list_existing(engine, instance).await {
        Ok(x) => x,
        Err(e) => {
            c.fail("builders running", e, "see the engine's log");
            return;
        }
    };
    if existing.is_empty() {
        c.info(
            "builders running",
            "none (a builder starts at the first build for its system)",
        );
        return;
    }
    let state = match StateDir::open(&env.state_path) {
        Ok(s) => s,
        Err(e) => {
            c.fail("ssh", e.to_string(), "fix the state directory (see above)");
            return;
        }
    };
    let builders = match Builders::new(engine.clone(), state) {
        Ok(b) => b,
        Err(e) => {
            c.fail("ssh", e.to_string(), "fix the state directory (see above)");
            return;
        }
    };
    for ex in existing {
        let name = format!("ssh {}", ex.system);
        if !ex.running() {
            c.info(
                &name,
                format!(
                    "{} is {} (it starts at the next build)",
                    ex.name,
                    ex.state_name()
                ),
            );
            continue;
        }
        let (Some(port), Some(key)) = (ex.port(), ex.host_key()) else {
            c.fail(
                &name,
                format!("{} has no published SSH port or pinned host key", ex.name),
                format!(
                    "nixdock gc --volumes {} (the next build recreates it)",
                    ex.system
                ),
            );
            continue;
        };
        let pinned = match keys::parse_public_key(key) {
            Ok(k) => k,
            Err(e) => {
                c.fail(
                    &name,
                    format!("{}: bad pinned host key: {e}", ex.name),
                    format!("nixdock gc --volumes {}", ex.system),
                );
                continue;
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let t = Instant::now();
        match tokio::time::timeout(
            Duration::from_secs(30),
            builders.connect(&ex.name, addr, &pinned),
        )
        .await
        {
            Ok(Ok((session, _daemon))) => {
                c.ok(
                    &name,
                    format!(
                        "{} at {addr}: SSH and nix-daemon answered in {} ms",
                        ex.name,
                        t.elapsed().as_millis()
                    ),
                );
                let _ = session.close().await;
            }
            Ok(Err(e)) => c.fail(
                &name,
                e.to_string(),
                format!(
                    "see `nixdock logs {}`; `nixdock stop {}` lets the next build start it afresh",
                    ex.system, ex.system
                ),
            ),
            Err(_) => c.fail(
                &name,
                format!("{} at {addr} did not answer within 30 s", ex.name),
                format!("see `nixdock logs {}`", ex.system),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_setting_follows_includes_and_takes_the_last() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("extra.conf"),
            "build-hook = /b/nixdock-hook\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("nix.conf"),
            "# build-hook = /commented\nbuild-hook = /a\n!include extra.conf\nsandbox = false\n",
        )
        .unwrap();
        let (v, f) = conf_setting(&d.path().join("nix.conf"), "build-hook").unwrap();
        assert_eq!(v, "/b/nixdock-hook");
        assert!(f.ends_with("extra.conf"));
        assert!(conf_setting(&d.path().join("nix.conf"), "builders").is_none());
    }

    #[test]
    fn wraps_at_spaces() {
        assert_eq!(wrap("aaa bbb ccc", 7), vec!["aaa bbb", "ccc"]);
        assert_eq!(wrap("a-very-long-word x", 5), vec!["a-very-long-word", "x"]);
        assert_eq!(wrap("", 5), vec![""]);
    }

    #[test]
    fn hook_values() {
        assert!(is_nixdock_hook("/usr/local/bin/nixdock-hook"));
        assert!(is_nixdock_hook("/x/nixdock-hook extra"));
        assert!(!is_nixdock_hook("/usr/libexec/nix/build-remote"));
        assert!(!is_nixdock_hook("nix __build-remote"));
        assert!(!is_nixdock_hook(""));
    }

    #[test]
    fn user_conf_files_follow_xdg() {
        let env = vec![("HOME".to_string(), "/root".to_string())];
        assert_eq!(
            user_conf_files(&env, 0),
            vec![
                PathBuf::from("/root/.config/nix/nix.conf"),
                PathBuf::from("/etc/xdg/nix/nix.conf")
            ]
        );
        let env = vec![("NIX_USER_CONF_FILES".to_string(), "/a:/b".to_string())];
        assert_eq!(
            user_conf_files(&env, 0),
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
    }
}
