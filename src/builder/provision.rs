//! What goes into a builder container: the files nixdock uploads through the Engine API before
//! the container starts (no bind mount of host files), and the container's own configuration.
//! Everything that decides whether a running container is still right goes into
//! [`BuilderSpec::config_hash`].

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, DeviceMapping, HostConfig, Mount, MountType, PortBinding,
};
use sha2::{Digest, Sha256};

use crate::config::{
    BuilderConfig, Config, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_JOBS, Emulation, Sandbox, parse_memory,
};

use super::systems;

/// Bumped whenever the provisioning below changes in a way that needs new containers.
const PROVISION_VERSION: &str = "2";
pub const ENTRY_SCRIPT: &str = include_str!("entry.sh");
pub const SSH_PORT: &str = "22/tcp";
/// The command the hook runs over SSH; the entry script links it to the image's nix-daemon.
pub const REMOTE_NIX_DAEMON: &str = "/etc/nixdock/bin/nix-daemon --stdio";
/// The sshd subsystem started once per connection so that sshd sets `TCP_NODELAY`.
/// The builder's sshd in the container, and its configuration (both put in place by `entry.sh`).
pub const SSHD: &str = "/etc/nixdock/bin/sshd";
pub const SSHD_CONFIG: &str = "/etc/nixdock/sshd_config";
pub const NODELAY_SUBSYSTEM: &str = "nixdock-nodelay";
/// Made by `entry.sh` (`$ND/set-up`) once its first set-up is done and the container serves;
/// outside `/nix`, so a recreated container on a kept volume starts without it.
pub const SET_UP_MARKER: &str = "/etc/nixdock/set-up";
/// The socket of the persistent `nix-daemon` that `entry.sh` starts in every builder.
pub const REMOTE_DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

pub const LABEL_INSTANCE: &str = "nixdock.instance";
pub const LABEL_SYSTEM: &str = "nixdock.system";
pub const LABEL_CONFIG: &str = "nixdock.config-hash";
pub const LABEL_HOST_KEY: &str = "nixdock.host-key";
pub const LABEL_IMAGE: &str = "nixdock.image";
pub const LABEL_MAX_JOBS: &str = "nixdock.max-jobs";

/// The image a system's builder runs when the config names none: the official `nixos/nix`,
/// unmodified (it ships OpenSSH's sshd since Nix 2.9; `entry.sh` copes with its layout), at a
/// pinned tag, pulled by the engine on the first build for the system's platform. One image
/// serves every system: it is multi-platform.
pub const DEFAULT_IMAGE: &str = "nixos/nix:2.28.3";

/// For tests only: an image reference that replaces [`DEFAULT_IMAGE`] (e.g. one in a local
/// registry), read by the hook and the CLI alike. Not a user setting: `image` in the config is.
pub const DEFAULT_IMAGE_ENV: &str = "NIXDOCK_DEFAULT_IMAGE";

/// The image a system uses when the config names none: [`DEFAULT_IMAGE`], or the tests'
/// [`DEFAULT_IMAGE_ENV`].
pub fn default_image() -> String {
    match std::env::var(DEFAULT_IMAGE_ENV) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => DEFAULT_IMAGE.to_string(),
    }
}

/// Features every builder offers; `kvm` and `nixos-test` only with `/dev/kvm` passed through.
pub fn default_features(kvm: bool) -> Vec<String> {
    let mut f = vec!["big-parallel".to_string(), "benchmark".to_string()];
    if kvm {
        f.push("kvm".into());
        f.push("nixos-test".into());
    }
    f
}

/// Where a builder's sshd is published on its engine's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    /// On loopback, on a port the engine picks (a local engine; Docker Desktop, OrbStack and
    /// colima forward it to this host).
    Loopback,
    /// On this address of a remote engine's host (`transport = "ssh"`).
    Address(String),
    /// Nowhere: the builder is reached through the engine's exec.
    Nothing,
}

/// What a builder's spec takes from the engine it runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct EnginePlace {
    /// `default` (the top-level engine) or its `[engines.<name>]` name.
    pub name: String,
    /// The engine's architecture as Nix names it (`x86_64`, `aarch64`).
    pub arch: String,
    /// Whether the engine runs on this host (its emulation can be checked here).
    pub local: bool,
    pub publish: Publish,
    /// Caps each builder's `max-jobs` on this engine.
    pub max_jobs: Option<u32>,
    /// Multiplies each builder's speed factor on this engine.
    pub speed_factor: Option<f32>,
    /// The systems it may serve; `None`: what `[builders]` lists, else its defaults.
    pub systems: Option<Vec<String>>,
}

impl EnginePlace {
    /// The top-level engine when it is a local socket (or discovered): decided without asking
    /// it, from this host's architecture.
    pub fn local_default(cfg: &Config) -> EnginePlace {
        EnginePlace {
            name: crate::config::DEFAULT_ENGINE_NAME.to_string(),
            arch: systems::host_arch().to_string(),
            local: systems::ENGINE_IS_LOCAL,
            publish: super::engine::publish_for(None, cfg.transport),
            max_jobs: None,
            speed_factor: None,
            systems: None,
        }
    }

    pub fn is_default(&self) -> bool {
        self.name == crate::config::DEFAULT_ENGINE_NAME
    }
}

/// A builder as configured for one system on one engine.
#[derive(Debug, Clone, PartialEq)]
pub struct BuilderSpec {
    /// The engine it runs on (`default`, or an `[engines.<name>]` name).
    pub engine: String,
    pub publish: Publish,
    pub instance: String,
    pub system: String,
    pub image: String,
    pub platform: Option<String>,
    /// The image is the default one, which serves every platform under one tag: it is kept
    /// locally under a tag per platform (see [`local_image`](Self::local_image)).
    pub per_platform: bool,
    pub max_jobs: u32,
    pub nano_cpus: Option<i64>,
    pub memory: Option<i64>,
    /// Garbage is collected in the builder's store above this many bytes.
    pub max_store_bytes: Option<u64>,
    pub idle_timeout_secs: u64,
    pub features: Vec<String>,
    pub extra_nix_conf: Vec<String>,
    pub kvm: bool,
    /// The system's programs run under emulation on this engine (qemu-user through
    /// binfmt_misc): in the native builder (`served_by`) or in a container of its own.
    pub emulated: bool,
    /// The native system whose builder (container, slots, settings) builds this emulated
    /// system through `extra-platforms` (`emulation = "native-builder"`); `None`: a container
    /// of its own.
    pub served_by: Option<String>,
    /// The emulated systems this spec's container also builds (its nix.conf's
    /// `extra-platforms`); the same on the native spec and on every spec it serves.
    pub extra_platforms: Vec<String>,
    /// Speed factor against the user's own remote builders (not part of the container).
    pub speed_factor: f32,
    /// Nix's sandbox as configured; "auto" is decided when the container is created, from the
    /// engine's info (`builder::sandbox`), and recorded in its labels.
    pub sandbox: Sandbox,
}

impl BuilderSpec {
    pub fn from_config(
        instance: &str,
        system: &str,
        c: &BuilderConfig,
        engine_arch: &str,
    ) -> BuilderSpec {
        BuilderSpec {
            engine: crate::config::DEFAULT_ENGINE_NAME.to_string(),
            publish: Publish::Loopback,
            instance: instance.to_string(),
            system: system.to_string(),
            image: c.image.clone().unwrap_or_else(default_image),
            per_platform: c.image.is_none(),
            // An image is pulled for the system's platform unless the config says otherwise.
            platform: c
                .platform
                .clone()
                .or_else(|| systems::docker_platform(system).map(String::from)),
            max_jobs: c.max_jobs.unwrap_or(DEFAULT_MAX_JOBS),
            nano_cpus: c.cpus.map(|c| (c * 1e9) as i64),
            memory: c.memory.as_deref().and_then(parse_memory),
            max_store_bytes: c
                .max_store_size
                .as_deref()
                .and_then(parse_memory)
                .and_then(|n| u64::try_from(n).ok()),
            idle_timeout_secs: c.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT.as_secs()),
            features: c
                .features
                .clone()
                .unwrap_or_else(|| default_features(c.kvm)),
            extra_nix_conf: c.extra_nix_conf.clone(),
            kvm: c.kvm,
            emulated: systems::is_emulated(system, engine_arch),
            served_by: None,
            extra_platforms: Vec::new(),
            speed_factor: c.speed_factor.unwrap_or(1.0),
            sandbox: c.sandbox.unwrap_or_default(),
        }
    }

    /// [`from_config`](Self::from_config) with the config's top-level defaults applied.
    fn from_tables(
        cfg: &Config,
        instance: &str,
        system: &str,
        c: &BuilderConfig,
        engine_arch: &str,
    ) -> BuilderSpec {
        let mut s = Self::from_config(instance, system, c, engine_arch);
        s.sandbox = c.sandbox.or(cfg.sandbox).unwrap_or_default();
        s
    }

    /// The builders the hook serves on the local default engine, decided without asking it.
    pub fn served(cfg: &Config, instance: &str) -> Vec<BuilderSpec> {
        Self::on_engine(cfg, instance, &EnginePlace::local_default(cfg))
    }

    /// The builders `place` serves: the `[builders]` tables' systems (or, without any, the
    /// engine's defaults), limited to its `systems`, with its caps applied.
    pub fn on_engine(cfg: &Config, instance: &str, place: &EnginePlace) -> Vec<BuilderSpec> {
        let mut specs = match &place.systems {
            Some(systems) if !cfg.builders.is_empty() => Self::native_builder_serves(
                cfg,
                instance,
                cfg.builders
                    .iter()
                    .filter(|(s, _)| systems.contains(s))
                    .map(|(s, c)| Self::from_tables(cfg, instance, s, c, &place.arch))
                    .collect(),
                &place.arch,
                place.local,
            ),
            Some(systems) => Self::native_builder_serves(
                cfg,
                instance,
                systems
                    .iter()
                    .map(|s| {
                        Self::from_tables(cfg, instance, s, &BuilderConfig::default(), &place.arch)
                    })
                    .collect(),
                &place.arch,
                place.local,
            ),
            None => Self::all(cfg, instance, &place.arch, place.local),
        };
        for s in &mut specs {
            s.engine = place.name.clone();
            s.publish = place.publish.clone();
            if let Some(cap) = place.max_jobs {
                s.max_jobs = s.max_jobs.min(cap);
            }
            if let Some(f) = place.speed_factor {
                s.speed_factor *= f;
            }
        }
        specs
    }

    /// Every builder this installation serves: the config's tables, or the engine's sensible
    /// defaults when there are none.
    pub fn all(
        cfg: &Config,
        instance: &str,
        engine_arch: &str,
        engine_is_local: bool,
    ) -> Vec<BuilderSpec> {
        let specs = if cfg.builders.is_empty() {
            systems::default_systems(engine_arch, engine_is_local)
                .iter()
                .map(|s| {
                    Self::from_tables(cfg, instance, s, &BuilderConfig::default(), engine_arch)
                })
                .collect()
        } else {
            cfg.builders
                .iter()
                .map(|(s, c)| Self::from_tables(cfg, instance, s, c, engine_arch))
                .collect()
        };
        Self::native_builder_serves(cfg, instance, specs, engine_arch, engine_is_local)
    }

    /// Hands every emulated system whose `emulation` is "native-builder" (the default) to the
    /// engine's native builder: its spec becomes the native builder's (same container, slots,
    /// image, sandbox …) under its own system name and speed factor, and the native builder's
    /// nix.conf lists it in `extra-platforms` — when this host can tell, only if binfmt_misc
    /// runs it (a missing emulator is then the build's clear error, not a builder that
    /// accepts what it cannot run). The native builder's spec is made from its own table (or
    /// the defaults) when the config serves only emulated systems on this engine.
    fn native_builder_serves(
        cfg: &Config,
        instance: &str,
        mut specs: Vec<BuilderSpec>,
        engine_arch: &str,
        engine_is_local: bool,
    ) -> Vec<BuilderSpec> {
        let Some(native) = systems::native_system(engine_arch) else {
            return specs;
        };
        let table = |s: &str| cfg.builders.get(s).cloned().unwrap_or_default();
        let mode = |s: &str| table(s).emulation.or(cfg.emulation).unwrap_or_default();
        let served: Vec<usize> = specs
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.emulated
                    && systems::container_arch(&s.system).is_some()
                    && mode(&s.system) == Emulation::NativeBuilder
            })
            .map(|(i, _)| i)
            .collect();
        if served.is_empty() {
            return specs;
        }
        let mut platforms: Vec<String> = served
            .iter()
            .map(|&i| specs[i].system.clone())
            .filter(|s| {
                !matches!(
                    systems::emulation_support(s, engine_arch, engine_is_local),
                    systems::EmulationSupport::Missing(_)
                )
            })
            .collect();
        platforms.sort();
        platforms.dedup();
        let mut host = specs
            .iter()
            .find(|s| s.system == native)
            .cloned()
            .unwrap_or_else(|| {
                Self::from_tables(cfg, instance, native, &table(native), engine_arch)
            });
        host.extra_platforms = platforms;
        for s in specs.iter_mut().filter(|s| s.system == native) {
            s.extra_platforms = host.extra_platforms.clone();
        }
        for i in served {
            let own = &specs[i];
            let mut by = host.clone();
            by.system = own.system.clone();
            by.emulated = true;
            by.served_by = Some(native.to_string());
            by.speed_factor = own.speed_factor;
            specs[i] = by;
        }
        specs
    }

    /// The system whose container runs this spec's builds: its own, or the native builder's.
    pub fn container_system(&self) -> &str {
        self.served_by.as_deref().unwrap_or(&self.system)
    }

    /// Whether the container's own processes (nix-daemon, sshd, every copy) run under
    /// qemu-user: an emulated system in a container of its own. Such a container gets no
    /// sandbox and no seccomp filter of Nix's.
    pub fn runs_under_emulation(&self) -> bool {
        self.emulated && self.served_by.is_none()
    }

    /// Where the image is on the engine: the image itself, or for the default image a local tag
    /// of its own per platform (`nixos/nix:2.28.3` for linux/arm64 is kept as
    /// `nixos/nix:2.28.3-nixdock-linux-arm64`): one tag serves every platform in the registry,
    /// but an engine holds one image per tag, so two systems' builders would otherwise take
    /// each other's architecture.
    pub fn local_image(&self) -> String {
        match (&self.platform, self.per_platform, split_tag(&self.image)) {
            (Some(p), true, Some((repo, tag))) => {
                format!("{repo}:{tag}-nixdock-{}", sanitize(&p.replace('/', "-")))
            }
            _ => self.image.clone(),
        }
    }

    /// Container name: the instance id keeps two installations on one engine apart, and a
    /// pool engine's name keeps its builders (and their slot and lock names, which are the
    /// container's) apart from another engine's for the same system.
    pub fn container_name(&self) -> String {
        let system = self.container_system();
        if self.engine == crate::config::DEFAULT_ENGINE_NAME {
            format!("nixdock-{}-{}", self.instance, sanitize(system))
        } else {
            format!(
                "nixdock-{}-{}-{}",
                self.instance,
                sanitize(&self.engine),
                sanitize(system)
            )
        }
    }

    /// `/nix` lives on a volume per system and image, so the store survives restarts while a
    /// new image never runs over an old image's `/nix`.
    pub fn volume_name(&self, image_id: &str) -> String {
        let short: String = image_id
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect();
        format!("{}-{short}", self.container_name())
    }

    /// The static part of the builder's nix.conf (the entry script puts the sandbox settings
    /// before it — `sandbox`, decided when the container is created, and the image's static
    /// shell as `/bin/sh` — and adds the emulation settings it verified and, last,
    /// `build-users-group = nixbld`: builds never run as root).
    pub fn nix_conf(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("max-jobs = {}\n", self.max_jobs));
        s.push_str("cores = 0\n");
        s.push_str(&format!("system-features = {}\n", self.features.join(" ")));
        let mut platforms: Vec<&str> = Vec::new();
        if self.container_system() == "i686-linux" {
            platforms.push("i686-linux");
        }
        // Emulated systems this builder serves: the kernel runs their programs through
        // binfmt_misc's qemu (flag F, so the interpreter needs no path inside the container or
        // the sandbox), while the daemon stays native — so Nix's own syscall filter loads and
        // the sandbox can start (measured: both work; no `filter-syscalls = false` here).
        platforms.extend(self.extra_platforms.iter().map(String::as_str));
        if !platforms.is_empty() {
            s.push_str(&format!("extra-platforms = {}\n", platforms.join(" ")));
        }
        // Collect garbage before the volume fills: start below 1 GiB free, stop at 4 GiB.
        s.push_str("min-free = 1073741824\nmax-free = 4294967296\n");
        for l in &self.extra_nix_conf {
            s.push_str(l);
            s.push('\n');
        }
        // After the user's lines, so none of them can widen who is trusted (the config refuses
        // such lines too); entry.sh appends `build-users-group = nixbld` after this.
        s.push_str("trusted-users = root\n");
        s
    }

    pub fn sshd_config(&self) -> String {
        [
            "# written by nixdock",
            "Port 22",
            "HostKey /etc/nixdock/ssh_host_ed25519_key",
            "PermitRootLogin prohibit-password",
            "AuthorizedKeysFile /etc/nixdock/authorized_keys",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            // Store connections reach the builder's nix-daemon socket through a
            // direct-streamlocal channel: no shell, no process start per connection. sshd
            // gates those on AllowTcpForwarding too ("local" only: nothing listens remotely;
            // the only key is nixdock's, which is root here anyway).
            "AllowTcpForwarding local",
            "AllowStreamLocalForwarding local",
            // Started and closed once per connection (see `SshSession::touch_subsystem`): it
            // makes sshd set TCP_NODELAY, which streamlocal channels alone never do.
            "Subsystem nixdock-nodelay internal-sftp",
            "AllowAgentForwarding no",
            "X11Forwarding no",
            "PermitTunnel no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "StrictModes no",
            // Sessions get the container's PATH from ~/.ssh/environment (entry.sh writes it):
            // nixos/nix has its tools only in root's profile, off sshd's compiled-in PATH.
            "PermitUserEnvironment yes",
            "MaxSessions 64",
            "MaxStartups 64:30:128",
            "PidFile /run/nixdock-sshd.pid",
            "",
        ]
        .join("\n")
    }

    /// Hash of everything that, when changed, means the container must be recreated.
    pub fn config_hash(&self, image_id: &str, client_public_key: &str) -> String {
        let mut h = Sha256::new();
        for part in [
            PROVISION_VERSION,
            ENTRY_SCRIPT,
            image_id,
            self.container_system(),
            &self.nix_conf(),
            &self.sshd_config(),
            &format!(
                "{:?}/{:?}/{}/{}/{:?}",
                self.nano_cpus, self.memory, self.idle_timeout_secs, self.kvm, self.max_store_bytes
            ),
            &self.runs_under_emulation().to_string(),
            // The setting, not the decision: "auto" is decided at creation from the engine,
            // which a builder's container never outlives.
            self.sandbox.as_str(),
            // A new profile (a new nixdock) must reach running sandboxed builders.
            &super::sandbox::seccomp_profile(),
            &format!("{:?}", self.publish),
            client_public_key,
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn labels(
        &self,
        config_hash: &str,
        host_public_key: &str,
        image_id: &str,
    ) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_INSTANCE.into(), self.instance.clone()),
            (LABEL_SYSTEM.into(), self.container_system().to_string()),
            (LABEL_CONFIG.into(), config_hash.into()),
            (LABEL_HOST_KEY.into(), host_public_key.into()),
            (LABEL_IMAGE.into(), image_id.into()),
            (LABEL_MAX_JOBS.into(), self.max_jobs.to_string()),
        ])
    }

    pub fn volume_labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_INSTANCE.into(), self.instance.clone()),
            (LABEL_SYSTEM.into(), self.container_system().to_string()),
        ])
    }

    pub fn container_body(
        &self,
        image_id: &str,
        volume: &str,
        labels: HashMap<String, String>,
    ) -> ContainerCreateBody {
        let system = self.container_system();
        let expect_arch = systems::container_arch(system).unwrap_or("");
        let devices = self.kvm.then(|| {
            vec![DeviceMapping {
                path_on_host: Some("/dev/kvm".into()),
                path_in_container: Some("/dev/kvm".into()),
                cgroup_permissions: Some("rwm".into()),
            }]
        });
        ContainerCreateBody {
            // Run the exact image we inspected, by id: a tag moved meanwhile cannot sneak in.
            image: Some(image_id.to_string()),
            entrypoint: Some(vec!["/bin/sh".into()]),
            cmd: Some(vec!["/etc/nixdock/entry.sh".into()]),
            env: Some(vec![
                format!("NIXDOCK_SYSTEM={system}"),
                format!("NIXDOCK_EXPECT_ARCH={expect_arch}"),
                format!("NIXDOCK_EMULATED={}", u8::from(self.runs_under_emulation())),
                format!("NIXDOCK_IDLE_TIMEOUT={}", self.idle_timeout_secs),
                // 0: no limit. KiB, what `du -sk` counts in.
                format!(
                    "NIXDOCK_MAX_STORE_KB={}",
                    self.max_store_bytes.map_or(0, |b| b.div_ceil(1024))
                ),
            ]),
            exposed_ports: (self.publish != Publish::Nothing).then(|| vec![SSH_PORT.into()]),
            labels: Some(labels),
            hostname: Some(format!("nixdock-{}", sanitize(system))),
            host_config: Some(HostConfig {
                // sshd on a port the engine picks: on loopback for a local engine, on the
                // engine's address when the hook reaches a remote one over SSH, else nowhere.
                port_bindings: match &self.publish {
                    Publish::Nothing => None,
                    p => Some(HashMap::from([(
                        SSH_PORT.to_string(),
                        Some(vec![PortBinding {
                            host_ip: Some(match p {
                                Publish::Address(a) => a.clone(),
                                _ => "127.0.0.1".into(),
                            }),
                            host_port: Some(String::new()),
                        }]),
                    )])),
                },
                mounts: Some(vec![Mount {
                    target: Some("/nix".into()),
                    source: Some(volume.to_string()),
                    typ: Some(MountType::VOLUME),
                    ..Default::default()
                }]),
                init: Some(true),
                nano_cpus: self.nano_cpus,
                memory: self.memory,
                devices,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The tar archive uploaded to `/` of the created container before it starts.
    pub fn provisioning_tar(
        &self,
        host_private_key: &str,
        client_public_key: &str,
    ) -> std::io::Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        let sshd_config = self.sshd_config();
        let nix_conf = self.nix_conf();
        let files: [(&str, &[u8], u32); 5] = [
            ("etc/nixdock/entry.sh", ENTRY_SCRIPT.as_bytes(), 0o755),
            ("etc/nixdock/sshd_config", sshd_config.as_bytes(), 0o600),
            (
                "etc/nixdock/ssh_host_ed25519_key",
                host_private_key.as_bytes(),
                0o600,
            ),
            (
                "etc/nixdock/authorized_keys",
                client_public_key.as_bytes(),
                0o600,
            ),
            ("etc/nixdock/nix.conf.in", nix_conf.as_bytes(), 0o644),
        ];
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        dir.set_mtime(0);
        b.append_data(&mut dir, "etc/nixdock/", std::io::empty())?;
        for (path, data, mode) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            b.append_data(&mut h, path, data)?;
        }
        b.into_inner()
    }
}

/// An image reference's repository and tag (`latest` when it names none); `None` for a
/// reference by digest.
pub fn split_tag(image: &str) -> Option<(&str, &str)> {
    if image.contains('@') {
        return None;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.rsplit_once(':') {
        Some((_, tag)) => Some((&image[..image.len() - tag.len() - 1], tag)),
        None => Some((image, "latest")),
    }
}

/// Docker names allow `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hook's exec waits for the marker the entry script makes: the same path.
    #[test]
    fn set_up_marker_is_the_entry_scripts() {
        let nd = SET_UP_MARKER.strip_suffix("/set-up").unwrap();
        assert!(ENTRY_SCRIPT.contains(&format!("\nND={nd}\n")));
        assert!(ENTRY_SCRIPT.contains(": > \"$ND/set-up\""));
        assert!(ENTRY_SCRIPT.contains("[ -e \"$ND/set-up\" ]"));
    }

    #[test]
    fn default_image_is_kept_under_a_tag_per_platform() {
        assert_eq!(split_tag("nixos/nix:2.28.3"), Some(("nixos/nix", "2.28.3")));
        assert_eq!(
            split_tag("127.0.0.1:5000/a/b"),
            Some(("127.0.0.1:5000/a/b", "latest"))
        );
        assert_eq!(
            split_tag("127.0.0.1:5000/a/b:t"),
            Some(("127.0.0.1:5000/a/b", "t"))
        );
        assert_eq!(split_tag("a/b@sha256:00"), None);
        let arm =
            BuilderSpec::from_config("i", "aarch64-linux", &BuilderConfig::default(), "x86_64");
        assert_eq!(arm.platform.as_deref(), Some("linux/arm64"));
        assert!(arm.per_platform);
        if std::env::var_os(DEFAULT_IMAGE_ENV).is_none() {
            assert_eq!(arm.image, DEFAULT_IMAGE);
            assert_eq!(
                arm.local_image(),
                format!("{DEFAULT_IMAGE}-nixdock-linux-arm64")
            );
        }
        let x86 =
            BuilderSpec::from_config("i", "x86_64-linux", &BuilderConfig::default(), "x86_64");
        assert_eq!(x86.platform.as_deref(), Some("linux/amd64"));
        assert_ne!(x86.local_image(), arm.local_image());
        // A configured image is used as it is, whatever the platform.
        let own = BuilderConfig {
            image: Some("nixdock/builder:aarch64-linux".into()),
            ..Default::default()
        };
        let s = BuilderSpec::from_config("i", "aarch64-linux", &own, "x86_64");
        assert_eq!(s.local_image(), "nixdock/builder:aarch64-linux");
        assert!(!s.per_platform);
    }

    fn spec() -> BuilderSpec {
        BuilderSpec::from_config(
            "abcd1234",
            "aarch64-linux",
            &BuilderConfig::default(),
            "x86_64",
        )
    }

    #[test]
    fn names_carry_the_instance() {
        let s = spec();
        assert_eq!(s.container_name(), "nixdock-abcd1234-aarch64-linux");
        assert_eq!(
            s.volume_name("sha256:0123456789abcdef0123"),
            "nixdock-abcd1234-aarch64-linux-0123456789ab"
        );
        assert!(s.emulated);
        assert_eq!(s.max_jobs, 8);
    }

    #[test]
    fn config_hash_tracks_what_matters() {
        let s = spec();
        let a = s.config_hash("img1", "key");
        assert_eq!(a, s.config_hash("img1", "key"));
        assert_ne!(a, s.config_hash("img2", "key"));
        let mut t = s.clone();
        t.max_jobs = 2;
        assert_ne!(a, t.config_hash("img1", "key"));
        let mut hashes = std::collections::HashSet::new();
        for sandbox in [Sandbox::Auto, Sandbox::On, Sandbox::Off] {
            let mut t = s.clone();
            t.sandbox = sandbox;
            hashes.insert(t.config_hash("img1", "key"));
        }
        assert_eq!(
            hashes.len(),
            3,
            "each sandbox setting has its own container"
        );
    }

    #[test]
    fn the_top_level_sandbox_is_the_builders_default() {
        let cfg = Config::parse(
            "sandbox = true\n[builders.\"x86_64-linux\"]\n[builders.\"aarch64-linux\"]\nsandbox = false\n\
             emulation = \"container\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let specs = BuilderSpec::all(&cfg, "id", "x86_64", true);
        let of = |sys: &str| specs.iter().find(|s| s.system == sys).unwrap().sandbox;
        assert_eq!(of("x86_64-linux"), Sandbox::On);
        assert_eq!(of("aarch64-linux"), Sandbox::Off);
        // Served by the native builder, an emulated system has that builder's sandbox.
        let native = Config::parse(
            "sandbox = true\n[builders.\"aarch64-linux\"]\nsandbox = false\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let specs = BuilderSpec::all(&native, "id", "x86_64", false);
        assert_eq!(specs[0].sandbox, Sandbox::On);
        let none = Config::default();
        for s in BuilderSpec::all(&none, "id", "x86_64", true) {
            assert_eq!(s.sandbox, Sandbox::Auto);
        }
    }

    /// By default an emulated system is the native builder's: the same container, config
    /// hash and slots, and the native builder lists it in `extra-platforms`;
    /// `emulation = "container"` keeps a container of its own.
    #[test]
    fn emulated_systems_are_served_by_the_native_builder_by_default() {
        let parse = |t: &str| Config::parse(t, std::path::Path::new("t.toml")).unwrap();
        let cfg = parse(
            "[builders.\"x86_64-linux\"]\nmax-jobs = 3\nimage = \"x\"\n\
             [builders.\"aarch64-linux\"]\nimage = \"ignored\"\nspeed-factor = 0.5\n",
        );
        // A remote engine: emulation is taken as there (not checked on this host).
        let specs = BuilderSpec::all(&cfg, "id", "x86_64", false);
        let of = |sys: &str| specs.iter().find(|s| s.system == sys).unwrap().clone();
        let (x, a) = (of("x86_64-linux"), of("aarch64-linux"));
        assert_eq!(a.served_by.as_deref(), Some("x86_64-linux"));
        assert!(a.emulated && !a.runs_under_emulation());
        assert_eq!(a.container_name(), x.container_name());
        assert_eq!(a.config_hash("img", "k"), x.config_hash("img", "k"));
        assert_eq!((a.image.as_str(), a.max_jobs), ("x", 3));
        assert_eq!(a.speed_factor, 0.5);
        assert!(x.nix_conf().contains("extra-platforms = aarch64-linux\n"));
        assert!(!x.nix_conf().contains("filter-syscalls"));

        // Only aarch64 configured: the native builder is made from the defaults.
        let only = BuilderSpec::all(
            &parse("[builders.\"aarch64-linux\"]\n"),
            "id",
            "x86_64",
            false,
        );
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].container_name(), "nixdock-id-x86_64-linux");
        assert_eq!(only[0].image, default_image());

        for t in [
            "emulation = \"container\"\n[builders.\"aarch64-linux\"]\n[builders.\"x86_64-linux\"]\n",
            "[builders.\"aarch64-linux\"]\nemulation = \"container\"\n[builders.\"x86_64-linux\"]\n",
        ] {
            let specs = BuilderSpec::all(&parse(t), "id", "x86_64", false);
            let of = |sys: &str| specs.iter().find(|s| s.system == sys).unwrap().clone();
            let (x, a) = (of("x86_64-linux"), of("aarch64-linux"));
            assert_eq!(a.served_by, None, "{t}");
            assert!(a.runs_under_emulation());
            assert_eq!(a.container_name(), "nixdock-id-aarch64-linux");
            assert!(!x.nix_conf().contains("extra-platforms"), "{t}");
        }
        // The emulated set is part of the native builder's hash.
        let plain = BuilderSpec::all(
            &parse("[builders.\"x86_64-linux\"]\n"),
            "id",
            "x86_64",
            false,
        );
        assert_ne!(plain[0].config_hash("img", "k"), x.config_hash("img", "k"));
    }

    #[test]
    fn nix_conf_is_static_and_has_no_per_caller_settings() {
        let c = spec().nix_conf();
        assert!(c.contains("trusted-users = root"));
        assert!(c.contains("max-jobs = 8"));
        assert!(!c.contains("substituters"));
    }

    #[test]
    fn tar_holds_the_provisioning_files() {
        let t = spec()
            .provisioning_tar("PRIVATE", "ssh-ed25519 AAAA x")
            .unwrap();
        let mut a = tar::Archive::new(&t[..]);
        let names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"etc/nixdock/entry.sh".to_string()));
        assert!(names.contains(&"etc/nixdock/ssh_host_ed25519_key".to_string()));
    }
}
