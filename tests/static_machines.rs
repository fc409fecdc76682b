//! The user's own remote builders (Nix's `builders`) served by nixdock-hook beside its Docker
//! builders, end to end: real `nix-build` (the host's Nix 2.8) with the real hook, and a
//! seed-style container (Debian's Nix and sshd, port published on 127.0.0.1) registered as an
//! `ssh-ng://` machine. Nothing is mocked.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nixdock::transport::keys;

const HOOK: &str = env!("CARGO_BIN_EXE_nixdock-hook");
const NIXDOCK: &str = env!("CARGO_BIN_EXE_nixdock");

/// A container standing in for a user's remote build machine.
struct Seed {
    _guard: common::ContainerGuard,
    name: String,
    port: u16,
    /// `ssh-ed25519 AAAA… root@…`, the container's real host key.
    host_key_line: String,
    /// Written to /etc/nixdock-seed-marker in the container: a build that cats it proves it
    /// ran there.
    marker: String,
    /// The client key the container's authorized_keys holds.
    key_path: PathBuf,
    _dir: tempfile::TempDir,
}

fn b64(s: &str) -> String {
    hook_protocol::hash::base64_encode(s.as_bytes())
}

impl Seed {
    fn start() -> Seed {
        let dir = tempfile::tempdir().unwrap();
        let key = keys::load_or_create_client_key(dir.path()).unwrap();
        let key_path = key.path().expect("key file").to_path_buf();
        let name = common::unique_name("nixdock-test-static");
        let marker = common::unique_name("seed-marker");
        let script = "set -e; mkdir -p /run/sshd /root/.ssh; \
            printf '%s\\n' \"$PUB\" > /root/.ssh/authorized_keys; chmod 700 /root/.ssh; \
            chmod 600 /root/.ssh/authorized_keys; \
            printf 'substituters =\\nextra-platforms = i686-linux\\nbuild-users-group =\\ntrusted-users = root\\nsandbox = false\\n' >> /etc/nix/nix.conf; \
            printf '%s\\n' \"$MARKER\" > /etc/nixdock-seed-marker; \
            exec /usr/sbin/sshd -D -e";
        common::docker_ok([
            "run",
            "-d",
            "--name",
            &name,
            "-p",
            "127.0.0.1::22",
            "-e",
            &format!("PUB={}", key.public_openssh()),
            "-e",
            &format!("MARKER={marker}"),
            &common::image("bookworm-amd64"),
            "bash",
            "-c",
            script,
        ]);
        let guard = common::ContainerGuard(name.clone());
        let port_line = common::docker_ok(["port", &name, "22"]);
        let port: u16 = port_line
            .lines()
            .find_map(|l| l.trim().strip_prefix("127.0.0.1:"))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no published port in {port_line:?}"));
        let host_key_line =
            common::docker_ok(["exec", &name, "cat", "/etc/ssh/ssh_host_ed25519_key.pub"])
                .trim()
                .to_string();
        // Wait for sshd's banner (a published port accepts before sshd listens).
        let t = Instant::now();
        loop {
            use std::io::Read;
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).is_ok() && &buf == b"SSH-" {
                    break;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "sshd in {name} did not answer: {}",
                String::from_utf8_lossy(&common::docker(["logs", &name]).stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Seed {
            _guard: guard,
            name,
            port,
            host_key_line,
            marker,
            key_path,
            _dir: dir,
        }
    }

    fn uri(&self) -> String {
        format!("ssh-ng://root@127.0.0.1:{}", self.port)
    }

    /// The `builders` entry: `systems`, max-jobs, and the host key field as given.
    fn entry(&self, systems: &str, max_jobs: u32, host_key_b64: Option<&str>) -> String {
        format!(
            "{} {systems} {} {max_jobs} 1 - - {}",
            self.uri(),
            self.key_path.display(),
            host_key_b64.unwrap_or("-")
        )
    }
}

/// A nixdock installation for one test: its own config and state dir.
struct Install {
    config: PathBuf,
    state: PathBuf,
    root: PathBuf,
}

impl Install {
    fn new(tag: &str, config: &str) -> Install {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("static-machines")
            .join(common::unique_name(tag));
        std::fs::create_dir_all(&root).unwrap();
        let config_path = root.join("nixdock.toml");
        std::fs::write(&config_path, config).unwrap();
        Install {
            config: config_path,
            state: root.join("state"),
            root,
        }
    }

    /// Docker builders this installation made, for cleanup.
    fn remove_builders(&self) {
        let Ok(id) = std::fs::read_to_string(self.state.join("instance-id")) else {
            return;
        };
        let ids = common::docker_ok([
            "ps",
            "-aq",
            "--filter",
            &format!("label=nixdock.instance={}", id.trim()),
        ]);
        for c in ids.split_whitespace() {
            common::docker(["rm", "-f", "-v", c]);
        }
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        self.remove_builders();
    }
}

fn drv_expr(name: &str, system: &str, script: &str) -> String {
    format!(
        "derivation {{ name = \"{name}\"; system = \"{system}\"; builder = \"/bin/sh\"; \
         args = [\"-c\" {script:?}]; nonce = \"{}\"; }}",
        common::unique_name("n")
    )
}

fn nix_build_cmd(inst: &Install, expr: &str, builders: &str, home: &Path) -> Command {
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "-E", expr])
        .args(["--option", "build-hook", HOOK])
        .args(["--max-jobs", "0"])
        .args(["--builders", builders])
        .args(["--option", "substituters", ""])
        .env("NIXDOCK_CONFIG", &inst.config)
        .env("NIXDOCK_STATE_DIR", &inst.state)
        .env("HOME", home);
    cmd
}

fn nix_build(inst: &Install, expr: &str, builders: &str, home: &Path) -> Output {
    common::run_with_timeout(
        nix_build_cmd(inst, expr, builders, home),
        Duration::from_secs(600),
    )
    .expect("nix-build ran")
}

use common::{out_path, output_text as text};

fn is_valid(path: &str) -> bool {
    Command::new("nix-store")
        .args(["--check-validity", path])
        .output()
        .unwrap()
        .status
        .success()
}

/// A config whose only Docker builder is x86_64-linux: nothing here serves i686-linux.
fn x86_only_config(max_jobs: u32) -> String {
    format!(
        "[builders.\"x86_64-linux\"]\nimage = \"{}\"\nidle-timeout = 300\nmax-jobs = {max_jobs}\n",
        common::image("bookworm-amd64")
    )
}

const MARKER_SCRIPT: &str = "echo building-on-remote; /bin/cat /etc/nixdock-seed-marker > $out";

#[test]
fn i686_builds_on_a_static_ssh_ng_machine_with_pinned_host_key() {
    if !common::require_bed() {
        return;
    }
    let seed = Seed::start();
    let inst = Install::new("pinned", &x86_only_config(4));
    let home = tempfile::tempdir().unwrap();
    let builders = seed.entry("i686-linux", 1, Some(&b64(&seed.host_key_line)));
    let o = nix_build(
        &inst,
        &drv_expr("static-i686", "i686-linux", MARKER_SCRIPT),
        &builders,
        home.path(),
    );
    let out = out_path(&o);
    assert!(is_valid(&out), "{out} must be registered locally");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().trim(),
        seed.marker,
        "the build must have run in {}",
        seed.name
    );
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("building-on-remote"), "{}", text(&o));
    // No Docker builder was made for it: nothing serves i686 in this config.
    if let Ok(id) = std::fs::read_to_string(inst.state.join("instance-id")) {
        let made = common::docker_ok([
            "ps",
            "-aq",
            "--filter",
            &format!("label=nixdock.instance={}", id.trim()),
        ]);
        assert!(
            made.trim().is_empty(),
            "a Docker builder was started: {made}"
        );
    }
}

#[test]
fn wrong_pinned_host_key_is_refused_naming_the_machine() {
    if !common::require_bed() {
        return;
    }
    let seed = Seed::start();
    let inst = Install::new("wrongkey", &x86_only_config(4));
    let home = tempfile::tempdir().unwrap();
    let other = keys::generate_host_key().unwrap().public_openssh();
    let builders = seed.entry("i686-linux", 1, Some(&b64(&other)));
    let o = nix_build(
        &inst,
        &drv_expr("static-wrongkey", "i686-linux", MARKER_SCRIPT),
        &builders,
        home.path(),
    );
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&seed.uri()), "names the machine: {err}");
    assert!(err.contains("host key"), "says why: {err}");
    assert!(err.contains("not trusted"), "says why: {err}");
    assert!(
        err.contains(&keys::fingerprint(
            &keys::parse_public_key(&seed.host_key_line).unwrap()
        )),
        "shows the presented key's fingerprint: {err}"
    );
    assert!(!err.contains("building-on-remote"), "nothing ran: {err}");
}

#[test]
fn host_key_from_known_hosts_in_home_and_none_trusted_without_it() {
    if !common::require_bed() {
        return;
    }
    let seed = Seed::start();
    let inst = Install::new("knownhosts", &x86_only_config(4));
    let builders = seed.entry("i686-linux", 1, None);

    // No known_hosts entry: refused, never trusted on first use.
    let empty_home = tempfile::tempdir().unwrap();
    let o = nix_build(
        &inst,
        &drv_expr("static-kh-none", "i686-linux", MARKER_SCRIPT),
        &builders,
        empty_home.path(),
    );
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&seed.uri()) && err.contains("no trusted host key"),
        "{err}"
    );

    // The key in ~/.ssh/known_hosts as `[127.0.0.1]:PORT`: accepted.
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".ssh")).unwrap();
    std::fs::write(
        home.path().join(".ssh/known_hosts"),
        format!("[127.0.0.1]:{} {}\n", seed.port, seed.host_key_line),
    )
    .unwrap();
    let o = nix_build(
        &inst,
        &drv_expr("static-kh", "i686-linux", MARKER_SCRIPT),
        &builders,
        home.path(),
    );
    let out = out_path(&o);
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), seed.marker);
}

#[test]
fn unreachable_and_legacy_machines_are_skipped_with_warnings_naming_them() {
    if !common::require_bed() {
        return;
    }
    let seed = Seed::start();
    let inst = Install::new("skip", &x86_only_config(4));
    let home = tempfile::tempdir().unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let key = seed.key_path.display().to_string();
    // Listed first, so they are tried first (all idle, same speed).
    let builders = format!(
        "root@127.0.0.1:{port} i686-linux {key} 1 1 ; ssh-ng://root@127.0.0.1:{closed} i686-linux {key} 1 1 - - {hk} ; {good}",
        port = seed.port,
        hk = b64(&seed.host_key_line),
        good = seed.entry("i686-linux", 1, Some(&b64(&seed.host_key_line)))
    );
    let o = nix_build(
        &inst,
        &drv_expr("static-skip", "i686-linux", MARKER_SCRIPT),
        &builders,
        home.path(),
    );
    let out = out_path(&o);
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), seed.marker);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("'ssh-ng://root@127.0.0.1:{closed}'")) && err.contains("refused"),
        "the unreachable machine is named: {err}"
    );
    assert!(
        err.contains(&format!("'ssh://root@127.0.0.1:{}'", seed.port))
            && err.contains(&format!("ssh-ng://root@127.0.0.1:{}", seed.port)),
        "the ssh:// machine is pointed to ssh-ng://: {err}"
    );
}

#[test]
fn large_input_closure_goes_over_two_daemon_connections_to_a_static_machine() {
    if !common::require_bed() {
        return;
    }
    let seed = Seed::start();
    let inst = Install::new("closure", &x86_only_config(4));
    let home = tempfile::tempdir().unwrap();
    // Two store paths of 10 MiB of incompressible data each: over the parallel-copy threshold.
    let mut inputs = Vec::new();
    for k in 0..2u64 {
        let dir = inst.root.join(format!("in{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut x = 0x9e3779b97f4a7c15u64 ^ (std::process::id() as u64) ^ (k << 32);
        let mut buf = vec![0u8; 10 << 20];
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        std::fs::write(dir.join("data"), &buf).unwrap();
        let o = Command::new("nix-store")
            .args(["--add", dir.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        inputs.push(String::from_utf8_lossy(&o.stdout).trim().to_string());
    }
    let expr = format!(
        "derivation {{ name = \"static-closure\"; system = \"i686-linux\"; builder = \"/bin/sh\"; \
         a = builtins.storePath \"{}\"; b = builtins.storePath \"{}\"; nonce = \"{}\"; \
         args = [\"-c\" \"test -s $a/data && test -s $b/data && /bin/cat /etc/nixdock-seed-marker > $out\"]; }}",
        inputs[0],
        inputs[1],
        common::unique_name("n")
    );
    let builders = seed.entry("i686-linux", 1, Some(&b64(&seed.host_key_line)));
    let mut cmd = nix_build_cmd(&inst, &expr, &builders, home.path());
    cmd.env("NIXDOCK_LOG", "debug");
    let o = common::run_with_timeout(cmd, Duration::from_secs(600)).unwrap();
    let out = out_path(&o);
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), seed.marker);
    let log = std::fs::read_to_string(inst.state.join("hook.log")).unwrap_or_default();
    assert!(
        log.contains("copying input"),
        "the inputs were copied: {log}"
    );
    assert!(
        !log.contains("one copy stream only"),
        "the second nix-daemon on the machine did not open: {log}"
    );
}

#[test]
fn docker_builder_and_static_machine_share_x86_64_load() {
    if !common::require_bed() {
        return;
    }
    let seed = Seed::start();
    let inst = Install::new("share", &x86_only_config(1));
    let home = tempfile::tempdir().unwrap();
    let builders = seed.entry("x86_64-linux", 1, Some(&b64(&seed.host_key_line)));
    // Each build holds its slot for a few seconds; the one on the Docker builder says so.
    let script = "/bin/sleep 6; if [ -e /etc/nixdock-seed-marker ]; then /bin/cat /etc/nixdock-seed-marker > $out; else echo docker > $out; fi";
    let children: Vec<_> = (0..2)
        .map(|i| {
            let mut cmd = nix_build_cmd(
                &inst,
                &drv_expr(&format!("share{i}"), "x86_64-linux", script),
                &builders,
                home.path(),
            );
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = cmd.spawn().expect("spawn nix-build");
            let out = common::drain(child.stdout.take());
            let err = common::drain(child.stderr.take());
            // Let the first take its slot before the second asks.
            std::thread::sleep(Duration::from_millis(1500));
            (child, out, err)
        })
        .collect();
    let mut contents = Vec::new();
    for (mut child, out, err) in children {
        let status = common::wait_timeout(&mut child, Duration::from_secs(600)).expect("finished");
        let o = Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        };
        let p = out_path(&o);
        contents.push(std::fs::read_to_string(&p).unwrap().trim().to_string());
    }
    contents.sort();
    let mut want = vec!["docker".to_string(), seed.marker.clone()];
    want.sort();
    assert_eq!(
        contents, want,
        "one build on each (the Docker builder and {})",
        seed.name
    );
}

#[test]
fn doctor_lists_and_checks_static_machines() {
    if !common::require_bed() {
        return;
    }
    let seed = Seed::start();
    let inst = Install::new("doctor", &x86_only_config(1));
    let home = tempfile::tempdir().unwrap();
    let good = seed.entry("i686-linux", 1, Some(&b64(&seed.host_key_line)));
    let bad_key = keys::generate_host_key().unwrap().public_openssh();
    let bad = format!(
        "ssh-ng://root@localhost:{} i686-linux {} 1 1 - - {}",
        seed.port,
        seed.key_path.display(),
        b64(&bad_key)
    );
    let o = common::run_with_timeout(
        {
            let mut cmd = Command::new(NIXDOCK);
            cmd.args(["doctor", "--json"])
                .env("NIXDOCK_CONFIG", &inst.config)
                .env("NIXDOCK_STATE_DIR", &inst.state)
                .env("HOME", home.path())
                .env("NIX_CONFIG", format!("builders = {good} ; {bad}"));
            cmd
        },
        Duration::from_secs(300),
    )
    .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    let checks = v["checks"].as_array().unwrap();
    let find = |name: String| {
        checks
            .iter()
            .find(|c| c["name"] == name.as_str())
            .unwrap_or_else(|| panic!("no check {name}: {v}"))
            .clone()
    };
    let listed = find("builders".into());
    assert_eq!(listed["status"], "ok", "{listed}");
    assert!(
        listed["detail"].as_str().unwrap().contains(&seed.uri()),
        "{listed}"
    );
    let ok = find(format!("machine {}", seed.uri()));
    assert_eq!(ok["status"], "ok", "{ok}");
    assert!(
        ok["detail"]
            .as_str()
            .unwrap()
            .contains("nix-daemon answered")
    );
    let failed = find(format!("machine ssh-ng://root@localhost:{}", seed.port));
    assert_eq!(failed["status"], "fail", "{failed}");
    assert!(
        failed["detail"].as_str().unwrap().contains("not trusted"),
        "{failed}"
    );
    assert!(
        failed["fix"].as_str().unwrap().contains("8th field"),
        "{failed}"
    );
    let _ = &inst.root;
}
