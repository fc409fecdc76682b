//! Engines beyond this host (issue 15), end to end: the real hook under the host's Nix 2.8,
//! building on a second, real Docker engine that runs in its own network namespace with its
//! own address (the test bed's stand-in for a remote server or Docker Desktop's VM: it cannot
//! see this host's files and publishes on its own address), reached over TLS, plain TCP and
//! `ssh://` (`docker system dial-stdio`), alone and in a pool with the host's engine; and on
//! rootful Podman's Docker API.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{
    ENGINE2_ADDR, ENGINE2_SSH_HOST_KEY_PUB, ENGINE2_SSH_KEY, ENGINE2_TLS_CA, ENGINE2_TLS_CERT,
    ENGINE2_TLS_KEY, ENGINE2_TLS_WRONG_CA, out_path, output_text as text,
};

const HOOK: &str = env!("CARGO_BIN_EXE_nixdock-hook");
const NIXDOCK: &str = env!("CARGO_BIN_EXE_nixdock");

/// The link-down test takes the second engine off the network: it runs alone, the others
/// beside each other.
static ENGINE2_LINK: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn engine2_shared() -> std::sync::RwLockReadGuard<'static, ()> {
    ENGINE2_LINK.read().unwrap_or_else(|p| p.into_inner())
}

/// One installation per test (its own instance id, so its own builders), removed at the end
/// from both engines.
struct Install {
    inner: common::SuiteInstall,
    _cleanup: Vec<Cleanup>,
}

/// Removes an installation's containers and volumes from one engine when dropped.
struct Cleanup {
    engine: String,
    state: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(id) = std::fs::read_to_string(self.state.join("instance-id")) else {
            return;
        };
        let label = format!(
            "label={}={}",
            nixdock::builder::provision::LABEL_INSTANCE,
            id.trim()
        );
        for (list, remove) in [
            (&["ps", "-aq"][..], &["rm", "-f", "-v"][..]),
            (&["volume", "ls", "-q"][..], &["volume", "rm", "-f"][..]),
        ] {
            let mut args: Vec<&str> = list.to_vec();
            args.extend(["--filter", &label]);
            let ids = String::from_utf8_lossy(&common::docker_on(&self.engine, &args).stdout)
                .into_owned();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args: Vec<&str> = remove.to_vec();
                args.extend(ids);
                common::docker_on(&self.engine, &args);
            }
        }
    }
}

fn install(dir: &str, config: &str, engines: &[&str]) -> Install {
    let inner = common::SuiteInstall::new(dir, config);
    // A fresh instance per run: nothing from an earlier run is reused.
    let _ = std::fs::remove_dir_all(&inner.state);
    let _cleanup = engines
        .iter()
        .map(|e| Cleanup {
            engine: e.to_string(),
            state: inner.state.clone(),
        })
        .collect();
    Install { inner, _cleanup }
}

const LOCAL: &str = "unix:///var/run/docker.sock";

fn engine2() -> String {
    common::ENGINE2_UNIX.to_string()
}

fn tls_engine(name: Option<&str>, ca: &str) -> String {
    let head = match name {
        Some(n) => format!("[engines.{n}]\n"),
        None => String::new(),
    };
    format!(
        "{head}docker-host = \"tcp://{ENGINE2_ADDR}:2376\"\ntls-ca = \"{ca}\"\n\
         tls-cert = \"{ENGINE2_TLS_CERT}\"\ntls-key = \"{ENGINE2_TLS_KEY}\"\n"
    )
}

fn amd64_builder(max_jobs: u32) -> String {
    format!(
        "[builders.\"x86_64-linux\"]\nimage = \"{}\"\nidle-timeout = 300\nmax-jobs = {max_jobs}\n",
        common::image("bookworm-amd64")
    )
}

/// `n` independent x86_64 derivations in one expression; each sleeps `secs` and writes its
/// name.
fn drvs(tag: &str, n: usize, secs: u32) -> String {
    let nonce = common::unique_name(tag);
    let items: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "(derivation {{ name = \"{tag}-{i}\"; system = \"x86_64-linux\"; \
                 builder = \"/bin/sh\"; args = [\"-c\" \"sleep {secs}; echo {i} > $out\"]; \
                 nonce = \"{nonce}\"; }})"
            )
        })
        .collect();
    format!("[ {} ]", items.join(" "))
}

fn nix_build(i: &Install, expr: &str, extra: &[&str]) -> Output {
    nix_build_env(i, expr, extra, &[])
}

fn nix_build_env(i: &Install, expr: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "-E", expr])
        .args(["--option", "build-hook", HOOK, "--max-jobs", "0"])
        .args(extra)
        .env("NIXDOCK_CONFIG", &i.inner.config)
        .env("NIXDOCK_STATE_DIR", &i.inner.state)
        .envs(env.iter().copied());
    common::run_with_timeout(cmd, Duration::from_secs(600)).expect("nix-build ran")
}

/// A build whose hooks log at debug level (the Engine API's requests among it); returns the
/// build and what its hooks added to the hook log.
fn nix_build_logged(i: &Install, expr: &str) -> (Output, String) {
    let log = i.inner.state.join("hook.log");
    let before = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
    let o = nix_build_env(i, expr, &[], &[("NIXDOCK_LOG", "debug,rustls=info")]);
    let all = std::fs::read(&log).unwrap_or_default();
    let added = String::from_utf8_lossy(all.get(before..).unwrap_or_default()).into_owned();
    (o, added)
}

/// What the hooks remembered of engine `name`'s last answer.
fn known_engine(i: &Install, name: &str) -> Option<String> {
    std::fs::read_to_string(i.inner.state.join(format!("engines/{name}.known"))).ok()
}

fn instance(i: &Install) -> String {
    std::fs::read_to_string(i.inner.state.join("instance-id"))
        .expect("an instance id after a build")
        .trim()
        .to_string()
}

/// The containers of this installation on `engine`, as `name ports` lines.
fn containers_on(engine: &str, i: &Install) -> Vec<String> {
    let label = format!(
        "label={}={}",
        nixdock::builder::provision::LABEL_INSTANCE,
        instance(i)
    );
    let o = common::docker_on(
        engine,
        [
            "ps",
            "-a",
            "--filter",
            &label,
            "--format",
            "{{.Names}} {{.Ports}}",
        ],
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Whether `path` is valid in the store of builder `container` on `engine`.
fn in_builder_store(engine: &str, container: &str, path: &str) -> bool {
    common::docker_on(
        engine,
        [
            "exec",
            container,
            "/etc/nixdock/bin/nix-store",
            "--check-validity",
            path,
        ],
    )
    .status
    .success()
}

#[test]
fn a_tls_engine_builds_through_its_exec_with_no_port_published() {
    let _link = engine2_shared();
    if !common::require_second_engine() {
        return;
    }
    let i = install(
        "engines-tls",
        &format!("{}{}", tls_engine(None, ENGINE2_TLS_CA), amd64_builder(4)),
        &[&engine2()],
    );
    let o = nix_build(&i, &drvs("tls", 1, 0), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = out_path(&o);
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "0");
    let on2 = containers_on(&engine2(), &i);
    assert_eq!(on2.len(), 1, "one builder on the second engine: {on2:?}");
    let (name, ports) = on2[0].split_once(' ').unwrap_or((&on2[0], ""));
    assert!(
        ports.trim().is_empty(),
        "no port published on a remote engine's network: {ports:?}"
    );
    assert!(in_builder_store(&engine2(), name, &out));
    assert!(
        containers_on(LOCAL, &i).is_empty(),
        "nothing on the host's engine"
    );
    // The engine's answer is remembered for the next hooks, with the API version it gave.
    let api = common::docker_on_ok(&engine2(), ["version", "-f", "{{.Server.APIVersion}}"]);
    let known = known_engine(&i, "default").expect("the engine's answer is remembered");
    assert!(
        known.contains(&format!("addr=tcp://{ENGINE2_ADDR}:2376\n"))
            && known.contains(&format!("api={}\n", api.trim()))
            && known.contains("arch=x86_64\n"),
        "{known}"
    );
    // Warm: the same builder again, and the output verified locally. The hook does not ask
    // the engine's `/version` before accepting: it served the last hook a moment ago (said
    // so here, as a loaded machine may take longer than that window between the builds).
    let at = known.lines().find(|l| l.starts_with("at=")).unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    std::fs::write(
        i.inner.state.join("engines/default.known"),
        known.replace(at, &format!("at={now_ms}")),
    )
    .unwrap();
    let (o, log) = nix_build_logged(&i, &drvs("tls-warm", 1, 0));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        log.contains("not asked again before accepting") && !log.contains(":2376/version"),
        "{log}"
    );
    assert_eq!(containers_on(&engine2(), &i).len(), 1);
    let v = Command::new("nix-store")
        .args(["--verify-path", &out_path(&o)])
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", text(&v));
    // An engine that served longer ago than that is asked again, and remembered anew.
    let stale = known.replace(at, "at=1000");
    std::fs::write(i.inner.state.join("engines/default.known"), stale).unwrap();
    let (o, log) = nix_build_logged(&i, &drvs("tls-stale", 1, 0));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        log.contains(":2376/version") && !log.contains("not asked again"),
        "{log}"
    );
    let known = known_engine(&i, "default").unwrap();
    assert!(!known.contains("at=1000\n"), "{known}");
}

#[test]
fn a_tls_engine_with_the_wrong_ca_is_refused() {
    let _link = engine2_shared();
    if !common::require_second_engine() {
        return;
    }
    let i = install(
        "engines-wrong-ca",
        &format!(
            "{}{}",
            tls_engine(None, ENGINE2_TLS_WRONG_CA),
            amd64_builder(4)
        ),
        &[&engine2()],
    );
    let t = Instant::now();
    let o = nix_build(&i, &drvs("wrong-ca", 1, 0), &[]);
    assert!(
        !o.status.success(),
        "built despite the wrong CA: {}",
        text(&o)
    );
    let err = text(&o);
    assert!(
        err.contains("engine default") && err.contains("certificate"),
        "the error names the engine and the certificate problem: {err}"
    );
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    let label = format!("label={}", nixdock::builder::provision::LABEL_INSTANCE);
    let o = common::docker_on(&engine2(), ["ps", "-aq", "--filter", &label]);
    let ours = std::fs::read_to_string(i.inner.state.join("instance-id")).unwrap_or_default();
    if !ours.is_empty() {
        assert!(containers_on(&engine2(), &i).is_empty(), "{}", text(&o));
    }
}

fn ssh_config(host_key: &str) -> String {
    format!(
        "docker-host = \"ssh://nixdock-engine@{ENGINE2_ADDR}\"\nssh-key = \"{ENGINE2_SSH_KEY}\"\n\
         ssh-host-key = \"{host_key}\"\n{}",
        amd64_builder(4)
    )
}

fn base64_of_file(path: &str) -> String {
    let line = std::fs::read_to_string(path).expect("the test bed's host key");
    hook_protocol::hash::base64_encode(line.trim().as_bytes())
}

#[test]
fn an_ssh_engine_builds_over_dial_stdio() {
    let _link = engine2_shared();
    if !common::require_second_engine() {
        return;
    }
    let i = install(
        "engines-ssh",
        &ssh_config(&base64_of_file(ENGINE2_SSH_HOST_KEY_PUB)),
        &[&engine2()],
    );
    let o = nix_build(&i, &drvs("ssh", 1, 0), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = out_path(&o);
    let on2 = containers_on(&engine2(), &i);
    assert_eq!(on2.len(), 1, "{on2:?}");
    let name = on2[0].split(' ').next().unwrap_or_default();
    assert!(in_builder_store(&engine2(), name, &out));
}

#[test]
fn an_ssh_engine_with_the_wrong_host_key_is_refused() {
    let _link = engine2_shared();
    if !common::require_second_engine() {
        return;
    }
    // A real key, but not that host's.
    let other = nixdock::transport::generate_host_key().unwrap();
    let wrong = hook_protocol::hash::base64_encode(other.public_openssh().as_bytes());
    let i = install("engines-ssh-wrong", &ssh_config(&wrong), &[&engine2()]);
    let o = nix_build(&i, &drvs("ssh-wrong", 1, 0), &[]);
    assert!(
        !o.status.success(),
        "built despite the wrong host key: {}",
        text(&o)
    );
    let err = text(&o);
    assert!(
        err.contains("engine default") && err.to_lowercase().contains("host key"),
        "the error names the engine and the host key: {err}"
    );
}

fn pool_config(second_max_jobs: u32) -> String {
    format!(
        "docker-host = \"{LOCAL}\"\n{}{}max-jobs = {second_max_jobs}\n",
        amd64_builder(4),
        tls_engine(Some("e2"), ENGINE2_TLS_CA),
    )
}

#[test]
fn eight_builds_spread_over_two_engines() {
    let _link = engine2_shared();
    if !common::require_second_engine() {
        return;
    }
    let i = install("engines-pool", &pool_config(4), &[LOCAL, &engine2()]);
    let o = nix_build(&i, &drvs("pool", 8, 3), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let outs: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(outs.len(), 8, "{}", text(&o));
    let id = instance(&i);
    let local = format!("nixdock-{id}-x86_64-linux");
    let remote = format!("nixdock-{id}-e2-x86_64-linux");
    let (mut on_local, mut on_remote) = (0, 0);
    for out in &outs {
        let l = in_builder_store(LOCAL, &local, out);
        let r = in_builder_store(&engine2(), &remote, out);
        assert!(
            l ^ r,
            "{out} was built on exactly one engine (local {l}, e2 {r})"
        );
        on_local += usize::from(l);
        on_remote += usize::from(r);
    }
    // Each builder has 4 slots: eight at once need both.
    assert!(
        on_local >= 1 && on_remote >= 1,
        "local {on_local}, e2 {on_remote}"
    );
    // In a pool, Nix's "building … on '…'" names each builder's engine.
    let err = String::from_utf8_lossy(&o.stderr);
    for engine in ["default", "e2"] {
        let on = format!("on 'nixdock x86_64-linux builder on engine {engine}'");
        assert!(err.contains(&on), "{on}: {}", text(&o));
    }
    // `nixdock shell` reaches the remote engine's builder (through its exec over TLS): an
    // output built there is in its store, one built on this host's engine is not.
    let shell = |args: &[&str]| {
        let mut cmd = Command::new(NIXDOCK);
        cmd.args(["--config", i.inner.config.to_str().unwrap()])
            .args(["--state-dir", i.inner.state.to_str().unwrap()])
            .arg("shell")
            .args(args);
        common::run_with_timeout(cmd, Duration::from_secs(300)).expect("nixdock shell ran")
    };
    for out in &outs {
        let built_there = in_builder_store(&engine2(), &remote, out);
        let o = shell(&["x86_64-linux", "--engine", "e2", "--", "test", "-e", out]);
        assert_eq!(
            o.status.code(),
            Some(if built_there { 0 } else { 1 }),
            "{}",
            text(&o)
        );
    }
    let o = shell(&["x86_64-linux", "--", "true"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("pick one with --engine NAME"),
        "{}",
        text(&o)
    );
}

/// Brings the second engine's link back up however the test ends.
struct LinkUp;

impl Drop for LinkUp {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "set", common::ENGINE2_HOST_IF, "up"])
            .status();
    }
}

#[test]
fn an_engine_off_the_network_is_skipped_with_a_warning_and_no_long_wait() {
    let _alone = ENGINE2_LINK.write().unwrap_or_else(|p| p.into_inner());
    if !common::require_second_engine() {
        return;
    }
    let i = install("engines-link-down", &pool_config(4), &[LOCAL, &engine2()]);
    // Every hook asks the pool's engines: this one remembers e2's answer, which must not
    // make the next hooks wait for (or build on) it once it is gone.
    let o = nix_build(&i, &drvs("link-up", 1, 0), &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(known_engine(&i, "e2").is_some());
    let _up = LinkUp;
    let down = Command::new("ip")
        .args(["link", "set", common::ENGINE2_HOST_IF, "down"])
        .status()
        .unwrap();
    assert!(down.success());
    // Within `known_engines::FRESH` of its last answer a hook would take a TCP connection as
    // the engine's (this test bed's network accepts connections to the gone address).
    std::thread::sleep(nixdock::builder::known_engines::FRESH);
    let t = Instant::now();
    let o = nix_build(&i, &drvs("link-down", 4, 0), &[]);
    let took = t.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    let err = text(&o);
    assert!(
        err.contains("engine e2"),
        "a warning names the engine: {err}"
    );
    assert!(
        took < Duration::from_secs(40),
        "no long wait for the engine that is gone: {took:?}"
    );
    let id = instance(&i);
    for out in String::from_utf8_lossy(&o.stdout).lines() {
        assert!(in_builder_store(
            LOCAL,
            &format!("nixdock-{id}-x86_64-linux"),
            out
        ));
    }
    assert!(known_engine(&i, "e2").is_none(), "forgotten once it failed");
    // The next hook does not even try for a while (the back-off is shared through the state
    // dir): its warning says it skipped the engine.
    let o = nix_build(&i, &drvs("link-down-2", 1, 0), &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("engine e2 is skipped"), "{}", text(&o));
}

#[test]
fn a_podman_engine_builds() {
    if !common::require_podman() {
        return;
    }
    let podman = common::PODMAN_UNIX;
    let i = install(
        "engines-podman",
        &format!("docker-host = \"{podman}\"\n{}", amd64_builder(2)),
        &[podman],
    );
    let o = nix_build(&i, &drvs("podman", 1, 0), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = out_path(&o);
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "0");
    let on = containers_on(podman, &i);
    assert_eq!(on.len(), 1, "{on:?}");
    // Limits the engine can grant are asked for, so the builder starts even where Podman's
    // defaults (nofile 1048576) exceed what its root may set.
    let name = on[0].split(' ').next().unwrap_or_default();
    let limits = common::docker_on_ok(
        podman,
        ["inspect", "-f", "{{json .HostConfig.Ulimits}}", name],
    );
    let limits = limits.to_lowercase();
    assert!(
        limits.contains("nofile") && limits.contains("nproc"),
        "{limits}"
    );
}

/// Removes an image from an engine when dropped (also on panic).
struct ImageGuardOn {
    engine: String,
    tag: String,
}

impl Drop for ImageGuardOn {
    fn drop(&mut self) {
        common::docker_on(&self.engine, ["image", "rm", "-f", &self.tag]);
    }
}

#[test]
fn image_build_on_a_pool_engine_puts_the_image_there() {
    let _link = engine2_shared();
    if !common::require_second_engine() {
        return;
    }
    let i = install(
        "engines-image-build",
        &format!("[engines.e2]\ndocker-host = \"{}\"\n", engine2()),
        &[],
    );
    let nixdock = |args: &[&str]| {
        let mut cmd = Command::new(NIXDOCK);
        cmd.arg("--config")
            .arg(&i.inner.config)
            .arg("--state-dir")
            .arg(&i.inner.state)
            .args(["image", "build"])
            .args(args);
        common::run_with_timeout(cmd, Duration::from_secs(900)).expect("nixdock ran")
    };
    // A name the config does not have is refused, naming the ones it has.
    let o = nixdock(&[
        "--engine",
        "e3",
        "--from-debian",
        "--system",
        "x86_64-linux",
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("no engine e3 in the config (engines: default, e2)"),
        "{}",
        text(&o)
    );
    // From Debian packages (no registry): made here, imported into engine 2, run there.
    let tag = format!("{}:{}", common::image("image-build-e2"), std::process::id());
    let _guard = ImageGuardOn {
        engine: engine2(),
        tag: tag.clone(),
    };
    let o = nixdock(&[
        "--engine",
        "e2",
        "--from-debian",
        "--system",
        "x86_64-linux",
        "--tag",
        &tag,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("engine e2: {}", engine2())),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("verified: x86_64"), "{}", text(&o));
    let id = common::docker_on_ok(&engine2(), ["image", "inspect", "-f", "{{.Id}}", &tag]);
    assert!(id.trim().starts_with("sha256:"), "{id}");
    assert!(
        !common::docker(["image", "inspect", &tag]).status.success(),
        "the image went to engine 2, not to the host's"
    );
}

/// A command run through an engine's exec whose channel is dropped without closing its input
/// (a log follower once its build is over, an end read never used) sees the end of its input
/// and ends: the input's half of the exec connection is shut down on drop, on the local
/// engine's socket and on the second engine over TLS alike.
#[test]
fn an_exec_dropped_unclosed_ends_its_commands_input() {
    use nixdock::transport::EngineExec;
    use nixdock::transport::engine_api::{TlsFiles, tls_docker};
    if !common::require_bed() {
        return;
    }
    let _link = engine2_shared();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let engines = [
        ("local", LOCAL.to_string(), None),
        (
            "engine 2 (TLS)",
            engine2(),
            Some(
                tls_docker(
                    common::ENGINE2_TLS,
                    &TlsFiles {
                        ca: ENGINE2_TLS_CA.into(),
                        cert: ENGINE2_TLS_CERT.into(),
                        key: ENGINE2_TLS_KEY.into(),
                    },
                    30,
                    bollard::API_DEFAULT_VERSION,
                )
                .unwrap(),
            ),
        ),
    ];
    for (what, cli_host, api) in engines {
        let name = common::unique_name("nixdock-test-exec-drop");
        let docker_cli = |args: &[&str]| {
            let o = Command::new("docker")
                .args(["-H", &cli_host])
                .args(args)
                .output()
                .unwrap();
            (o.status.success(), text(&o))
        };
        let (ok, out) = docker_cli(&[
            "run",
            "-d",
            "--rm",
            "--name",
            &name,
            &common::image("bookworm-amd64"),
            "sleep",
            "120",
        ]);
        assert!(ok, "{what}: {out}");
        let docker = api.unwrap_or_else(|| bollard::Docker::connect_with_local_defaults().unwrap());
        let exec = EngineExec::new(docker, name.clone());
        rt.block_on(async {
            let ch = exec
                .exec("cat >/dev/null; touch /tmp/input-ended")
                .await
                .unwrap();
            drop(ch);
        });
        let ended = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            docker_cli(&["exec", &name, "test", "-e", "/tmp/input-ended"]).0
        });
        docker_cli(&["rm", "-f", &name]);
        assert!(ended, "{what}: the command never saw the end of its input");
    }
}
