//! Which Nix systems a Docker engine can build for, and whether that takes emulation.
//! Decided from the requested system against the engine's architecture — never from an
//! image's label, which `docker import` gets wrong — and confirmed with `uname -m` inside the
//! container when it is provisioned.

use std::path::Path;

/// The host's architecture as `uname -m` names it. Until a build is accepted the engine is
/// asked nothing, so its architecture is taken to be ours (true for a local dockerd, Docker
/// Desktop and OrbStack alike).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "x86_64",
        "aarch64" => "aarch64",
        other => other,
    }
}

/// Whether the engine shares this kernel, so this machine's binfmt_misc is the one that counts.
pub const ENGINE_IS_LOCAL: bool = cfg!(target_os = "linux");

/// What `uname -m` says inside a container that builds for `system`, if it is a Linux system
/// we know.
pub fn container_arch(system: &str) -> Option<&'static str> {
    Some(match system {
        "x86_64-linux" | "i686-linux" => "x86_64",
        "aarch64-linux" => "aarch64",
        "armv7l-linux" | "armv6l-linux" => "armv7l",
        "riscv64-linux" => "riscv64",
        "powerpc64le-linux" => "ppc64le",
        "s390x-linux" => "s390x",
        _ => return None,
    })
}

/// The Nix system an engine of `engine_arch` runs natively, whose builder serves the emulated
/// systems with `emulation = "native-builder"`.
pub fn native_system(engine_arch: &str) -> Option<&'static str> {
    match engine_arch {
        "x86_64" => Some("x86_64-linux"),
        "aarch64" => Some("aarch64-linux"),
        _ => None,
    }
}

/// Docker's platform for a Nix system: what a pulled image must be for (a multi-platform
/// image, like nixos/nix, has one per architecture).
pub fn docker_platform(system: &str) -> Option<&'static str> {
    Some(match system {
        "x86_64-linux" | "i686-linux" => "linux/amd64",
        "aarch64-linux" => "linux/arm64",
        "armv7l-linux" | "armv6l-linux" => "linux/arm/v7",
        "riscv64-linux" => "linux/riscv64",
        "powerpc64le-linux" => "linux/ppc64le",
        "s390x-linux" => "linux/s390x",
        _ => return None,
    })
}

/// The binfmt_misc entry name `qemu-user-static` registers for a container architecture.
fn binfmt_name(arch: &str) -> &str {
    match arch {
        "armv7l" => "arm",
        "ppc64le" => "ppc64le",
        other => other,
    }
}

/// Whether a container for `system` runs under emulation on an engine of `engine_arch`.
pub fn is_emulated(system: &str, engine_arch: &str) -> bool {
    match container_arch(system) {
        Some(a) => a != engine_arch && !(a == "armv7l" && engine_arch == "aarch64"),
        None => true,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum EmulationSupport {
    Native,
    /// Registered with the F flag, so it works inside containers.
    Binfmt,
    /// The engine runs in a VM we cannot inspect (Docker Desktop, OrbStack, colima): trust it
    /// and let the in-container `uname -m` check decide.
    EngineVm,
    /// binfmt_misc is not visible from here.
    Unknown,
    Missing(String),
}

/// Checks that `system` can run on this engine. `engine_is_local` is true when the engine
/// shares our kernel (a Linux host's own dockerd), so binfmt_misc here is the one that counts.
pub fn emulation_support(
    system: &str,
    engine_arch: &str,
    engine_is_local: bool,
) -> EmulationSupport {
    let Some(arch) = container_arch(system) else {
        return EmulationSupport::Missing(format!(
            "nixdock does not know how to run {system} in a Linux container"
        ));
    };
    if !is_emulated(system, engine_arch) {
        return EmulationSupport::Native;
    }
    if !engine_is_local {
        return EmulationSupport::EngineVm;
    }
    check_binfmt(Path::new("/proc/sys/fs/binfmt_misc"), binfmt_name(arch))
}

fn check_binfmt(dir: &Path, name: &str) -> EmulationSupport {
    // Without binfmt_misc mounted here (inside a container, say) we cannot tell; the
    // `uname -m` check at provisioning decides then.
    if !dir.join("status").exists() && !dir.join("register").exists() {
        return EmulationSupport::Unknown;
    }
    let entry = dir.join(format!("qemu-{name}"));
    let how_to = "install qemu-user-static and binfmt-support (Debian/Ubuntu), or run \
                  `docker run --privileged --rm tonistiigi/binfmt --install all`";
    let Ok(text) = std::fs::read_to_string(&entry) else {
        return EmulationSupport::Missing(format!(
            "{} is not registered, so this machine cannot run {name} binaries: {how_to}",
            entry.display()
        ));
    };
    if !text.lines().any(|l| l.trim() == "enabled") {
        return EmulationSupport::Missing(format!(
            "{} is disabled: `echo 1 > {}`",
            entry.display(),
            entry.display()
        ));
    }
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .unwrap_or("")
        .trim();
    if !flags.contains('F') {
        return EmulationSupport::Missing(format!(
            "{} lacks the F (fix binary) flag, so it does not work inside containers: {how_to}",
            entry.display()
        ));
    }
    EmulationSupport::Binfmt
}

/// Systems served with no config: the engine's own, plus the other common Linux one when the
/// engine can emulate it.
pub fn default_systems(engine_arch: &str, engine_is_local: bool) -> Vec<String> {
    let mut out = Vec::new();
    for s in ["x86_64-linux", "aarch64-linux"] {
        match emulation_support(s, engine_arch, engine_is_local) {
            EmulationSupport::Missing(_) => {}
            _ => out.push(s.to_string()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulation_is_decided_by_the_system() {
        assert!(!is_emulated("x86_64-linux", "x86_64"));
        assert!(!is_emulated("i686-linux", "x86_64"));
        assert!(is_emulated("aarch64-linux", "x86_64"));
        assert!(is_emulated("x86_64-linux", "aarch64"));
        assert!(is_emulated("x86_64-darwin", "x86_64"));
    }

    #[test]
    fn binfmt_entry_states() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(check_binfmt(d.path(), "aarch64"), EmulationSupport::Unknown);
        std::fs::write(d.path().join("status"), "enabled\n").unwrap();
        assert!(matches!(
            check_binfmt(d.path(), "aarch64"),
            EmulationSupport::Missing(m) if m.contains("qemu-user-static")
        ));
        std::fs::write(
            d.path().join("qemu-aarch64"),
            "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POCF\n",
        )
        .unwrap();
        assert_eq!(check_binfmt(d.path(), "aarch64"), EmulationSupport::Binfmt);
        std::fs::write(
            d.path().join("qemu-aarch64"),
            "enabled\ninterpreter /x\nflags: P\n",
        )
        .unwrap();
        assert!(matches!(
            check_binfmt(d.path(), "aarch64"),
            EmulationSupport::Missing(m) if m.contains("F (fix binary)")
        ));
    }

    #[test]
    fn unknown_systems_are_refused() {
        assert!(matches!(
            emulation_support("x86_64-darwin", "x86_64", true),
            EmulationSupport::Missing(_)
        ));
    }
}
