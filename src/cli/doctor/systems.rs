//! The served systems: can this machine run each, and is its image present.

use crate::builder::engine::DEFAULT_ENGINE;
use crate::builder::sandbox::{self, EngineFacts};
use crate::builder::systems::{self, EmulationSupport};
use crate::builder::{BuilderSpec, Engine};
use crate::config::Config;

use super::super::engines::PoolEngine;
use super::super::{builders, containers, host};
use super::Checks;

/// Every served system runs on its engine (natively or emulated) and has its image there: the
/// top-level engine's systems under their own names, another engine's as `<system> on <engine>`.
pub(super) async fn check_systems(
    c: &mut Checks,
    config: &Config,
    instance: Option<&str>,
    pool: &[PoolEngine],
) {
    let instance = instance.unwrap_or("none");
    let specs = builders::served(config, instance);
    let others: Vec<(&PoolEngine, &Engine, Vec<BuilderSpec>)> = pool
        .iter()
        .filter(|pe| pe.name() != DEFAULT_ENGINE)
        .filter_map(|pe| {
            let e = pe.engine.as_ref().ok()?;
            Some((pe, e, pe.served(config, instance)))
        })
        .collect();
    // An unreachable engine's systems are unknown (its check failed already).
    let some_unknown = pool
        .iter()
        .filter(|pe| pe.name() != DEFAULT_ENGINE)
        .any(|pe| pe.engine.is_err());
    if specs.is_empty() && others.iter().all(|(_, _, s)| s.is_empty()) && !some_unknown {
        c.fail(
            "systems",
            "no system is served: the config names none and this machine can emulate none",
            "install qemu-user-static and binfmt-support (or run `docker run --privileged --rm \
             tonistiigi/binfmt --install all`), or add a [builders.\"<system>\"] table",
        );
    }
    let default = pool
        .iter()
        .find(|pe| pe.name() == DEFAULT_ENGINE)
        .and_then(|pe| pe.engine.as_ref().ok());
    let default_facts = match default {
        Some(e) => Some(EngineFacts::ask(e).await),
        None => None,
    };
    for spec in &specs {
        let name = spec.system.as_str();
        match systems::emulation_support(name, host::host_arch(), host::ENGINE_IS_LOCAL) {
            EmulationSupport::Native => c.ok(name, "runs natively"),
            EmulationSupport::Binfmt => c.ok(
                name,
                match &spec.served_by {
                    Some(by) => format!(
                        "runs emulated (binfmt_misc qemu, flag F) in the {by} builder \
                         ({}), through its extra-platforms",
                        spec.container_name()
                    ),
                    None => "runs emulated (binfmt_misc qemu, flag F) in a container of its own"
                        .to_string(),
                },
            ),
            EmulationSupport::EngineVm => c.ok(name, "runs emulated by the engine's VM"),
            EmulationSupport::Unknown => c.warn(
                name,
                "emulated, but binfmt_misc is not visible here to tell whether it works",
                "mount binfmt_misc (mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc); \
                 the builder's own `uname -m` check decides at its first start",
            ),
            EmulationSupport::Missing(why) => {
                c.fail(name, format!("cannot run {name} containers here"), why)
            }
        }
        check_sandbox_setting(c, name, spec, default_facts.as_ref());
        check_unused_settings(c, name, spec, config);
        let Some(e) = default else { continue };
        check_image(c, name, spec, e, None).await;
    }
    for (pe, e, specs) in others {
        let facts = EngineFacts::ask(e).await;
        for spec in &specs {
            let name = format!("{} on {}", spec.system, pe.name());
            match systems::emulation_support(&spec.system, &e.arch, false) {
                EmulationSupport::Native => c.ok(
                    &name,
                    format!("runs natively on engine {} ({})", pe.name(), e.arch),
                ),
                EmulationSupport::Missing(why) => c.fail(
                    &name,
                    format!(
                        "cannot run {} containers on engine {}",
                        spec.system,
                        pe.name()
                    ),
                    why,
                ),
                _ => c.ok(
                    &name,
                    format!(
                        "runs emulated on engine {} ({}); the builder's `uname -m` check at \
                         its first start tells whether the engine's host can",
                        pe.name(),
                        e.arch
                    ),
                ),
            }
            check_sandbox_setting(c, &name, spec, Some(&facts));
            check_unused_settings(c, &name, spec, config);
            check_image(c, &name, spec, e, Some(pe.name())).await;
        }
    }
}

/// Whether a new container for `spec` would sandbox its builds, and why (an existing
/// container's own decision is in its labels: the builders-running checks show it);
/// `sandbox = true` on an emulated builder fails every build for it: say so before a build.
fn check_sandbox_setting(
    c: &mut Checks,
    name: &str,
    spec: &BuilderSpec,
    facts: Option<&EngineFacts>,
) {
    let check = format!("sandbox {name}");
    if let Some(why) = sandbox::refusal(spec.sandbox, spec.runs_under_emulation(), &spec.system) {
        c.fail(
            &check,
            why,
            format!(
                "set sandbox = false (or \"auto\") in [builders.\"{}\"]",
                spec.system
            ),
        );
        return;
    }
    let Some(facts) = facts else { return };
    let d = sandbox::decide(spec.sandbox, spec.runs_under_emulation(), facts);
    c.info(
        &check,
        format!(
            "a new builder's builds run {} Nix's sandbox: {}",
            if d.on { "in" } else { "without" },
            d.why
        ),
    );
}

/// An emulated system built by the native builder uses that builder's container settings: the
/// ones its own table sets do nothing, which the user should hear about.
fn check_unused_settings(c: &mut Checks, name: &str, spec: &BuilderSpec, config: &Config) {
    let Some(by) = &spec.served_by else { return };
    let Some(table) = config.builders.get(&spec.system) else {
        return;
    };
    let keys = table.container_keys();
    if keys.is_empty() {
        return;
    }
    c.warn(
        &format!("settings {name}"),
        format!(
            "{} in [builders.\"{}\"] not used: {} is built by the {by} builder \
             (emulation = \"native-builder\"), whose settings count",
            keys.join(", "),
            spec.system,
            spec.system
        ),
        format!(
            "move them to [builders.\"{by}\"], or set emulation = \"container\" in \
             [builders.\"{}\"] for a container of its own (no sandbox there)",
            spec.system
        ),
    );
}

/// " for <platform>", when the pull names one.
fn pull_platform(spec: &BuilderSpec) -> String {
    spec.platform
        .as_deref()
        .map(|p| format!(" for {p}"))
        .unwrap_or_default()
}

/// The spec's image is on engine `e` (`remote`: a pool engine's name, for the fix).
async fn check_image(
    c: &mut Checks,
    name: &str,
    spec: &BuilderSpec,
    e: &Engine,
    remote: Option<&str>,
) {
    let system = spec.system.as_str();
    match e.docker.inspect_image(&spec.local_image()).await {
        Ok(i) => c.ok(
            name,
            format!(
                "image {} present ({})",
                spec.image,
                i.id.as_deref()
                    .unwrap_or("?")
                    .trim_start_matches("sha256:")
                    .chars()
                    .take(12)
                    .collect::<String>()
            ),
        ),
        Err(err) if containers::is_not_found(&err) => c.warn(
            name,
            match remote {
                None => format!(
                    "image {} is not present locally; the hook pulls it at the first build{}",
                    spec.image,
                    pull_platform(spec)
                ),
                Some(engine) => format!(
                    "image {} is not on engine {engine}; the hook pulls it there at the \
                         first build{}",
                    spec.image,
                    pull_platform(spec)
                ),
            },
            format!(
                "docker pull{} {} (to check now that it can be pulled); without a \
                     registry: nixdock image build --from-debian --system {system}, then set \
                     image for {system} in the config",
                spec.platform
                    .as_deref()
                    .map(|p| format!(" --platform {p}"))
                    .unwrap_or_default(),
                spec.image
            ),
        ),
        Err(err) => c.fail(
            name,
            format!("cannot inspect image {}: {err}", spec.image),
            "see the engine's log",
        ),
    }
}
