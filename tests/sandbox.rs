//! Nix's sandbox inside builders (issue 16), end to end: the host's Nix 2.8, the real hook,
//! builder containers on the host's rootful engine.
//!
//! Each test has an installation of its own (its own instance id, so its own containers), since
//! the sandbox setting is per builder and decides how its container is made. The sandboxed
//! builder's image is nixdock-test/trixie-amd64 (Nix 2.26): its Nix names a static shell for the
//! sandbox's /bin/sh (`sandbox-paths = /bin/sh=/usr/bin/bash-static`); the bookworm images have
//! none, which is what the static-shell test uses.

mod common;

use std::process::Output;

use common::output_text as text;

/// An installation of the test's own, with what these tests ask of it.
struct Install(common::OwnInstall);

impl std::ops::Deref for Install {
    type Target = common::OwnInstall;
    fn deref(&self) -> &common::OwnInstall {
        &self.0
    }
}

impl Install {
    fn new(config: &str) -> Install {
        Install(common::OwnInstall::new("sandbox", config))
    }

    /// The builder container's label `key` for `system`.
    fn label(&self, system: &str, key: &str) -> String {
        common::docker_ok([
            "inspect",
            "-f",
            &format!("{{{{index .Config.Labels \"{key}\"}}}}"),
            &self.container(system),
        ])
        .trim()
        .to_string()
    }
}

fn config(image: &str, sandbox: Option<&str>) -> String {
    let sandbox = sandbox
        .map(|s| format!("sandbox = {s}\n"))
        .unwrap_or_default();
    format!(
        "{sandbox}[builders.\"x86_64-linux\"]\nimage = \"{}\"\nidle-timeout = 120\n",
        common::image(image)
    )
}

/// A derivation that writes what it finds of the builder around it: `/usr/bin`,
/// `/etc/hostname`, `/etc/resolv.conf` and every network interface but loopback (from
/// `/proc/net/dev`, which shows the build's own network namespace). Shell builtins only: a
/// sandboxed build has no other program. No `${`: the script goes into a Nix string.
const PROBE: &str = r#"r=""
[ -e /usr/bin ] && r="$r usr-bin"
[ -e /etc/hostname ] && r="$r etc-hostname"
[ -e /etc/resolv.conf ] && r="$r resolv-conf"
while IFS=: read -r i rest; do case "$i" in *"|"*) ;; *) set -- $i; [ "$1" = lo ] || r="$r if-$1";; esac; done < /proc/net/dev
echo "probe found:$r" >&2
"#;

fn probe_expr(name: &str) -> String {
    format!(
        "derivation {{ name = \"{name}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
         args = [\"-c\" {:?}]; nonce = \"{}\"; }}",
        format!("{PROBE}echo \"$r\" > $out"),
        common::unique_name("n")
    )
}

/// What the probe found, from its output.
fn found(o: &Output) -> Vec<String> {
    assert!(o.status.success(), "{}", text(o));
    let out = common::out_path(o);
    std::fs::read_to_string(&out)
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn has_interface(found: &[String]) -> bool {
    found.iter().any(|f| f.starts_with("if-"))
}

/// `sandbox = true` on the host's (rootful) engine: the build sees none of the builder's
/// `/usr`, `/etc` or network; a fixed-output derivation keeps the network, as in Nix.
#[test]
fn sandboxed_build_sees_only_its_inputs_and_a_fixed_output_keeps_the_network() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(&config("trixie-amd64", Some("true")));
    let f = found(&i.build(&probe_expr("sandboxed-probe")));
    assert!(!f.contains(&"usr-bin".to_string()), "{f:?}");
    assert!(!f.contains(&"etc-hostname".to_string()), "{f:?}");
    assert!(!has_interface(&f), "a sandboxed build saw a network: {f:?}");
    assert_eq!(i.label("x86_64-linux", "nixdock.sandbox"), "on");
    let st = i.status("x86_64-linux");
    assert_eq!(st["sandboxed"], true, "{st}");
    assert_eq!(st["sandbox_why"], "sandbox = true", "{st}");

    // A fixed-output derivation gets the network (and resolv.conf): it writes "ok" only then.
    let fod = format!(
        "derivation {{ name = \"{}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
         args = [\"-c\" {:?}]; outputHashMode = \"flat\"; outputHashAlgo = \"sha256\"; \
         outputHash = \"dc51b8c96c2d745df3bd5590d990230a482fd247123599548e0632fdbf97fc22\"; }}",
        common::unique_name("sandboxed-fod"),
        format!(
            "{PROBE}case \"$r\" in *if-*resolv*|*resolv*if-*) ;; *) echo \"no network in a fixed-output build:$r\" >&2; exit 1;; esac; \
             case \"$r\" in *usr-bin*) echo \"a fixed-output build saw /usr/bin\" >&2; exit 1;; esac; \
             echo ok > $out"
        ),
    );
    let o = i.build(&fod);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(common::out_path(&o)).unwrap(),
        "ok\n"
    );
}

/// `sandbox = false`: the same probe finds the builder's `/usr/bin`, `/etc/hostname` and its
/// network interface (so the sandboxed test's "none" means something).
#[test]
fn unsandboxed_build_sees_the_builder() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(&config("trixie-amd64", Some("false")));
    let f = found(&i.build(&probe_expr("unsandboxed-probe")));
    assert!(f.contains(&"usr-bin".to_string()), "{f:?}");
    assert!(f.contains(&"etc-hostname".to_string()), "{f:?}");
    assert!(has_interface(&f), "{f:?}");
    assert_eq!(i.label("x86_64-linux", "nixdock.sandbox"), "off");
    assert_eq!(i.status("x86_64-linux")["sandboxed"], false);
}

/// "auto" (no setting) on this host's rootful engine leaves the sandbox off, and says why.
#[test]
fn auto_on_a_rootful_host_engine_leaves_the_sandbox_off() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(&config("bookworm-amd64", None));
    let f = found(&i.build(&probe_expr("auto-probe")));
    assert!(f.contains(&"usr-bin".to_string()), "{f:?}");
    assert!(has_interface(&f), "{f:?}");
    assert_eq!(i.label("x86_64-linux", "nixdock.sandbox"), "off");
    let why = i.label("x86_64-linux", "nixdock.sandbox-why");
    assert!(why.starts_with("auto: a rootful engine"), "{why}");
    let st = i.status("x86_64-linux");
    assert_eq!(st["sandboxed"], false, "{st}");
    assert_eq!(st["sandbox_why"], why.as_str(), "{st}");
}

/// `sandbox = true` for the emulated aarch64 builder in a container of its own
/// (`emulation = "container"`; tests/emulation.rs has it sandboxed in the native builder):
/// qemu-user cannot start Nix's sandbox, so
/// the build fails with a message naming the sandbox (never an unsandboxed build), before any
/// container is made.
#[test]
fn sandbox_true_for_an_emulated_builder_fails_the_build_naming_the_sandbox() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(&format!(
        "[builders.\"aarch64-linux\"]\nimage = \"{}\"\nidle-timeout = 120\nsandbox = true\n\
         emulation = \"container\"\n",
        common::image("bookworm-arm64")
    ));
    let expr = format!(
        "derivation {{ name = \"emulated-sandboxed\"; system = \"aarch64-linux\"; \
         builder = \"/bin/sh\"; args = [\"-c\" \"echo built > $out\"]; nonce = \"{}\"; }}",
        common::unique_name("n")
    );
    let o = i.build(&expr);
    assert!(!o.status.success(), "built: {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("sandbox = true"), "{err}");
    assert!(err.contains("qemu-user"), "{err}");
    if let Some(id) = i.instance() {
        let ps = common::docker_ok([
            "ps",
            "-aq",
            "--filter",
            &format!("label=nixdock.instance={id}"),
        ]);
        assert!(ps.trim().is_empty(), "a container was made: {ps}");
    }
}

/// An image without a static shell for the sandbox's /bin/sh (Debian bookworm's Nix names
/// none, and bash-static is not installed): the builder does not start, and the build fails
/// saying what is missing and what to do.
#[test]
fn sandbox_without_a_static_shell_fails_the_build_clearly() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(&config("bookworm-amd64", Some("true")));
    let o = i.build(&probe_expr("no-static-shell"));
    assert!(!o.status.success(), "built: {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no static shell"), "{err}");
    assert!(err.contains("bash-static"), "{err}");
}

/// Podman's Docker API takes a sandboxed builder's options (it reads `seccomp=` as a file on
/// its host, so nixdock sends it `seccomp=unconfined` and `unmask=ALL`): the container is
/// created and started, and its entry script gets as far as the static-shell check (the test
/// bed's Podman holds only the bookworm image, which has none: exit status 68). With the
/// inline profile, creating it failed with "opening seccomp profile failed: … file name too
/// long".
#[test]
fn podman_takes_a_sandboxed_builders_options() {
    if !common::require_podman() {
        return;
    }
    let i = Install::new(&format!(
        "docker-host = \"{}\"\n{}",
        common::PODMAN_UNIX,
        config("bookworm-amd64", Some("true"))
    ));
    let o = i.build(&probe_expr("podman-sandbox"));
    assert!(!o.status.success(), "built: {}", text(&o));
    let id = i.instance().expect("an instance id");
    // entry.sh's exit status for "no static shell" (the hook's own message about it is lost to
    // bollard's reading of Podman's "stopped" state, a separate matter).
    let exit = common::docker_on(
        common::PODMAN_UNIX,
        [
            "inspect",
            "-f",
            "{{.State.ExitCode}}",
            &format!("nixdock-{id}-x86_64-linux"),
        ],
    );
    {
        let by_label = format!("label=nixdock.instance={id}");
        let ids = common::docker_on_ok(common::PODMAN_UNIX, ["ps", "-aq", "--filter", &by_label]);
        for c in ids.split_whitespace() {
            common::docker_on(common::PODMAN_UNIX, ["rm", "-f", "-v", c]);
        }
        let vols = common::docker_on_ok(
            common::PODMAN_UNIX,
            ["volume", "ls", "-q", "--filter", &by_label],
        );
        for v in vols.split_whitespace() {
            common::docker_on(common::PODMAN_UNIX, ["volume", "rm", "-f", v]);
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&exit.stdout).trim(),
        "68",
        "{}\n{}",
        text(&exit),
        text(&o)
    );
}
