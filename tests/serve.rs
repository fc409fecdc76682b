//! `nixdock serve` with stock Nix (issue 18): the host's Nix 2.8 and its own `build-remote`
//! (no nixdock-hook in these invocations: the host's nix.conf sets no `build-hook`, so Nix
//! runs its own, which names the machine by its store URI in "building … on"), the OpenSSH
//! client, the machines line exactly as `nixdock serve --machines-line` printed it, real
//! builders on the host's Docker.
//!
//! The test bed has OpenSSH's client (`scripts/testbed`, HOST_PACKAGES), which stock ssh-ng runs.
//!
//! Each test runs its own `nixdock serve` on port 22 of a loopback address of its own
//! (127.0.83.N: Nix 2.8 cannot carry a port in an ssh-ng URI), so they run in parallel.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::output_text as text;

const NIXDOCK: &str = env!("CARGO_BIN_EXE_nixdock");

/// The installation these tests share (its serve builders stay warm across tests and runs;
/// they stop themselves when idle).
fn install() -> &'static common::SuiteInstall {
    static I: OnceLock<common::SuiteInstall> = OnceLock::new();
    I.get_or_init(|| common::SuiteInstall::new("serve", &config()))
}

/// The builders' own nix.conf names no cache: the test bed has no network, and stock
/// build-remote does not pass its caller's `substituters` on (the builder's daemon would spend
/// ~4 s per build failing to reach cache.nixos.org).
/// aarch64-linux has a container of its own (`emulation = "container"`): the tests read
/// `uname -m` from the image's `/usr/bin`, which the native builder would run as x86_64.
fn config() -> String {
    format!(
        "[builders.\"x86_64-linux\"]\nimage = \"{}\"\nidle-timeout = 600\nmax-jobs = 4\n\
         extra-nix-conf = [\"substituters =\"]\n\
         [builders.\"aarch64-linux\"]\nimage = \"{}\"\nidle-timeout = 600\nmax-jobs = 2\n\
         emulation = \"container\"\nextra-nix-conf = [\"substituters =\"]\n",
        common::image("bookworm-amd64"),
        common::image("bookworm-arm64")
    )
}

fn nixdock(state: &Path, config: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(NIXDOCK);
    cmd.args(args)
        .env("NIXDOCK_STATE_DIR", state)
        .env("NIXDOCK_CONFIG", config);
    common::run_with_timeout(cmd, Duration::from_secs(60)).expect("nixdock ran")
}

/// A client key pair (ssh-keygen), in `dir`.
fn client_key(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(key.with_extension("pub"));
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    key
}

/// A new client key, authorised through `nixdock serve --authorize` as an operator would.
fn authorized_key(state: &Path, config: &Path, dir: &Path, name: &str) -> PathBuf {
    let key = client_key(dir, name);
    let o = nixdock(
        state,
        config,
        &[
            "serve",
            "--authorize",
            key.with_extension("pub").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    key
}

/// A running `nixdock serve`, killed when dropped; its diagnostics go to `log`.
struct Serve {
    child: Child,
    log: PathBuf,
    listen: String,
}

impl Serve {
    fn start(state: &Path, config: &Path, listen: &str, log: PathBuf) -> Serve {
        Self::start_with(state, config, listen, log, &[])
    }

    fn start_with(
        state: &Path,
        config: &Path,
        listen: &str,
        log: PathBuf,
        extra: &[&str],
    ) -> Serve {
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(NIXDOCK)
            .args(["serve", "--listen", listen])
            .args(extra)
            .env("NIXDOCK_STATE_DIR", state)
            .env("NIXDOCK_CONFIG", config)
            .env("NIXDOCK_LOG", "info,russh=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        let s = Serve {
            child,
            log,
            listen: listen.to_string(),
        };
        let t0 = Instant::now();
        while !s.log().contains("nixdock serve: listening on") {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "serve did not start:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The machines line for `system`, exactly as `--machines-line` prints it.
    fn line(&self, state: &Path, config: &Path, key: &Path, system: &str) -> String {
        let key = key.to_str().unwrap();
        let o = nixdock(
            state,
            config,
            &[
                "serve",
                "--machines-line",
                "--key",
                key,
                "--listen",
                &self.listen,
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        // Port 22: no warning, and stdout holds machines lines only.
        assert!(o.stderr.is_empty(), "{}", text(&o));
        assert!(
            out.lines().all(|l| l.starts_with("ssh-ng://")),
            "{}",
            text(&o)
        );
        out.lines()
            .find(|l| l.starts_with(&format!("ssh-ng://{system}@")))
            .unwrap_or_else(|| panic!("no line for {system}:\n{out}"))
            .to_string()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nonce() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn drv_expr(name: &str, system: &str, script: &str) -> String {
    format!(
        "derivation {{ name = \"{name}\"; system = \"{system}\"; builder = \"/bin/sh\"; \
         args = [\"-c\" {script:?}]; nonce = \"{}\"; }}",
        nonce()
    )
}

/// Stock Nix with only `line` as its builders and no local builds.
fn stock_build(expr: &str, line: &str) -> Output {
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "-E", expr, "--builders", line])
        .args(["--max-jobs", "0"])
        .args(["--option", "substituters", ""]);
    common::run_with_timeout(cmd, Duration::from_secs(600)).expect("nix-build ran")
}

fn started_at(container: &str) -> Option<String> {
    let o = common::docker(["inspect", "-f", "{{.State.StartedAt}}", container]);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[test]
fn stock_nix_2_8_builds_aarch64_through_serve() {
    if !common::require_bed() {
        return;
    }
    let i = install();
    let key = authorized_key(&i.state, &i.config, &i.root, "client-a");
    let serve = i.serve("127.0.83.1:22", "a.log");
    let line = i.line(&serve, &key, "aarch64-linux");
    // The fields Nix reads: URI, system, key, max-jobs, speed factor, features, mandatory,
    // host key (base64 of the endpoint's public key line).
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(f.len(), 8, "{line}");
    assert_eq!(f[0], "ssh-ng://aarch64-linux@127.0.83.1");
    assert_eq!(
        (f[1], f[2], f[3]),
        ("aarch64-linux", key.to_str().unwrap(), "2")
    );
    let host_key =
        String::from_utf8(hook_protocol::hash::base64_decode(f[7]).expect("base64")).unwrap();
    assert!(host_key.starts_with("ssh-ed25519 "), "{host_key}");

    let expr = drv_expr(
        "serve-aarch64",
        "aarch64-linux",
        // No sandbox in these builders: the image's uname, run under qemu-user, says aarch64.
        "echo serve-log-line; /usr/bin/uname -m > $out",
    );
    let o = stock_build(&expr, &line);
    let out = common::out_path(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    // Stock build-remote named the machine by its URI: not nixdock-hook.
    assert!(
        err.contains("on 'ssh-ng://aarch64-linux@127.0.83.1'"),
        "{}",
        text(&o)
    );
    assert!(err.contains("serve-log-line"), "{}", text(&o));
    let arch = std::fs::read_to_string(&out).unwrap();
    assert_eq!(arch.trim(), "aarch64", "built by an aarch64 builder");
    // On serve's own builder (whichever container serves aarch64-linux: its own, or a native
    // builder emulating it), never the hook's: nothing carries the hook's instance.
    let id = std::fs::read_to_string(i.state.join("instance-id")).unwrap();
    let id = id.trim();
    let log = serve.log();
    let bridged: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("session bridged to the builder") && l.contains("system=aarch64-linux")
        })
        .collect();
    assert_eq!(bridged.len(), 1, "{log}");
    assert!(
        bridged[0].contains(&format!("container=nixdock-{id}-serve-")),
        "{log}"
    );
    let hooks = common::docker_ok([
        "ps",
        "-aq",
        "--filter",
        &format!("label=nixdock.instance={id}"),
    ]);
    assert!(
        hooks.trim().is_empty(),
        "the hook's builders were used: {hooks}"
    );
}

#[test]
fn an_unauthorised_key_is_refused_and_no_builder_touched() {
    if !common::require_bed() {
        return;
    }
    // An installation of its own: whatever it created would carry its instance id.
    let i = own_install("serve-refused", &["listed"]);
    let stranger = client_key(&i.root, "stranger");
    let serve = i.serve("127.0.83.2:22", "serve.log");
    let line = i.line(&serve, &stranger, "x86_64-linux");
    let o = stock_build(
        &drv_expr("serve-refused", "x86_64-linux", "echo x > $out"),
        &line,
    );
    assert!(!o.status.success(), "{}", text(&o));
    let log = serve.log();
    assert!(log.contains("refused: key not in authorized_keys"), "{log}");
    assert!(!log.contains("client authenticated"), "{log}");
    let by_label = format!("label=nixdock.instance={}", i.instance);
    let ps = common::docker_ok(["ps", "-aq", "--filter", &by_label]);
    assert!(ps.trim().is_empty(), "a builder was created: {ps}");
    // A listed key gets nothing but the daemon: any other command is refused.
    let o = Command::new("ssh")
        .arg("-i")
        .arg(i.root.join("listed"))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "BatchMode=yes", "x86_64-linux@127.0.83.2", "id"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(serve.log().contains("refused a command"), "{}", serve.log());
    let ps = common::docker_ok(["ps", "-aq", "--filter", &by_label]);
    assert!(ps.trim().is_empty(), "a builder was created: {ps}");
}

/// An installation of its own (so its builders are created here and removed at the end).
struct ServeInstall {
    root: PathBuf,
    config: PathBuf,
    state: PathBuf,
    instance: String,
    _cleanup: common::InstanceCleanup,
    /// The hook's instance: serve-shares-builders puts serve's sessions there.
    _cleanup_hook: common::InstanceCleanup,
}

/// Starting `nixdock serve` for an installation and asking it for machines lines.
trait Serves {
    /// Its state directory, config file and a directory for its files.
    fn dirs(&self) -> (&Path, &Path, &Path);

    /// `nixdock serve` on `listen`, its diagnostics in `log` under the installation's directory.
    fn serve(&self, listen: &str, log: &str) -> Serve {
        let (state, config, root) = self.dirs();
        Serve::start(state, config, listen, root.join(log))
    }

    /// `serve`'s machines line for `system` with the client key `key`.
    fn line(&self, serve: &Serve, key: &Path, system: &str) -> String {
        let (state, config, _) = self.dirs();
        serve.line(state, config, key, system)
    }
}

impl Serves for ServeInstall {
    fn dirs(&self) -> (&Path, &Path, &Path) {
        (&self.state, &self.config, &self.root)
    }
}

impl Serves for common::SuiteInstall {
    fn dirs(&self) -> (&Path, &Path, &Path) {
        (&self.state, &self.config, &self.root)
    }
}

fn own_install(prefix: &str, keys: &[&str]) -> ServeInstall {
    own_install_with(prefix, keys, &config())
}

fn own_install_with(prefix: &str, keys: &[&str], config_text: &str) -> ServeInstall {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(common::unique_name(prefix));
    std::fs::create_dir_all(&root).unwrap();
    let config = root.join("nixdock.toml");
    std::fs::write(&config, config_text).unwrap();
    let state = root.join("state");
    for k in keys {
        authorized_key(&state, &config, &root, k);
    }
    let id = std::fs::read_to_string(state.join("instance-id")).unwrap();
    let instance = format!("{}-serve", id.trim());
    ServeInstall {
        _cleanup: common::InstanceCleanup(instance.clone()),
        _cleanup_hook: common::InstanceCleanup(id.trim().to_string()),
        root,
        config,
        state,
        instance,
    }
}

#[test]
fn a_session_starts_its_builder_cold() {
    if !common::require_bed() {
        return;
    }
    let i = own_install("serve-cold", &["client"]);
    let key = i.root.join("client");
    let serve = i.serve("127.0.83.3:22", "serve.log");
    let line = i.line(&serve, &key, "x86_64-linux");
    let container = format!("nixdock-{}-x86_64-linux", i.instance);
    assert!(started_at(&container).is_none());
    // No builder yet: the session creates and starts it, as the hook would.
    let o = stock_build(
        &drv_expr("serve-cold", "x86_64-linux", "echo cold > $out"),
        &line,
    );
    assert_eq!(
        std::fs::read_to_string(common::out_path(&o)).unwrap(),
        "cold\n"
    );
    assert!(serve.log().contains("creating builder"), "{}", serve.log());
    // Stopped: the next session starts it again.
    let first = started_at(&container).expect("the builder exists");
    common::docker_ok(["stop", "-t", "2", &container]);
    let o = stock_build(
        &drv_expr("serve-cold", "x86_64-linux", "echo again > $out"),
        &line,
    );
    assert_eq!(
        std::fs::read_to_string(common::out_path(&o)).unwrap(),
        "again\n"
    );
    let second = started_at(&container).expect("the builder exists");
    assert_ne!(first, second, "not restarted");
    assert!(serve.log().contains("starting builder"), "{}", serve.log());
}

#[test]
fn two_clients_build_at_once() {
    if !common::require_bed() {
        return;
    }
    let i = install();
    let key = authorized_key(&i.state, &i.config, &i.root, "client-d");
    let serve = i.serve("127.0.83.4:22", "d.log");
    let line = i.line(&serve, &key, "x86_64-linux");
    // Each build marks its start in the builder's /tmp (these builders are not sandboxed:
    // `sandbox = "auto"` on a rootful engine) and waits, up to 60 s, for the other's mark: both
    // succeed only if serve ran the two sessions at the same time.
    let tag = nonce();
    let builds: Vec<_> = (0..2)
        .map(|n| {
            let line = line.clone();
            let script = format!(
                ": > /tmp/serve-two-{tag}-{n}; i=0; \
                 while [ ! -e /tmp/serve-two-{tag}-{other} ]; do \
                   i=$((i+1)); [ $i -lt 600 ] || exit 1; /bin/sleep 0.1; done; \
                 echo {n} > $out",
                other = 1 - n
            );
            std::thread::spawn(move || {
                stock_build(
                    &drv_expr(&format!("serve-two-{n}"), "x86_64-linux", &script),
                    &line,
                )
            })
        })
        .collect();
    for (n, b) in builds.into_iter().enumerate() {
        let o = b.join().unwrap();
        let out = common::out_path(&o);
        assert_eq!(std::fs::read_to_string(out).unwrap(), format!("{n}\n"));
    }
    // Both sessions held a slot of their own at the same time (distinct slot numbers: a
    // slot is free again once its session ended).
    let log = serve.log();
    let slots: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("session bridged to the builder"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("slot=")))
        .collect();
    assert_eq!(slots.len(), 2, "{log}");
    assert_ne!(slots[0], slots[1], "{log}");
}

/// Nix 2.34 (Debian sid image, on the host network), multi-user: the line as printed goes
/// into the container's nix.conf `builders`, the root nix-daemon's own build-remote runs ssh,
/// an unprivileged user in `nix-users` builds an aarch64 derivation.
#[test]
fn nix_2_34_multi_user_builds_through_serve() {
    if !common::require_bed() {
        return;
    }
    let i = install();
    let key = authorized_key(&i.state, &i.config, &i.root, "client-e");
    let serve = i.serve("127.0.83.5:22", "e.log");
    let line = i.line(&serve, &key, "aarch64-linux");
    let expr = drv_expr(
        "serve-234",
        "aarch64-linux",
        "echo from-2.34; /usr/bin/uname -m > $out",
    );
    let name = common::unique_name("nixdock-test-serve-client");
    let _guard = common::ContainerGuard(name.clone());
    let key_path = key.to_str().unwrap();
    let script = format!(
        "set -e; nix --version; \
         printf 'builders = {line}\\nmax-jobs = 0\\nsubstituters =\\n' >> /etc/nix/nix.conf; \
         nix-daemon --daemon > /tmp/daemon.log 2>&1 & \
         i=0; while [ ! -S /nix/var/nix/daemon-socket/socket ]; do \
           i=$((i+1)); [ $i -lt 200 ] || {{ cat /tmp/daemon.log; exit 1; }}; sleep 0.05; done; \
         useradd -m -G nix-users alice; \
         out=$(runuser -u alice -- env NIX_REMOTE=daemon nix-build --no-out-link -E '{expr}') \
           || {{ cat /tmp/daemon.log; exit 1; }}; \
         cat $out"
    );
    let mut cmd = Command::new("docker");
    cmd.args(["run", "--rm", "--name", &name, "--network", "host"])
        .args(["-v", &format!("{key_path}:{key_path}:ro")])
        .args([&common::image("sid-amd64"), "sh", "-c", &script]);
    let o = common::run_with_timeout(cmd, Duration::from_secs(600)).expect("docker ran");
    let t = text(&o);
    assert!(o.status.success(), "{t}\nserve:\n{}", serve.log());
    let stdout = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains("(Nix) 2.34."), "{t}");
    assert_eq!(lines.last(), Some(&"aarch64"), "{t}");
    assert!(
        serve.log().contains("session bridged to the builder"),
        "{}",
        serve.log()
    );
}

/// `serve-shares-builders = true`: sessions go to the hook's builder (its container, store and
/// slots), and serve makes none of its own.
#[test]
fn shared_builders_are_the_hooks() {
    if !common::require_bed() {
        return;
    }
    let text = format!("serve-shares-builders = true\n{}", config());
    let i = own_install_with("serve-shared", &["client"], &text);
    let key = i.root.join("client");
    let serve = i.serve("127.0.83.6:22", "serve.log");
    let line = i.line(&serve, &key, "x86_64-linux");
    let o = stock_build(
        &drv_expr("serve-shared", "x86_64-linux", "echo shared > $out"),
        &line,
    );
    assert_eq!(
        std::fs::read_to_string(common::out_path(&o)).unwrap(),
        "shared\n"
    );
    let hooks = i.instance.trim_end_matches("-serve");
    assert!(started_at(&format!("nixdock-{hooks}-x86_64-linux")).is_some());
    assert!(started_at(&format!("nixdock-{}-x86_64-linux", i.instance)).is_none());
    assert!(
        serve.log().contains("builders shared with the hook"),
        "{}",
        serve.log()
    );
}

/// Removes a serve instance's containers and volumes on engine 2 when dropped.
struct Engine2Cleanup(String);

impl Drop for Engine2Cleanup {
    fn drop(&mut self) {
        let label = format!("label=nixdock.instance={}", self.0);
        let host = common::ENGINE2_UNIX;
        let ids = common::docker_on(host, ["ps", "-aq", "--filter", &label]);
        let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        if !ids.is_empty() {
            common::docker_on(
                host,
                ["rm", "-f", "-v"].into_iter().map(String::from).chain(ids),
            );
        }
        let vols = common::docker_on(host, ["volume", "ls", "-q", "--filter", &label]);
        let vols: Vec<String> = String::from_utf8_lossy(&vols.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        if !vols.is_empty() {
            common::docker_on(
                host,
                ["volume", "rm", "-f"]
                    .into_iter()
                    .map(String::from)
                    .chain(vols),
            );
        }
    }
}

/// The ways to a builder other than the local socket: SSH to its sshd (`transport = "ssh"`,
/// the daemon socket forwarded) and a remote engine's exec (engine 2 over TLS:
/// `nix-daemon --stdio` in the builder); the session's bytes go either way unchanged.
#[test]
fn sessions_reach_builders_over_ssh_and_a_remote_engines_exec() {
    if !common::require_bed() {
        return;
    }
    let i = own_install_with(
        "serve-ssh",
        &["client"],
        &format!("transport = \"ssh\"\n{}", config()),
    );
    let serve = i.serve("127.0.83.7:22", "serve.log");
    let line = i.line(&serve, &i.root.join("client"), "x86_64-linux");
    let o = stock_build(
        &drv_expr("serve-ssh", "x86_64-linux", "echo ssh > $out"),
        &line,
    );
    assert_eq!(
        std::fs::read_to_string(common::out_path(&o)).unwrap(),
        "ssh\n"
    );
    assert!(serve.log().contains("via=\"ssh\""), "{}", serve.log());
    drop(serve);

    if !common::require_second_engine() {
        return;
    }
    let tls = format!(
        "docker-host = \"{}\"\ntls-ca = \"{}\"\ntls-cert = \"{}\"\ntls-key = \"{}\"\n\
         [builders.\"x86_64-linux\"]\nimage = \"{}\"\nidle-timeout = 120\n\
         extra-nix-conf = [\"substituters =\"]\n",
        common::ENGINE2_TLS,
        common::ENGINE2_TLS_CA,
        common::ENGINE2_TLS_CERT,
        common::ENGINE2_TLS_KEY,
        common::image("bookworm-amd64")
    );
    let i = own_install_with("serve-e2", &["client"], &tls);
    let _e2 = Engine2Cleanup(i.instance.clone());
    let serve = i.serve("127.0.83.8:22", "serve.log");
    let line = i.line(&serve, &i.root.join("client"), "x86_64-linux");
    let o = stock_build(
        &drv_expr("serve-e2", "x86_64-linux", "echo e2 > $out"),
        &line,
    );
    assert_eq!(
        std::fs::read_to_string(common::out_path(&o)).unwrap(),
        "e2\n"
    );
    assert!(
        serve.log().contains("via=\"engine exec\""),
        "{}",
        serve.log()
    );
}

/// A client that disconnects mid-session (its ssh killed) ends the session at once: the
/// builder stream is dropped and the session's slot is free again.
#[test]
fn a_client_disconnect_ends_its_session_and_frees_its_slot() {
    if !common::require_bed() {
        return;
    }
    let i = own_install("serve-gone", &["client"]);
    let serve = i.serve("127.0.83.10:22", "serve.log");
    let mut ssh = Command::new("ssh")
        .arg("-i")
        .arg(i.root.join("client"))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args([
            "-o",
            "BatchMode=yes",
            "x86_64-linux@127.0.83.10",
            "nix-daemon",
            "--stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wait_for = |what: &str, secs: u64| {
        let t0 = Instant::now();
        while !serve.log().contains(what) {
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "no {what:?}:\n{}",
                serve.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for("session bridged to the builder", 120);
    let load = i.state.join("current-load");
    let container = format!("nixdock-{}-x86_64-linux", i.instance);
    let busy = || nixdock::builder::slots::busy_count(&load, &container, 4).unwrap();
    assert_eq!(busy(), 1, "the open session holds a slot");
    let _ = ssh.kill();
    let _ = ssh.wait();
    wait_for("client disconnected", 30);
    let t0 = Instant::now();
    while busy() != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the slot stayed held"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// All slots busy: a session waits for one up to `--slot-wait`, then fails with the reason on
/// the client's stderr; a client that leaves while waiting ends its wait at once.
#[test]
fn a_session_waits_for_a_slot_then_fails_with_why() {
    if !common::require_bed() {
        return;
    }
    let one_slot = config().replace("max-jobs = 4", "max-jobs = 1");
    let i = own_install_with("serve-full", &["client"], &one_slot);
    let serve = Serve::start_with(
        &i.state,
        &i.config,
        "127.0.83.11:22",
        i.root.join("serve.log"),
        &["--slot-wait", "3"],
    );
    let session = |stderr: Stdio| {
        Command::new("ssh")
            .arg("-i")
            .arg(i.root.join("client"))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
            .args(["x86_64-linux@127.0.83.11", "nix-daemon", "--stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap()
    };
    let count = |what: &str| serve.log().matches(what).count();
    let wait_until = |what: &str, n: usize, secs: u64| {
        let t0 = Instant::now();
        while count(what) < n {
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "no {what:?}:\n{}",
                serve.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The only slot, held.
    let mut holder = session(Stdio::null());
    wait_until("session bridged to the builder", 1, 120);
    // A second session waits, then fails saying why (the holder still holds the slot).
    let t0 = Instant::now();
    let waiter = session(Stdio::piped());
    let o = waiter.wait_with_output().unwrap();
    let waited = t0.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("every x86_64-linux build slot stayed busy for 3 s"),
        "{err}"
    );
    assert!(waited >= Duration::from_secs(3), "{waited:?}");
    assert_eq!(
        count("session bridged to the builder"),
        1,
        "{}",
        serve.log()
    );
    // A third one leaves while waiting: its wait ends there, long before the deadline.
    let mut leaver = session(Stdio::null());
    wait_until("client authenticated", 3, 30);
    std::thread::sleep(Duration::from_millis(300));
    let _ = leaver.kill();
    let _ = leaver.wait();
    wait_until("client disconnected", 1, 2);
    let _ = holder.kill();
    let _ = holder.wait();
    wait_until("client disconnected", 2, 30);
}

/// Off port 22 the lines carry `host:port` (Nix ≥ 2.31) and a warning for older Nix goes to
/// stderr, never into the lines; an address that names no one host is refused.
#[test]
fn machines_lines_off_port_22_warn_on_stderr() {
    if !common::require_bed() {
        return;
    }
    let i = install();
    let key = client_key(&i.root, "client-f");
    let args = |listen: &str| {
        vec![
            "serve".to_string(),
            "--machines-line".into(),
            "--key".into(),
            key.to_str().unwrap().into(),
            "--listen".into(),
            listen.into(),
        ]
    };
    let a = args("127.0.0.1:3022");
    let o = nixdock(
        &i.state,
        &i.config,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("ssh-ng://x86_64-linux@127.0.0.1:3022 x86_64-linux ")),
        "{}",
        text(&o)
    );
    assert!(
        out.lines().all(|l| l.starts_with("ssh-ng://")),
        "{}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Nix before 2.31"),
        "{}",
        text(&o)
    );
    let a = args("0.0.0.0:22");
    let o = nixdock(
        &i.state,
        &i.config,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(o.stdout.is_empty(), "{}", text(&o));
}
