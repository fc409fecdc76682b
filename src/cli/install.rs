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

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::builder::Engine;
use crate::builder::engine;
use crate::state::StateDir;

use super::Env;
use super::{
    host,
    nix_version::{self, has_nix_conf_bug},
};

pub const MANIFEST: &str = "install-manifest.json";
const DROPIN: &str = "etc/systemd/system/nix-daemon.service.d/nixdock.conf";
const PLIST: &str = "Library/LaunchDaemons/org.nixos.nix-daemon.plist";
const LAUNCHD_LABEL: &str = "org.nixos.nix-daemon";
const CONFIG: &str = "etc/nixdock/nixdock.toml";

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

/// The install manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub root: PathBuf,
    pub hook: PathBuf,
    pub nix_version: String,
    pub service_manager: ServiceManager,
    /// In the order they were changed.
    pub files: Vec<FileEntry>,
    /// Directories install made, parents first.
    pub created_dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: PathBuf,
    pub original: Original,
    /// sha256 of what install wrote, to notice later edits.
    pub installed_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Original {
    Absent(AbsentTag),
    Present(Present),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum AbsentTag {
    #[serde(rename = "absent")]
    Absent,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Present {
    /// The content when it is UTF-8 …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// … else as hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hex: Option<String>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Present {
    fn of(bytes: &[u8], meta: &std::fs::Metadata) -> Present {
        let (text, hex) = match std::str::from_utf8(bytes) {
            Ok(s) => (Some(s.to_string()), None),
            Err(_) => (
                None,
                Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
            ),
        };
        Present {
            text,
            hex,
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        if let Some(t) = &self.text {
            return Ok(t.as_bytes().to_vec());
        }
        let h = self.hex.as_deref().unwrap_or("");
        (0..h.len())
            .step_by(2)
            .map(|i| {
                h.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
                    .ok_or_else(|| "corrupt hex content in the install manifest".to_string())
            })
            .collect()
    }
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
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

fn parse_version(s: &str) -> Result<(u32, u32), String> {
    nix_version::parse_nix_version(s)
        .ok_or_else(|| format!("--nix-version {s:?}: expected a version like 2.26"))
}

/// The Nix version to install for: the running daemon's, else the `nix` on PATH.
fn detect_version() -> Result<((u32, u32), String), String> {
    for pid in super::nix_daemon_process::nix_daemons() {
        if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe"))
            && let Some((v, text)) = nix_version::nix_version_of(&exe)
        {
            return Ok((v, format!("{text} (the running nix-daemon)")));
        }
    }
    let nix =
        crate::nix_tools::find("nix").map_err(|e| format!("{e}\nor pass --nix-version X.Y"))?;
    nix_version::nix_version_of(&nix)
        .map(|(v, t)| (v, format!("{t} ({})", nix.display())))
        .ok_or_else(|| {
            format!(
                "cannot tell the Nix version from `{} --version`; pass --nix-version X.Y",
                nix.display()
            )
        })
}

/// Sets `key = value` in nix.conf text: replaces every uncommented assignment of `key`, or
/// appends one.
pub fn set_conf(original: Option<&str>, key: &str, value: &str) -> String {
    let line = format!("{key} = {value}");
    let text = original.unwrap_or("");
    let is_key = |l: &str| {
        let l = l.split('#').next().unwrap_or("");
        l.split_once('=').is_some_and(|(k, _)| k.trim() == key)
    };
    if text.lines().any(is_key) {
        let mut out = String::with_capacity(text.len() + line.len());
        for l in text.split_inclusive('\n') {
            let (body, nl) = match l.strip_suffix('\n') {
                Some(b) => (b, "\n"),
                None => (l, ""),
            };
            if is_key(body) {
                out.push_str(&line);
            } else {
                out.push_str(body);
            }
            out.push_str(nl);
        }
        return out;
    }
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(
        "# nixdock-hook builds foreign systems in Docker containers (added by `nixdock install`;\n\
         # `nixdock uninstall` removes it)\n",
    );
    out.push_str(&line);
    out.push('\n');
    out
}

/// The systemd drop-in that gives nix-daemon the hook through `NIX_CONFIG`.
pub fn systemd_dropin(hook: &Path) -> String {
    // In unit files `%` starts a specifier; the quotes keep the spaces of the value.
    let value = format!("build-hook = {}", hook.display()).replace('%', "%%");
    format!(
        "# Written by `nixdock install`; `nixdock uninstall` removes it.\n\
         # Nix 2.25-2.33 ignore build-hook in /etc/nix/nix.conf, so nix-daemon gets it from\n\
         # its environment instead.\n\
         [Service]\n\
         Environment=\"NIX_CONFIG={value}\"\n"
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The whitespace before position `at` on its line.
fn indent_at(text: &str, at: usize) -> &str {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let ws = &text[start..at];
    if ws.chars().all(char::is_whitespace) {
        ws
    } else {
        ""
    }
}

/// Adds `NIX_CONFIG = build-hook = <hook>` to the EnvironmentVariables of a launchd plist,
/// editing the XML as text so everything else stays byte for byte. An existing NIX_CONFIG
/// keeps its other settings.
pub fn plist_set_hook(text: &str, hook: &Path) -> Result<String, String> {
    let setting = format!("build-hook = {}", hook.display());
    let bad = |what: &str| format!("cannot edit the launchd plist: {what}");
    if let Some(k) = text.find("<key>EnvironmentVariables</key>") {
        let after_key = k + "<key>EnvironmentVariables</key>".len();
        let rest = &text[after_key..];
        let ws = rest.len() - rest.trim_start().len();
        let dict_at = after_key + ws;
        let key_indent = indent_at(text, k).to_string();
        let inner = format!("{key_indent}\t");
        if text[dict_at..].starts_with("<dict/>") {
            let replacement = format!(
                "<dict>\n{inner}<key>NIX_CONFIG</key>\n{inner}<string>{}</string>\n{key_indent}</dict>",
                xml_escape(&setting)
            );
            return Ok(format!(
                "{}{replacement}{}",
                &text[..dict_at],
                &text[dict_at + "<dict/>".len()..]
            ));
        }
        if !text[dict_at..].starts_with("<dict>") {
            return Err(bad("EnvironmentVariables is not followed by a <dict>"));
        }
        let body_start = dict_at + "<dict>".len();
        let body_end = body_start
            + text[body_start..]
                .find("</dict>")
                .ok_or_else(|| bad("unterminated EnvironmentVariables <dict>"))?;
        let body = &text[body_start..body_end];
        if let Some(nk) = body.find("<key>NIX_CONFIG</key>") {
            let s_rel = body[nk..]
                .find("<string>")
                .ok_or_else(|| bad("NIX_CONFIG has no <string> value"))?;
            let v_start = body_start + nk + s_rel + "<string>".len();
            let v_end = v_start
                + text[v_start..]
                    .find("</string>")
                    .ok_or_else(|| bad("unterminated NIX_CONFIG <string>"))?;
            let old = xml_unescape(&text[v_start..v_end]);
            let mut lines: Vec<&str> = old
                .lines()
                .filter(|l| {
                    l.split_once('=')
                        .is_none_or(|(k, _)| k.trim() != "build-hook")
                })
                .collect();
            lines.push(&setting);
            let new = xml_escape(&lines.join("\n"));
            return Ok(format!("{}{new}{}", &text[..v_start], &text[v_end..]));
        }
        let insert = format!(
            "\n{inner}<key>NIX_CONFIG</key>\n{inner}<string>{}</string>",
            xml_escape(&setting)
        );
        return Ok(format!(
            "{}{insert}{}",
            &text[..body_start],
            &text[body_start..]
        ));
    }
    // No EnvironmentVariables yet: add it at the end of the top-level dict.
    let plist_end = text.rfind("</plist>").ok_or_else(|| bad("no </plist>"))?;
    let dict_end = text[..plist_end]
        .rfind("</dict>")
        .ok_or_else(|| bad("no top-level </dict>"))?;
    let indent = text
        .find("<key>")
        .map(|k| indent_at(text, k).to_string())
        .unwrap_or_else(|| "\t".into());
    let line_start = text[..dict_end].rfind('\n').map_or(0, |i| i + 1);
    let (at, prefix) = if text[line_start..dict_end].trim().is_empty() {
        (line_start, String::new())
    } else {
        (dict_end, "\n".to_string())
    };
    let block = format!(
        "{prefix}{indent}<key>EnvironmentVariables</key>\n{indent}<dict>\n{indent}\t<key>NIX_CONFIG</key>\n{indent}\t<string>{}</string>\n{indent}</dict>\n",
        xml_escape(&setting)
    );
    Ok(format!("{}{block}{}", &text[..at], &text[at..]))
}

/// The config file `install` writes when there is none: every setting, commented out.
pub const DEFAULT_CONFIG: &str = r#"# nixdock configuration, read by nixdock-hook at every build and by `nixdock`.
# Written by `nixdock install` with every setting commented out: the defaults apply.
# `nixdock doctor` checks it; unknown keys are errors.

# The Docker engine. As root (under nix-daemon) the hook uses only this, else DOCKER_HOST,
# else the sockets /var/run/docker.sock and /run/podman/podman.sock when they and every
# directory above them belong to root: it never looks in users' homes. `sudo nixdock install`
# records here the engine it finds (Docker Desktop, OrbStack, colima, ...). An engine named
# here that does not answer is an error; no other is tried.
# docker-host = "unix:///var/run/docker.sock"

# Also send builds for this machine's own system to a builder (normally they run here).
# offload-local = false

# How the hook reaches a builder's nix-daemon: "auto" goes straight to the daemon's socket in
# the builder's /nix volume when the engine is local (Linux) and the hook runs as root, and
# over SSH otherwise; "ssh" always uses SSH.
# transport = "auto"

# With no [builders] table, nixdock serves this machine's own Linux system and, when it can
# emulate it (binfmt_misc with qemu, flag F), the other of x86_64-linux / aarch64-linux.
# A table per system replaces those defaults:
#
# [builders."aarch64-linux"]
# image = "nixdock/builder:aarch64-linux"   # `nixdock image build` makes it
# platform = "linux/arm64"                  # only used when the image has to be pulled
# max-jobs = 8                              # builds at once in this builder
# cpus = 4.0                                # CPU limit of the container
# memory = "8g"                             # memory limit of the container
# idle-timeout = 1800                       # seconds without builds before it stops
# features = ["big-parallel", "benchmark"]  # system features it offers
# extra-nix-conf = ["keep-outputs = true"]  # lines added to the builder's nix.conf
# kvm = false                               # pass /dev/kvm (adds kvm, nixos-test)
# speed-factor = 1.0                        # against the machines in Nix's `builders`
"#;

/// Reads a file for editing: `None` when absent; a symlink is refused (NixOS and
/// home-manager make these, and their owner would overwrite our change).
fn read_for_edit(path: &Path) -> Result<Option<(Vec<u8>, std::fs::Metadata)>, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(format!(
            "{} is a symlink (managed by NixOS or home-manager?): set build-hook there instead \
             (NixOS: nix.settings.build-hook, and for Nix 2.25-2.33 \
             systemd.services.nix-daemon.environment.NIX_CONFIG)",
            path.display()
        )),
        Ok(m) if !m.is_file() => Err(format!("{} is not a regular file", path.display())),
        Ok(m) => std::fs::read(path)
            .map(|b| Some((b, m)))
            .map_err(|e| format!("cannot read {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `bytes` to `path` atomically with the given mode and owner (when known).
fn write_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.nixdock-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        std::fs::write(&tmp, bytes)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(())
}

/// Prints a change as a small line diff.
fn print_change(path: &Path, old: Option<&[u8]>, new: Option<&[u8]>, why: &str) {
    let old_s = old.map(String::from_utf8_lossy);
    let new_s = new.map(String::from_utf8_lossy);
    match (&old_s, &new_s) {
        (None, Some(_)) => println!("created {}  ({why})", path.display()),
        (Some(_), None) => println!("deleted {}  ({why})", path.display()),
        _ => println!("changed {}  ({why})", path.display()),
    }
    let old_lines: Vec<&str> = old_s
        .as_deref()
        .map(|s| s.lines().collect())
        .unwrap_or_default();
    let new_lines: Vec<&str> = new_s
        .as_deref()
        .map(|s| s.lines().collect())
        .unwrap_or_default();
    // Common prefix and suffix are unchanged; print what lies between.
    let pre = old_lines
        .iter()
        .zip(&new_lines)
        .take_while(|(a, b)| a == b)
        .count();
    let suf = old_lines[pre..]
        .iter()
        .rev()
        .zip(new_lines[pre..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let removed = &old_lines[pre..old_lines.len() - suf];
    let added = &new_lines[pre..new_lines.len() - suf];
    // A whole file of some length (the commented config) is summarised, not listed.
    if (old.is_none() || new.is_none()) && removed.len() + added.len() > 8 {
        println!("  ({} lines)", removed.len() + added.len());
        return;
    }
    for l in removed {
        println!("  - {l}");
    }
    for l in added {
        println!("  + {l}");
    }
}

fn manifest_path(env: &Env) -> PathBuf {
    env.state_path.join(MANIFEST)
}

fn load_manifest(path: &Path) -> Result<Option<Manifest>, String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{} is corrupt: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn save_manifest(env: &Env, m: &Manifest) -> Result<(), String> {
    // An older nixdock left its state directory with the umask's modes, which the hook now
    // refuses; installing over it is the upgrade, so make it private here.
    let tightened =
        crate::state::tighten_legacy_modes(&env.state_path).map_err(|e| e.to_string())?;
    if !tightened.is_empty() {
        println!(
            "made {} private ({} entries were readable by other users; an older nixdock made them)",
            env.state_path.display(),
            tightened.len()
        );
    }
    let state = StateDir::open(&env.state_path).map_err(|e| e.to_string())?;
    let path = state.path().join(MANIFEST);
    let json = serde_json::to_vec_pretty(m).map_err(|e| e.to_string())?;
    crate::state::write_private(&path, &json, 0o600)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn same_path(a: &Path, b: &Path) -> bool {
    let ca = std::fs::canonicalize(a).unwrap_or_else(|_| a.to_path_buf());
    let cb = std::fs::canonicalize(b).unwrap_or_else(|_| b.to_path_buf());
    ca == cb
}

pub async fn install(env: &Env, args: InstallArgs) -> Result<i32, String> {
    let root = args.root.clone();
    if !root.is_absolute() || !root.is_dir() {
        return Err(format!(
            "--root {}: not an existing absolute directory",
            root.display()
        ));
    }
    let real_root = same_path(&root, Path::new("/"));
    if real_root && !host::is_root() {
        return Err("installing into / needs root: run `sudo nixdock install`".into());
    }
    if args.restart_daemon && !real_root {
        return Err("--restart-daemon only makes sense without --root".into());
    }
    let hook = match &args.hook {
        Some(h) => h.clone(),
        None => host::hook_next_to_me()?,
    };
    if !hook.is_absolute() {
        return Err(format!(
            "--hook {}: must be an absolute path",
            hook.display()
        ));
    }
    let hook_s = hook.to_string_lossy();
    if hook_s
        .chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\\' || c == '\'')
    {
        return Err(format!(
            "{}: Nix splits build-hook at spaces; install nixdock-hook at a path without \
             spaces or quotes",
            hook.display()
        ));
    }
    if !host::is_executable(&hook) {
        if real_root {
            return Err(format!("{} is not an executable file", hook.display()));
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
                .map_err(|e| e.to_string())
        }
        None => Ok(None),
    };

    // A previous install is undone first, so the manifest keeps the true originals.
    let mpath = manifest_path(env);
    if let Some(old) = load_manifest(&mpath)? {
        if !same_path(&old.root, &root) {
            return Err(format!(
                "nixdock is already installed under {} (manifest {}); run `nixdock uninstall` first",
                old.root.display(),
                mpath.display()
            ));
        }
        println!("undoing the previous install first");
        restore(&old)?;
        std::fs::remove_file(&mpath)
            .map_err(|e| format!("cannot remove {}: {e}", mpath.display()))?;
    }

    println!("installing {} for {version_text}", hook.display());
    let mut plan: Vec<Change> = Vec::new();
    let mut edit = |path: PathBuf,
                    f: &dyn Fn(Option<&str>) -> Result<String, String>,
                    why: String|
     -> Result<(), String> {
        let cur = read_for_edit(&path)?;
        let cur_text = match &cur {
            Some((b, _)) => Some(
                std::str::from_utf8(b)
                    .map_err(|_| format!("{} is not UTF-8 text", path.display()))?
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
    };
    let hook_str = hook.display().to_string();
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
                let d = systemd_dropin(&hook);
                edit(
                    under(&root, DROPIN),
                    &|_| Ok(d.clone()),
                    "nix-daemon's environment: NIX_CONFIG".into(),
                )?;
                restart_cmd =
                    Some("systemctl daemon-reload && systemctl restart nix-daemon".to_string());
            }
            ServiceManager::Launchd => {
                let plist = under(&root, PLIST);
                if !plist.exists() {
                    return Err(format!(
                        "{} does not exist: is Nix installed in multi-user mode? (or pass \
                         --service-manager none)",
                        plist.display()
                    ));
                }
                let h = hook.clone();
                edit(
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
        edit(
            under(&root, &format!("{root_home}/.config/nix/nix.conf")),
            &|cur| Ok(set_conf(cur, "build-hook", &hook_str)),
            "direct builds as root".into(),
        )?;
    } else {
        edit(
            under(&root, "etc/nix/nix.conf"),
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
    let record = match (&kept_host, &args.docker_host) {
        (Err(e), _) => {
            println!(
                "warning: {e}\nthe config is left as it is and no docker-host is recorded: fix \
                 it (the hook cannot read it either), then install again"
            );
            None
        }
        (Ok(Some(h)), _) => {
            println!(
                "Docker engine: keeping docker-host = {} from {}",
                toml_string(h),
                cfg_path.display()
            );
            if args.docker_host.as_ref().is_some_and(|a| a != h) {
                println!(
                    "warning: --docker-host ignored: the config already names an engine; \
                     change it there"
                );
            }
            None
        }
        (Ok(None), Some(h)) => Some(h.clone()),
        (Ok(None), None) if real_root => engine_to_record().await,
        (Ok(None), None) => None,
    };
    let cur_cfg = match read_for_edit(&cfg_path)? {
        Some((b, _)) => Some(
            String::from_utf8(b)
                .map_err(|_| format!("{} is not UTF-8 text", cfg_path.display()))?,
        ),
        None => None,
    };
    // Undoing an earlier install may have taken away the docker-host it recorded (or that was
    // set since): it goes back in.
    let record = record.or_else(|| {
        let now = cur_cfg
            .as_deref()
            .and_then(|t| crate::config::Config::parse(t, &cfg_path).ok())
            .and_then(|c| c.docker_host);
        kept_host.ok().flatten().filter(|_| now.is_none())
    });
    match (&cur_cfg, &record) {
        (None, None) => plan.push(Change {
            path: cfg_path,
            new: DEFAULT_CONFIG.as_bytes().to_vec(),
            why: "nixdock's config, every setting commented out".into(),
        }),
        (cur, Some(host)) => plan.push(Change {
            new: config_with_docker_host(cur.as_deref(), host, &cfg_path)?.into_bytes(),
            path: cfg_path,
            why: format!("nixdock's config: docker-host = {}", toml_string(host)),
        }),
        (Some(_), None) => {}
    }

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
        std::fs::create_dir(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
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
    println!("check the result with `nixdock doctor`");
    Ok(0)
}

/// A TOML string literal.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The config with `docker-host` set: the commented default with that line filled in when
/// there is none, else the file with the setting added at its top (before any table).
fn config_with_docker_host(cur: Option<&str>, host: &str, path: &Path) -> Result<String, String> {
    let line = format!("docker-host = {}", toml_string(host));
    let new = match cur {
        None => {
            DEFAULT_CONFIG.replacen("# docker-host = \"unix:///var/run/docker.sock\"", &line, 1)
        }
        Some(text) => format!(
            "# The Docker engine `nixdock install` found (the hook as root looks nowhere else but\n\
             # DOCKER_HOST and root's own system sockets).\n{line}\n\n{text}"
        ),
    };
    match crate::config::Config::parse(&new, path) {
        Ok(c) if c.docker_host.as_deref() == Some(host) => Ok(new),
        Ok(_) => Err(format!(
            "cannot add docker-host to {}: set docker-host = {} there yourself",
            path.display(),
            toml_string(host)
        )),
        Err(e) => Err(format!("{e} (with docker-host added)")),
    }
}

/// `sudo nixdock install`'s search for the engine ([`Engine::search_at_install`]): shows what
/// answered and returns its address to record, unless its socket belongs to someone other
/// than root, the invoking user (SUDO_UID) or the console user, whose engine would get the
/// builders: that is shown, and left to the operator to name.
async fn engine_to_record() -> Option<String> {
    let (found, tried) = Engine::search_at_install().await;
    let tried_text = tried
        .iter()
        .map(|(w, why)| format!("  {w}: {why}"))
        .collect::<Vec<_>>()
        .join("\n");
    let Some(e) = found else {
        println!(
            "warning: no Docker engine answered; tried:\n{tried_text}\nThe hook (as root) will \
             use only the root-owned system sockets. Start your engine (Docker Desktop, \
             OrbStack, colima, ...) and run `sudo nixdock install` again, or set docker-host in \
             the config."
        );
        return None;
    };
    println!(
        "Docker engine: {} (found via {}), {} {}",
        e.addr, e.how_found, e.os, e.arch
    );
    let mut trusted = vec![0, euid()];
    trusted.extend(
        std::env::var("SUDO_UID")
            .ok()
            .and_then(|u| u.parse::<u32>().ok()),
    );
    trusted.extend(engine::console_uid());
    if let Some(uid) = engine::socket_owner(&e.addr)
        && !trusted.contains(&uid)
    {
        println!(
            "warning: not recorded as docker-host: that socket belongs to uid {uid}, who is \
             neither root, you nor the console user, and whoever runs the engine gets the \
             builders and what they build. If you trust it, set docker-host = {} in the config.",
            toml_string(&e.addr)
        );
        return None;
    }
    Some(e.addr)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Restarts the daemon when asked, else says how.
fn finish(
    real_root: bool,
    restart: bool,
    cmd: Option<&str>,
    manager: ServiceManager,
) -> Result<(), String> {
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
        return Err(format!(
            "systemd does not run on this machine, so `{cmd}` cannot work: restart nix-daemon \
             the way it was started"
        ));
    }
    println!("running: {cmd}");
    let status = Command::new("/bin/sh")
        .args(["-c", cmd])
        .status()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if !status.success() {
        return Err(format!("`{cmd}` failed ({status})"));
    }
    Ok(())
}

/// Writes back every original of a manifest, newest change first, then removes the
/// directories install made (when empty).
fn restore(m: &Manifest) -> Result<(), String> {
    let mut errors = Vec::new();
    for f in m.files.iter().rev() {
        let cur = match std::fs::symlink_metadata(&f.path) {
            Ok(_) => std::fs::read(&f.path).ok(),
            Err(_) => None,
        };
        if let Some(cur) = &cur
            && sha256_hex(cur) != f.installed_sha256
        {
            let bak = PathBuf::from(format!("{}.nixdock-uninstall.bak", f.path.display()));
            match std::fs::write(&bak, cur) {
                Ok(()) => println!(
                    "warning: {} changed since the install; its current content is saved as {}",
                    f.path.display(),
                    bak.display()
                ),
                Err(e) => {
                    errors.push(format!(
                        "{} changed since the install and cannot be saved to {}: {e}",
                        f.path.display(),
                        bak.display()
                    ));
                    continue;
                }
            }
        }
        match &f.original {
            Original::Absent(_) => {
                if cur.is_some() {
                    match std::fs::remove_file(&f.path) {
                        Ok(()) => print_change(&f.path, cur.as_deref(), None, "made by install"),
                        Err(e) => errors.push(format!("cannot delete {}: {e}", f.path.display())),
                    }
                }
            }
            Original::Present(p) => {
                let bytes = p.bytes()?;
                if cur.as_deref() == Some(bytes.as_slice()) {
                    continue;
                }
                match write_file(&f.path, &bytes, p.mode, Some((p.uid, p.gid))) {
                    Ok(()) => print_change(&f.path, cur.as_deref(), Some(&bytes), "restored"),
                    Err(e) => errors.push(e),
                }
            }
        }
    }
    for d in m.created_dirs.iter().rev() {
        if std::fs::remove_dir(d).is_ok() {
            println!("removed directory {}", d.display());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

pub fn uninstall(env: &Env, args: UninstallArgs) -> Result<i32, String> {
    let mpath = manifest_path(env);
    let Some(m) = load_manifest(&mpath)? else {
        return Err(format!(
            "nothing to uninstall: no install manifest at {} (is this the state directory \
             install used? see --state-dir)",
            mpath.display()
        ));
    };
    if let Some(r) = &args.root
        && !same_path(r, &m.root)
    {
        return Err(format!(
            "the install recorded in {} was under {}, not {}",
            mpath.display(),
            m.root.display(),
            r.display()
        ));
    }
    let real_root = same_path(&m.root, Path::new("/"));
    if real_root && !host::is_root() {
        return Err("uninstalling from / needs root: run `sudo nixdock uninstall`".into());
    }
    if args.restart_daemon && !real_root {
        return Err("--restart-daemon only makes sense for an install into /".into());
    }
    restore(&m)?;
    std::fs::remove_file(&mpath).map_err(|e| format!("cannot remove {}: {e}", mpath.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_conf_appends_or_replaces() {
        let a = set_conf(None, "build-hook", "/h");
        assert!(a.ends_with("build-hook = /h\n"), "{a}");
        let b = set_conf(Some("sandbox = false"), "build-hook", "/h");
        assert!(b.starts_with("sandbox = false\n#"), "{b}");
        let c = set_conf(
            Some("x = 1\nbuild-hook = /old # comment\n# build-hook = /c\ny = 2"),
            "build-hook",
            "/h",
        );
        assert_eq!(c, "x = 1\nbuild-hook = /h\n# build-hook = /c\ny = 2");
    }

    #[test]
    fn default_config_parses_to_defaults() {
        let c = crate::config::Config::parse(DEFAULT_CONFIG, Path::new("x")).unwrap();
        assert_eq!(c, crate::config::Config::default());
        // Uncommented, the example table is valid too.
        let uncommented: String = DEFAULT_CONFIG
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.contains('=') || l.starts_with('['))
            .map(|l| format!("{l}\n"))
            .collect();
        crate::config::Config::parse(&uncommented, Path::new("x")).unwrap();
    }

    #[test]
    fn dropin_quotes_the_value() {
        let d = systemd_dropin(Path::new("/opt/nixdock/bin/nixdock-hook"));
        assert!(d.contains(
            "[Service]\nEnvironment=\"NIX_CONFIG=build-hook = /opt/nixdock/bin/nixdock-hook\"\n"
        ));
    }

    const PLIST_NO_ENV: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>Label</key>
	<string>org.nixos.nix-daemon</string>
	<key>ProgramArguments</key>
	<array>
		<string>/bin/sh</string>
	</array>
</dict>
</plist>
"#;

    #[test]
    fn plist_gets_environment_variables() {
        let out = plist_set_hook(PLIST_NO_ENV, Path::new("/usr/local/bin/nixdock-hook")).unwrap();
        assert!(out.contains(
            "\t</array>\n\t<key>EnvironmentVariables</key>\n\t<dict>\n\t\t<key>NIX_CONFIG</key>\n\t\t<string>build-hook = /usr/local/bin/nixdock-hook</string>\n\t</dict>\n</dict>\n</plist>\n"
        ), "{out}");
        // Idempotent in effect: a second edit keeps one NIX_CONFIG with one build-hook.
        let again = plist_set_hook(&out, Path::new("/x/nixdock-hook")).unwrap();
        assert_eq!(again.matches("<key>NIX_CONFIG</key>").count(), 1);
        assert!(
            again.contains("<string>build-hook = /x/nixdock-hook</string>"),
            "{again}"
        );
    }

    #[test]
    fn plist_keeps_other_environment() {
        let with_env = PLIST_NO_ENV.replace(
            "</array>\n",
            "</array>\n\t<key>EnvironmentVariables</key>\n\t<dict>\n\t\t<key>NIX_SSL_CERT_FILE</key>\n\t\t<string>/etc/ssl/cert.pem</string>\n\t\t<key>NIX_CONFIG</key>\n\t\t<string>max-jobs = 4</string>\n\t</dict>\n",
        );
        let out = plist_set_hook(&with_env, Path::new("/h/nixdock-hook")).unwrap();
        assert!(out.contains("<string>/etc/ssl/cert.pem</string>"));
        assert!(
            out.contains("<string>max-jobs = 4\nbuild-hook = /h/nixdock-hook</string>"),
            "{out}"
        );
        let empty = PLIST_NO_ENV.replace(
            "</array>\n",
            "</array>\n\t<key>EnvironmentVariables</key>\n\t<dict/>\n",
        );
        let out = plist_set_hook(&empty, Path::new("/h/nixdock-hook")).unwrap();
        assert!(out.contains("<dict>\n\t\t<key>NIX_CONFIG</key>\n\t\t<string>build-hook = /h/nixdock-hook</string>\n\t</dict>"), "{out}");
    }

    #[test]
    fn manifest_original_forms() {
        let absent = serde_json::to_string(&Original::Absent(AbsentTag::Absent)).unwrap();
        assert_eq!(absent, "\"absent\"");
        let back: Original = serde_json::from_str(&absent).unwrap();
        assert!(matches!(back, Original::Absent(_)));
        let p: Original =
            serde_json::from_str(r#"{"hex":"00ff","mode":420,"uid":0,"gid":0}"#).unwrap();
        let Original::Present(p) = p else { panic!() };
        assert_eq!(p.bytes().unwrap(), vec![0, 255]);
    }
}
