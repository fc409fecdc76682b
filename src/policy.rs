//! The decision for each `try`: decline, accept on which builder, or postpone. The hook sees
//! every derivation Nix builds, so deciding must not touch Docker or SSH — only the request,
//! the parent's settings, nixdock's config, the machines of Nix's `builders`, and a snapshot of
//! busy slots the caller takes from the slot lock files.

use std::collections::BTreeSet;

use hook_protocol::hook::{Settings, TryRequest};

use hook_protocol::machines::Machine;

use crate::builder::BuilderSpec;

/// Features that need more than a builder container can give.
pub const CA_DERIVATIONS: &str = "ca-derivations";

/// A place a derivation can be built: a Docker builder (index into the served specs) or one
/// of the user's own machines from `builders` (index into those).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Docker(usize),
    Static(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The host builds it itself; nothing to say.
    DeclineLocal,
    /// Nobody here can build it; `reason` is shown to the user (warn level) when the host
    /// cannot build it either.
    Decline { reason: String, tell_user: bool },
    /// Build it on one of these, which had a free slot, best first (least busy slots per
    /// unit of speed factor). Try them in order.
    Offload { candidates: Vec<Target> },
    /// Machines for it exist, but every slot of every one is taken.
    Busy,
}

/// Everything the decision may build on, and how loaded each is. `busy` is a snapshot of the
/// held slots (the caller counts lock files); `skip` leaves out static machines already found
/// unusable by this process.
pub struct Pool<'a> {
    pub docker: &'a [BuilderSpec],
    pub statics: &'a [Machine],
    pub busy: &'a dyn Fn(Target) -> u32,
    pub skip: &'a dyn Fn(usize) -> bool,
}

impl Pool<'_> {
    fn max_jobs(&self, t: Target) -> u32 {
        match t {
            Target::Docker(i) => self.docker[i].max_jobs,
            Target::Static(i) => self.statics[i].max_jobs,
        }
    }

    fn speed(&self, t: Target) -> f32 {
        match t {
            // Docker builders: the config's speed-factor, default 1.
            Target::Docker(i) => self.docker[i].speed_factor,
            Target::Static(i) => self.statics[i].speed_factor,
        }
    }

    /// Static machines that serve the request's system and features, as Nix chooses them:
    /// the system (or `builtin`), every required feature supported or mandatory, every
    /// mandatory feature required, and at least one job.
    fn static_candidates(&self, req: &TryRequest) -> Vec<Target> {
        self.statics
            .iter()
            .enumerate()
            .filter(|(i, m)| {
                !(self.skip)(*i)
                    && m.max_jobs > 0
                    && m.system_supported(&req.needed_system)
                    && m.all_supported(&req.required_features)
                    && m.mandatory_met(&req.required_features)
            })
            .map(|(i, _)| Target::Static(i))
            .collect()
    }

    /// Whether the target runs the system under emulation (a user's machine never does).
    fn emulated(&self, t: Target) -> bool {
        match t {
            Target::Docker(i) => self.docker[i].emulated,
            Target::Static(_) => false,
        }
    }

    /// The candidates with a free slot, native ones first (an emulated builder only when no
    /// native one has a free slot), then least loaded first: lowest busy/speed, then higher
    /// speed, then fewer busy slots (Nix's order); Docker builders first on a full tie.
    fn rank(&self, all: Vec<Target>) -> Vec<Target> {
        let mut free: Vec<(Target, u32)> = all
            .into_iter()
            .map(|t| (t, (self.busy)(t)))
            .filter(|(t, busy)| *busy < self.max_jobs(*t))
            .collect();
        free.sort_by(|(a, la), (b, lb)| {
            let (sa, sb) = (self.speed(*a), self.speed(*b));
            self.emulated(*a)
                .cmp(&self.emulated(*b))
                .then((*la as f32 / sa).total_cmp(&(*lb as f32 / sb)))
                .then(sb.total_cmp(&sa))
                .then(la.cmp(lb))
        });
        free.into_iter().map(|(t, _)| t).collect()
    }
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

/// Whether any of the user's machines could take this derivation (ignoring load): the hook's
/// fast path declines builds the host can do itself only when none could, as Nix's own hook
/// offers them to remote machines first.
pub fn any_static_serves<'m>(
    req: &TryRequest,
    statics: impl IntoIterator<Item = &'m Machine>,
) -> bool {
    statics.into_iter().any(|m| {
        m.max_jobs > 0
            && m.system_supported(&req.needed_system)
            && m.all_supported(&req.required_features)
            && m.mandatory_met(&req.required_features)
    })
}

/// What the calling Nix could do with a `try` itself, answered once per `try` and passed to
/// everything that asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// Its `system`/`extra-platforms` and `system-features` cover the derivation
    /// ([`host_can_build`]).
    pub can_build: bool,
    /// `max-jobs = 0`: it builds nothing itself.
    pub max_jobs_zero: bool,
}

impl Host {
    pub fn of(req: &TryRequest, settings: &Settings) -> Host {
        Host {
            can_build: host_can_build(req, settings),
            max_jobs_zero: settings.max_jobs() == Some(0),
        }
    }

    /// The parent builds the derivation itself if the hook declines it.
    pub fn builds_it(self) -> bool {
        self.can_build && !self.max_jobs_zero
    }
}

pub fn decide(req: &TryRequest, host: Host, offload_local: bool, pool: &Pool<'_>) -> Decision {
    let served = pool.docker;
    let statics = pool.static_candidates(req);
    if host.builds_it() && !offload_local {
        // Like Nix's hook: a free remote machine first, else the host.
        if statics.is_empty() || req.required_features.contains(CA_DERIVATIONS) {
            return Decision::DeclineLocal;
        }
        return match pool.rank(statics) {
            free if free.is_empty() => Decision::DeclineLocal,
            free => Decision::Offload { candidates: free },
        };
    }
    if req.required_features.contains(CA_DERIVATIONS) {
        return Decision::Decline {
            reason: format!(
                "nixdock cannot build '{}': it has floating content-addressed outputs (ca-derivations), which nixdock cannot register yet; build it locally or with Nix's own remote builders",
                req.drv_path
            ),
            tell_user: !host.builds_it(),
        };
    }
    if req.needed_system == "builtin" {
        // Builtins (fetchurl, …) run inside any Nix; with max-jobs 0 nothing else can run them.
        let docker: Vec<Target> = match served.iter().position(|s| !s.emulated) {
            Some(i) => vec![Target::Docker(i)],
            None if !served.is_empty() => vec![Target::Docker(0)],
            None => vec![],
        };
        let all: Vec<Target> = docker.into_iter().chain(statics).collect();
        if all.is_empty() {
            return Decision::Decline {
                reason: "nixdock serves no builder for builtin derivations".into(),
                tell_user: true,
            };
        }
        return match pool.rank(all) {
            free if free.is_empty() => Decision::Busy,
            free => Decision::Offload { candidates: free },
        };
    }
    let wanted: &BTreeSet<String> = &req.required_features;
    let same_system: Vec<usize> = served
        .iter()
        .enumerate()
        .filter(|(_, s)| s.system == req.needed_system)
        .map(|(i, _)| i)
        .collect();
    let docker: Vec<Target> = same_system
        .iter()
        .filter(|&&i| wanted.iter().all(|f| served[i].features.contains(f)))
        .map(|&i| Target::Docker(i))
        .collect();
    if !docker.is_empty() || !statics.is_empty() {
        let all: Vec<Target> = docker.into_iter().chain(statics).collect();
        return match pool.rank(all) {
            free if free.is_empty() => Decision::Busy,
            free => Decision::Offload { candidates: free },
        };
    }
    let mut reason = if same_system.is_empty() {
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
        missing_features(req, served, &same_system)
    };
    if !pool.statics.is_empty() {
        reason.push_str(&format!(
            "; none of the {} machine(s) in Nix's `builders` setting serves '{}' with {{{}}} (or they were unreachable)",
            pool.statics.len(),
            req.needed_system,
            wanted.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
        ));
    }
    if host.can_build && host.max_jobs_zero {
        // Nix itself then says only "unable to start any build".
        reason.push_str("; this host could build it but builds nothing itself (max-jobs = 0)");
    }
    Decision::Decline {
        reason,
        // Told whenever nobody builds it: the host's own `try`s that it then builds stay quiet.
        tell_user: !host.builds_it(),
    }
}

/// `{a, b}`, as Nix writes a feature set.
fn feature_set<'s>(features: impl IntoIterator<Item = &'s str>) -> String {
    format!(
        "{{{}}}",
        features.into_iter().collect::<Vec<_>>().join(", ")
    )
}

/// Which required features the system's builders (`same_system`, indices into `served`) lack,
/// and what each offers: one builder in words, several (a pool) each under its engine.
fn missing_features(req: &TryRequest, served: &[BuilderSpec], same_system: &[usize]) -> String {
    let lacks = |s: &BuilderSpec| -> Vec<&str> {
        req.required_features
            .iter()
            .filter(|f| !s.features.contains(f))
            .map(String::as_str)
            .collect()
    };
    let offers = |s: &BuilderSpec| feature_set(s.features.iter().map(String::as_str));
    if let [i] = same_system {
        let s = &served[*i];
        return format!(
            "nixdock's {} builder lacks the system features {} required by '{}' (it offers {}); set `features` for it in the nixdock config",
            req.needed_system,
            feature_set(lacks(s)),
            req.drv_path,
            offers(s)
        );
    }
    let each: Vec<String> = same_system
        .iter()
        .map(|&i| {
            let s = &served[i];
            format!(
                "on engine {} it lacks {} and offers {}",
                s.engine,
                feature_set(lacks(s)),
                offers(s)
            )
        })
        .collect();
    format!(
        "nixdock's {} builders lack system features required by '{}' ({}): {}; set `features` for one of them in the nixdock config",
        req.needed_system,
        req.drv_path,
        feature_set(req.required_features.iter().map(String::as_str)),
        each.join("; ")
    )
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
            drv_path: "/nix/store/00000000000000000000000000000000-x.drv"
                .parse()
                .unwrap(),
            required_features: features.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Docker builders only, all idle.
    fn dk(
        req: &TryRequest,
        settings: &Settings,
        offload: bool,
        served: &[BuilderSpec],
    ) -> Decision {
        decide(
            req,
            Host::of(req, settings),
            offload,
            &Pool {
                docker: served,
                statics: &[],
                busy: &|_| 0,
                skip: &|_| false,
            },
        )
    }

    fn machines(text: &str) -> Vec<Machine> {
        hook_protocol::machines::parse_text(&BTreeSet::from(["x86_64-linux".to_string()]), text)
            .unwrap()
    }

    fn with(
        req: &TryRequest,
        max_jobs: &str,
        served: &[BuilderSpec],
        statics: &[Machine],
        busy: &[(Target, u32)],
        skip: &[usize],
    ) -> Decision {
        let busy: std::collections::HashMap<Target, u32> = busy.iter().copied().collect();
        decide(
            req,
            Host::of(req, &settings(max_jobs)),
            false,
            &Pool {
                docker: served,
                statics,
                busy: &|t| busy.get(&t).copied().unwrap_or(0),
                skip: &|i| skip.contains(&i),
            },
        )
    }

    #[test]
    fn static_machines_serve_systems_no_docker_builder_does() {
        let st = machines("ssh-ng://a riscv64-linux - 2 ; ssh-ng://b riscv64-linux - 1 1 kvm");
        let r = req("riscv64-linux", &[]);
        assert_eq!(
            with(&r, "1", &served(), &st, &[], &[]),
            Decision::Offload {
                candidates: vec![Target::Static(0), Target::Static(1)]
            }
        );
        // Feature kvm: only b supports it.
        assert_eq!(
            with(
                &req("riscv64-linux", &["kvm"]),
                "1",
                &served(),
                &st,
                &[],
                &[]
            ),
            Decision::Offload {
                candidates: vec![Target::Static(1)]
            }
        );
        // A skipped (unreachable) machine is left out; all busy → Busy.
        assert_eq!(
            with(&r, "1", &served(), &st, &[(Target::Static(1), 1)], &[0]),
            Decision::Busy
        );
        let Decision::Decline { reason, tell_user } = with(&r, "1", &served(), &st, &[], &[0, 1])
        else {
            panic!()
        };
        assert!(tell_user && reason.contains("builders"), "{reason}");
    }

    #[test]
    fn mandatory_features_must_be_required() {
        let st = machines("ssh-ng://a riscv64-linux - 1 1 - benchmark");
        assert!(matches!(
            with(&req("riscv64-linux", &[]), "1", &served(), &st, &[], &[]),
            Decision::Decline { .. }
        ));
        assert_eq!(
            with(
                &req("riscv64-linux", &["benchmark"]),
                "1",
                &served(),
                &st,
                &[],
                &[]
            ),
            Decision::Offload {
                candidates: vec![Target::Static(0)]
            }
        );
    }

    #[test]
    fn least_load_per_speed_wins_across_kinds() {
        // Docker x86_64 builder (speed 1) and a static x86_64 machine, speed 2, 4 jobs.
        let st = machines("ssh-ng://fast x86_64-linux - 4 2");
        let r = req("x86_64-linux", &[]);
        let s = served();
        // Both idle: equal load 0; the faster one first.
        assert_eq!(
            with(&r, "0", &s, &st, &[], &[]),
            Decision::Offload {
                candidates: vec![Target::Static(0), Target::Docker(0)]
            }
        );
        // Static has 3 busy (3/2 = 1.5), Docker 1 busy (1/1 = 1): Docker first.
        assert_eq!(
            with(
                &r,
                "0",
                &s,
                &st,
                &[(Target::Static(0), 3), (Target::Docker(0), 1)],
                &[]
            ),
            Decision::Offload {
                candidates: vec![Target::Docker(0), Target::Static(0)]
            }
        );
        // Static full: only Docker.
        assert_eq!(
            with(&r, "0", &s, &st, &[(Target::Static(0), 4)], &[]),
            Decision::Offload {
                candidates: vec![Target::Docker(0)]
            }
        );
    }

    #[test]
    fn docker_speed_factor_from_the_config_counts() {
        let st = machines("ssh-ng://box x86_64-linux - 4 2");
        let fast = BuilderConfig {
            speed_factor: Some(4.0),
            ..Default::default()
        };
        let s = vec![BuilderSpec::from_config(
            "id",
            "x86_64-linux",
            &fast,
            "x86_64",
        )];
        // Docker 2 busy / 4 = 0.5 beats static 2 busy / 2 = 1.
        assert_eq!(
            with(
                &req("x86_64-linux", &[]),
                "0",
                &s,
                &st,
                &[(Target::Docker(0), 2), (Target::Static(0), 2)],
                &[]
            ),
            Decision::Offload {
                candidates: vec![Target::Docker(0), Target::Static(0)]
            }
        );
    }

    #[test]
    fn native_builders_come_first_and_emulation_only_when_every_native_one_is_full() {
        use crate::builder::provision::{EnginePlace, Publish};
        let cfg = crate::config::Config::default();
        let place = |name: &str, arch: &str, speed: Option<f32>| EnginePlace {
            name: name.into(),
            arch: arch.into(),
            local: false,
            publish: Publish::Nothing,
            max_jobs: Some(2),
            speed_factor: speed,
            systems: Some(vec!["aarch64-linux".into()]),
        };
        // An x86_64 engine emulating aarch64 (listed first, and much faster) and an arm64 one.
        let mut s = BuilderSpec::on_engine(&cfg, "id", &place("amd", "x86_64", Some(8.0)));
        s.extend(BuilderSpec::on_engine(
            &cfg,
            "id",
            &place("arm", "aarch64", None),
        ));
        assert!(s[0].emulated && !s[1].emulated);
        assert_ne!(s[0].container_name(), s[1].container_name());
        assert_eq!(s[1].container_name(), "nixdock-id-arm-aarch64-linux");
        assert_eq!(s[0].max_jobs, 2, "the engine's max-jobs caps its builders");
        let r = req("aarch64-linux", &[]);
        assert_eq!(
            with(&r, "1", &s, &[], &[(Target::Docker(1), 1)], &[]),
            Decision::Offload {
                candidates: vec![Target::Docker(1), Target::Docker(0)]
            },
            "native first, however busy it is, while it has a free slot"
        );
        assert_eq!(
            with(&r, "1", &s, &[], &[(Target::Docker(1), 2)], &[]),
            Decision::Offload {
                candidates: vec![Target::Docker(0)]
            },
            "emulated once the native builder is full"
        );
        assert_eq!(
            with(
                &r,
                "1",
                &s,
                &[],
                &[(Target::Docker(0), 2), (Target::Docker(1), 2)],
                &[]
            ),
            Decision::Busy
        );
    }

    #[test]
    fn host_builds_go_to_free_static_machines_first_as_nix_does() {
        let st = machines("ssh-ng://box x86_64-linux - 1");
        let r = req("x86_64-linux", &[]);
        assert_eq!(
            with(&r, "1", &served(), &st, &[], &[]),
            Decision::Offload {
                candidates: vec![Target::Static(0)]
            }
        );
        assert_eq!(
            with(&r, "1", &served(), &st, &[(Target::Static(0), 1)], &[]),
            Decision::DeclineLocal
        );
        assert!(any_static_serves(&r, &st));
        assert!(!any_static_serves(&req("aarch64-linux", &[]), &st));
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
            dk(&req("x86_64-linux", &[]), &settings("1"), false, &s),
            Decision::DeclineLocal
        );
        assert_eq!(
            dk(&req("i686-linux", &[]), &settings("1"), false, &s),
            Decision::DeclineLocal
        );
        assert_eq!(
            dk(&req("x86_64-linux", &[]), &settings("0"), false, &s),
            Decision::Offload {
                candidates: vec![Target::Docker(0)]
            }
        );
        assert_eq!(
            dk(&req("x86_64-linux", &[]), &settings("1"), true, &s),
            Decision::Offload {
                candidates: vec![Target::Docker(0)]
            }
        );
    }

    #[test]
    fn foreign_systems_go_to_their_builder() {
        assert_eq!(
            dk(
                &req("aarch64-linux", &["big-parallel"]),
                &settings("1"),
                false,
                &served()
            ),
            Decision::Offload {
                candidates: vec![Target::Docker(1)]
            }
        );
    }

    #[test]
    fn missing_features_and_systems_are_explained() {
        let Decision::Decline { reason, tell_user } = dk(
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
            dk(&req("riscv64-linux", &[]), &settings("1"), false, &served())
        else {
            panic!()
        };
        assert!(
            reason.contains("riscv64-linux") && reason.contains("aarch64-linux"),
            "{reason}"
        );
    }

    /// The host has the feature but builds nothing (max-jobs 0), no builder has it: Nix says
    /// only "unable to start any build", so the user is told why; when the host builds it
    /// (offload-local, max-jobs 1) nothing is said.
    #[test]
    fn a_feature_only_the_idle_host_has_is_told() {
        let r = req("x86_64-linux", &["benchmark", "nixos-tset"]);
        let mut s = settings("0");
        s.0.insert("system-features".into(), "benchmark nixos-tset".into());
        let Decision::Decline { reason, tell_user } = dk(&r, &s, false, &served()) else {
            panic!()
        };
        assert!(tell_user, "{reason}");
        assert!(
            reason.contains("x86_64-linux builder lacks the system features {nixos-tset}"),
            "{reason}"
        );
        assert!(reason.contains("(it offers {"), "{reason}");
        assert!(reason.contains("max-jobs = 0"), "{reason}");
        s.0.insert("max-jobs".into(), "1".into());
        let Decision::Decline { tell_user, .. } = dk(&r, &s, true, &served()) else {
            panic!()
        };
        assert!(!tell_user);
    }

    /// In a pool, each builder of the system is named with what it lacks and offers.
    #[test]
    fn a_missing_feature_names_every_builder_of_the_system() {
        let mut s = served();
        let mut e2 = s[0].clone();
        e2.engine = "e2".into();
        e2.features = vec!["big-parallel".into()];
        s.push(e2);
        let Decision::Decline { reason, tell_user } =
            dk(&req("x86_64-linux", &["kvm"]), &settings("0"), false, &s)
        else {
            panic!()
        };
        assert!(tell_user);
        assert!(reason.contains("builders lack system features"), "{reason}");
        assert!(
            reason.contains("on engine default it lacks {kvm}"),
            "{reason}"
        );
        assert!(
            reason.contains("on engine e2 it lacks {kvm} and offers {big-parallel}"),
            "{reason}"
        );
    }

    #[test]
    fn ca_derivations_are_declined_with_a_reason() {
        let Decision::Decline { reason, .. } = dk(
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
            dk(&req("builtin", &[]), &settings("1"), false, &served()),
            Decision::DeclineLocal
        );
        assert_eq!(
            dk(&req("builtin", &[]), &settings("0"), false, &served()),
            Decision::Offload {
                candidates: vec![Target::Docker(0)]
            }
        );
    }
}
