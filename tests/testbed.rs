//! Proves the test bed made by `scripts/testbed` is real: every `nixdock-test/*` image starts,
//! its `nix-daemon --stdio` speaks the worker protocol, it has the expected Nix version,
//! architecture, sshd and `nixbld` group; and the host's Nix builds, both through its daemon
//! and directly as root. For issue 15's tests: engine 2 (a dockerd in its own network namespace)
//! answers on unix, TLS and plain tcp, refuses a wrong CA, publishes on its own address, serves
//! `docker system dial-stdio` over SSH with a pinned host key, and Podman's Docker API runs a
//! container.
//!
//! Without the bed these tests skip (loudly), or fail when `CI` is set: see `common::require_bed`.

mod common;

use common::{
    ContainerGuard, ContainerGuardOn, ENGINE2_ADDR, ENGINE2_IMAGES, ENGINE2_PLAIN,
    ENGINE2_SSH_HOST_KEY_PUB, ENGINE2_SSH_KEY, ENGINE2_SSH_KNOWN_HOSTS, ENGINE2_SSH_USER,
    ENGINE2_TLS, ENGINE2_TLS_CA, ENGINE2_TLS_WRONG_CA, ENGINE2_UNIX, PODMAN_IMAGES, PODMAN_UNIX,
    docker, docker_ok, docker_on, docker_on_ok, drain, engine2_tls_flags, image, output_text,
    require_bed, require_podman, require_second_engine, unique_name,
};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The host engine, named explicitly beside engine 2 (`docker_on` ignores DOCKER_HOST).
const HOST_ENGINE: &str = "unix:///var/run/docker.sock";

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
const NIXOS_NIX: Img = Img {
    name: "nixos-nix",
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
    // grep, not getent: nixos/nix (and so nixos-nix) has no getent on its PATH.
    let (ok, out) = run_sh(img, "grep '^nixbld:' /etc/group");
    if img.nixbld {
        assert!(ok, "{}: no nixbld group:\n{out}", img.name);
        let members = out.trim().rsplit(':').next().unwrap_or("");
        assert!(
            members.split(',').any(|m| m == "nixbld1"),
            "{}: nixbld group without build users: {out:?}",
            img.name
        );
        let (ok, out) = run_sh(img, "grep '^nixbld1:' /etc/passwd");
        assert!(ok, "{}: no nixbld1 user:\n{out}", img.name);
    } else {
        assert!(!ok, "{}: unexpected nixbld group: {out:?}", img.name);
        let (ok, out) = run_sh(img, "grep '^nixbld1:' /etc/passwd");
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
    nixos_nix => NIXOS_NIX;
    bookworm_amd64_nobld => BOOKWORM_AMD64_NOBLD;
    no_sshd => NO_SSHD;
}

/// nixos-nix is laid out like the official nixos/nix image (NixOS/nix docker.nix): Nix, sshd,
/// bash and coreutils only in root's profile, off sshd's default PATH; users only root, nobody
/// and nixbld1-32 (uids 30001+, gid 30000), so no sshd privilege-separation user; no /var/empty,
/// no useradd, no sed, no awk; /etc/passwd and nix.conf links into the store; nix.conf sets
/// build-users-group = nixbld.
#[test]
fn nixos_nix_is_laid_out_like_the_official_image() {
    if !require_bed() {
        return;
    }
    let bld: Vec<String> = (1..=32).map(|i| format!("nixbld{i}")).collect();
    let script = format!(
        "set -e; \
         for f in nix nix-daemon nix-store sshd bash ls cp mv; do test ! -e /usr/bin/$f; test ! -e /usr/sbin/$f; \
           test -x /root/.nix-profile/bin/$f; test -x /nix/var/nix/profiles/default/bin/$f; done; \
         if PATH={SSHD_DEFAULT_PATH}:/usr/sbin:/sbin command -v nix-daemon sshd ls; then echo 'tools on the default PATH'; exit 1; fi; \
         if command -v sed || command -v awk || command -v useradd || command -v groupadd; then echo 'sed, awk or useradd'; exit 1; fi; \
         test ! -e /var/empty; \
         test -L /etc/passwd; test -L /etc/nix/nix.conf; \
         grep -qx 'build-users-group = nixbld' /etc/nix/nix.conf; \
         echo users $(cut -d: -f1 /etc/passwd); \
         echo nixbld $(grep '^nixbld:' /etc/group | cut -d: -f3-); \
         echo uids $(grep '^nixbld' /etc/passwd | cut -d: -f3,4 | head -n 2); \
         echo fine"
    );
    let (ok, out) = run_sh(&NIXOS_NIX, &script);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        ok && lines.last() == Some(&"fine"),
        "nixos-nix layout:\n{out}"
    );
    assert!(
        lines.contains(&format!("users root nobody {}", bld.join(" ")).as_str()),
        "{out}"
    );
    assert!(
        lines.contains(&format!("nixbld 30000:{}", bld.join(",")).as_str()),
        "{out}"
    );
    assert!(lines.contains(&"uids 30001:30000 30002:30000"), "{out}");
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
        NIXOS_NIX,
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

// ---------------------------------------------------------------------------------------------
// Engines beyond this host (issue 15): engine 2 in its network namespace, and Podman.

/// An engine's ID (`docker info`), which tells engines apart.
fn engine_id(host: &str, flags: &[String]) -> String {
    let mut args = flags.to_vec();
    args.extend(["info", "-f", "{{.ID}}"].map(String::from));
    docker_on_ok(host, &args).trim().to_string()
}

#[test]
fn engine2_answers_on_unix_tls_and_plain_tcp_and_is_not_the_host_engine() {
    if !require_second_engine() {
        return;
    }
    let host = docker_ok(["info", "-f", "{{.ID}}"]).trim().to_string();
    let unix = engine_id(ENGINE2_UNIX, &[]);
    assert!(!unix.is_empty());
    assert_ne!(unix, host, "engine 2's unix socket reaches the host engine");
    let tls = engine_id(ENGINE2_TLS, &engine2_tls_flags(ENGINE2_TLS_CA));
    assert_eq!(
        tls, unix,
        "{ENGINE2_TLS} is another engine than {ENGINE2_UNIX}"
    );
    let plain = engine_id(ENGINE2_PLAIN, &[]);
    assert_eq!(
        plain, unix,
        "{ENGINE2_PLAIN} is another engine than {ENGINE2_UNIX}"
    );
}

#[test]
fn engine2_tls_refuses_a_wrong_ca_and_a_client_without_certificate() {
    if !require_second_engine() {
        return;
    }
    let mut args = engine2_tls_flags(ENGINE2_TLS_WRONG_CA);
    args.push("version".into());
    let out = docker_on(ENGINE2_TLS, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("certificate"),
        "a client trusting only wrong-ca.pem reached engine 2: {}",
        output_text(&out)
    );
    // dockerd --tlsverify: no client certificate, no API.
    let out = docker_on(
        ENGINE2_TLS,
        ["--tlsverify", "--tlscacert", ENGINE2_TLS_CA, "version"],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        !out.status.success() && err.contains("tls"),
        "engine 2 served a client without a certificate: {}",
        output_text(&out)
    );
}

/// Runs an sshd container with `-p ADDR::22` on the engine at `host`; the host must read the
/// SSH banner at the published address.
fn check_publish(host: &str, addr: &str) {
    let name = unique_name("nixdock-testbed-publish");
    let _guard = ContainerGuardOn {
        host: host.to_string(),
        name: name.clone(),
    };
    docker_on_ok(
        host,
        [
            "run",
            "-d",
            "--rm",
            "--name",
            &name,
            "-p",
            &format!("{addr}::22"),
            &image("bookworm-amd64"),
            "sh",
            "-c",
            "mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e",
        ],
    );
    let port = docker_on_ok(host, ["port", &name, "22/tcp"]);
    let published: SocketAddr = port
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("docker port {name}: {port:?}"));
    assert_eq!(published.ip().to_string(), addr, "published on {published}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let banner = loop {
        let attempt =
            TcpStream::connect_timeout(&published, Duration::from_secs(2)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut buf = [0u8; 7];
                s.read_exact(&mut buf)?;
                Ok(buf)
            });
        match attempt {
            Ok(buf) => break buf,
            Err(e) if Instant::now() > deadline => {
                panic!("{host}: nothing answers on {published}: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    };
    assert_eq!(&banner, b"SSH-2.0", "{host}: banner at {published}");
}

#[test]
fn engine2_publishes_on_its_own_address() {
    if !require_second_engine() {
        return;
    }
    check_publish(ENGINE2_UNIX, ENGINE2_ADDR);
}

/// Engine 2's iptables live in its namespace: the host engine still publishes on loopback.
#[test]
fn host_engine_still_publishes_on_loopback() {
    if !require_bed() {
        return;
    }
    check_publish(HOST_ENGINE, "127.0.0.1");
}

/// Engine 2 stands in for a remote engine: a bind mount of this checkout finds it empty there,
/// while the host engine sees the checkout's files.
#[test]
fn engine2_does_not_see_the_host_files() {
    if !require_second_engine() {
        return;
    }
    let root = common::repo_root().display().to_string();
    let list = |host: &str| {
        let name = unique_name("nixdock-testbed-files");
        let _guard = ContainerGuardOn {
            host: host.to_string(),
            name: name.clone(),
        };
        docker_on_ok(
            host,
            [
                "run",
                "--rm",
                "--name",
                &name,
                "-v",
                &format!("{root}:/checkout:ro"),
                &image("bookworm-amd64"),
                "ls",
                "-A",
                "/checkout",
            ],
        )
    };
    let on_host = list(HOST_ENGINE);
    assert!(
        on_host.lines().any(|l| l == "Cargo.toml"),
        "the host engine does not see {root}: {on_host:?}"
    );
    let on_engine2 = list(ENGINE2_UNIX);
    assert_eq!(on_engine2, "", "engine 2 sees the host's {root}");
}

#[test]
fn engine2_holds_the_builder_images() {
    if !require_second_engine() {
        return;
    }
    for name in ENGINE2_IMAGES {
        let want = docker_ok(["image", "inspect", "-f", "{{.Id}}", &image(name)]);
        let have = docker_on_ok(
            ENGINE2_UNIX,
            ["image", "inspect", "-f", "{{.Id}}", &image(name)],
        );
        assert_eq!(have.trim(), want.trim(), "{name} on engine 2");
    }
}

/// `ssh -i KEY … nixdock-engine@10.231.0.2` with `known_hosts` pinning the host key, `stdin`
/// as its input (it reaches the forced `docker system dial-stdio`), `extra` appended.
fn ssh_engine2(known_hosts: &str, stdin: &[u8], extra: &[&str]) -> std::process::Output {
    let mut child = Command::new("ssh")
        .args(["-T", "-F", "/dev/null", "-i", ENGINE2_SSH_KEY])
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
        .args(["-o", &format!("UserKnownHostsFile={known_hosts}")])
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10"])
        .arg(format!("{ENGINE2_SSH_USER}@{ENGINE2_ADDR}"))
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh");
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let mut input = child.stdin.take().unwrap();
    let _ = input.write_all(stdin);
    drop(input);
    let status = common::wait_timeout(&mut child, Duration::from_secs(60)).expect("ssh timed out");
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

const PING: &[u8] = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n";

#[test]
fn engine2_ssh_dial_stdio_answers_ping_with_the_pinned_host_key() {
    if !require_second_engine() {
        return;
    }
    let host_key = std::fs::read_to_string(ENGINE2_SSH_HOST_KEY_PUB).unwrap();
    assert!(
        host_key.starts_with("ssh-ed25519 AAAA") && host_key.trim().split(' ').count() == 2,
        "host_key.pub: {host_key:?}"
    );
    let out = ssh_engine2(ENGINE2_SSH_KNOWN_HOSTS, PING, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("HTTP/1.0 200 OK") && text.ends_with("\r\n\r\nOK"),
        "GET /_ping through ssh dial-stdio: {}",
        output_text(&out)
    );
    // The key is forced to dial-stdio: a command of the client's choosing does not run.
    let out = ssh_engine2(ENGINE2_SSH_KNOWN_HOSTS, b"", &["id"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("uid="),
        "the engine's key ran `id`: {}",
        output_text(&out)
    );
}

#[test]
fn engine2_ssh_refuses_a_wrong_host_key() {
    if !require_second_engine() {
        return;
    }
    // Some other ed25519 key (the client's own) pinned as the host's.
    let other = std::fs::read_to_string(format!("{ENGINE2_SSH_KEY}.pub")).unwrap();
    let other: Vec<&str> = other.split_whitespace().take(2).collect();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let known_hosts = dir.join(unique_name("engine2-wrong-known-hosts"));
    std::fs::write(
        &known_hosts,
        format!("{ENGINE2_ADDR} {}\n", other.join(" ")),
    )
    .unwrap();
    let out = ssh_engine2(known_hosts.to_str().unwrap(), PING, &[]);
    let _ = std::fs::remove_file(&known_hosts);
    assert!(
        !out.status.success()
            && !String::from_utf8_lossy(&out.stdout).contains("OK")
            && String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"),
        "ssh with a wrong pinned host key: {}",
        output_text(&out)
    );
}

#[test]
fn podman_runs_a_container_through_the_docker_api() {
    if !require_podman() {
        return;
    }
    let components = docker_on_ok(
        PODMAN_UNIX,
        [
            "version",
            "-f",
            "{{range .Server.Components}}{{.Name}};{{end}}",
        ],
    );
    assert!(
        components.contains("Podman Engine"),
        "{PODMAN_UNIX} is not Podman: {components:?}"
    );
    for name in PODMAN_IMAGES {
        let want = docker_ok(["image", "inspect", "-f", "{{.Id}}", &image(name)]);
        let have = docker_on_ok(
            PODMAN_UNIX,
            ["image", "inspect", "-f", "{{.Id}}", &image(name)],
        );
        assert_eq!(
            have.trim().trim_start_matches("sha256:"),
            want.trim().trim_start_matches("sha256:"),
            "{name} in Podman"
        );
    }
    let name = unique_name("nixdock-testbed-podman");
    let _guard = ContainerGuardOn {
        host: PODMAN_UNIX.to_string(),
        name: name.clone(),
    };
    let out = docker_on_ok(
        PODMAN_UNIX,
        [
            "run",
            "--rm",
            "--name",
            &name,
            &image("bookworm-amd64"),
            "sh",
            "-c",
            "echo ran-on-podman; uname -m",
        ],
    );
    assert_eq!(out, "ran-on-podman\nx86_64\n");
}

#[test]
fn rootless_podman_runs_containers_in_its_users_subordinate_range() {
    if !common::require_rootless() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(common::ROOTLESS_HOME)
        .expect("the rootless user's home")
        .uid();
    let sock = format!("/run/user/{uid}/podman/podman.sock");
    let owner = std::fs::metadata(&sock).expect("the rootless socket").uid();
    assert_eq!(owner, uid, "{sock} belongs to the rootless user");
    let engine = format!("unix://{sock}");
    let name = unique_name("nixdock-testbed-rootless");
    let _guard = ContainerGuardOn {
        host: engine.clone(),
        name: name.clone(),
    };
    let out = docker_on_ok(
        &engine,
        [
            "run",
            "--rm",
            "--name",
            &name,
            &image("bookworm-amd64"),
            "cat",
            "/proc/self/uid_map",
        ],
    );
    let map: Vec<Vec<u64>> = out
        .lines()
        .map(|l| {
            l.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .collect();
    // The container's root is the user itself; every other uid one of its subordinate ones.
    assert_eq!(
        map,
        vec![
            vec![0, u64::from(uid), 1],
            vec![
                1,
                u64::from(common::ROOTLESS_SUBID_START),
                u64::from(common::ROOTLESS_SUBID_COUNT)
            ],
        ],
        "{out}"
    );
}
