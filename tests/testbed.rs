//! Proves the test bed made by `scripts/testbed` is real: every `nixdock-test/*` image starts,
//! its `nix-daemon --stdio` speaks the worker protocol, it has the expected Nix version,
//! architecture, sshd and `nixbld` group; and the host's Nix builds, both through its daemon
//! and directly as root.
//!
//! Without the bed these tests skip (loudly), or fail when `CI` is set: see `common::require_bed`.

mod common;

use common::{ContainerGuard, docker, docker_ok, drain, image, require_bed, unique_name};
use std::io::{self, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

const WORKER_MAGIC_1: u64 = 0x6e69_7863; // "cxin", client -> daemon
const WORKER_MAGIC_2: u64 = 0x6478_696f; // "oixd", daemon -> client
const CLIENT_VERSION: u64 = 0x126; // 1.38

/// The sshd default PATH a builder's commands get over SSH (Debian's sshd).
const SSHD_DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/games";

struct Img {
    name: &'static str,
    /// Where the Nix binaries are, with a trailing slash; "" = on the image's PATH.
    bin: &'static str,
    /// The daemon's worker-protocol version.
    protocol: u64,
    /// `nix --version` contains this.
    nix_version: &'static str,
    /// `uname -m`.
    machine: &'static str,
    /// Where sshd is; None = nowhere.
    sshd: Option<&'static str>,
    /// Whether the `nixbld` group (with build users) exists.
    nixbld: bool,
}

const NIX_2_8: u64 = 0x122; // protocol 1.34
const NIX_2_26: u64 = 0x126; // protocol 1.38
const NIX_2_34: u64 = 0x126; // still 1.38 (newer features are negotiated after the handshake)

const BOOKWORM_AMD64: Img = Img {
    name: "bookworm-amd64",
    bin: "",
    protocol: NIX_2_8,
    nix_version: "(Nix) 2.8.",
    machine: "x86_64",
    sshd: Some("/usr/sbin/sshd"),
    nixbld: true,
};
const TRIXIE_AMD64: Img = Img {
    name: "trixie-amd64",
    bin: "",
    protocol: NIX_2_26,
    nix_version: "(Nix) 2.26.",
    machine: "x86_64",
    sshd: Some("/usr/sbin/sshd"),
    nixbld: true,
};
const SID_AMD64: Img = Img {
    name: "sid-amd64",
    bin: "",
    protocol: NIX_2_34,
    nix_version: "(Nix) 2.34.",
    machine: "x86_64",
    sshd: Some("/usr/sbin/sshd"),
    nixbld: true,
};
const BOOKWORM_ARM64: Img = Img {
    name: "bookworm-arm64",
    bin: "",
    protocol: NIX_2_8,
    nix_version: "(Nix) 2.8.",
    machine: "aarch64",
    sshd: Some("/usr/sbin/sshd"),
    nixbld: true,
};
const NIXOS_LAYOUT: Img = Img {
    name: "nixos-layout",
    bin: "/root/.nix-profile/bin/",
    protocol: NIX_2_26,
    nix_version: "(Nix) 2.26.",
    machine: "x86_64",
    sshd: Some("/root/.nix-profile/bin/sshd"),
    nixbld: true,
};
const BOOKWORM_AMD64_NOBLD: Img = Img {
    name: "bookworm-amd64-nobld",
    bin: "",
    protocol: NIX_2_8,
    nix_version: "(Nix) 2.8.",
    machine: "x86_64",
    sshd: Some("/usr/sbin/sshd"),
    nixbld: false,
};
const NO_SSHD: Img = Img {
    name: "no-sshd",
    bin: "",
    protocol: NIX_2_8,
    nix_version: "(Nix) 2.8.",
    machine: "x86_64",
    sshd: None,
    nixbld: true,
};

/// `docker run --rm IMAGE sh -c SCRIPT`: (success, stdout+stderr).
fn run_sh(img: &Img, script: &str) -> (bool, String) {
    let name = unique_name("nixdock-testbed");
    let _guard = ContainerGuard(name.clone());
    let out = docker([
        "run",
        "--rm",
        "--name",
        &name,
        &image(img.name),
        "sh",
        "-c",
        script,
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `nix-daemon --stdio` in a fresh container, exchanges the worker-protocol magic and
/// versions over the container's stdio, then closes stdin and requires the process to end.
fn check_handshake(img: &Img) {
    let name = unique_name("nixdock-testbed-hs");
    let _guard = ContainerGuard(name.clone());
    let daemon = format!("{}nix-daemon", img.bin);
    let mut child = Command::new("docker")
        .args(["run", "--rm", "-i", "--name", &name, &image(img.name)])
        .args([daemon.as_str(), "--stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn docker run");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let stderr = drain(child.stderr.take());

    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(&WORKER_MAGIC_1.to_le_bytes());
    hello.extend_from_slice(&CLIENT_VERSION.to_le_bytes());
    stdin.write_all(&hello).expect("write handshake");
    stdin.flush().unwrap();

    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 16];
        let _ = tx.send(stdout.read_exact(&mut buf).map(|()| buf));
        let _ = io::copy(&mut stdout, &mut io::sink()); // whatever follows (e.g. features)
    });
    let reply = rx.recv_timeout(Duration::from_secs(90));
    let reply = match reply {
        Ok(Ok(buf)) => buf,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!(
                "{}: no handshake reply ({other:?}); stderr:\n{err}",
                img.name
            );
        }
    };
    let magic = u64::from_le_bytes(reply[..8].try_into().unwrap());
    let version = u64::from_le_bytes(reply[8..].try_into().unwrap());

    drop(stdin); // EOF: the daemon must end the connection and the container stop
    let status = common::wait_timeout(&mut child, Duration::from_secs(60));
    let _ = reader.join();
    let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    assert!(
        status.is_some(),
        "{}: nix-daemon --stdio did not end within 60 s of stdin closing; stderr:\n{err}",
        img.name
    );
    assert_eq!(
        magic, WORKER_MAGIC_2,
        "{}: daemon magic; stderr:\n{err}",
        img.name
    );
    assert_eq!(
        version,
        img.protocol,
        "{}: daemon protocol version {}.{} (expected {}.{})",
        img.name,
        version >> 8,
        version & 0xff,
        img.protocol >> 8,
        img.protocol & 0xff
    );
}

fn check_nix_version(img: &Img) {
    let (ok, out) = run_sh(img, &format!("{}nix --version", img.bin));
    assert!(ok, "{}: nix --version failed:\n{out}", img.name);
    assert!(
        out.contains(img.nix_version),
        "{}: expected {:?} in {out:?}",
        img.name,
        img.nix_version
    );
}

fn check_machine(img: &Img) {
    let (ok, out) = run_sh(img, "uname -m");
    assert!(ok, "{}: uname -m failed:\n{out}", img.name);
    assert_eq!(out.trim(), img.machine, "{}: uname -m", img.name);
}

fn check_nixbld(img: &Img) {
    let (ok, out) = run_sh(img, "getent group nixbld");
    if img.nixbld {
        assert!(ok, "{}: no nixbld group:\n{out}", img.name);
        let members = out.trim().rsplit(':').next().unwrap_or("");
        assert!(
            members.split(',').any(|m| m == "nixbld1"),
            "{}: nixbld group without build users: {out:?}",
            img.name
        );
        let (ok, out) = run_sh(img, "getent passwd nixbld1");
        assert!(ok, "{}: no nixbld1 user:\n{out}", img.name);
    } else {
        assert!(!ok, "{}: unexpected nixbld group: {out:?}", img.name);
        let (ok, out) = run_sh(img, "getent passwd nixbld1");
        assert!(!ok, "{}: unexpected nixbld1 user: {out:?}", img.name);
    }
}

fn check_sshd(img: &Img) {
    // Search the usual places plus root's profile.
    let script = "PATH=/root/.nix-profile/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin; \
                  command -v sshd || echo none";
    let (ok, out) = run_sh(img, script);
    assert!(ok, "{}: {out}", img.name);
    assert_eq!(out.trim(), img.sshd.unwrap_or("none"), "{}: sshd", img.name);
}

macro_rules! image_tests {
    ($($module:ident => $img:expr;)*) => {$(
        mod $module {
            use super::*;

            #[test]
            fn daemon_stdio_handshake() {
                if !require_bed() {
                    return;
                }
                check_handshake(&$img);
            }

            #[test]
            fn nix_version() {
                if !require_bed() {
                    return;
                }
                check_nix_version(&$img);
            }

            #[test]
            fn machine() {
                if !require_bed() {
                    return;
                }
                check_machine(&$img);
            }

            #[test]
            fn nixbld_group() {
                if !require_bed() {
                    return;
                }
                check_nixbld(&$img);
            }

            #[test]
            fn sshd() {
                if !require_bed() {
                    return;
                }
                check_sshd(&$img);
            }
        }
    )*};
}

image_tests! {
    bookworm_amd64 => BOOKWORM_AMD64;
    trixie_amd64 => TRIXIE_AMD64;
    sid_amd64 => SID_AMD64;
    bookworm_arm64 => BOOKWORM_ARM64;
    nixos_layout => NIXOS_LAYOUT;
    bookworm_amd64_nobld => BOOKWORM_AMD64_NOBLD;
    no_sshd => NO_SSHD;
}

/// nixos-layout: Nix and sshd only under root's profile, not on sshd's default PATH.
#[test]
fn nixos_layout_has_nix_only_in_profile() {
    if !require_bed() {
        return;
    }
    let script = format!(
        "set -e; \
         for f in nix nix-daemon nix-store; do test ! -e /usr/bin/$f; test -x /root/.nix-profile/bin/$f; done; \
         test ! -e /usr/sbin/sshd; \
         if PATH={SSHD_DEFAULT_PATH} command -v nix-daemon; then echo 'nix-daemon on the default PATH'; exit 1; fi; \
         if PATH={SSHD_DEFAULT_PATH}:/usr/sbin:/sbin command -v sshd; then echo 'sshd on the default PATH'; exit 1; fi; \
         echo fine"
    );
    let (ok, out) = run_sh(&NIXOS_LAYOUT, &script);
    assert!(ok && out.trim() == "fine", "nixos-layout layout:\n{out}");
}

/// sid-amd64: Debian restricts the daemon socket's directory to the `nix-users` group, so a
/// multi-user client must be in it; the image has the group and that directory.
#[test]
fn sid_amd64_restricts_the_daemon_socket_to_nix_users() {
    if !require_bed() {
        return;
    }
    let (ok, out) = run_sh(
        &SID_AMD64,
        "getent group nix-users >/dev/null && stat -c '%a %U %G' /nix/var/nix/daemon-socket",
    );
    assert!(ok, "sid-amd64: {out}");
    assert_eq!(
        out.trim(),
        "770 root nix-users",
        "sid-amd64 daemon-socket directory"
    );
}

/// The images are labelled with their recipe hash (what `scripts/testbed` keys rebuilds on).
#[test]
fn images_carry_recipe_labels() {
    if !require_bed() {
        return;
    }
    for img in [
        BOOKWORM_AMD64,
        TRIXIE_AMD64,
        SID_AMD64,
        BOOKWORM_ARM64,
        NIXOS_LAYOUT,
        BOOKWORM_AMD64_NOBLD,
        NO_SSHD,
    ] {
        let label = docker_ok([
            "image",
            "inspect",
            "-f",
            "{{index .Config.Labels \"nixdock.recipe\"}}",
            &image(img.name),
        ]);
        let label = label.trim();
        assert!(
            label.len() == 64 && label.bytes().all(|b| b.is_ascii_hexdigit()),
            "{}: nixdock.recipe label {label:?}",
            img.name
        );
    }
}

/// Builds a derivation no one built before (a nonce attribute) with the host's Nix and
/// returns the content of its output.
fn host_build(nix_remote: &str) -> String {
    let nonce = unique_name("nonce");
    let expr = format!(
        r#"derivation {{ name = "nixdock-testbed-x"; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" "echo hi > $out"]; nonce = "{nonce}"; }}"#
    );
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "-E", &expr])
        .env("NIX_REMOTE", nix_remote);
    let out = common::run_with_timeout(cmd, Duration::from_secs(180)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nix-build (NIX_REMOTE={nix_remote}) failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = stdout.trim();
    assert!(
        path.starts_with("/nix/store/"),
        "nix-build printed {path:?}"
    );
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

#[test]
fn host_nix_builds_through_daemon() {
    if !require_bed() {
        return;
    }
    assert_eq!(host_build("daemon"), "hi\n");
}

#[test]
fn host_nix_builds_directly_as_root() {
    if !require_bed() {
        return;
    }
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("SKIPPED host_nix_builds_directly_as_root: not root");
        return;
    }
    assert_eq!(host_build("local"), "hi\n");
}
