//! The systemd drop-in that gives nix-daemon the hook in its environment (Nix 2.25–2.33).

use std::path::Path;

/// The drop-in, under the install root.
pub const DROPIN: &str = "etc/systemd/system/nix-daemon.service.d/nixdock.conf";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropin_quotes_the_value() {
        let d = systemd_dropin(Path::new("/opt/nixdock/bin/nixdock-hook"));
        assert!(d.contains(
            "[Service]\nEnvironment=\"NIX_CONFIG=build-hook = /opt/nixdock/bin/nixdock-hook\"\n"
        ));
    }
}
