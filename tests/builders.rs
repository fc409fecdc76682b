//! Builder lifecycle against the real Docker engine and the `nixdock-test/*` images of
//! `scripts/testbed`: cold start, reuse, recreation on a configuration change (never under a
//! running build), the `/nix` volume, racing callers (tasks and processes), two instances on
//! one engine, idle stop, the emulated arm64 builder with build users, the nixos/nix-like
//! image, images without build users (builds still run as build users of nixdock's), an
//! unreachable engine and an image without sshd.
//!
//! Every test uses its own temporary state directory, so its own instance id and containers;
//! a guard removes the instance's containers and volumes (by label and by name) even when the
//! test fails. Without the bed these tests skip (loudly), or fail when `CI` is set.
//!
//! Two tests are helpers that do nothing unless a parent test starts this very binary with
//! their environment (`helper_process_*`): the two-process race, and discovery in a mount
//! namespace where no engine socket exists.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bollard::models::{ContainerInspectResponse, PortBinding};
use hook_protocol::derivation::Derivation;
use hook_protocol::store_path::StorePath;
use hook_protocol::worker::{BuildMode, BuildStatus, ClientSettings, LogEvent};
use nixdock::builder::engine::HowFound;
use nixdock::builder::provision::{LABEL_INSTANCE, LABEL_MAX_JOBS, LABEL_SYSTEM, SSH_PORT};
use nixdock::builder::{
    BuilderError, BuilderSpec, Builders, Engine, EngineError, ReadyBuilder, slots,
};
use nixdock::config::BuilderConfig;
use nixdock::state::StateDir;
use nixdock::transport::{ExecChannel, SshSession};
use tokio::io::AsyncReadExt;

use common::{docker, docker_ok, image, require_bed, run_with_timeout};

/// Upper bound for one `ensure_ready` (an emulated cold start takes ~7 s alone).
const READY_TIMEOUT: Duration = Duration::from_secs(240);
/// Upper bound for one trivial build (emulated: a few seconds).
const BUILD_TIMEOUT: Duration = Duration::from_secs(180);

const AMD64: &str = "bookworm-amd64";
const X86: &str = "x86_64-linux";

// ---------------------------------------------------------------------------------------------
// helpers

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "nixdock=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Removes every container and volume of an instance when dropped (also on panic).
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_instance(&self.0);
    }
}

fn lines(out: &str) -> Vec<String> {
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// Names or ids that `docker <what...> --filter <filter>` lists (`-q`/`--format` in `what`).
fn docker_list(what: &[&str], filter: &str) -> Vec<String> {
    let mut args: Vec<&str> = what.to_vec();
    args.extend(["--filter", filter]);
    lines(&docker_ok(&args))
}

fn remove_instance(id: &str) {
    let by_label = format!("label={LABEL_INSTANCE}={id}");
    let by_name = format!("name=nixdock-{id}-");
    for f in [&by_label, &by_name] {
        let ids = docker_list(&["ps", "-aq"], f);
        if !ids.is_empty() {
            let mut args = vec!["rm".to_string(), "-f".into(), "-v".into()];
            args.extend(ids);
            docker(&args);
        }
    }
    for f in [&by_label, &by_name] {
        let vols = docker_list(&["volume", "ls", "-q"], f);
        if !vols.is_empty() {
            let mut args = vec!["volume".to_string(), "rm".into(), "-f".into()];
            args.extend(vols);
            docker(&args);
        }
    }
}

/// One nixdock installation: a fresh state dir, so a fresh instance id.
struct Instance {
    id: String,
    builders: Builders,
    _cleanup: Cleanup,
    dir: tempfile::TempDir,
}

impl Instance {
    async fn new() -> Instance {
        init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let state = StateDir::open(dir.path().join("state")).expect("state dir");
        let id = state.instance_id().expect("instance id");
        let cleanup = Cleanup(id.clone());
        let engine = Engine::discover(&nixdock::builder::engine::EngineSettings::top_level(None))
            .await
            .expect("a docker engine");
        let builders = Builders::new(engine, state).expect("builders");
        Instance {
            id,
            builders,
            _cleanup: cleanup,
            dir,
        }
    }

    fn state_path(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn load_dir(&self) -> PathBuf {
        self.builders.state.load_dir()
    }

    fn spec(&self, system: &str, img: &str) -> BuilderSpec {
        self.spec_with(system, img, |_| {})
    }

    fn spec_with(
        &self,
        system: &str,
        img: &str,
        f: impl FnOnce(&mut BuilderConfig),
    ) -> BuilderSpec {
        spec_for(&self.id, system, img, &self.builders.engine.arch, f)
    }

    async fn try_ready(&self, spec: &BuilderSpec) -> Result<ReadyBuilder, BuilderError> {
        tokio::time::timeout(READY_TIMEOUT, self.builders.ensure_ready(spec, None))
            .await
            .unwrap_or_else(|_| panic!("ensure_ready({}) took over {READY_TIMEOUT:?}", spec.system))
    }

    async fn ready(&self, spec: &BuilderSpec) -> ReadyBuilder {
        self.try_ready(spec)
            .await
            .unwrap_or_else(|e| panic!("ensure_ready({} on {}): {e}", spec.system, spec.image))
    }

    async fn inspect(&self, spec: &BuilderSpec) -> ContainerInspectResponse {
        self.builders
            .inspect(&spec.container_name())
            .await
            .expect("inspect")
            .unwrap_or_else(|| panic!("no container {}", spec.container_name()))
    }

    async fn container_id(&self, spec: &BuilderSpec) -> String {
        self.inspect(spec).await.id.expect("container id")
    }

    /// Names of this instance's containers (running or not), sorted.
    fn containers(&self) -> Vec<String> {
        let mut v = docker_list(
            &["ps", "-a", "--format", "{{.Names}}"],
            &format!("label={LABEL_INSTANCE}={}", self.id),
        );
        v.sort();
        v
    }

    /// Names of this instance's volumes, sorted.
    fn volumes(&self) -> Vec<String> {
        let mut v = docker_list(
            &["volume", "ls", "-q"],
            &format!("label={LABEL_INSTANCE}={}", self.id),
        );
        v.sort();
        v
    }
}

/// The spec every test starts from: the test image, 2 slots, a long idle timeout.
fn spec_for(
    instance: &str,
    system: &str,
    img: &str,
    arch: &str,
    f: impl FnOnce(&mut BuilderConfig),
) -> BuilderSpec {
    let mut c = BuilderConfig {
        image: Some(image(img)),
        max_jobs: Some(2),
        idle_timeout: Some(600),
        ..Default::default()
    };
    f(&mut c);
    BuilderSpec::from_config(instance, system, &c, arch)
}

fn label<'a>(c: &'a ContainerInspectResponse, key: &str) -> Option<&'a str> {
    c.config
        .as_ref()?
        .labels
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn is_running(c: &ContainerInspectResponse) -> bool {
    c.state.as_ref().and_then(|s| s.running).unwrap_or(false)
}

fn exit_code(c: &ContainerInspectResponse) -> Option<i64> {
    c.state.as_ref().and_then(|s| s.exit_code)
}

/// The volume mounted at /nix.
fn nix_volume(c: &ContainerInspectResponse) -> String {
    c.mounts
        .as_ref()
        .and_then(|m| {
            m.iter()
                .find(|m| m.destination.as_deref() == Some("/nix"))
                .and_then(|m| m.name.clone())
        })
        .expect("a volume mounted at /nix")
}

/// The builder's SSH session (a local engine's builders are reached over SSH).
fn ssh(ready: &ReadyBuilder) -> &SshSession {
    match &ready.link {
        nixdock::transport::Link::Ssh(s) => s,
        // Builders::new keeps no holder: these tests always connect themselves.
        nixdock::transport::Link::Engine(_) | nixdock::transport::Link::Holder(_) => {
            panic!(
                "{} is not reached over its own SSH session",
                ready.container
            )
        }
    }
}

/// Runs `cmd` over the builder's SSH session; returns stdout, panics on failure.
async fn sh(session: &SshSession, cmd: &str) -> String {
    let ExecChannel {
        stdin,
        mut stdout,
        mut stderr,
        exit,
    } = session.exec(cmd).await.expect("ssh exec");
    drop(stdin);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (a, b) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
    a.expect("stdout");
    b.expect("stderr");
    let status = exit.wait().await.expect("exit status");
    assert!(
        status.success(),
        "`{cmd}` on the builder: {status}\n{}",
        String::from_utf8_lossy(&err)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// `docker exec NAME sh -c CMD`, which must succeed.
fn dexec(container: &str, cmd: &str) -> String {
    docker_ok(["exec", container, "sh", "-c", cmd])
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Closes a builder's connection (daemon channel and SSH), so no nix-daemon runs for it.
async fn close(ready: ReadyBuilder) {
    let ReadyBuilder { link, daemon, .. } = ready;
    drop(daemon);
    let _ = link.close().await;
}

/// Writes, with the host's `nix-instantiate`, a derivation for `system` whose builder is
/// `/bin/sh` (no inputs) and writes "hi", the machine and the builder's uid to `$out` (with
/// coreutils from /usr/bin, or from the default profile as in nixos/nix).
fn instantiate(system: &str, nonce: &str) -> (StorePath, Derivation) {
    let expr = format!(
        r#"derivation {{
            name = "nixdock-builders-test";
            system = "{system}";
            builder = "/bin/sh";
            args = [ "-c" "PATH=/bin:/usr/bin:/nix/var/nix/profiles/default/bin; echo hi > $out; uname -m >> $out; id -u >> $out" ];
            nonce = "{nonce}";
        }}"#
    );
    let mut cmd = Command::new("nix-instantiate");
    cmd.args(["--expr", &expr]);
    let out = run_with_timeout(cmd, Duration::from_secs(60)).expect("nix-instantiate");
    assert!(
        out.status.success(),
        "nix-instantiate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drv_path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let bytes = std::fs::read(&drv_path).expect("read .drv");
    let drv = Derivation::parse(&bytes).expect("parse .drv");
    (StorePath::from_absolute(&drv_path).expect("drv path"), drv)
}

/// What the trivial derivation wrote.
#[derive(Debug)]
struct BuildOutput {
    text: String,
    machine: String,
    uid: u32,
}

/// Builds the trivial derivation through the ready connection (as the hook does:
/// BuildDerivation of the basic derivation) and reads its output back over SSH.
async fn build_trivial(ready: &mut ReadyBuilder, nonce: &str) -> BuildOutput {
    let system = ready.spec.system.clone();
    let (drv_path, drv) = instantiate(&system, nonce);
    let out_path = drv.outputs["out"].path.clone();
    let mut settings = ClientSettings {
        use_substitutes: false,
        ..Default::default()
    };
    settings
        .overrides
        .insert("substituters".into(), String::new());
    ready
        .daemon
        .set_options(&settings, &mut |_| {})
        .await
        .expect("SetOptions");
    let mut log = Vec::new();
    let res = tokio::time::timeout(
        BUILD_TIMEOUT,
        ready.daemon.build_derivation(
            &drv_path,
            &drv.to_basic(None),
            BuildMode::Normal,
            &mut |e: LogEvent| {
                if let Some(l) = e.log_line() {
                    log.push(l.to_string());
                }
            },
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("building {drv_path} took over {BUILD_TIMEOUT:?}"))
    .unwrap_or_else(|e| panic!("building {drv_path}: {e}\nlog:\n{}", log.join("\n")));
    assert_eq!(
        res.status,
        BuildStatus::Built,
        "building {drv_path} on {}: {}\nlog:\n{}",
        ready.spec.image,
        res.error_msg,
        log.join("\n")
    );
    let text = sh(ssh(ready), &format!("cat {out_path}")).await;
    let l = lines(&text);
    assert_eq!(l.len(), 3, "output of {out_path}: {text:?}");
    assert_eq!(l[0], "hi", "output of {out_path}: {text:?}");
    BuildOutput {
        machine: l[1].clone(),
        uid: l[2].parse().expect("uid"),
        text,
    }
}

/// The lines of the builder's /etc/nix/nix.conf, trimmed.
/// The ready connection goes to the builder's persistent nix-daemon through its socket: no
/// `nix-daemon --stdio` runs, and the daemon has forked a worker for it.
async fn assert_uses_persistent_daemon(ready: &ReadyBuilder) {
    let procs = sh(
        ssh(ready),
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done",
    )
    .await;
    assert!(
        !procs.contains("--stdio"),
        "a nix-daemon --stdio runs:\n{procs}"
    );
    let daemons = procs.lines().filter(|l| l.contains("nix-daemon")).count();
    assert!(daemons >= 2, "no listening daemon and worker:\n{procs}");
}

async fn nix_conf(ready: &ReadyBuilder) -> Vec<String> {
    lines(&sh(ssh(ready), "cat /etc/nix/nix.conf").await)
}

fn assert_line(conf: &[String], line: &str) {
    assert!(
        conf.iter().any(|l| l == line),
        "nix.conf lacks `{line}`:\n{}",
        conf.join("\n")
    );
}

/// Waits until the container is no longer running; None when `limit` passed first.
async fn wait_stopped(inst: &Instance, spec: &BuilderSpec, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if !is_running(&inst.inspect(spec).await) {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// This test binary, started again to run one helper test with `env`.
fn helper_command(test: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"]);
    cmd
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// cold start, reuse, readiness

/// A cold start creates one labelled container whose sshd is published on 127.0.0.1 only, on
/// an ephemeral port; the next call reuses it as it is.
#[tokio::test]
async fn cold_start_then_reuse() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let spec = inst.spec(X86, AMD64);
    let name = spec.container_name();
    assert!(name.contains(&inst.id), "{name}");

    let t = Instant::now();
    let mut ready = inst.ready(&spec).await;
    eprintln!("cold start: {:?}", t.elapsed());
    assert!(ready.started, "a cold start must report started");
    assert_eq!(ready.container, name);
    assert_uses_persistent_daemon(&ready).await;
    // The subsystem that makes sshd set TCP_NODELAY is there.
    ssh(&ready)
        .touch_subsystem(nixdock::builder::provision::NODELAY_SUBSYSTEM)
        .await
        .expect("the nodelay subsystem starts");

    let c = inst.inspect(&spec).await;
    assert!(is_running(&c));
    assert_eq!(label(&c, LABEL_INSTANCE), Some(inst.id.as_str()));
    assert_eq!(label(&c, LABEL_SYSTEM), Some(X86));
    assert_eq!(label(&c, LABEL_MAX_JOBS), Some("2"));
    assert_eq!(
        c.name.as_deref().map(|n| n.trim_start_matches('/')),
        Some(name.as_str())
    );

    // sshd: requested on loopback with no fixed port, and bound so by the engine.
    let requested: HashMap<String, Option<Vec<PortBinding>>> = c
        .host_config
        .as_ref()
        .and_then(|h| h.port_bindings.clone())
        .expect("port bindings");
    assert_eq!(requested.keys().collect::<Vec<_>>(), vec![SSH_PORT]);
    for b in requested.values().flatten().flatten() {
        assert_eq!(b.host_ip.as_deref(), Some("127.0.0.1"), "{requested:?}");
        assert_eq!(b.host_port.as_deref().unwrap_or(""), "", "{requested:?}");
    }
    let bound = c
        .network_settings
        .as_ref()
        .and_then(|n| n.ports.clone())
        .expect("published ports");
    let bindings: Vec<&PortBinding> = bound.values().flatten().flatten().collect();
    assert_eq!(
        bindings.len(),
        1,
        "exactly one published binding: {bound:?}"
    );
    assert_eq!(bindings[0].host_ip.as_deref(), Some("127.0.0.1"));
    let port: u16 = bindings[0]
        .host_port
        .as_deref()
        .and_then(|p| p.parse().ok())
        .expect("host port");
    assert!(port >= 1024, "ephemeral port, got {port}");
    assert_eq!(ssh(&ready).addr(), SocketAddr::from(([127, 0, 0, 1], port)));
    let docker_port = docker_ok(["port", &name]);
    assert_eq!(
        lines(&docker_port),
        vec![format!("22/tcp -> 127.0.0.1:{port}")],
        "docker port"
    );
    // Not reachable through a non-loopback address of this host.
    if let Some(ip) = UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("10.255.255.255:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
    {
        eprintln!("checking that {ip}:{port} does not answer");
        let r = TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(2));
        assert!(
            r.is_err(),
            "sshd of {name} answers on {ip}:{port}; it must be on 127.0.0.1 only"
        );
    }

    // The volume: labelled, named after the instance, mounted at /nix.
    let volume = nix_volume(&c);
    assert!(
        volume.starts_with(&format!("nixdock-{}-", inst.id)),
        "{volume}"
    );
    let v = inst
        .builders
        .engine
        .docker
        .inspect_volume(&volume)
        .await
        .expect("inspect volume");
    assert_eq!(
        v.labels.get(LABEL_INSTANCE).map(String::as_str),
        Some(inst.id.as_str())
    );
    assert_eq!(v.labels.get(LABEL_SYSTEM).map(String::as_str), Some(X86));
    assert_eq!(inst.volumes(), vec![volume.clone()]);

    // The readiness connection is live: the daemon answers a real request.
    let probe =
        StorePath::from_absolute("/nix/store/00000000000000000000000000000000-nixdock-probe")
            .unwrap();
    assert!(
        !ready
            .daemon
            .is_valid_path(&probe, &mut |_| {})
            .await
            .expect("IsValidPath")
    );
    let conf = nix_conf(&ready).await;
    assert_line(&conf, "build-users-group = nixbld");
    assert_line(&conf, "max-jobs = 2");
    assert!(
        !conf.iter().any(|l| l.starts_with("filter-syscalls")),
        "a native builder keeps seccomp filtering:\n{}",
        conf.join("\n")
    );
    let id1 = c.id.clone().unwrap();
    close(ready).await;

    // Reuse: same container, nothing started.
    let t = Instant::now();
    let ready = inst.ready(&spec).await;
    eprintln!("warm ensure_ready: {:?}", t.elapsed());
    assert!(!ready.started, "a running, current builder is reused");
    assert_eq!(inst.container_id(&spec).await, id1);
    assert_eq!(inst.containers(), vec![name]);
    assert_eq!(inst.volumes(), vec![volume]);
}

/// Ready means: the SSH handshake proved the pinned host key, and `nix-daemon --stdio`
/// answered. A builder whose daemon does not answer, or whose sshd shows another key, is not
/// ready.
#[tokio::test]
async fn ready_needs_the_pinned_host_key_and_an_answering_daemon() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let spec = inst.spec(X86, AMD64);
    let name = spec.container_name();
    let ready = inst.ready(&spec).await;
    let addr = ssh(&ready).addr();
    close(ready).await;

    // nix-daemon that exits at once: ssh works, the handshake does not. The persistent daemon
    // goes too (entry.sh's watchdog restarts it from the same binary, which now exits), so
    // the connection falls back to `nix-daemon --stdio`, which exits as well.
    dexec(
        &name,
        "mv /usr/bin/nix-daemon /usr/bin/nix-daemon.real && ln -s /bin/true /usr/bin/nix-daemon && \
         pkill -KILL -x nix-daemon; rm -f /nix/var/nix/daemon-socket/socket",
    );
    match inst.try_ready(&spec).await {
        Err(e @ (BuilderError::Daemon { .. } | BuilderError::Broken { .. })) => {
            eprintln!("daemon not answering: {e}")
        }
        Err(e) => panic!("expected a daemon error, got: {e}"),
        Ok(_) => panic!("a builder whose nix-daemon does not answer was reported ready"),
    }
    dexec(&name, "mv -f /usr/bin/nix-daemon.real /usr/bin/nix-daemon");
    let ready = inst.ready(&spec).await;
    assert!(!ready.started);
    close(ready).await;

    // Another key than the pinned one is refused at the SSH layer.
    let other = nixdock::transport::generate_host_key().unwrap();
    let other_pub = nixdock::transport::parse_public_key(&other.public_openssh()).unwrap();
    match inst
        .builders
        .connect(&name, addr, &other_pub, Duration::ZERO)
        .await
    {
        Err(e) => assert!(
            e.is_host_key_mismatch(),
            "expected a host key mismatch: {e}"
        ),
        Ok(_) => panic!("connected although the server's key is not the pinned one"),
    }

    // sshd switches to another host key: ensure_ready refuses the builder.
    dexec(
        &name,
        "rm -f /tmp/k /tmp/k.pub && ssh-keygen -q -t ed25519 -N '' -f /tmp/k && \
         cat /tmp/k > /etc/nixdock/ssh_host_ed25519_key && kill -HUP $(cat /run/nixdock-sshd.pid)",
    );
    let t = Instant::now();
    loop {
        match inst.try_ready(&spec).await {
            Err(e) if e.is_host_key_mismatch() => {
                eprintln!("changed host key: {e}");
                break;
            }
            // sshd re-executes itself on SIGHUP; it may briefly refuse connections.
            Err(BuilderError::Ssh { .. }) if t.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("expected a host key mismatch, got: {e}"),
            Ok(_) => panic!("a builder presenting another host key was reported ready"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// configuration changes and the volume

/// A configuration change recreates the builder, but never while one of its slots is held by a
/// build; once the slots are free, the next call recreates it. `/nix` survives (same volume).
#[tokio::test]
async fn config_change_recreates_but_not_under_a_running_build() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let spec = inst.spec(X86, AMD64);
    let name = spec.container_name();
    let ready = inst.ready(&spec).await;
    let marker = format!("survives-{}", inst.id);
    sh(ssh(&ready), &format!("echo {marker} > /nix/nixdock-marker")).await;
    close(ready).await;
    let id1 = inst.container_id(&spec).await;
    let vol1 = nix_volume(&inst.inspect(&spec).await);

    // A build holds a slot (slot 0) while the configuration changes.
    let changed = inst.spec_with(X86, AMD64, |c| {
        c.extra_nix_conf = vec!["keep-outputs = true".into()];
    });
    let (build, _) = slots::try_acquire(&inst.load_dir(), &name, spec.max_jobs).unwrap();
    let build = build.expect("a free slot");
    let ready = inst.ready(&changed).await;
    assert!(!ready.started, "must not restart under a running build");
    assert_eq!(
        inst.container_id(&spec).await,
        id1,
        "recreated under a running build"
    );
    assert!(
        !nix_conf(&ready)
            .await
            .contains(&"keep-outputs = true".to_string())
    );
    close(ready).await;

    // The build ends: the next call applies the change.
    drop(build);
    let ready = inst.ready(&changed).await;
    assert!(ready.started, "a recreated builder is a cold start");
    let id2 = inst.container_id(&spec).await;
    assert_ne!(
        id2, id1,
        "configuration change did not recreate the builder"
    );
    assert_line(&nix_conf(&ready).await, "keep-outputs = true");
    assert_eq!(
        sh(ssh(&ready), "cat /nix/nixdock-marker").await.trim(),
        marker,
        "/nix did not survive the recreation"
    );
    close(ready).await;
    assert_eq!(nix_volume(&inst.inspect(&spec).await), vol1);
    assert_eq!(inst.containers(), vec![name.clone()]);

    // A max-jobs change while a build holds the old container's last slot (index 1): still no
    // recreation, although the new config would have only one slot.
    let (a, _) = slots::try_acquire(&inst.load_dir(), &name, 2).unwrap();
    let (b, _) = slots::try_acquire(&inst.load_dir(), &name, 2).unwrap();
    let b = b.expect("slot 1");
    assert_eq!(b.index, 1);
    drop(a);
    let one_job = inst.spec_with(X86, AMD64, |c| {
        c.extra_nix_conf = vec!["keep-outputs = true".into()];
        c.max_jobs = Some(1);
    });
    let ready = inst.ready(&one_job).await;
    assert!(!ready.started);
    assert_eq!(
        inst.container_id(&spec).await,
        id2,
        "recreated although the old container's slot 1 is busy"
    );
    close(ready).await;
    drop(b);
    let ready = inst.ready(&one_job).await;
    assert!(ready.started);
    let c = inst.inspect(&spec).await;
    assert_ne!(c.id.clone().unwrap(), id2);
    assert_eq!(label(&c, LABEL_MAX_JOBS), Some("1"));
    assert_line(&nix_conf(&ready).await, "max-jobs = 1");
}

/// The hook takes its build slot first and then calls `ensure_ready` (src/hook/mod.rs), so the
/// caller's own slot must not count as "a running build": otherwise a configuration change is
/// never applied by the hook at all.
///
/// FAILS on the current code: `ensure_ready` tries to take *all* slots, including the one its
/// caller holds, so it always sees a build running and reuses the outdated container.
#[tokio::test]
async fn config_change_is_applied_when_the_caller_holds_its_own_slot() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let spec = inst.spec(X86, AMD64);
    let name = spec.container_name();
    let ready = inst.ready(&spec).await;
    close(ready).await;
    let id1 = inst.container_id(&spec).await;

    let changed = inst.spec_with(X86, AMD64, |c| {
        c.extra_nix_conf = vec!["keep-outputs = true".into()];
    });
    // Exactly what the hook does for one build: slot, then ensure_ready; nobody else builds.
    let (own, busy) = slots::try_acquire(&inst.load_dir(), &name, changed.max_jobs).unwrap();
    assert!(own.is_some());
    assert_eq!(busy, 0, "no other build runs");
    let ready = tokio::time::timeout(
        READY_TIMEOUT,
        inst.builders.ensure_ready(&changed, own.as_ref()),
    )
    .await
    .expect("in time")
    .expect("ready");
    let id2 = inst.container_id(&spec).await;
    let conf = nix_conf(&ready).await;
    assert!(
        id2 != id1 && conf.contains(&"keep-outputs = true".to_string()),
        "the hook's own slot blocked the recreation: the builder still runs the old \
         configuration (no other build was running)"
    );
}

/// Builds started under a new configuration that raised max-jobs can hold slots beyond the old
/// container's max-jobs; those are running builds too.
///
/// FAILS on the current code: `ensure_ready` only checks the slots `0..old max-jobs` (from the
/// container's label), so it recreates the container under a build holding slot 2.
#[tokio::test]
async fn config_change_waits_for_builds_beyond_the_old_max_jobs() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let spec = inst.spec(X86, AMD64); // max-jobs 2
    let name = spec.container_name();
    let ready = inst.ready(&spec).await;
    close(ready).await;
    let id1 = inst.container_id(&spec).await;

    // max-jobs is raised to 4; a hook process of the new config builds on slot 2 of the (still
    // old) container, slots 0 and 1 are free.
    let raised = inst.spec_with(X86, AMD64, |c| c.max_jobs = Some(4));
    let dir = inst.load_dir();
    let held: Vec<_> = (0..3)
        .map(|_| slots::try_acquire(&dir, &name, 4).unwrap().0.unwrap())
        .collect();
    let build = held.into_iter().find(|s| s.index == 2).unwrap();
    assert_eq!(slots::busy_count(&dir, &name, 4).unwrap(), 1);

    let r = inst.try_ready(&raised).await;
    let id2 = inst.container_id(&spec).await;
    assert_eq!(
        id2, id1,
        "recreated the builder under a running build (slot 2 of the new max-jobs 4)"
    );
    close(r.expect("ensure_ready")).await;
    drop(build);
}

/// /nix lives on the volume: a file there survives `docker stop` and the restart that the
/// next call does.
#[tokio::test]
async fn nix_volume_survives_a_stop() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let spec = inst.spec(X86, AMD64);
    let name = spec.container_name();
    let ready = inst.ready(&spec).await;
    let marker = format!("kept-{}", inst.id);
    sh(ssh(&ready), &format!("echo {marker} > /nix/nixdock-marker")).await;
    close(ready).await;
    let id1 = inst.container_id(&spec).await;

    docker_ok(["stop", "-t", "5", &name]);
    assert!(!is_running(&inst.inspect(&spec).await));
    let t = Instant::now();
    let ready = inst.ready(&spec).await;
    eprintln!("restart of a stopped builder: {:?}", t.elapsed());
    assert!(ready.started, "starting a stopped builder is a cold start");
    assert_eq!(inst.container_id(&spec).await, id1, "stopped ≠ outdated");
    // A restart serves before its set-up reruns, and the hook waits for the daemon's socket
    // rather than starting a `nix-daemon --stdio` beside it.
    let out = docker(["logs", &name]);
    let logs = String::from_utf8_lossy(&out.stderr); // the entry script logs to stderr
    assert_eq!(
        logs.matches("restart: sshd and nix-daemon started before the set-up")
            .count(),
        1,
        "{logs}"
    );
    assert_uses_persistent_daemon(&ready).await;
    assert_eq!(
        sh(ssh(&ready), "cat /nix/nixdock-marker").await.trim(),
        marker
    );
    // The store itself is intact.
    sh(ssh(&ready), "test -d /nix/store && test -d /nix/var/nix/db").await;
}

/// A new image means a new container on a new volume: the old image's /nix never runs under
/// the new image.
#[tokio::test]
async fn image_change_gets_a_fresh_volume() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let spec = inst.spec(X86, AMD64);
    let ready = inst.ready(&spec).await;
    sh(ssh(&ready), "echo old > /nix/nixdock-marker").await;
    close(ready).await;
    let c1 = inst.inspect(&spec).await;
    let vol1 = nix_volume(&c1);

    let trixie = inst.spec(X86, "trixie-amd64");
    assert_eq!(trixie.container_name(), spec.container_name());
    let mut ready = inst.ready(&trixie).await;
    assert!(ready.started);
    let c2 = inst.inspect(&trixie).await;
    assert_ne!(c2.id, c1.id);
    let vol2 = nix_volume(&c2);
    assert_ne!(vol2, vol1);
    assert!(vol2.starts_with(&format!("nixdock-{}-", inst.id)), "{vol2}");
    sh(ssh(&ready), "test ! -e /nix/nixdock-marker").await;
    assert!(
        ready
            .daemon
            .daemon_nix_version()
            .is_some_and(|v| v.contains("2.26")),
        "{:?}",
        ready.daemon.daemon_nix_version()
    );
    let out = build_trivial(&mut ready, &format!("trixie-{}", inst.id)).await;
    assert_eq!(out.machine, "x86_64");
}

// ---------------------------------------------------------------------------------------------
// concurrency and instances

/// Two callers at once (two `Builders` on one state dir, as two hook processes would have)
/// make one container: one starts it, the other waits and reuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_make_one_container() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let other = Builders::new(
        inst.builders.engine.clone(),
        StateDir::open(inst.state_path()).unwrap(),
    )
    .unwrap();
    let spec = inst.spec(X86, AMD64);
    let (a, b) = tokio::join!(
        tokio::time::timeout(READY_TIMEOUT, inst.builders.ensure_ready(&spec, None)),
        tokio::time::timeout(READY_TIMEOUT, other.ensure_ready(&spec, None)),
    );
    let a = a.expect("timeout").expect("first caller");
    let b = b.expect("timeout").expect("second caller");
    assert_eq!(
        [a.started, b.started].iter().filter(|s| **s).count(),
        1,
        "exactly one caller starts the builder"
    );
    assert_eq!(ssh(&a).addr(), ssh(&b).addr());
    assert_eq!(inst.containers(), vec![spec.container_name()]);
    assert_eq!(inst.volumes().len(), 1);
}

fn race_spec(instance: &str, arch: &str) -> BuilderSpec {
    spec_for(instance, X86, AMD64, arch, |_| {})
}

/// Two real processes, both fresh on one state dir (so they also race to create the SSH client
/// key), ask for the same builder at the same moment: one container, one start.
#[tokio::test]
async fn two_processes_racing_make_one_container() {
    if !require_bed() {
        return;
    }
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("state");
    let id = StateDir::open(&state_path).unwrap().instance_id().unwrap();
    let _cleanup = Cleanup(id.clone());
    let at = unix_ms() + 1500;
    let children: Vec<_> = (0..2)
        .map(|_| {
            let mut cmd = helper_command("helper_process_race_for_a_builder");
            cmd.env("NIXDOCK_TEST_RACE_STATE", &state_path)
                .env("NIXDOCK_TEST_RACE_AT", at.to_string())
                .env("RUST_LOG", "nixdock=info");
            std::thread::spawn(move || run_with_timeout(cmd, READY_TIMEOUT))
        })
        .collect();
    let mut results = Vec::new();
    for c in children {
        let out = c.join().unwrap().expect("helper process");
        let text = output_text(&out);
        assert!(out.status.success(), "helper process failed:\n{text}");
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("RACE-RESULT "))
            .unwrap_or_else(|| panic!("no result from the helper process:\n{text}"))
            .to_string();
        eprintln!("helper: {line}");
        results.push(line);
    }
    let started = results
        .iter()
        .filter(|l| l.contains("started=true"))
        .count();
    assert_eq!(started, 1, "exactly one process starts it: {results:?}");
    let ids: Vec<&str> = results
        .iter()
        .map(|l| l.split("id=").nth(1).unwrap_or(""))
        .collect();
    assert_eq!(ids[0], ids[1], "both got the same container: {results:?}");
    let label = format!("label={LABEL_INSTANCE}={id}");
    assert_eq!(docker_list(&["ps", "-aq"], &label).len(), 1);
    assert_eq!(docker_list(&["volume", "ls", "-q"], &label).len(), 1);
}

/// Helper for `two_processes_racing_make_one_container`; does nothing on its own.
#[tokio::test]
async fn helper_process_race_for_a_builder() {
    let Some(state_path) = std::env::var_os("NIXDOCK_TEST_RACE_STATE") else {
        return;
    };
    init_tracing();
    let at: u64 = std::env::var("NIXDOCK_TEST_RACE_AT")
        .unwrap()
        .parse()
        .unwrap();
    let state = StateDir::open(PathBuf::from(state_path)).unwrap();
    let id = state.instance_id().unwrap();
    let engine = Engine::discover(&nixdock::builder::engine::EngineSettings::top_level(None))
        .await
        .unwrap();
    let wait = at.saturating_sub(unix_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let builders = Builders::new(engine, state).unwrap();
    let spec = race_spec(&id, &builders.engine.arch);
    let mut ready = builders.ensure_ready(&spec, None).await.unwrap();
    let probe =
        StorePath::from_absolute("/nix/store/00000000000000000000000000000000-nixdock-probe")
            .unwrap();
    ready
        .daemon
        .is_valid_path(&probe, &mut |_| {})
        .await
        .unwrap();
    let c = builders
        .inspect(&spec.container_name())
        .await
        .unwrap()
        .unwrap();
    println!("RACE-RESULT started={} id={}", ready.started, c.id.unwrap());
}

/// Two installations on one engine have their own containers and volumes, each named after and
/// labelled with its own instance id; recreating one leaves the other alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_engine() {
    if !require_bed() {
        return;
    }
    let (a, b) = (Instance::new().await, Instance::new().await);
    assert_ne!(a.id, b.id);
    let (sa, sb) = (a.spec(X86, AMD64), b.spec(X86, AMD64));
    assert_ne!(sa.container_name(), sb.container_name());
    let (ra, rb) = tokio::join!(a.ready(&sa), b.ready(&sb));
    assert!(
        ra.started && rb.started,
        "each instance starts its own builder"
    );
    assert_ne!(ssh(&ra).addr(), ssh(&rb).addr());

    assert_eq!(a.containers(), vec![sa.container_name()]);
    assert_eq!(b.containers(), vec![sb.container_name()]);
    let (va, vb) = (a.volumes(), b.volumes());
    assert_eq!(va.len(), 1);
    assert_eq!(vb.len(), 1);
    assert!(
        va[0].contains(&a.id) && vb[0].contains(&b.id),
        "{va:?} {vb:?}"
    );
    assert_eq!(nix_volume(&a.inspect(&sa).await), va[0]);
    assert_eq!(nix_volume(&b.inspect(&sb).await), vb[0]);

    // Separate stores.
    sh(ssh(&ra), "echo a > /nix/nixdock-marker").await;
    sh(ssh(&rb), "test ! -e /nix/nixdock-marker").await;
    close(ra).await;
    close(rb).await;

    // Recreating a's builder does not touch b's.
    let b_id = b.container_id(&sb).await;
    let a_id = a.container_id(&sa).await;
    let changed = a.spec_with(X86, AMD64, |c| c.max_jobs = Some(3));
    let ra = a.ready(&changed).await;
    assert!(ra.started);
    assert_ne!(a.container_id(&sa).await, a_id);
    let cb = b.inspect(&sb).await;
    assert_eq!(cb.id.as_deref(), Some(b_id.as_str()));
    assert!(is_running(&cb));
    let rb = b.ready(&sb).await;
    assert!(!rb.started);
    close(ra).await;
    close(rb).await;
}

// ---------------------------------------------------------------------------------------------
// idle stop

/// The builder stops itself after `idle-timeout` seconds with no nix-daemon running, but not
/// while a connection (so a nix-daemon) is open; the next call starts it again.
#[tokio::test]
async fn idle_builder_stops_itself() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let spec = inst.spec_with(X86, AMD64, |c| c.idle_timeout = Some(10));
    let ready = inst.ready(&spec).await;
    let id1 = inst.container_id(&spec).await;

    // Busy for longer than the timeout: keeps running.
    tokio::time::sleep(Duration::from_secs(17)).await;
    assert!(
        is_running(&inst.inspect(&spec).await),
        "stopped although a nix-daemon was running"
    );
    close(ready).await;
    let took = wait_stopped(&inst, &spec, Duration::from_secs(30))
        .await
        .expect("the idle builder did not stop itself within 30 s");
    eprintln!("idle stop {took:?} after the last connection closed");
    let c = inst.inspect(&spec).await;
    assert_eq!(exit_code(&c), Some(0), "an idle stop is a clean exit");
    let logs = output_text(&docker(["logs", &spec.container_name()]));
    assert!(logs.contains("idle for 10s"), "{logs}");

    let ready = inst.ready(&spec).await;
    assert!(ready.started);
    assert_eq!(inst.container_id(&spec).await, id1);
}

// ---------------------------------------------------------------------------------------------
// images

/// The emulated arm64 builder (binfmt + qemu-user): the entry script turns off seccomp
/// filtering and uses the image's build users, and a real derivation builds through the
/// ready connection, as a build user, on aarch64. Idle detection sees the emulated nix-daemon.
#[tokio::test]
async fn emulated_arm64_builder_builds_with_build_users() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let spec = inst.spec_with("aarch64-linux", "bookworm-arm64", |c| {
        c.idle_timeout = Some(15)
    });
    assert!(
        spec.emulated,
        "aarch64-linux on {}",
        inst.builders.engine.arch
    );
    let t = Instant::now();
    let mut ready = inst.ready(&spec).await;
    let t_ready = Instant::now();
    eprintln!("emulated cold start: {:?}", t.elapsed());
    assert!(ready.started);
    assert_eq!(sh(ssh(&ready), "uname -m").await.trim(), "aarch64");
    let conf = nix_conf(&ready).await;
    assert_line(&conf, "filter-syscalls = false");
    assert_line(&conf, "build-users-group = nixbld");

    let t = Instant::now();
    let out = build_trivial(&mut ready, &format!("arm64-{}", inst.id)).await;
    eprintln!("emulated build: {:?}: {:?}", t.elapsed(), out.text);
    assert_eq!(out.machine, "aarch64");
    assert_ne!(out.uid, 0, "built as root although build users exist");

    // Held open past the idle timeout: the emulated nix-daemon counts as busy.
    let hold = Duration::from_secs(22).saturating_sub(t_ready.elapsed());
    tokio::time::sleep(hold).await;
    assert!(
        is_running(&inst.inspect(&spec).await),
        "the emulated builder stopped while its nix-daemon was running"
    );
    close(ready).await;
    let took = wait_stopped(&inst, &spec, Duration::from_secs(40))
        .await
        .expect("the idle emulated builder did not stop itself");
    eprintln!("emulated idle stop {took:?} after the last connection closed");
}

/// An image laid out like nixos/nix (Nix, sshd and coreutils only in root's profile, no sed,
/// awk or useradd, no sshd user or /var/empty, build users with the host's uids, Nix 2.26)
/// becomes ready and builds as one of nixdock's own build users; SSH sessions find the
/// profile's tools.
#[tokio::test]
async fn nixos_nix_image_builds() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let spec = inst.spec(X86, "nixos-nix");
    let mut ready = inst.ready(&spec).await;
    assert_uses_persistent_daemon(&ready).await;
    let link = sh(ssh(&ready), "readlink /etc/nixdock/bin/nix-daemon").await;
    assert!(link.contains("/root/.nix-profile/"), "{link}");
    assert_line(&nix_conf(&ready).await, "build-users-group = nixbld");
    // The group's members are nixdock's users now, not the image's (uids 30001+).
    let group = sh(ssh(&ready), "grep '^nixbld:' /etc/group").await;
    assert!(
        group.contains(":nixdockbld1,") && !group.contains("nixbld1"),
        "{group}"
    );
    let out = build_trivial(&mut ready, &format!("nixos-{}", inst.id)).await;
    assert_eq!(out.machine, "x86_64");
    // A build user of nixdock's own, never a host build user's uid (the host's Nix kills every
    // process of its build users' uids, containers' included).
    assert_nixdock_build_user(out.uid);
    assert_multi_user_store(&ready).await;
}

/// nixdock's build users: uids above the base in entry.sh and below Nix's auto-allocate-uids
/// range, so never root and never a host's build user.
fn assert_nixdock_build_user(uid: u32) {
    assert!(
        uid > 700_000_000 && uid < 872_415_232,
        "built as uid {uid}, not as one of nixdock's build users"
    );
}

/// The builder's store as multi-user Nix wants it: root's, group nixbld, 1775 (build users
/// create outputs in it; only their own can they remove).
async fn assert_multi_user_store(ready: &ReadyBuilder) {
    let st = sh(ssh(ready), "stat -c '%u %G %a' /nix/store").await;
    assert_eq!(
        st.trim(),
        "0 nixbld 1775",
        "/nix/store in {}",
        ready.spec.image
    );
}

/// Without a nixbld group the builder makes one (gid from nixdock's range, /etc/group edited
/// directly) with its own build users, and builds never run as root.
#[tokio::test]
async fn image_without_build_users_builds_as_a_build_user() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let spec = inst.spec(X86, "bookworm-amd64-nobld");
    let mut ready = inst.ready(&spec).await;
    assert_line(&nix_conf(&ready).await, "build-users-group = nixbld");
    let group = sh(ssh(&ready), "grep '^nixbld:' /etc/group").await;
    let gid: u32 = group.split(':').nth(2).unwrap_or("").parse().expect(&group);
    assert!(
        gid >= 700_000_000,
        "nixbld gid outside nixdock's range: {group}"
    );
    assert!(group.trim().ends_with(",nixdockbld32"), "{group}");
    let out = build_trivial(&mut ready, &format!("nobld-{}", inst.id)).await;
    assert_nixdock_build_user(out.uid);
    assert_multi_user_store(&ready).await;
}

/// An image whose nixbld group has no members (and no useradd/groupadd): the group keeps its
/// gid and gets nixdock's build users. The image is made here from the nobld one and removed.
#[tokio::test]
async fn image_with_an_empty_nixbld_group_builds_as_a_build_user() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let tag = format!("nixdock-test-tmp/empty-nixbld-{}", inst.id);
    struct RemoveImage(String);
    impl Drop for RemoveImage {
        fn drop(&mut self) {
            let _ = docker(["image", "rm", "-f", &self.0]);
        }
    }
    let dockerfile = format!(
        "FROM {}\nRUN echo 'nixbld:x:30000:' >> /etc/group && \\\n    \
         rm -f /usr/sbin/useradd /usr/sbin/groupadd /usr/sbin/usermod /usr/sbin/adduser\n",
        image("bookworm-amd64-nobld")
    );
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).unwrap();
    let _rm = RemoveImage(tag.clone());
    docker_ok(["build", "-q", "-t", &tag, &ctx.path().to_string_lossy()]);
    let c = BuilderConfig {
        image: Some(tag.clone()),
        max_jobs: Some(2),
        idle_timeout: Some(600),
        ..Default::default()
    };
    let spec = BuilderSpec::from_config(&inst.id, X86, &c, &inst.builders.engine.arch);
    let mut ready = inst.ready(&spec).await;
    assert_line(&nix_conf(&ready).await, "build-users-group = nixbld");
    let group = sh(ssh(&ready), "grep '^nixbld:' /etc/group").await;
    assert!(group.starts_with("nixbld:x:30000:nixdockbld1,"), "{group}");
    let out = build_trivial(&mut ready, &format!("emptybld-{}", inst.id)).await;
    assert_nixdock_build_user(out.uid);
    assert_multi_user_store(&ready).await;
}

/// An image without sshd fails fast with the entry script's explanation, not a timeout.
#[tokio::test]
async fn image_without_sshd_is_a_clear_error() {
    if !require_bed() {
        return;
    }
    let inst = Instance::new().await;
    let spec = inst.spec(X86, "no-sshd");
    let t = Instant::now();
    let err = match inst.try_ready(&spec).await {
        Ok(_) => panic!("an image without sshd was reported ready"),
        Err(e) => e,
    };
    let took = t.elapsed();
    let text = err.to_string();
    eprintln!("no sshd ({took:?}): {text}");
    assert!(
        matches!(err, BuilderError::Exited { .. }),
        "expected Exited, got: {text}"
    );
    assert!(text.contains("no sshd in this image"), "{text}");
    assert!(text.contains("exit code 66"), "{text}");
    assert!(text.contains(&spec.container_name()), "{text}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

// ---------------------------------------------------------------------------------------------
// the engine

/// A socket path that refuses connections (the file exists, nobody listens).
fn refused_socket(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
    p
}

/// An engine that cannot be reached: a configured docker-host that is dead or silent is an
/// error naming it, quickly, and no other engine is tried (the system socket answers here);
/// an engine gone after discovery fails `ensure_ready` naming its address; with no engine
/// anywhere (a mount namespace without sockets), the error lists everything tried.
#[tokio::test]
async fn unreachable_engine() {
    if !require_bed() {
        return;
    }
    init_tracing();
    let dir = tempfile::tempdir().unwrap();

    // A configured docker-host that is dead, or silent, is an error naming it: never a
    // reason to try another engine (the system socket answers here).
    let refused = refused_socket(dir.path(), "refused.sock");
    let named = format!("unix://{}", refused.display());
    match Engine::discover(&nixdock::builder::engine::EngineSettings::top_level(Some(
        named.clone(),
    )))
    .await
    {
        Err(EngineError::Explicit { addr, how, .. }) => {
            assert_eq!(addr, named);
            assert_eq!(how, HowFound::ConfigDockerHost);
        }
        other => panic!("a dead docker-host must be an error naming it: {other:?}"),
    }
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let named = format!("tcp://{}", silent.local_addr().unwrap());
    let t = Instant::now();
    let err = Engine::discover(&nixdock::builder::engine::EngineSettings::top_level(Some(
        named.clone(),
    )))
    .await
    .expect_err("a silent docker-host is an error");
    let text = err.to_string();
    assert!(
        text.contains(&named) && text.contains("timed out"),
        "{text}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "a silent engine held discovery for {:?}",
        t.elapsed()
    );
    // A Unix socket that accepts (the kernel does, into the backlog) but never answers.
    let silent_unix = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&silent_unix).unwrap();
    let named = format!("unix://{}", silent_unix.display());
    let t = Instant::now();
    let err = Engine::discover(&nixdock::builder::engine::EngineSettings::top_level(Some(
        named.clone(),
    )))
    .await
    .expect_err("a silent docker-host is an error");
    let text = err.to_string();
    assert!(
        text.contains(&named) && text.contains("timed out"),
        "{text}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let e = Engine::discover(&nixdock::builder::engine::EngineSettings::top_level(None))
        .await
        .expect("the system socket");

    // The engine goes away after discovery: ensure_ready names it.
    let gone = refused_socket(dir.path(), "gone.sock");
    let engine = Engine {
        name: "default".into(),
        docker: bollard::Docker::connect_with_unix(
            gone.to_str().unwrap(),
            10,
            bollard::API_DEFAULT_VERSION,
        )
        .unwrap(),
        addr: format!("unix://{}", gone.display()),
        how_found: HowFound::Given,
        arch: e.arch.clone(),
        os: e.os.clone(),
        podman: false,
        api: e.api.clone(),
    };
    let state = StateDir::open(dir.path().join("state")).unwrap();
    let id = state.instance_id().unwrap();
    let _cleanup = Cleanup(id.clone());
    let builders = Builders::new(engine, state).unwrap();
    let spec = spec_for(&id, X86, AMD64, &e.arch, |_| {});
    let err =
        match tokio::time::timeout(Duration::from_secs(30), builders.ensure_ready(&spec, None))
            .await
            .expect("ensure_ready against a dead engine hung")
        {
            Ok(_) => panic!("ready without an engine"),
            Err(e) => e,
        };
    let text = err.to_string();
    eprintln!("engine gone: {text}");
    assert!(
        matches!(err, BuilderError::Engine(EngineError::Api { .. })),
        "{text}"
    );
    assert!(text.contains("gone.sock"), "{text}");

    // No engine anywhere: run discovery in a mount namespace where /run (so
    // /var/run/docker.sock) and /home are empty.
    let probe = Command::new("unshare")
        .args(["--mount", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!(
            "!! unreachable_engine: SKIPPED the no-engine-at-all part: cannot `unshare --mount` here"
        );
        return;
    }
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            // Mode 0755 as the real /run has: a 1777 tmpfs would fail the ownership check
            // before the socket is even looked for.
            "set -e; mount -t tmpfs -o mode=755 tmpfs /run; \
             [ -L /var/run ] || mount -t tmpfs -o mode=755 tmpfs /var/run; \
             [ ! -d /home ] || mount -t tmpfs tmpfs /home; exec \"$@\"",
        )
        .arg("sh")
        .arg(exe)
        .args([
            "--exact",
            "helper_process_discover_without_engines",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NIXDOCK_TEST_DISCOVER_DIR", dir.path())
        .env("HOME", &home)
        .env_remove("DOCKER_HOST")
        .env_remove("SUDO_USER")
        .env_remove("XDG_RUNTIME_DIR");
    let out = run_with_timeout(cmd, Duration::from_secs(60)).expect("helper process");
    let text = output_text(&out);
    assert!(out.status.success(), "helper process failed:\n{text}");
    assert!(text.contains("DISCOVER-OK"), "{text}");
}

/// Helper for `unreachable_engine`; does nothing on its own.
#[tokio::test]
async fn helper_process_discover_without_engines() {
    if std::env::var_os("NIXDOCK_TEST_DISCOVER_DIR").is_none() {
        return;
    }
    assert!(
        !Path::new("/var/run/docker.sock").exists(),
        "not in the test's mount namespace"
    );
    let t = Instant::now();
    let r = Engine::discover(&nixdock::builder::engine::EngineSettings::top_level(None)).await;
    let took = t.elapsed();
    let err = match r {
        Ok(e) => panic!("found an engine in an empty namespace: {e:?}"),
        Err(e) => e,
    };
    let text = err.to_string();
    println!("no engine ({took:?}):\n{text}");
    let tried = match &err {
        EngineError::NotFound { tried, as_root } => {
            assert!(*as_root);
            tried
                .iter()
                .map(|(w, why)| (w.clone(), why.to_string()))
                .collect::<Vec<_>>()
        }
        other => panic!("expected NotFound, got {other}"),
    };
    // As root: the two system sockets, nothing else (HOME has none, and is not looked at).
    assert_eq!(
        tried,
        [
            (
                "unix:///var/run/docker.sock (system socket)".to_string(),
                "no such socket".to_string()
            ),
            (
                "unix:///run/podman/podman.sock (Podman (rootful))".to_string(),
                "no such socket".to_string()
            )
        ]
    );
    assert!(text.contains("no Docker engine answered"), "{text}");
    assert!(text.contains("sudo nixdock install"), "{text}");
    assert!(took < Duration::from_secs(10), "discovery took {took:?}");
    println!("DISCOVER-OK");
}
