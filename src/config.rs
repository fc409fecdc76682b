//! nixdock's configuration file (`$NIXDOCK_CONFIG`, default `/etc/nixdock/nixdock.toml`).
//!
//! Every table rejects unknown keys so a typo is an error that names the key instead of a
//! setting that silently does nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/nixdock/nixdock.toml";
/// Builder slots when the config names none: Nix retries a postponed build only every
/// `build-poll-interval` (5 s), so a builder should rarely be full.
pub const DEFAULT_MAX_JOBS: u32 = 8;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long an SSH holder keeps a builder's session after its last channel, by default.
pub const DEFAULT_SSH_PERSIST: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: builders.\"{system}\": {message}")]
    Invalid {
        path: PathBuf,
        system: String,
        message: String,
    },
    /// A problem with the top-level engine (`engine` = "default") or an `[engines.<name>]`.
    #[error("{path}: {}: {message}", engine_where(.engine))]
    Engine {
        path: PathBuf,
        engine: String,
        message: String,
    },
}

fn engine_where(engine: &str) -> String {
    if engine == DEFAULT_ENGINE_NAME {
        "the top-level docker-host".to_string()
    } else {
        format!("engines.{engine}")
    }
}

/// The name the top-level engine (`docker-host`) goes by among `[engines.<name>]`.
pub const DEFAULT_ENGINE_NAME: &str = "default";

/// The file as written by the user.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Docker engine address (`unix:///path`, a plain socket path, `tcp://host:port` or
    /// `ssh://user@host`); the first engine of the pool.
    pub docker_host: Option<String>,
    /// How to reach `docker-host`: TLS files for `tcp://`, identity and host key for `ssh://`
    /// (see [`EngineAccess`]).
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub ssh_key: Option<PathBuf>,
    pub ssh_host_key: Option<String>,
    /// More engines, by name: `[engines.<name>]`.
    #[serde(default)]
    pub engines: BTreeMap<String, EngineConfig>,
    /// Also offload derivations the host could build itself.
    #[serde(default)]
    pub offload_local: bool,
    /// How the hook reaches a builder's nix-daemon.
    #[serde(default)]
    pub transport: Transport,
    /// Seconds an SSH holder keeps a builder's SSH session open after its last use, for the
    /// next hooks (default 60; 0: every hook connects itself). Only builders reached over SSH.
    pub ssh_persist: Option<u64>,
    /// `nixdock serve` uses the hook's builders (their containers and stores) instead of its
    /// own: its clients are trusted users of those builders' daemons, so this lets them put
    /// unsigned paths where the hook will import from (see `serve`).
    #[serde(default)]
    pub serve_shares_builders: bool,
    /// Nix's sandbox in every builder that does not set its own (default "auto").
    pub sandbox: Option<Sandbox>,
    /// How an emulated system is built, for every builder that does not set its own
    /// (default "native-builder").
    pub emulation: Option<Emulation>,
    /// Serve the engine's native and emulated systems when no `[builders]` table is given.
    #[serde(default)]
    pub builders: BTreeMap<String, BuilderConfig>,
}

/// How the hook reaches a builder's nix-daemon.
#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// Through the daemon's socket in the builder's `/nix` volume when the engine is local
    /// and that socket is the hook's user's (root on a rootful engine, the engine's own user
    /// on a rootless one; no SSH at all); over SSH to a loopback port on any other
    /// local-socket engine; through the engine's exec on a `tcp://` or `ssh://` engine.
    #[default]
    Auto,
    /// Always over SSH: a remote engine's builders publish sshd on the engine's address.
    Ssh,
    /// Always through the engine's exec (`nix-daemon --stdio` in the container).
    EngineExec,
}

/// Where an emulated system's builds run (a system the engine's CPU cannot run natively, such
/// as aarch64-linux on an x86_64 engine).
#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Emulation {
    /// In the engine's native builder, whose nix.conf lists the system in `extra-platforms`:
    /// only the build's own programs run under qemu-user (through binfmt_misc, flag F), while
    /// its nix-daemon, sshd and every copy run natively, and Nix's sandbox can start. The
    /// native builder's container settings (image, max-jobs, sandbox, …) are the ones that
    /// count, and its slots are shared.
    #[default]
    NativeBuilder,
    /// In a container of the system's own architecture (an image for it), everything in it
    /// under qemu-user: no sandbox there (qemu-user refuses clone's namespace flags).
    Container,
}

impl Emulation {
    pub fn as_str(self) -> &'static str {
        match self {
            Emulation::NativeBuilder => "native-builder",
            Emulation::Container => "container",
        }
    }
}

/// Whether builds inside a builder run in Nix's sandbox: `true`, `false` or `"auto"`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Sandbox {
    /// On where it costs the host nothing: an engine inside a VM or a user-namespaced engine,
    /// and never for an emulated builder (see `builder::sandbox`).
    #[default]
    Auto,
    On,
    Off,
}

impl Sandbox {
    pub fn as_str(self) -> &'static str {
        match self {
            Sandbox::Auto => "auto",
            Sandbox::On => "true",
            Sandbox::Off => "false",
        }
    }
}

/// A TOML boolean or the string "auto" (serde's `untagged` would say only "did not match any
/// variant", without naming what is accepted).
impl<'de> Deserialize<'de> for Sandbox {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sandbox, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Sandbox;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Sandbox, E> {
                Ok(if b { Sandbox::On } else { Sandbox::Off })
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Sandbox, E> {
                match s {
                    "auto" => Ok(Sandbox::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(s), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// TLS files for a `tcp://` engine; identity and pinned host key for an `ssh://` one.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EngineAccess {
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub ssh_key: Option<PathBuf>,
    /// The base64 of the engine host's OpenSSH public key line, as in a machines line.
    pub ssh_host_key: Option<String>,
}

/// One `[engines.<name>]` table: another engine of the pool.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EngineConfig {
    pub docker_host: String,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub ssh_key: Option<PathBuf>,
    pub ssh_host_key: Option<String>,
    /// The systems it may serve (default: its own, and those it emulates when local).
    pub systems: Option<Vec<String>>,
    /// Relative speed of its builders (default 1).
    pub speed_factor: Option<f32>,
    /// Builds at once in each of its builders (caps `builders.<system>.max-jobs`).
    pub max_jobs: Option<u32>,
}

impl EngineConfig {
    pub fn access(&self) -> EngineAccess {
        EngineAccess {
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            ssh_key: self.ssh_key.clone(),
            ssh_host_key: self.ssh_host_key.clone(),
        }
    }
}

/// What is wrong with an engine's address and access, if anything.
fn check_engine(host: &str, a: &EngineAccess) -> Option<String> {
    let tls = [&a.tls_ca, &a.tls_cert, &a.tls_key];
    let n_tls = tls.iter().filter(|t| t.is_some()).count();
    if n_tls != 0 && n_tls != 3 {
        return Some("tls-ca, tls-cert and tls-key go together: set all three or none".into());
    }
    let is_ssh = host.starts_with("ssh://");
    if is_ssh && (a.ssh_key.is_none() || a.ssh_host_key.is_none()) {
        return Some(
            "an ssh:// engine needs ssh-key (the identity to log in with) and ssh-host-key \
             (the base64 of its host's public key line, e.g. `base64 -w0 \
             /etc/ssh/ssh_host_ed25519_key.pub`): nixdock never trusts a host key on first use"
                .into(),
        );
    }
    if !is_ssh && (a.ssh_key.is_some() || a.ssh_host_key.is_some()) {
        return Some("ssh-key and ssh-host-key are for ssh:// engines".into());
    }
    if n_tls == 3 && !(host.starts_with("tcp://") || host.starts_with("https://")) {
        return Some("tls-ca, tls-cert and tls-key are for tcp:// engines".into());
    }
    None
}

#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BuilderConfig {
    pub image: Option<String>,
    /// Passed to the engine only when an image has to be pulled.
    pub platform: Option<String>,
    pub max_jobs: Option<u32>,
    pub cpus: Option<f64>,
    /// Memory limit, e.g. "8g" or "512m".
    pub memory: Option<String>,
    /// Collect garbage in the builder's store when it holds more than this, e.g. "20G"
    /// (`entry.sh`, when a build has ended).
    pub max_store_size: Option<String>,
    /// Seconds without a build before the container stops itself.
    pub idle_timeout: Option<u64>,
    pub features: Option<Vec<String>>,
    /// Lines appended to the builder's nix.conf.
    #[serde(default)]
    pub extra_nix_conf: Vec<String>,
    /// Pass `/dev/kvm` through (enables the `kvm` and `nixos-test` features).
    #[serde(default)]
    pub kvm: bool,
    /// Relative speed against the machines in Nix's `builders` (default 1), as their speed
    /// factor: builds go to the least `busy slots / speed factor`.
    pub speed_factor: Option<f32>,
    /// Nix's sandbox for builds in this builder (default: the top-level `sandbox`, else "auto").
    pub sandbox: Option<Sandbox>,
    /// For a system its engine emulates: built by the engine's native builder
    /// ("native-builder", where this table's container settings — image, platform, max-jobs,
    /// cpus, memory, idle-timeout, features, extra-nix-conf, kvm, sandbox — are not used: the
    /// native builder's are) or in a container of its own ("container"). Default: the
    /// top-level `emulation`, else "native-builder". Ignored for a natively run system.
    pub emulation: Option<Emulation>,
}

impl BuilderConfig {
    /// The container settings this table sets, which a system served by the native builder
    /// does not use (named as in the file).
    pub fn container_keys(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut k = |set: bool, name: &'static str| {
            if set {
                v.push(name)
            }
        };
        k(self.image.is_some(), "image");
        k(self.platform.is_some(), "platform");
        k(self.max_jobs.is_some(), "max-jobs");
        k(self.cpus.is_some(), "cpus");
        k(self.memory.is_some(), "memory");
        k(self.idle_timeout.is_some(), "idle-timeout");
        k(self.features.is_some(), "features");
        k(!self.extra_nix_conf.is_empty(), "extra-nix-conf");
        k(self.kvm, "kvm");
        k(self.sandbox.is_some(), "sandbox");
        v
    }
}

impl Config {
    /// How to reach the top-level `docker-host`.
    pub fn access(&self) -> EngineAccess {
        EngineAccess {
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            ssh_key: self.ssh_key.clone(),
            ssh_host_key: self.ssh_host_key.clone(),
        }
    }

    /// [`Self::ssh_persist`] or its default.
    pub fn ssh_persist(&self) -> Duration {
        self.ssh_persist
            .map_or(DEFAULT_SSH_PERSIST, Duration::from_secs)
    }

    /// The config path from the environment, or the default.
    pub fn path_from_env() -> PathBuf {
        std::env::var_os("NIXDOCK_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
    }

    /// Loads the config; a missing file is an empty config, anything else unreadable is an
    /// error.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let engine_err = |engine: &str, message: String| ConfigError::Engine {
            path: path.to_owned(),
            engine: engine.to_string(),
            message,
        };
        if let Some(why) = check_engine(cfg.docker_host.as_deref().unwrap_or(""), &cfg.access()) {
            return Err(engine_err(DEFAULT_ENGINE_NAME, why));
        }
        for (name, e) in &cfg.engines {
            if name == DEFAULT_ENGINE_NAME
                || name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(engine_err(
                    name,
                    format!(
                        "an engine's name is lowercase letters, digits and '-', and not \
                         \"{DEFAULT_ENGINE_NAME}\" (the top-level docker-host's)"
                    ),
                ));
            }
            if let Some(why) = check_engine(&e.docker_host, &e.access()) {
                return Err(engine_err(name, why));
            }
            if e.max_jobs == Some(0) {
                return Err(engine_err(name, "max-jobs must be at least 1".into()));
            }
            if e.speed_factor.is_some_and(|f| !f.is_finite() || f <= 0.0) {
                return Err(engine_err(
                    name,
                    "speed-factor must be a positive number".into(),
                ));
            }
            if let Some(s) = e.systems.iter().flatten().find(|s| !s.contains('-')) {
                return Err(engine_err(
                    name,
                    format!("systems: {s:?} is not a system like \"aarch64-linux\""),
                ));
            }
        }
        for (system, b) in &cfg.builders {
            let invalid = |message: &str| ConfigError::Invalid {
                path: path.to_owned(),
                system: system.clone(),
                message: message.to_string(),
            };
            if !system.contains('-') {
                return Err(invalid("a system looks like \"x86_64-linux\""));
            }
            if b.max_jobs == Some(0) {
                return Err(invalid("max-jobs must be at least 1"));
            }
            if let Some(m) = &b.max_store_size
                && parse_memory(m).is_none_or(|n| n <= 0)
            {
                return Err(invalid(
                    "max-store-size must look like \"20G\", \"512M\" or a byte count",
                ));
            }
            if let Some(m) = &b.memory
                && parse_memory(m).is_none()
            {
                return Err(invalid(
                    "memory must look like \"8g\", \"512m\" or a byte count",
                ));
            }
            if b.speed_factor.is_some_and(|f| !f.is_finite() || f <= 0.0) {
                return Err(invalid("speed-factor must be a positive number"));
            }
            if b.cpus.is_some_and(|c| c.is_nan() || c <= 0.0) {
                return Err(invalid("cpus must be positive"));
            }
            if b.extra_nix_conf.iter().any(|l| l.contains('\n')) {
                return Err(invalid("extra-nix-conf holds one setting per list element"));
            }
            for line in &b.extra_nix_conf {
                if let Some(why) = refused_nix_conf_line(line) {
                    return Err(invalid(&format!(
                        "extra-nix-conf line {line:?} is refused: {why}; remove it"
                    )));
                }
            }
        }
        Ok(cfg)
    }
}

/// Settings a builder's nix.conf must not get from `extra-nix-conf` (nor in their `extra-`
/// form), with why: each undoes a rule that keeps one user's build from reaching another's.
/// nix/common.nix mirrors this list for the NixOS and nix-darwin modules.
///
/// Deliberately not here: `sandbox-paths` (what a sandboxed build sees; the administrator's to
/// widen), `build-hook` and
/// `pre-build-hook` (commands the administrator picks, run by the builder's root daemon; they
/// change no user's rights), `trusted-public-keys` and `substituters` (which caches the
/// administrator trusts).
const REFUSED_NIX_CONF: &[(&str, &str)] = &[
    (
        "sandbox",
        "the builder's `sandbox` setting decides it, together with the container options the \
         sandbox needs; set `sandbox = true | false | \"auto\"` for the builder instead",
    ),
    (
        "sandbox-fallback",
        "a sandbox that cannot start must fail the build, never build unsandboxed in silence",
    ),
    (
        "build-users-group",
        "builds in a builder must run as its unprivileged build users (nixbld, which nixdock \
         sets up); as root a build would own the shared builder and every later build in it",
    ),
    (
        "auto-allocate-uids",
        "builds must run as nixdock's build users, whose uids no host allocates; \
         auto-allocated uids are the ones the host's own Nix kills around its builds",
    ),
    (
        "require-drop-supplementary-groups",
        "a build must never keep the daemon's (root's) supplementary groups",
    ),
    (
        "trusted-users",
        "only root (nixdock) may be trusted by a builder's nix-daemon; a trusted build user \
         could reconfigure the daemon and so run as root",
    ),
    (
        "allowed-users",
        "who may connect to a builder's nix-daemon is nixdock's to decide",
    ),
    (
        "require-sigs",
        "without signatures a build user could add any content under any store path to the \
         shared builder's store, poisoning later builds",
    ),
];

/// Why `line` (one nix.conf line) may not go into a builder's nix.conf, or None. Read as Nix
/// reads it: `#` starts a comment, the name is the first word (before `=`), `extra-NAME`
/// changes NAME; `include` / `!include` are refused because nobody can see what they set.
pub fn refused_nix_conf_line(line: &str) -> Option<String> {
    let line = line.split('#').next().unwrap_or("");
    let first = line.split_whitespace().next()?;
    if first == "include" || first == "!include" {
        return Some(
            "an included file could set anything, including what nixdock must control \
             (build-users-group, trusted-users, allowed-users, …); put the settings here instead"
                .to_string(),
        );
    }
    let name = first.split('=').next().unwrap_or(first);
    let base = name.strip_prefix("extra-").unwrap_or(name);
    REFUSED_NIX_CONF
        .iter()
        .find(|(n, _)| *n == base)
        .map(|(n, why)| format!("`{n}` is nixdock's to set: {why}"))
}

/// Parses "8g", "512m", "1024k" or a plain byte count.
pub fn parse_memory(s: &str) -> Option<i64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1i64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.trim().parse::<i64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn full_builder_table() {
        let c = parse(
            r#"
            docker-host = "unix:///run/docker.sock"
            [builders."aarch64-linux"]
            image = "nixdock-test/bookworm-arm64"
            max-jobs = 4
            cpus = 1.5
            memory = "2g"
            idle-timeout = 60
            features = ["big-parallel"]
            extra-nix-conf = ["keep-outputs = true"]
            "#,
        )
        .unwrap();
        let b = &c.builders["aarch64-linux"];
        assert_eq!(b.image.as_deref(), Some("nixdock-test/bookworm-arm64"));
        assert_eq!(b.max_jobs, Some(4));
        assert_eq!(b.idle_timeout, Some(60));
        assert_eq!(c.docker_host.as_deref(), Some("unix:///run/docker.sock"));
    }

    #[test]
    fn transport_defaults_to_auto_and_accepts_ssh_only_besides() {
        assert_eq!(parse("").unwrap().transport, Transport::Auto);
        assert_eq!(
            parse("transport = \"ssh\"\n").unwrap().transport,
            Transport::Ssh
        );
        assert_eq!(
            parse("transport = \"auto\"\n").unwrap().transport,
            Transport::Auto
        );
        assert!(parse("transport = \"tcp\"\n").is_err());
    }

    #[test]
    fn ssh_persist_defaults_to_a_minute_and_zero_turns_it_off() {
        assert_eq!(parse("").unwrap().ssh_persist(), DEFAULT_SSH_PERSIST);
        assert_eq!(
            parse("ssh-persist = 5\n").unwrap().ssh_persist(),
            Duration::from_secs(5)
        );
        assert!(parse("ssh-persist = 0\n").unwrap().ssh_persist().is_zero());
        assert!(parse("ssh-persist = -1\n").is_err());
        assert!(parse("ssh-persist = \"60s\"\n").is_err());
    }

    #[test]
    fn sandbox_is_a_bool_or_auto() {
        assert_eq!(parse("").unwrap().sandbox, None);
        let c = parse(
            "sandbox = false\n[builders.\"x86_64-linux\"]\nsandbox = true\n\
             [builders.\"aarch64-linux\"]\nsandbox = \"auto\"\n[builders.\"i686-linux\"]\n",
        )
        .unwrap();
        assert_eq!(c.sandbox, Some(Sandbox::Off));
        assert_eq!(c.builders["x86_64-linux"].sandbox, Some(Sandbox::On));
        assert_eq!(c.builders["aarch64-linux"].sandbox, Some(Sandbox::Auto));
        assert_eq!(c.builders["i686-linux"].sandbox, None);
        for bad in [
            "sandbox = \"yes\"\n",
            "sandbox = 1\n",
            "sandbox = \"relaxed\"\n",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("true, false or \"auto\""), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[builders.\"x86_64-linux\"]\nimgae = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("imgae"), "{e}");
        let e = parse("dockr-host = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("dockr-host"), "{e}");
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse("[builders.\"x86_64-linux\"]\nmax-jobs = 0\n").is_err());
        assert!(parse("[builders.\"x86_64-linux\"]\nmemory = \"lots\"\n").is_err());
        assert!(parse("[builders.\"x86_64-linux\"]\nmax-store-size = \"lots\"\n").is_err());
        assert!(parse("[builders.\"x86_64-linux\"]\nmax-store-size = \"0\"\n").is_err());
        let c = parse("[builders.\"x86_64-linux\"]\nmax-store-size = \"20G\"\n").unwrap();
        assert_eq!(
            c.builders["x86_64-linux"].max_store_size.as_deref(),
            Some("20G")
        );
        assert!(parse("[builders.\"linux\"]\n").is_err());
    }

    #[test]
    fn extra_nix_conf_cannot_undo_the_trust_rules() {
        let conf = |line: &str| {
            parse(&format!(
                "[builders.\"x86_64-linux\"]\nextra-nix-conf = [\"keep-outputs = true\", {line:?}]\n"
            ))
        };
        for line in [
            "build-users-group =",
            "build-users-group = root",
            "  build-users-group=",
            "extra-build-users-group = x",
            "trusted-users = root alice",
            "extra-trusted-users = alice",
            "trusted-users=*",
            "allowed-users = alice",
            "extra-allowed-users = @wheel",
            "require-sigs = false",
            "auto-allocate-uids = true",
            "require-drop-supplementary-groups = false",
            "sandbox = false",
            "sandbox-fallback = true",
            "include /etc/nix/other.conf",
            "!include /etc/nix/other.conf",
            "trusted-users = alice # a comment",
        ] {
            let e = conf(line).expect_err(line).to_string();
            assert!(e.contains(line), "{line}: {e}");
            assert!(e.contains("is refused"), "{line}: {e}");
            assert!(e.contains("builders.\"x86_64-linux\""), "{line}: {e}");
        }
        let e = conf("trusted-users = alice").unwrap_err().to_string();
        assert!(e.contains("only root (nixdock) may be trusted"), "{e}");
        // Lines that only look alike, or are commented out, are fine.
        for line in [
            "# trusted-users = alice",
            "",
            "extra-sandbox-paths = /etc/ssl",
            "build-hook = /bin/false",
            "trusted-public-keys = k:AAAA",
            "keep-outputs = true",
            "max-jobs = 2 # trusted-users = alice",
            "trusted-substituters = https://cache.example",
            "extra-trusted-public-keys = k:AAAA",
        ] {
            assert!(conf(line).is_ok(), "{line} refused: {:?}", conf(line));
        }
    }

    #[test]
    fn missing_file_is_empty_config() {
        let c = Config::load(Path::new("/nonexistent/nixdock.toml")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory("2g"), Some(2 << 30));
        assert_eq!(parse_memory("512m"), Some(512 << 20));
        assert_eq!(parse_memory("100"), Some(100));
        assert_eq!(parse_memory("x"), None);
    }
}
