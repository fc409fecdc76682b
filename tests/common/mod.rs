//! Shared helpers for integration tests that need the real test bed (`scripts/testbed`):
//! Docker, the host's Nix daemon and the `nixdock-test/*` builder images.
//!
//! Use it from a test file with `mod common;` and start every bed-dependent test with
//! `if !common::require_bed() { return; }`.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Prefix of every test-bed image tag.
pub const IMAGE_PREFIX: &str = "nixdock-test";

/// Default time limit for one `docker` command.
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);

/// The repository root (the root crate's manifest dir).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The full tag of a test-bed image, e.g. `image("bookworm-amd64")`.
pub fn image(name: &str) -> String {
    format!("{IMAGE_PREFIX}/{name}")
}

/// True when the test bed is present (current, or stale with a warning). When it is missing:
/// with `CI` set, panics ("test bed missing: run scripts/testbed");
/// otherwise prints a loud notice and returns false, and the caller should return (skip).
///
/// The check (`scripts/testbed --check`) runs once per test binary.
pub fn require_bed() -> bool {
    static BED: OnceLock<Result<(), String>> = OnceLock::new();
    let state = BED.get_or_init(check_bed);
    match state {
        Ok(()) => true,
        Err(report) => missing(format!(
            "test bed missing: run scripts/testbed (as root)\n{report}"
        )),
    }
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// `scripts/testbed --check`: exit 0 = complete, 2 = complete but some image was built from an
/// older recipe (still usable: warn and go on), anything else = missing.
fn check_bed() -> Result<(), String> {
    let script = repo_root().join("scripts/testbed");
    let mut cmd = Command::new("bash");
    // Only the core: engine 2 and Podman have their own require_* helpers.
    cmd.arg(&script).args(["--check", "core"]);
    match run_with_timeout(cmd, Duration::from_secs(120)) {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) if out.status.code() == Some(2) => {
            eprintln!(
                "WARNING: test bed is stale (an image recipe changed since it was built); \
                 testing against the existing images. Run scripts/testbed to rebuild.\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
            Ok(())
        }
        Ok(out) => Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("{} --check: {e}", script.display())),
    }
}

/// Runs `cmd` to completion (stdin closed) with a time limit; on timeout the child is killed
/// and an error returned. Output is collected on threads, so large outputs cannot deadlock.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().map_err(|e| format!("spawn {what}: {e}"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_timeout(&mut child, timeout)
        .ok_or_else(|| format!("{what} did not finish within {timeout:?} (killed)"))?;
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Reads a pipe to its end on a thread.
pub fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// Waits for `child` up to `timeout`; kills it and returns None when it is still running then.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// `docker ARGS...` with [`DOCKER_TIMEOUT`]; panics only when it cannot run or times out.
pub fn docker<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("docker");
    cmd.args(args);
    run_with_timeout(cmd, DOCKER_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// `docker ARGS...` that must succeed; returns its stdout (lossy UTF-8), panics with stderr.
pub fn docker_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = docker(&args);
    assert!(
        out.status.success(),
        "docker {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A name unique across processes and calls, e.g. for containers: `PREFIX-PID-N-NANOS`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the named container (`docker rm -f`) when dropped, so a failing test leaves none.
pub struct ContainerGuard(pub String);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let mut cmd = Command::new("docker");
        cmd.args(["rm", "-f", "-v", &self.0]);
        let _ = run_with_timeout(cmd, Duration::from_secs(60));
    }
}

/// Path of the test-bed script.
pub fn testbed_script() -> PathBuf {
    repo_root().join("scripts/testbed")
}

/// True when `program --version` runs. When it does not: with `CI` set, panics (the test bed
/// installs it: `scripts/testbed`); otherwise prints a loud notice and returns false, and the
/// caller should return (skip).
pub fn require_tool(program: &str) -> bool {
    let mut cmd = Command::new(program);
    cmd.arg("--version");
    let problem = match run_with_timeout(cmd, Duration::from_secs(60)) {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!(
            "`{program} --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => e,
    };
    missing(format!(
        "{program} is missing: run scripts/testbed (as root)\n{problem}"
    ))
}

/// Something a test needs is missing: a failure in CI, a loud skip (`false`) elsewhere.
fn missing(msg: String) -> bool {
    if in_ci() {
        panic!("{msg}");
    }
    eprintln!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !! SKIPPED: {msg}\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    );
    false
}

/// A command's status and both outputs, for assertion messages.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The output path a successful `nix-build --no-out-link` printed last.
pub fn out_path(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}", output_text(o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .expect("an output path")
        .to_string()
}

/// `docker run` of a Nix client container (a test-bed image) on the host's network with the
/// hook, the engine socket, a nixdock state directory and config mounted at their host paths,
/// running `script` with `sh -c`. The container is named, so a timeout still removes it.
pub fn client_container(
    img: &str,
    hook: &str,
    state: &Path,
    config: &Path,
    script: &str,
) -> Output {
    let (state, config) = (state.display(), config.display());
    let name = unique_name("nixdock-test-client");
    let _guard = ContainerGuard(name.clone());
    let mut cmd = Command::new("docker");
    cmd.args(["run", "--rm", "--name", &name, "--network", "host"])
        .args(["-v", "/var/run/docker.sock:/var/run/docker.sock"])
        .args(["-v", &format!("{hook}:/usr/local/bin/nixdock-hook:ro")])
        .args(["-v", &format!("{state}:{state}")])
        .args(["-v", &format!("{config}:{config}:ro")])
        .args(["-e", &format!("NIXDOCK_STATE_DIR={state}")])
        .args(["-e", &format!("NIXDOCK_CONFIG={config}")])
        .args([&image(img), "sh", "-c", script]);
    run_with_timeout(cmd, Duration::from_secs(600)).unwrap_or_else(|e| panic!("{e}"))
}

/// Removes every container and volume labelled with a nixdock instance id when dropped (also
/// on panic), so a failing test leaves no builder behind.
pub struct InstanceCleanup(pub String);

impl Drop for InstanceCleanup {
    fn drop(&mut self) {
        let by_label = format!(
            "label={}={}",
            nixdock::builder::provision::LABEL_INSTANCE,
            self.0
        );
        for (list, remove) in [
            (&["ps", "-aq"][..], &["rm", "-f", "-v"][..]),
            (&["volume", "ls", "-q"][..], &["volume", "rm", "-f"][..]),
        ] {
            let mut args: Vec<&str> = list.to_vec();
            args.extend(["--filter", &by_label]);
            let ids = String::from_utf8_lossy(&docker(&args).stdout).into_owned();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args: Vec<&str> = remove.to_vec();
                args.extend(ids);
                docker(&args);
            }
        }
    }
}

/// An installation of a test's own (its own instance id, so its own containers): config and
/// state under the target's temporary directory; its containers and volumes are removed when
/// it is dropped (also on panic).
pub struct OwnInstall {
    pub config: PathBuf,
    pub state: PathBuf,
}

impl OwnInstall {
    pub fn new(prefix: &str, config: &str) -> OwnInstall {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique_name(prefix));
        std::fs::create_dir_all(&root).unwrap();
        let path = root.join("nixdock.toml");
        std::fs::write(&path, config).unwrap();
        OwnInstall {
            config: path,
            state: root.join("state"),
        }
    }

    /// The instance id, once the first hook or command has made it.
    pub fn instance(&self) -> Option<String> {
        std::fs::read_to_string(self.state.join("instance-id"))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// The builder container serving `system` (the naming of the top-level engine).
    pub fn container(&self, system: &str) -> String {
        let id = self.instance().expect("an instance id");
        format!("nixdock-{id}-{system}")
    }

    /// `nix-build` of `expr` through the hook (`--max-jobs 0`: even the host's own system goes
    /// to a builder).
    pub fn build(&self, expr: &str) -> Output {
        let mut cmd = Command::new("nix-build");
        cmd.args(["--no-out-link", "-E", expr])
            .args([
                "--option",
                "build-hook",
                env!("CARGO_BIN_EXE_nixdock-hook"),
                "--max-jobs",
                "0",
            ])
            .env("NIXDOCK_CONFIG", &self.config)
            .env("NIXDOCK_STATE_DIR", &self.state);
        run_with_timeout(cmd, Duration::from_secs(600)).expect("nix-build ran")
    }

    /// The `nixdock` CLI with this installation's config and state.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_nixdock"))
            .args(args)
            .env("NIXDOCK_CONFIG", &self.config)
            .env("NIXDOCK_STATE_DIR", &self.state)
            .output()
            .unwrap()
    }

    /// `nixdock status --json`'s entry for `system`.
    pub fn status(&self, system: &str) -> serde_json::Value {
        let o = self.cli(&["status", "--json", "--no-size"]);
        assert!(o.status.success(), "{}", output_text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["builders"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["system"] == system)
            .cloned()
            .unwrap_or_else(|| panic!("no {system} in {v}"))
    }
}

impl Drop for OwnInstall {
    fn drop(&mut self) {
        if let Some(id) = self.instance() {
            drop(InstanceCleanup(id));
        }
    }
}

/// The nixdock installation one test suite shares: a config written once and a state
/// directory, under the target's temporary directory, so its builders stay warm across tests
/// and runs.
pub struct SuiteInstall {
    pub root: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
}

impl SuiteInstall {
    pub fn new(dir: &str, config: &str) -> SuiteInstall {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(dir);
        std::fs::create_dir_all(&root).unwrap();
        let config_path = root.join("nixdock.toml");
        std::fs::write(&config_path, config).unwrap();
        SuiteInstall {
            state: root.join("state"),
            config: config_path,
            root,
        }
    }
}

/// The config of the `e2e` installation, which hook_e2e and build_log share (and so its
/// builders): amd64 and emulated arm64 builders from the test bed, the arm64 one a container of
/// its own (`emulation = "container"`: these suites' aarch64 derivations run the arm64 image's
/// `/bin/sh`; tests/emulation.rs covers the native builder).
pub fn e2e_config() -> String {
    format!(
        "[builders.\"x86_64-linux\"]\nimage = \"{}\"\nidle-timeout = 900\nmax-jobs = 16\n\
         [builders.\"aarch64-linux\"]\nimage = \"{}\"\nidle-timeout = 900\nemulation = \"container\"\n",
        image("bookworm-amd64"),
        image("bookworm-arm64")
    )
}

// ---------------------------------------------------------------------------------------------
// Engines beyond this host (issue 15): engine 2 and Podman, provisioned by `scripts/testbed`
// (see the comment at its top). The paths are fixed there too.

/// Engine 2's network namespace; the veth pair's host end and namespace end.
pub const ENGINE2_NETNS: &str = "nixdock-e2";
pub const ENGINE2_HOST_IF: &str = "nxd-e2h";
pub const ENGINE2_IF: &str = "nxd-e2n";
/// The host's address on the veth pair, and engine 2's (where it listens and publishes).
pub const ENGINE2_HOST_ADDR: &str = "10.231.0.1";
pub const ENGINE2_ADDR: &str = "10.231.0.2";
/// Engine 2's unix socket (group `nixdock-engine`).
pub const ENGINE2_SOCKET: &str = "/run/nixdock-testbed/engine2/docker.sock";
pub const ENGINE2_UNIX: &str = "unix:///run/nixdock-testbed/engine2/docker.sock";
/// TCP with TLS; dockerd runs with `--tlsverify`, so a client certificate is required.
pub const ENGINE2_TLS: &str = "tcp://10.231.0.2:2376";
/// Plain TCP (socat in the namespace, onto the unix socket).
pub const ENGINE2_PLAIN: &str = "tcp://10.231.0.2:2375";
/// The ssh:// engine: this user's one key is forced to `docker system dial-stdio`.
pub const ENGINE2_SSH_USER: &str = "nixdock-engine";
pub const ENGINE2_SSH: &str = "ssh://nixdock-engine@10.231.0.2";
/// Engine 2's material (root-only where it is a key).
pub const ENGINE2_DIR: &str = "/var/cache/nixdock-testbed/engine2";
pub const ENGINE2_TLS_CA: &str = "/var/cache/nixdock-testbed/engine2/tls/ca.pem";
pub const ENGINE2_TLS_CERT: &str = "/var/cache/nixdock-testbed/engine2/tls/cert.pem";
pub const ENGINE2_TLS_KEY: &str = "/var/cache/nixdock-testbed/engine2/tls/key.pem";
/// A CA unrelated to engine 2's: a client trusting only it must refuse the engine.
pub const ENGINE2_TLS_WRONG_CA: &str = "/var/cache/nixdock-testbed/engine2/tls/wrong-ca.pem";
/// The ssh:// engine's client key (ed25519), its host key (`ssh-ed25519 AAAA…`, one line) and
/// a known_hosts file holding that key for [`ENGINE2_ADDR`].
pub const ENGINE2_SSH_KEY: &str = "/var/cache/nixdock-testbed/engine2/ssh/id_ed25519";
pub const ENGINE2_SSH_HOST_KEY_PUB: &str = "/var/cache/nixdock-testbed/engine2/ssh/host_key.pub";
pub const ENGINE2_SSH_KNOWN_HOSTS: &str = "/var/cache/nixdock-testbed/engine2/ssh/known_hosts";
/// The builder images engine 2 holds (same image IDs as on the host engine).
pub const ENGINE2_IMAGES: [&str; 3] = ["bookworm-amd64", "bookworm-arm64", "trixie-amd64"];
/// Rootful `podman system service` (Docker API), and the images it holds.
pub const PODMAN_SOCKET: &str = "/run/podman/podman.sock";
pub const PODMAN_UNIX: &str = "unix:///run/podman/podman.sock";
pub const PODMAN_IMAGES: [&str; 1] = ["bookworm-amd64"];

/// The docker CLI's global flags for engine 2 over TLS ([`ENGINE2_TLS`]) with the client
/// certificate, trusting `ca` (e.g. [`ENGINE2_TLS_CA`] or [`ENGINE2_TLS_WRONG_CA`]).
pub fn engine2_tls_flags(ca: &str) -> Vec<String> {
    [
        "--tlsverify",
        "--tlscacert",
        ca,
        "--tlscert",
        ENGINE2_TLS_CERT,
        "--tlskey",
        ENGINE2_TLS_KEY,
    ]
    .map(String::from)
    .to_vec()
}

/// True when engine 2 is up on all its endpoints (`scripts/testbed --check engine2`: network,
/// unix, TLS, plain tcp, ssh dial-stdio, images). When not: with `CI` set, panics; otherwise
/// prints a loud notice and returns false, and the caller should return (skip).
pub fn require_second_engine() -> bool {
    static E2: OnceLock<Result<(), String>> = OnceLock::new();
    match E2.get_or_init(|| check_part("engine2")) {
        Ok(()) => true,
        Err(report) => missing(format!(
            "second Docker engine (netns {ENGINE2_NETNS}, {ENGINE2_ADDR}) missing: \
             run scripts/testbed (as root)\n{report}"
        )),
    }
}

/// True when the Podman engine is up (`scripts/testbed --check podman`: packages,
/// containers.conf, the service's socket, its image). Otherwise as [`require_second_engine`].
pub fn require_podman() -> bool {
    static PODMAN: OnceLock<Result<(), String>> = OnceLock::new();
    match PODMAN.get_or_init(|| check_part("podman")) {
        Ok(()) => true,
        Err(report) => missing(format!(
            "Podman engine ({PODMAN_UNIX}) missing: run scripts/testbed (as root)\n{report}"
        )),
    }
}

/// The test bed's rootless Podman user (`scripts/testbed`: subordinate ids 200000-265535, its
/// `podman system service` on /run/user/<uid>/podman/podman.sock) and its home.
pub const ROOTLESS_USER: &str = "nixdock-rootless";
pub const ROOTLESS_HOME: &str = "/var/lib/nixdock-testbed/rootless";
pub const ROOTLESS_SUBID_START: u32 = 200000;
pub const ROOTLESS_SUBID_COUNT: u32 = 65536;

/// True when the rootless Podman engine is up (`scripts/testbed --check rootless`: user,
/// subordinate ids, runtime dir, config, service, images). Otherwise as
/// [`require_second_engine`].
pub fn require_rootless() -> bool {
    static ROOTLESS: OnceLock<Result<(), String>> = OnceLock::new();
    match ROOTLESS.get_or_init(|| check_part("rootless")) {
        Ok(()) => true,
        Err(report) => missing(format!(
            "rootless Podman engine (user {ROOTLESS_USER}) missing: run scripts/testbed (as \
             root)\n{report}"
        )),
    }
}

/// `scripts/testbed --check PART`: 0 = present, 2 = present but an image is older than the host
/// engine's (usable: warn), anything else = missing.
fn check_part(part: &str) -> Result<(), String> {
    let script = testbed_script();
    let mut cmd = Command::new("bash");
    cmd.arg(&script).args(["--check", part]);
    match run_with_timeout(cmd, Duration::from_secs(120)) {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) if out.status.code() == Some(2) => {
            eprintln!(
                "WARNING: test bed part {part} is stale; testing against it anyway. Run \
                 scripts/testbed to refresh.\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
            Ok(())
        }
        Ok(out) => Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("{} --check {part}: {e}", script.display())),
    }
}

/// `docker -H HOST ARGS...` with [`DOCKER_TIMEOUT`] (the environment's DOCKER_HOST, TLS and
/// context settings removed, so only HOST and ARGS count); panics only when it cannot run or
/// times out. ARGS may start with global flags, e.g. `--tlsverify`.
pub fn docker_on<I, S>(host: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("docker");
    for var in [
        "DOCKER_HOST",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
        "DOCKER_CONTEXT",
    ] {
        cmd.env_remove(var);
    }
    cmd.arg("-H").arg(host).args(args);
    run_with_timeout(cmd, DOCKER_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// [`docker_on`] that must succeed; returns its stdout (lossy UTF-8), panics with both outputs.
pub fn docker_on_ok<I, S>(host: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = docker_on(host, &args);
    assert!(
        out.status.success(),
        "docker -H {host} {args:?}: {}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the named container from the engine at `host` (`docker -H HOST rm -f`) when
/// dropped, so a failing test leaves none there.
pub struct ContainerGuardOn {
    pub host: String,
    pub name: String,
}

impl Drop for ContainerGuardOn {
    fn drop(&mut self) {
        let mut cmd = Command::new("docker");
        cmd.args(["-H", &self.host, "rm", "-f", "-v", &self.name]);
        let _ = run_with_timeout(cmd, Duration::from_secs(60));
    }
}

/// Takes engine 2's link down (`ip link set nxd-e2h down`, as a host dropping off the network)
/// until dropped, also on panic; `scripts/testbed` brings a link left down back up too.
pub struct Engine2LinkDown(());

impl Engine2LinkDown {
    pub fn new() -> Engine2LinkDown {
        if let Err(e) = set_engine2_link("down") {
            panic!("{e}");
        }
        Engine2LinkDown(())
    }
}

impl Drop for Engine2LinkDown {
    fn drop(&mut self) {
        // No panic here: this also runs while a failed test unwinds.
        if let Err(e) = set_engine2_link("up") {
            eprintln!("WARNING: {e}; run scripts/testbed to bring engine 2 back");
        }
    }
}

fn set_engine2_link(state: &str) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    cmd.args(["link", "set", ENGINE2_HOST_IF, state]);
    let out = run_with_timeout(cmd, Duration::from_secs(30))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip link set {ENGINE2_HOST_IF} {state}: {}",
            output_text(&out)
        ))
    }
}

/// The test bed's local registry (Debian's docker-registry, `scripts/testbed`): plain HTTP on
/// loopback, which Docker pulls from without TLS settings. It holds `nixdock-test/nixos-nix` as
/// `127.0.0.1:5000/nixos/nix:<the default image's tag>`.
pub const REGISTRY: &str = "127.0.0.1:5000";
