//! `nixdock install` / `uninstall`: wire nixdock-hook into the Nix on this machine, and undo
//! it byte for byte.
//!
//! Where the setting goes depends on the Nix version. Nix before 2.25 and from 2.34 on read
//! `build-hook` from the system nix.conf. Nix 2.25–2.33 overwrite that value with their
//! default (an upstream bug), so there the daemon gets it from `NIX_CONFIG` in its
//! environment (a systemd drop-in, or the launchd plist) and direct builds as root from
//! root's user nix.conf; both are read after the point where the bug strikes.
//!
//! Every file touched is recorded first, with its original content (or "absent"), in
//! `install-manifest.json` in the state directory; `uninstall` writes those originals back.

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::Env;
use super::{
    host, nix_daemon_process,
    nix_version::{self, has_nix_conf_bug},
};

mod config_file;
mod files;
mod launchd;
mod manifest;
mod nix_conf;
mod serve_unit;
mod systemd;

pub use config_file::DEFAULT_CONFIG;
pub use launchd::PLIST;
pub use launchd::plist_set_hook;
pub use manifest::{AbsentTag, FileEntry, MANIFEST, Manifest, Original, Present};
pub use nix_conf::set_conf;
pub use systemd::{DROPIN, systemd_dropin};

use config_file::{CONFIG, plan_config};
use files::{print_change, read_for_edit, write_file};
use launchd::LAUNCHD_LABEL;
use manifest::{load_manifest, manifest_path, restore, save_manifest, sha256_hex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceManager {
    /// A systemd unit nix-daemon.service (Linux)
    Systemd,
    /// The launchd job org.nixos.nix-daemon (macOS)
    Launchd,
    /// Something else: nixdock prints what the daemon needs
    None,
}

impl ServiceManager {
    fn default_here() -> ServiceManager {
        if cfg!(target_os = "macos") {
            ServiceManager::Launchd
        } else {
            ServiceManager::Systemd
        }
    }
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
What is written depends on the Nix version (the running nix-daemon's, else
`nix --version`'s):
  Nix < 2.25 or >= 2.34: build-hook = <hook> in <root>/etc/nix/nix.conf
  Nix 2.25 - 2.33 (they ignore build-hook in /etc/nix/nix.conf):
    - for nix-daemon, NIX_CONFIG=\"build-hook = <hook>\" in its environment:
      systemd: <root>/etc/systemd/system/nix-daemon.service.d/nixdock.conf
      launchd: <root>/Library/LaunchDaemons/org.nixos.nix-daemon.plist
    - for direct builds as root, build-hook = <hook> in root's
      ~/.config/nix/nix.conf (<root>/root, or <root>/var/root with launchd)
  Always: <root>/etc/nixdock/nixdock.toml with commented defaults, if absent.
The service manager defaults to launchd on macOS and systemd elsewhere.

The Docker engine: as root the hook uses only docker-host, DOCKER_HOST and the
root-owned system sockets, never an engine in a user's home. Installing into /
searches once where engines live (DOCKER_HOST, the system sockets, Docker
Desktop, OrbStack and colima in your home (SUDO_USER), the console user's and
other homes, Podman), shows the engine found and records it as docker-host in
the config, unless the config already names one (kept). --docker-host ADDR
records ADDR instead. A socket owned by someone other than root, you or the
console user is shown but not recorded.

Every change is printed. The original of every file touched (or \"absent\") is
kept in install-manifest.json in the state directory, so `nixdock uninstall`
restores them exactly. Installing again first undoes the previous install.
nix-daemon reads its settings when it starts: restart it (--restart-daemon
does), then check with `nixdock doctor`.")]
pub struct InstallArgs {
    /// Install under DIR instead of / (images, tests)
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/",
        hide_default_value = true
    )]
    pub root: PathBuf,
    /// Restart nix-daemon afterwards (else print how)
    #[arg(long)]
    pub restart_daemon: bool,
    /// Hook [default: nixdock-hook next to nixdock]
    #[arg(long, value_name = "PATH")]
    pub hook: Option<PathBuf>,
    /// Install for this Nix version, not the one found
    #[arg(long, value_name = "X.Y")]
    pub nix_version: Option<String>,
    /// How nix-daemon is run: systemd, launchd or none
    #[arg(long, value_enum, value_name = "KIND", hide_possible_values = true)]
    pub service_manager: Option<ServiceManager>,
    /// Record ADDR as docker-host [default: search]
    #[arg(long, value_name = "ADDR")]
    pub docker_host: Option<String>,
    /// Also run `nixdock serve` as a service
    #[arg(
        long,
        value_name = "ADDR:PORT",
        num_args = 0..=1,
        default_missing_value = crate::cli::serve::DEFAULT_LISTEN
    )]
    pub serve: Option<std::net::SocketAddr>,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Reads install-manifest.json from the state directory and writes back the
original of every file `nixdock install` touched, deleting the files it
created and the directories it made (when empty). A file changed since the
install is first saved as <file>.nixdock-uninstall.bak. The builders and
their volumes stay: `nixdock gc --volumes` removes them.")]
pub struct UninstallArgs {
    /// The --root given to install [default: as recorded]
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Restart nix-daemon afterwards (else print how)
    #[arg(long)]
    pub restart_daemon: bool,
}

/// `<root>/<rel>`.
fn under(root: &Path, rel: &str) -> PathBuf {
    root.join(rel.trim_start_matches('/'))
}

/// One planned change.
struct Change {
    path: PathBuf,
    new: Vec<u8>,
    why: String,
}

fn parse_version(s: &str) -> anyhow::Result<(u32, u32)> {
    nix_version::parse_nix_version(s)
        .with_context(|| format!("--nix-version {s:?}: expected a version like 2.26"))
}

/// The Nix version to install for: the running daemon's, else the `nix` on PATH.
fn detect_version() -> anyhow::Result<((u32, u32), String)> {
    for pid in nix_daemon_process::nix_daemons() {
        if let Some(exe) = nix_daemon_process::process_exe(pid)
            && let Some((v, text)) = nix_version::nix_version_of(&exe)
        {
            return Ok((v, format!("{text} (the running nix-daemon)")));
        }
    }
    let nix = crate::nix_tools::find("nix")
        .map_err(|e| anyhow::anyhow!("{e}\nor pass --nix-version X.Y"))?;
    nix_version::nix_version_of(&nix)
        .map(|(v, t)| (v, format!("{t} ({})", nix.display())))
        .with_context(|| {
            format!(
                "cannot tell the Nix version from `{} --version`; pass --nix-version X.Y",
                nix.display()
            )
        })
}

fn same_path(a: &Path, b: &Path) -> bool {
    let ca = std::fs::canonicalize(a).unwrap_or_else(|_| a.to_path_buf());
    let cb = std::fs::canonicalize(b).unwrap_or_else(|_| b.to_path_buf());
    ca == cb
}

pub async fn install(env: &Env, args: InstallArgs) -> anyhow::Result<i32> {
    let root = args.root.clone();
    if !root.is_absolute() || !root.is_dir() {
        anyhow::bail!(
            "--root {}: not an existing absolute directory",
            root.display()
        );
    }
    let real_root = same_path(&root, Path::new("/"));
    if real_root && !host::is_root() {
        anyhow::bail!("installing into / needs root: run `sudo nixdock install`");
    }
    if args.restart_daemon && !real_root {
        anyhow::bail!("--restart-daemon only makes sense without --root");
    }
    let hook = match &args.hook {
        Some(h) => h.clone(),
        None => host::hook_next_to_me()?,
    };
    if !hook.is_absolute() {
        anyhow::bail!("--hook {}: must be an absolute path", hook.display());
    }
    let hook_s = hook.to_string_lossy();
    if hook_s
        .chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\\' || c == '\'')
    {
        anyhow::bail!(
            "{}: Nix splits build-hook at spaces; install nixdock-hook at a path without \
             spaces or quotes",
            hook.display()
        );
    }
    if !host::is_executable(&hook) {
        if real_root {
            anyhow::bail!("{} is not an executable file", hook.display());
        }
        eprintln!(
            "warning: {} is not an executable file on this machine",
            hook.display()
        );
    }
    let ((major, minor), version_text) = match &args.nix_version {
        Some(v) => (parse_version(v)?, format!("Nix {v} (--nix-version)")),
        None => detect_version()?,
    };
    let version = (major, minor);
    let manager = args
        .service_manager
        .unwrap_or_else(ServiceManager::default_here);

    // The docker-host in the config now (set by the user, or recorded by an earlier install)
    // is kept, even through the undo below.
    let cfg_path = under(&root, CONFIG);
    let kept_host = match read_for_edit(&cfg_path)? {
        Some((bytes, _)) => {
            crate::config::Config::parse(&String::from_utf8_lossy(&bytes), &cfg_path)
                .map(|c| c.docker_host)
                .map_err(anyhow::Error::from)
        }
        None => Ok(None),
    };

    // A previous install is undone first, so the manifest keeps the true originals.
    let mpath = manifest_path(env);
    if let Some(old) = load_manifest(&mpath)? {
        if !same_path(&old.root, &root) {
            anyhow::bail!(
                "nixdock is already installed under {} (manifest {}); run `nixdock uninstall` first",
                old.root.display(),
                mpath.display()
            );
        }
        println!("undoing the previous install first");
        restore(&old)?;
        std::fs::remove_file(&mpath)
            .with_context(|| format!("cannot remove {}", mpath.display()))?;
    }

    println!("installing {} for {version_text}", hook.display());
    let mut plan: Vec<Change> = Vec::new();
    let restart_cmd = plan_hook_setting(&mut plan, &root, &hook, version, manager)?;
    plan.extend(plan_config(&cfg_path, kept_host, args.docker_host.as_ref(), real_root).await?);
    let serve_cmd = match &args.serve {
        Some(listen) => plan_serve(&mut plan, &root, listen, manager)?,
        None => None,
    };

    // Record everything before touching anything.
    let mut manifest = Manifest {
        version: 1,
        root: root.clone(),
        hook: hook.clone(),
        nix_version: format!("{major}.{minor}"),
        service_manager: manager,
        files: Vec::new(),
        created_dirs: Vec::new(),
    };
    for ch in &plan {
        let original = match read_for_edit(&ch.path)? {
            Some((b, m)) => Original::Present(Present::of(&b, &m)),
            None => Original::Absent(AbsentTag::Absent),
        };
        manifest.files.push(FileEntry {
            path: ch.path.clone(),
            original,
            installed_sha256: sha256_hex(&ch.new),
        });
        let mut missing = Vec::new();
        let mut d = ch.path.parent();
        while let Some(dir) = d {
            if dir.exists() || manifest.created_dirs.iter().any(|c| c == dir) {
                break;
            }
            missing.push(dir.to_path_buf());
            d = dir.parent();
        }
        manifest.created_dirs.extend(missing.into_iter().rev());
    }
    if plan.is_empty() {
        println!(
            "nothing to change: Nix is already set up for {}",
            hook.display()
        );
    }
    save_manifest(env, &manifest)?;

    for dir in &manifest.created_dirs {
        std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        println!("created directory {}", dir.display());
    }
    for (ch, entry) in plan.iter().zip(&manifest.files) {
        let (old, mode, owner) = match &entry.original {
            Original::Present(p) => (Some(p.bytes()?), p.mode, Some((p.uid, p.gid))),
            Original::Absent(_) => (None, 0o644, None),
        };
        write_file(&ch.path, &ch.new, mode, owner)?;
        print_change(&ch.path, old.as_deref(), Some(&ch.new), &ch.why);
    }
    println!("recorded the originals in {}", manifest_path(env).display());
    finish(
        real_root,
        args.restart_daemon,
        restart_cmd.as_deref(),
        manager,
    )?;
    if let Some(cmd) = serve_cmd
        && real_root
    {
        println!("start nixdock serve: sudo sh -c '{cmd}'");
    }
    println!("check the result with `nixdock doctor`");
    Ok(0)
}

/// Plans `nixdock serve` as a service: the `nixdock` running this install, listening on
/// `listen`. Returns the command that starts it.
fn plan_serve(
    plan: &mut Vec<Change>,
    root: &Path,
    listen: &std::net::SocketAddr,
    manager: ServiceManager,
) -> anyhow::Result<Option<String>> {
    let me = std::env::current_exe().context("cannot tell where this nixdock is")?;
    let me = std::fs::canonicalize(&me).unwrap_or(me);
    if me.to_string_lossy().chars().any(char::is_whitespace) {
        anyhow::bail!(
            "{}: a service's command line is split at spaces; install nixdock at a path \
             without them",
            me.display()
        );
    }
    match manager {
        ServiceManager::Systemd => {
            let unit = serve_unit::systemd_unit(&me, listen);
            plan_edit(
                plan,
                under(root, serve_unit::SYSTEMD_UNIT),
                &|_| Ok(unit.clone()),
                "nixdock serve as a service".into(),
            )?;
            Ok(Some(
                "systemctl daemon-reload && systemctl enable --now nixdock-serve".into(),
            ))
        }
        ServiceManager::Launchd => {
            let plist = serve_unit::launchd_plist(&me, listen);
            plan_edit(
                plan,
                under(root, serve_unit::LAUNCHD_PLIST),
                &|_| Ok(plist.clone()),
                "nixdock serve as a service".into(),
            )?;
            Ok(Some(format!(
                "launchctl bootstrap system /{}",
                serve_unit::LAUNCHD_PLIST
            )))
        }
        ServiceManager::None => {
            println!(
                "run `{} serve --listen {listen}` as root the way this machine runs services",
                me.display()
            );
            Ok(None)
        }
    }
}

/// Plans the build-hook setting where this Nix version reads it (see the module doc): nix.conf,
/// or for Nix 2.25–2.33 the daemon's environment (systemd drop-in or launchd plist) and root's
/// user nix.conf. Returns the command that restarts the daemon, if there is one.
fn plan_hook_setting(
    plan: &mut Vec<Change>,
    root: &Path,
    hook: &Path,
    version: (u32, u32),
    manager: ServiceManager,
) -> anyhow::Result<Option<String>> {
    let hook_str = hook.display().to_string();
    let (major, minor) = version;
    let restart_cmd;
    if has_nix_conf_bug(version) {
        println!(
            "Nix {major}.{minor} ignores build-hook in /etc/nix/nix.conf (Nix 2.25-2.33), so the \
             daemon gets it from NIX_CONFIG and direct builds from root's user nix.conf"
        );
        let root_home = if manager == ServiceManager::Launchd {
            "var/root"
        } else {
            "root"
        };
        match manager {
            ServiceManager::Systemd => {
                let d = systemd_dropin(hook);
                plan_edit(
                    plan,
                    under(root, DROPIN),
                    &|_| Ok(d.clone()),
                    "nix-daemon's environment: NIX_CONFIG".into(),
                )?;
                restart_cmd =
                    Some("systemctl daemon-reload && systemctl restart nix-daemon".to_string());
            }
            ServiceManager::Launchd => {
                let plist = under(root, PLIST);
                if !plist.exists() {
                    anyhow::bail!(
                        "{} does not exist: is Nix installed in multi-user mode? (or pass \
                         --service-manager none)",
                        plist.display()
                    );
                }
                let h = hook.to_path_buf();
                plan_edit(
                    plan,
                    plist,
                    &|cur| plist_set_hook(cur.unwrap_or(""), &h),
                    "nix-daemon's environment: NIX_CONFIG".into(),
                )?;
                restart_cmd = Some(format!(
                    "launchctl bootout system/{LAUNCHD_LABEL}; launchctl bootstrap system /{PLIST}"
                ));
            }
            ServiceManager::None => {
                println!(
                    "start nix-daemon with `--option build-hook {hook_str}`, or with \
                     NIX_CONFIG='build-hook = {hook_str}' in its environment"
                );
                restart_cmd = None;
            }
        }
        plan_edit(
            plan,
            under(root, &format!("{root_home}/.config/nix/nix.conf")),
            &|cur| Ok(set_conf(cur, "build-hook", &hook_str)),
            "direct builds as root".into(),
        )?;
    } else {
        plan_edit(
            plan,
            under(root, "etc/nix/nix.conf"),
            &|cur| Ok(set_conf(cur, "build-hook", &hook_str)),
            "nix-daemon and direct builds".into(),
        )?;
        restart_cmd = match manager {
            ServiceManager::Systemd => Some("systemctl restart nix-daemon".to_string()),
            ServiceManager::Launchd => {
                Some(format!("launchctl kickstart -k system/{LAUNCHD_LABEL}"))
            }
            ServiceManager::None => None,
        };
    }
    Ok(restart_cmd)
}

/// Plans `path`'s new content, `f` of its current text (`None`: absent), unless it is unchanged.
fn plan_edit(
    plan: &mut Vec<Change>,
    path: PathBuf,
    f: &dyn Fn(Option<&str>) -> anyhow::Result<String>,
    why: String,
) -> anyhow::Result<()> {
    let cur = read_for_edit(&path)?;
    let cur_text = match &cur {
        Some((b, _)) => Some(
            std::str::from_utf8(b)
                .map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", path.display()))?
                .to_string(),
        ),
        None => None,
    };
    let new = f(cur_text.as_deref())?;
    if cur_text.as_deref() != Some(new.as_str()) {
        plan.push(Change {
            path,
            new: new.into_bytes(),
            why,
        });
    }
    Ok(())
}

/// Restarts the daemon when asked, else says how.
fn finish(
    real_root: bool,
    restart: bool,
    cmd: Option<&str>,
    manager: ServiceManager,
) -> anyhow::Result<()> {
    let Some(cmd) = cmd else {
        if real_root {
            println!("restart nix-daemon so it reads the change");
        }
        return Ok(());
    };
    if !restart {
        if real_root {
            println!("nix-daemon reads this when it starts; restart it: sudo sh -c '{cmd}'");
        }
        return Ok(());
    }
    if manager == ServiceManager::Systemd && !Path::new("/run/systemd/system").exists() {
        anyhow::bail!(
            "systemd does not run on this machine, so `{cmd}` cannot work: restart nix-daemon \
             the way it was started"
        );
    }
    println!("running: {cmd}");
    let status = Command::new("/bin/sh")
        .args(["-c", cmd])
        .status()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !status.success() {
        anyhow::bail!("`{cmd}` failed ({status})");
    }
    Ok(())
}

pub fn uninstall(env: &Env, args: UninstallArgs) -> anyhow::Result<i32> {
    let mpath = manifest_path(env);
    let Some(m) = load_manifest(&mpath)? else {
        anyhow::bail!(
            "nothing to uninstall: no install manifest at {} (is this the state directory \
             install used? see --state-dir)",
            mpath.display()
        );
    };
    if let Some(r) = &args.root
        && !same_path(r, &m.root)
    {
        anyhow::bail!(
            "the install recorded in {} was under {}, not {}",
            mpath.display(),
            m.root.display(),
            r.display()
        );
    }
    let real_root = same_path(&m.root, Path::new("/"));
    if real_root && !host::is_root() {
        anyhow::bail!("uninstalling from / needs root: run `sudo nixdock uninstall`");
    }
    if args.restart_daemon && !real_root {
        anyhow::bail!("--restart-daemon only makes sense for an install into /");
    }
    restore(&m)?;
    std::fs::remove_file(&mpath).with_context(|| format!("cannot remove {}", mpath.display()))?;
    println!("removed {}", mpath.display());
    let touched_daemon = m.files.iter().any(|f| {
        let p = f.path.to_string_lossy();
        p.ends_with("nix.conf") || p.ends_with(".plist") || p.ends_with("nixdock.conf")
    });
    if touched_daemon {
        let bug = parse_version(&m.nix_version).is_ok_and(has_nix_conf_bug);
        let cmd = match m.service_manager {
            ServiceManager::Systemd if bug => {
                Some("systemctl daemon-reload && systemctl restart nix-daemon".to_string())
            }
            ServiceManager::Systemd => Some("systemctl restart nix-daemon".to_string()),
            ServiceManager::Launchd => Some(format!(
                "launchctl bootout system/{LAUNCHD_LABEL}; launchctl bootstrap system /{PLIST}"
            )),
            ServiceManager::None => None,
        };
        finish(
            real_root,
            args.restart_daemon,
            cmd.as_deref(),
            m.service_manager,
        )?;
    }
    Ok(0)
}
