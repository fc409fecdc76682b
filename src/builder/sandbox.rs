//! Nix's sandbox inside a builder: whether a builder gets it (the `sandbox` setting, and for
//! "auto" what the engine reports about itself), and the container options it needs.
//!
//! Measured (Docker 20.10, Nix 2.8/2.26/2.34, no added capabilities): Nix's sandbox starts in a
//! user namespace of its own, so it needs no capability, but Docker's default seccomp profile
//! refuses clone's namespace flags, and Docker's masked and read-only `/proc` paths make the
//! kernel refuse the sandbox's fresh `/proc` mount ("too revealing"). So a sandboxed builder
//! gets nixdock's seccomp profile ([`seccomp_profile`]) and no masked or read-only paths. The
//! cost is the unmasked `/proc/sys`, writable by the container's root: on a rootful engine on
//! the host that is the host's root, hence "auto" leaves the sandbox off there.

use crate::config::Sandbox;

/// Container labels recording the decision made when the container was created, so `status`
/// and `doctor` show it without asking the engine's info again.
pub const LABEL_SANDBOX: &str = "nixdock.sandbox";
pub const LABEL_SANDBOX_WHY: &str = "nixdock.sandbox-why";

/// What the engine's `/info` says about where it runs; asked only when creating a builder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineFacts {
    /// Containers run in a user namespace (rootless Docker or Podman, userns-remap).
    pub user_namespaced: bool,
    /// The product whose VM the engine runs in (Docker Desktop, OrbStack, colima, Lima), if any.
    pub vm: Option<String>,
    /// The engine's info could not be read: "auto" then leaves the sandbox off.
    pub unknown: bool,
}

impl EngineFacts {
    /// Asks the engine's `/info` (slower than `/version`: only when creating a builder, and in
    /// `doctor`; never on a warm build).
    pub async fn ask(engine: &super::Engine) -> EngineFacts {
        match engine.docker.info().await {
            Ok(info) => {
                let mut facts = Self::from_info(
                    &info,
                    engine.is_local_socket() && !cfg!(target_os = "linux"),
                );
                if engine.podman && !facts.user_namespaced {
                    facts.user_namespaced = podman_rootless(engine).await == Some(true);
                }
                facts
            }
            Err(e) => {
                tracing::warn!(engine = %engine.name, "engine info: {e}");
                EngineFacts {
                    unknown: true,
                    ..Default::default()
                }
            }
        }
    }

    /// From `/info`: `SecurityOptions` names `name=userns` / `name=rootless`; the VM products
    /// name themselves in `OperatingSystem` ("Docker Desktop", "OrbStack") or in the VM's host
    /// name, `Name` ("docker-desktop", "orbstack", "colima" or "colima-<profile>",
    /// "lima-<instance>", e.g. Rancher Desktop's "lima-rancher-desktop"). `local_non_linux`: the
    /// engine is on a local socket of a host that is not Linux (macOS), so it runs in some VM.
    pub fn from_info(info: &bollard::models::SystemInfo, local_non_linux: bool) -> EngineFacts {
        let user_namespaced = info
            .security_options
            .iter()
            .flatten()
            .any(|o| o.contains("name=userns") || o.contains("name=rootless"));
        let os = info.operating_system.as_deref().unwrap_or("");
        let name = info.name.as_deref().unwrap_or("");
        let vm = if os.contains("Docker Desktop") || name == "docker-desktop" {
            Some("Docker Desktop")
        } else if os.contains("OrbStack") || name == "orbstack" {
            Some("OrbStack")
        } else if name == "colima" || name.starts_with("colima-") {
            Some("colima")
        } else if name.starts_with("lima-") {
            Some("Lima")
        } else if local_non_linux {
            Some("a VM (this host is not Linux)")
        } else {
            None
        };
        EngineFacts {
            user_namespaced,
            vm: vm.map(str::to_string),
            unknown: false,
        }
    }
}

/// Podman's own info path, asked instead of the path of the request it replaces.
const LIBPOD_INFO: &str = "/v4.0.0/libpod/info";

/// Whether a Podman engine runs rootless. Podman 4.3's Docker-API `/info` does not say so (its
/// `SecurityOptions` hold only seccomp; measured with Debian's 4.3.1 rootless), its own
/// `/libpod/info` does (`host.security.rootless`). bollard has no call for that path, so it is
/// asked through the engine's own connection (whatever its transport) as the raw body of a GET
/// whose path is replaced; within 5 s, at most 1 MiB; `None` when it cannot tell.
async fn podman_rootless(engine: &super::Engine) -> Option<bool> {
    use futures_util::StreamExt;
    let docker = engine.docker.clone().with_request_modifier(|mut req| {
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static(LIBPOD_INFO));
        if let Ok(uri) = hyper::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        req
    });
    let read = async {
        let mut body = docker.export_image("libpod-info");
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk.ok()?);
            if buf.len() > 1 << 20 {
                return None;
            }
        }
        Some(buf)
    };
    let buf = tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .ok()??;
    let info: serde_json::Value = serde_json::from_slice(&buf).ok()?;
    let rootless = info.pointer("/host/security/rootless")?.as_bool();
    tracing::debug!(engine = %engine.name, ?rootless, "podman's libpod info");
    rootless
}

/// Whether a builder's builds are sandboxed, and why, in words for `status` and `doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub on: bool,
    pub why: String,
}

/// Why an emulated builder cannot have the sandbox (measured under qemu-user 7.2).
pub const EMULATED_WHY: &str = "the builder's nix-daemon runs under qemu-user, which rejects \
     clone's namespace flags (\"cloning builder process: Invalid argument\"), so Nix's sandbox \
     cannot start there";

/// `sandbox = true` for a builder whose container runs under emulation (`emulated` here:
/// [`BuilderSpec::runs_under_emulation`](super::BuilderSpec::runs_under_emulation), not an
/// emulated system in the native builder), refused before anything is created.
pub fn refusal(setting: Sandbox, emulated: bool, system: &str) -> Option<String> {
    (setting == Sandbox::On && emulated).then(|| {
        format!(
            "sandbox = true, but the {system} builder is emulated in a container of its own \
             (emulation = \"container\"): {EMULATED_WHY}; set `emulation = \"native-builder\"` \
             for builders.\"{system}\" to build it in the native builder, sandboxed as that \
             builder is, or `sandbox = false` (or \"auto\") to build it unsandboxed"
        )
    })
}

/// The decision for a builder with `setting`, from the engine's facts. `true` is on (an
/// emulated builder never gets this far: [`refusal`]); "auto" is on only where the sandbox
/// costs the host nothing.
pub fn decide(setting: Sandbox, emulated: bool, facts: &EngineFacts) -> Decision {
    let d = |on: bool, why: String| Decision { on, why };
    match setting {
        Sandbox::On => d(true, "sandbox = true".into()),
        Sandbox::Off => d(false, "sandbox = false".into()),
        Sandbox::Auto if emulated => d(false, format!("auto: emulated; {EMULATED_WHY}")),
        Sandbox::Auto if facts.unknown => d(
            false,
            "auto: the engine's info could not be read, so it is not known to be in a VM or \
             user-namespaced"
                .into(),
        ),
        Sandbox::Auto => match (&facts.vm, facts.user_namespaced) {
            (Some(vm), _) => d(
                true,
                format!("auto: the engine runs in {vm}, whose VM is the boundary"),
            ),
            (None, true) => d(
                true,
                "auto: the engine is user-namespaced (rootless or userns-remap): the \
                 container's root is not the host's"
                    .into(),
            ),
            (None, false) => d(
                false,
                "auto: a rootful engine on its host: the sandbox needs an unmasked /proc, \
                 whose /proc/sys the container's root (the host's root) could then write; set \
                 sandbox = true to accept that"
                    .into(),
            ),
        },
    }
}

/// Syscalls nixdock's profile refuses (EPERM), for the builder's own processes and, since a
/// filter is inherited, for every build (Nix's `filter-syscalls` filter comes on top). They
/// are those Docker's default profile refuses to a container without capabilities, minus what
/// Nix's sandbox needs (clone/unshare with namespace flags, mount, umount2, pivot_root,
/// sethostname, setdomainname, chroot; and setns, which Nix uses to add paths to a running
/// sandbox and which enters only namespaces the caller already holds): kernel and host administration, key rings, BPF,
/// performance counters, userfaultfd, io_uring, cross-process memory access and the new mount
/// API (the sandbox mounts with mount(2)). `seccomp=unconfined` would let every build reach
/// them: measured, a sandboxed build could call keyctl, bpf, add_key and perf_event_open (the
/// kernel parsed their arguments) under unconfined, and got EPERM under this profile.
const REFUSED_SYSCALLS: &[&str] = &[
    "_sysctl",
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pidfd_getfd",
    "process_vm_readv",
    "process_vm_writev",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// nixdock's seccomp profile for a sandboxed builder, in the engine's profile format (what
/// `--security-opt seccomp=FILE` sends): everything else allowed, the [`REFUSED_SYSCALLS`]
/// refused with EPERM, for the engine's architecture and its 32-bit ones (i686 builds).
pub fn seccomp_profile() -> String {
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
        ],
        "syscalls": [
            {"names": REFUSED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
        ],
    })
    .to_string()
}

/// What a sandboxed builder's container gets: nixdock's seccomp profile, and no masked or
/// read-only paths (Docker's `systempaths=unconfined`, which its CLI turns into these two empty
/// lists; the daemon keeps its defaults only when the lists are absent).
///
/// Podman's Docker API reads `seccomp=` as a file on the engine's host ("opening seccomp profile
/// failed: open {…}: file name too long"), which nixdock cannot place on a remote engine: there
/// the builder runs `seccomp=unconfined`, and builds keep Nix's own `filter-syscalls` filter.
pub fn apply(hc: &mut bollard::models::HostConfig, podman: bool) {
    let seccomp = if podman {
        "seccomp=unconfined".to_string()
    } else {
        format!("seccomp={}", seccomp_profile())
    };
    let opts = hc.security_opt.get_or_insert_with(Vec::new);
    opts.push(seccomp);
    if podman {
        // Podman ignores empty lists below; this is its own way to say the same.
        opts.push("unmask=ALL".into());
    }
    hc.masked_paths = Some(Vec::new());
    hc.readonly_paths = Some(Vec::new());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(os: &str, name: &str, sec: &[&str]) -> bollard::models::SystemInfo {
        bollard::models::SystemInfo {
            operating_system: Some(os.into()),
            name: Some(name.into()),
            security_options: Some(sec.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn auto_is_on_in_a_vm_or_user_namespace_only() {
        let host = EngineFacts::from_info(
            &info(
                "Debian GNU/Linux 12 (bookworm)",
                "vm",
                &["name=seccomp,profile=default"],
            ),
            false,
        );
        assert_eq!(host, EngineFacts::default());
        assert!(!decide(Sandbox::Auto, false, &host).on);
        assert!(decide(Sandbox::Auto, false, &host).why.contains("rootful"));
        assert!(decide(Sandbox::On, false, &host).on);
        for (os, name) in [
            ("Docker Desktop", "docker-desktop"),
            ("OrbStack", "orbstack"),
            ("Ubuntu 24.04 LTS", "colima"),
            ("Ubuntu 24.04 LTS", "colima-work"),
            ("Alpine Linux v3.20", "lima-rancher-desktop"),
        ] {
            let f = EngineFacts::from_info(&info(os, name, &[]), false);
            assert!(f.vm.is_some(), "{name}");
            assert!(decide(Sandbox::Auto, false, &f).on, "{name}");
            assert!(!decide(Sandbox::Off, false, &f).on, "{name}");
            // Emulated: never under "auto".
            assert!(!decide(Sandbox::Auto, true, &f).on, "{name}");
        }
        for sec in ["name=userns", "name=rootless"] {
            let f = EngineFacts::from_info(&info("Debian", "vm", &["name=seccomp", sec]), false);
            assert!(decide(Sandbox::Auto, false, &f).on, "{sec}");
        }
        let mac = EngineFacts::from_info(&info("Fedora CoreOS", "localhost", &[]), true);
        assert!(decide(Sandbox::Auto, false, &mac).on);
        let unknown = EngineFacts {
            unknown: true,
            ..Default::default()
        };
        assert!(!decide(Sandbox::Auto, false, &unknown).on);
    }

    #[test]
    fn true_for_an_emulated_builder_is_refused_naming_the_sandbox() {
        let why = refusal(Sandbox::On, true, "aarch64-linux").unwrap();
        assert!(why.contains("sandbox = true"), "{why}");
        assert!(why.contains("qemu-user"), "{why}");
        assert_eq!(refusal(Sandbox::Auto, true, "aarch64-linux"), None);
        assert_eq!(refusal(Sandbox::On, false, "x86_64-linux"), None);
    }

    #[test]
    fn profile_refuses_the_listed_syscalls_and_allows_what_the_sandbox_needs() {
        let p: serde_json::Value = serde_json::from_str(&seccomp_profile()).unwrap();
        assert_eq!(p["defaultAction"], "SCMP_ACT_ALLOW");
        let names: Vec<&str> = p["syscalls"][0]["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(names.contains(&"keyctl") && names.contains(&"bpf"));
        for needed in [
            "clone",
            "clone3",
            "unshare",
            "mount",
            "umount2",
            "pivot_root",
            "sethostname",
            "setdomainname",
            "chroot",
            "seccomp",
        ] {
            assert!(!names.contains(&needed), "{needed} is refused");
        }
    }
}
