//! The decision for each `try`: decline, accept on which builder, or postpone. The hook sees
//! every derivation Nix builds, so deciding must not touch Docker or SSH — only the request,
//! the parent's settings and nixdock's config (and, for an accept, slot lock files).

use std::collections::BTreeSet;

use hook_protocol::hook::{Settings, TryRequest};

use crate::builder::BuilderSpec;

/// Features that need more than a builder container can give.
pub const CA_DERIVATIONS: &str = "ca-derivations";

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The host builds it itself; nothing to say.
    DeclineLocal,
    /// Nobody here can build it; `reason` is shown to the user (warn level) when the host
    /// cannot build it either.
    Decline { reason: String, tell_user: bool },
    /// Build it on this builder (index into the served specs), if a slot is free.
    Offload { builder: usize },
}

/// What the parent could build itself (its `system`, `extra-platforms` and
/// `system-features`), as Nix's own `canBuildLocally` sees it.
pub fn host_can_build(req: &TryRequest, settings: &Settings) -> bool {
    let system_ok = req.needed_system == "builtin"
        || settings.system() == Some(req.needed_system.as_str())
        || settings
            .extra_platforms()
            .iter()
            .any(|p| p == &req.needed_system);
    let features = settings.system_features();
    system_ok && req.required_features.iter().all(|f| features.contains(f))
}

pub fn decide(
    req: &TryRequest,
    settings: &Settings,
    offload_local: bool,
    served: &[BuilderSpec],
) -> Decision {
    let max_jobs_zero = settings.max_jobs() == Some(0);
    let local = host_can_build(req, settings);
    if local && !max_jobs_zero && !offload_local {
        return Decision::DeclineLocal;
    }
    if req.required_features.contains(CA_DERIVATIONS) {
        return Decision::Decline {
            reason: format!(
                "nixdock cannot build '{}': it has floating content-addressed outputs (ca-derivations), which nixdock cannot register yet; build it locally or with Nix's own remote builders",
                req.drv_path
            ),
            tell_user: !local,
        };
    }
    if req.needed_system == "builtin" {
        // Builtins (fetchurl, …) run inside any Nix; with max-jobs 0 nothing else can run them.
        if !max_jobs_zero && !offload_local {
            return Decision::DeclineLocal;
        }
        return match served.iter().position(|s| !s.emulated) {
            Some(i) => Decision::Offload { builder: i },
            None if !served.is_empty() => Decision::Offload { builder: 0 },
            None => Decision::Decline {
                reason: "nixdock serves no builder for builtin derivations".into(),
                tell_user: true,
            },
        };
    }
    let wanted: &BTreeSet<String> = &req.required_features;
    let same_system: Vec<usize> = served
        .iter()
        .enumerate()
        .filter(|(_, s)| s.system == req.needed_system)
        .map(|(i, _)| i)
        .collect();
    if let Some(&i) = same_system
        .iter()
        .find(|&&i| wanted.iter().all(|f| served[i].features.contains(f)))
    {
        return Decision::Offload { builder: i };
    }
    let reason = if same_system.is_empty() {
        let systems: Vec<&str> = served.iter().map(|s| s.system.as_str()).collect();
        format!(
            "nixdock has no builder for '{}' (needed by '{}'); it serves: {}. Add a [builders.\"{}\"] table to the nixdock config.",
            req.needed_system,
            req.drv_path,
            if systems.is_empty() {
                "nothing".to_string()
            } else {
                systems.join(", ")
            },
            req.needed_system
        )
    } else {
        let have = &served[same_system[0]].features;
        let missing: Vec<&str> = wanted
            .iter()
            .filter(|f| !have.contains(f))
            .map(String::as_str)
            .collect();
        format!(
            "nixdock's {} builder lacks the system features {{{}}} required by '{}' (it offers {{{}}}); set `features` for it in the nixdock config",
            req.needed_system,
            missing.join(", "),
            req.drv_path,
            have.join(", ")
        )
    };
    Decision::Decline {
        reason,
        tell_user: !local,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BuilderConfig;
    use std::collections::BTreeMap;

    fn settings(max_jobs: &str) -> Settings {
        let mut m = BTreeMap::new();
        m.insert("system".into(), "x86_64-linux".into());
        m.insert("extra-platforms".into(), "i686-linux".into());
        m.insert("system-features".into(), "benchmark big-parallel".into());
        m.insert("max-jobs".into(), max_jobs.into());
        Settings(m)
    }

    fn req(system: &str, features: &[&str]) -> TryRequest {
        TryRequest {
            am_willing: true,
            needed_system: system.into(),
            drv_path: "/nix/store/00000000000000000000000000000000-x.drv".into(),
            required_features: features.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn served() -> Vec<BuilderSpec> {
        ["x86_64-linux", "aarch64-linux"]
            .iter()
            .map(|s| BuilderSpec::from_config("id", s, &BuilderConfig::default(), "x86_64"))
            .collect()
    }

    #[test]
    fn host_systems_stay_local_unless_max_jobs_is_zero() {
        let s = served();
        assert_eq!(
            decide(&req("x86_64-linux", &[]), &settings("1"), false, &s),
            Decision::DeclineLocal
        );
        assert_eq!(
            decide(&req("i686-linux", &[]), &settings("1"), false, &s),
            Decision::DeclineLocal
        );
        assert_eq!(
            decide(&req("x86_64-linux", &[]), &settings("0"), false, &s),
            Decision::Offload { builder: 0 }
        );
        assert_eq!(
            decide(&req("x86_64-linux", &[]), &settings("1"), true, &s),
            Decision::Offload { builder: 0 }
        );
    }

    #[test]
    fn foreign_systems_go_to_their_builder() {
        assert_eq!(
            decide(
                &req("aarch64-linux", &["big-parallel"]),
                &settings("1"),
                false,
                &served()
            ),
            Decision::Offload { builder: 1 }
        );
    }

    #[test]
    fn missing_features_and_systems_are_explained() {
        let Decision::Decline { reason, tell_user } = decide(
            &req("aarch64-linux", &["kvm"]),
            &settings("1"),
            false,
            &served(),
        ) else {
            panic!()
        };
        assert!(tell_user);
        assert!(reason.contains("kvm"), "{reason}");
        let Decision::Decline { reason, .. } =
            decide(&req("riscv64-linux", &[]), &settings("1"), false, &served())
        else {
            panic!()
        };
        assert!(
            reason.contains("riscv64-linux") && reason.contains("aarch64-linux"),
            "{reason}"
        );
    }

    #[test]
    fn ca_derivations_are_declined_with_a_reason() {
        let Decision::Decline { reason, .. } = decide(
            &req("aarch64-linux", &["ca-derivations"]),
            &settings("1"),
            false,
            &served(),
        ) else {
            panic!()
        };
        assert!(reason.contains("content-addressed"));
    }

    #[test]
    fn builtins_only_with_max_jobs_zero() {
        assert_eq!(
            decide(&req("builtin", &[]), &settings("1"), false, &served()),
            Decision::DeclineLocal
        );
        assert_eq!(
            decide(&req("builtin", &[]), &settings("0"), false, &served()),
            Decision::Offload { builder: 0 }
        );
    }
}
