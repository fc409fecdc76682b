//! The served systems: can this machine run each, and is its image present.

use crate::builder::Engine;
use crate::builder::systems::{self, EmulationSupport};
use crate::config::Config;

use super::super::{builders, containers, host};
use super::Checks;

/// Every served system runs here (natively or emulated) and has its image.
pub(super) async fn check_systems(
    c: &mut Checks,
    config: &Config,
    instance: Option<&str>,
    engine: Option<&Engine>,
) {
    let specs = builders::served(config, instance.unwrap_or("none"));
    if specs.is_empty() {
        c.fail(
            "systems",
            "no system is served: the config names none and this machine can emulate none",
            "install qemu-user-static and binfmt-support (or run `docker run --privileged --rm \
             tonistiigi/binfmt --install all`), or add a [builders.\"<system>\"] table",
        );
    }
    for spec in &specs {
        let name = spec.system.as_str();
        match systems::emulation_support(name, host::host_arch(), host::ENGINE_IS_LOCAL) {
            EmulationSupport::Native => c.ok(name, "runs natively"),
            EmulationSupport::Binfmt => c.ok(name, "runs emulated (binfmt_misc qemu, flag F)"),
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
        let Some(e) = engine else { continue };
        let default = spec.image == crate::builder::provision::default_image(name);
        match e.docker.inspect_image(&spec.image).await {
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
            Err(err) if containers::is_not_found(&err) && default => c.fail(
                name,
                format!("image {} does not exist", spec.image),
                format!(
                    "nixdock image build --system {name}   (without a registry: nixdock image \
                     build --from-debian --system {name}), or set image for {name} in the config"
                ),
            ),
            Err(err) if containers::is_not_found(&err) => c.warn(
                name,
                format!(
                    "image {} is not present locally; the hook pulls it at the first build",
                    spec.image
                ),
                format!(
                    "docker pull {} (to check now that it can be pulled)",
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
}
