//! `nixdock install --serve`: `nixdock serve` as a system service — a systemd unit, or a
//! launchd daemon on macOS — with the installation's config and state (root's defaults).

use std::net::SocketAddr;
use std::path::Path;

/// The systemd unit, under the install root.
pub const SYSTEMD_UNIT: &str = "etc/systemd/system/nixdock-serve.service";
/// The launchd daemon's plist, under the install root.
pub const LAUNCHD_PLIST: &str = "Library/LaunchDaemons/org.nixdock.serve.plist";
pub const LAUNCHD_LABEL: &str = "org.nixdock.serve";

/// The systemd unit running `nixdock serve --listen <listen>`; restarted after a failure (it
/// exits when no engine answers, e.g. started before the engine), slowly enough that systemd's
/// start limit does not give up on it.
pub fn systemd_unit(nixdock: &Path, listen: &SocketAddr) -> String {
    // `%` starts a specifier in unit files; the path has no spaces (checked by the caller).
    let exe = nixdock.display().to_string().replace('%', "%%");
    format!(
        "# Written by `nixdock install --serve`; `nixdock uninstall` removes it.\n\
         [Unit]\n\
         Description=nixdock serve: an ssh-ng endpoint for nixdock's builders\n\
         After=network.target docker.service\n\
         \n\
         [Service]\n\
         ExecStart={exe} serve --listen {listen}\n\
         Restart=on-failure\n\
         RestartSec=5s\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The launchd daemon running `nixdock serve --listen <listen>`, kept alive.
pub fn launchd_plist(nixdock: &Path, listen: &SocketAddr) -> String {
    let exe = xml_escape(&nixdock.display().to_string());
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <!-- Written by `nixdock install --serve`; `nixdock uninstall` removes it. -->\n\
         <plist version=\"1.0\">\n\
         <dict>\n\
         \t<key>Label</key>\n\t<string>{LAUNCHD_LABEL}</string>\n\
         \t<key>ProgramArguments</key>\n\
         \t<array>\n\t\t<string>{exe}</string>\n\t\t<string>serve</string>\n\
         \t\t<string>--listen</string>\n\t\t<string>{listen}</string>\n\t</array>\n\
         \t<key>RunAtLoad</key>\n\t<true/>\n\
         \t<key>KeepAlive</key>\n\t<true/>\n\
         </dict>\n\
         </plist>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_run_serve_with_the_address() {
        let listen: SocketAddr = "127.0.0.2:22".parse().unwrap();
        let u = systemd_unit(Path::new("/opt/nixdock/bin/nixdock"), &listen);
        assert!(u.contains("\nExecStart=/opt/nixdock/bin/nixdock serve --listen 127.0.0.2:22\n"));
        assert!(u.contains("\nWantedBy=multi-user.target\n"));
        let p = launchd_plist(Path::new("/opt/a&b/nixdock"), &listen);
        assert!(p.contains("<string>/opt/a&amp;b/nixdock</string>"), "{p}");
        assert!(p.contains("<string>127.0.0.2:22</string>"), "{p}");
    }
}
