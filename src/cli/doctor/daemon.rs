//! The running nix-daemon: which build-hook it uses, worked out from /proc as Nix applies its
//! settings, and whether it has read a change made since it started.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::super::install;
use super::super::nix_daemon_process::{
    have_proc, listening_nix_daemon, proc_list, process_exe, process_start, process_uid,
};
use super::super::{
    host,
    nix_version::{self, has_nix_conf_bug},
};
use super::nix::{conf_setting, is_nixdock_hook};
use super::{Checks, DaemonInfo};

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
pub(super) fn check_daemon(c: &mut Checks, hook: &Path) -> Option<DaemonInfo> {
    let name = "nix-daemon";
    if !have_proc() {
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
    let exe = process_exe(pid);
    let version = exe.as_deref().and_then(nix_version::nix_version_of);
    let uid = process_uid(pid).unwrap_or(0);
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
    let v = version.as_ref().map(|v| v.0);
    let buggy = v.is_some_and(has_nix_conf_bug);
    let DaemonHook {
        value,
        source,
        user_files,
        system_conf,
        from_system,
    } = daemon_build_hook(&args, &env, uid, buggy);
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
            let changed = changed_after_start(pid, &system_conf, &user_files);
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

/// The build-hook a daemon uses and where it comes from, with the files that decide it.
struct DaemonHook {
    value: Option<String>,
    source: String,
    /// Its user config files, highest priority first.
    user_files: Vec<PathBuf>,
    /// Its system nix.conf, and the build-hook set there (ignored when `buggy`).
    system_conf: PathBuf,
    from_system: Option<(String, PathBuf)>,
}

/// Which build-hook a daemon with this command line, environment and uid uses, as Nix applies
/// its settings; `buggy`: its Nix ignores build-hook in the system nix.conf.
fn daemon_build_hook(
    args: &[String],
    env: &[(String, String)],
    uid: u32,
    buggy: bool,
) -> DaemonHook {
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
    let user_files = user_conf_files(env, uid);
    // The first file has the highest priority (Nix applies the list in reverse).
    let from_user = user_files
        .iter()
        .find_map(|f| conf_setting(f, "build-hook"));
    let conf_dir = get("NIX_CONF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/nix"));
    let system_conf = conf_dir.join("nix.conf");
    let from_system = conf_setting(&system_conf, "build-hook");

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
    DaemonHook {
        value,
        source,
        user_files,
        system_conf,
        from_system,
    }
}

/// Those of the files that set the daemon's hook which mention nixdock-hook and changed after
/// the daemon `pid` started.
fn changed_after_start(pid: u32, system_conf: &Path, user_files: &[PathBuf]) -> Vec<String> {
    let started = process_start(pid);
    // Where `nixdock install` puts the hook for this daemon.
    let mut candidates = vec![
        system_conf.to_path_buf(),
        Path::new("/").join(install::DROPIN),
        Path::new("/").join(install::PLIST),
    ];
    candidates.extend(user_files.iter().cloned());
    candidates
        .iter()
        .filter(|p| {
            started.is_some_and(|s| mtime(p).is_some_and(|m| m > s))
                && std::fs::read_to_string(p).is_ok_and(|t| t.contains("nixdock-hook"))
        })
        .map(|p| p.display().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_hook_precedence_is_nixs() {
        let d = tempfile::tempdir().unwrap();
        let user = d.path().join("user.conf");
        std::fs::write(&user, "build-hook = /user/nixdock-hook\n").unwrap();
        std::fs::write(
            d.path().join("nix.conf"),
            "build-hook = /system/nixdock-hook\n",
        )
        .unwrap();
        let var = |k: &str, v: &str| (k.to_string(), v.to_string());
        let conf_dir = var("NIX_CONF_DIR", d.path().to_str().unwrap());
        let user_files = var("NIX_USER_CONF_FILES", user.to_str().unwrap());
        let nix_config = var("NIX_CONFIG", "build-hook = /a\nbuild-hook = /env");
        let args: Vec<String> = ["nix-daemon", "--option", "build-hook", "/opt"]
            .map(String::from)
            .to_vec();

        let all = [conf_dir.clone(), user_files.clone(), nix_config];
        let h = daemon_build_hook(&args, &all, 0, false);
        assert_eq!(h.value.as_deref(), Some("/opt"));
        let h = daemon_build_hook(&args[..1], &all, 0, false);
        assert_eq!(h.value.as_deref(), Some("/env"));
        let h = daemon_build_hook(&args[..1], &[conf_dir.clone(), user_files], 0, false);
        assert_eq!(h.value.as_deref(), Some("/user/nixdock-hook"));
        let no_user = var(
            "NIX_USER_CONF_FILES",
            d.path().join("none").to_str().unwrap(),
        );
        let system_only = [conf_dir, no_user];
        let h = daemon_build_hook(&args[..1], &system_only, 0, false);
        assert_eq!(h.value.as_deref(), Some("/system/nixdock-hook"));
        // Nix 2.25–2.33 ignore the system nix.conf's build-hook.
        let h = daemon_build_hook(&args[..1], &system_only, 0, true);
        assert_eq!((h.value, h.source.as_str()), (None, "Nix's default"));
        assert!(h.from_system.is_some());
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
