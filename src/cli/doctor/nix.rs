//! Nix on this machine: its version, its settings, and the build-hook direct builds use.

use std::path::{Path, PathBuf};

use super::super::{
    host,
    nix_version::{self, has_nix_conf_bug},
};
use super::Checks;

/// The `nix` program found, its version, and its settings.
pub(super) struct Nix {
    pub(super) path: Option<PathBuf>,
    pub(super) version: Option<((u32, u32), String)>,
    pub(super) settings: Option<NixSettings>,
}

/// A `nix` program is found and says its version; reads its settings for the checks after.
pub(super) fn check_nix(c: &mut Checks) -> Nix {
    let path = crate::nix_tools::find("nix").ok();
    let version = path.as_deref().and_then(nix_version::nix_version_of);
    match (&path, &version) {
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
    let settings = match &path {
        Some(p) => nix_settings(p, version.as_ref().map(|v| v.0)),
        None => None,
    };
    Nix {
        path,
        version,
        settings,
    }
}

/// Direct builds (root's own `nix-build`, or anyone's on a single-user install) call
/// nixdock-hook.
pub(super) fn check_direct_builds(c: &mut Checks, nix: &Nix) {
    let conf_dir = std::env::var_os("NIX_CONF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/nix"));
    let system_conf = conf_dir.join("nix.conf");
    let system_line = conf_setting(&system_conf, "build-hook");

    if let (Some(p), None) = (&nix.path, &nix.settings) {
        c.warn(
            "direct builds",
            format!(
                "cannot read Nix's settings from `{} show-config`",
                p.display()
            ),
            "run `nix show-config --extra-experimental-features nix-command` to see why",
        );
    }
    // Root's nix-build opens the store itself; its hook is its own setting.
    if let (Some(s), Some((v, _))) = (&nix.settings, &nix.version) {
        let value = s.build_hook.clone().unwrap_or_default();
        let own = host::is_root() || host::single_user_nix();
        if !own {
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
            if !host::is_root() {
                c.fail(
                    "direct builds",
                    format!("your builds (single-user Nix) call {value}, not nixdock-hook"),
                    "add `build-hook = /path/to/nixdock-hook` to ~/.config/nix/nix.conf",
                );
                return;
            }
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
}

/// What `nix show-config` / `nix config show` says.
pub(super) struct NixSettings {
    pub(super) build_hook: Option<String>,
    pub(super) builders: Option<String>,
    pub(super) system: Option<String>,
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
pub(super) fn is_nixdock_hook(value: &str) -> bool {
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
    fn hook_values() {
        assert!(is_nixdock_hook("/usr/local/bin/nixdock-hook"));
        assert!(is_nixdock_hook("/x/nixdock-hook extra"));
        assert!(!is_nixdock_hook("/usr/libexec/nix/build-remote"));
        assert!(!is_nixdock_hook("nix __build-remote"));
        assert!(!is_nixdock_hook(""));
    }
}
