//! Which Docker engine the root hook trusts (issue 12, finding 1): the real `nixdock-hook`, run
//! by the real `nix-build` (Nix 2.8 on the host, as root, no daemon), against a fake engine in
//! an unprivileged user's home and against a configured `docker-host` that is down.
//!
//! The fake engine is a few lines of HTTP on a Unix socket: the real Docker cannot be made to
//! run as another user's socket in their home, and all it has to do is answer `/version` and
//! count who connects. Root, `unshare` (a private mount namespace to hide the system socket)
//! and the test bed (Nix, Docker, a builder image) are needed.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{docker_ok, output_text, require_bed, run_with_timeout, unique_name};
use nixdock::builder::engine::{Engine, HowFound};
use nixdock::builder::provision::LABEL_INSTANCE;

/// The hook under test; `NIXDOCK_TEST_HOOK` runs these tests against another build of it (an
/// older one, to see them fail).
fn hook() -> String {
    std::env::var("NIXDOCK_TEST_HOOK").unwrap_or_else(|_| env!("CARGO_BIN_EXE_nixdock-hook").into())
}
/// An uid no account uses: the owner of the fake engine's home and socket.
const OTHER_UID: u32 = 64123;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["--mount", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A fake Docker engine on a Unix socket: answers `GET /version` like Docker 20.10 and
/// everything else with 500, and counts connections.
struct FakeEngine {
    connections: Arc<AtomicUsize>,
}

impl FakeEngine {
    fn serve(listener: std::os::unix::net::UnixListener) -> FakeEngine {
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        // Detached: it blocks in accept until the test process ends.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                let _ = reader.read_line(&mut request);
                // Skip the headers (bodies are not expected on GET).
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let (status, body) = if request.contains("/version") {
                    (
                        "200 OK",
                        r#"{"Version":"20.10.24","ApiVersion":"1.41","MinAPIVersion":"1.12","Os":"linux","Arch":"amd64"}"#,
                    )
                } else {
                    ("500 Internal Server Error", r#"{"message":"fake engine"}"#)
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeEngine { connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// `/home/<unique>` owned by [`OTHER_UID`], with a fake engine at
/// `.docker/run/docker.sock` (Docker Desktop's place), socket and directories that user's.
/// Removed when dropped.
struct UserHome {
    home: PathBuf,
    socket: PathBuf,
    engine: FakeEngine,
}

impl UserHome {
    fn new() -> UserHome {
        let home = PathBuf::from("/home").join(unique_name("nixdock-trust"));
        let run = home.join(".docker/run");
        std::fs::create_dir_all(&run).unwrap();
        let socket = run.join("docker.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660)).unwrap();
        for p in [&home, &home.join(".docker"), &run, &socket] {
            std::os::unix::fs::lchown(p, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
        }
        UserHome {
            home,
            socket,
            engine: FakeEngine::serve(listener),
        }
    }
}

impl Drop for UserHome {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// Removes every container and volume of one nixdock instance (if a broken hook made any).
struct InstanceCleanup(String);

impl Drop for InstanceCleanup {
    fn drop(&mut self) {
        let filter = format!("label={LABEL_INSTANCE}={}", self.0);
        for id in docker_ok(["ps", "-aq", "--filter", &filter]).split_whitespace() {
            let _ = docker_ok(["rm", "-f", "-v", id]);
        }
        for v in docker_ok(["volume", "ls", "-q", "--filter", &filter]).split_whitespace() {
            let _ = docker_ok(["volume", "rm", "-f", v]);
        }
    }
}

/// A nixpkgs-free derivation for this machine's system that nothing has built yet.
fn expr(tag: &str) -> String {
    format!(
        "derivation {{ name = \"engine-trust\"; system = builtins.currentSystem; \
         builder = \"/bin/sh\"; args = [\"-c\" \"echo hi > $out\"]; nonce = \"{}\"; }}",
        unique_name(tag)
    )
}

/// `nix-build` (as root, no daemon) with nixdock-hook as its build hook and `--max-jobs 0`,
/// so the hook is asked for the build; `prefix` wraps it (e.g. `unshare ... sh -c`).
fn nix_build_with_hook(
    prefix: &[&str],
    dir: &Path,
    config: &str,
    env: &[(&str, &str)],
    tag: &str,
) -> Output {
    let cfg = dir.join("nixdock.toml");
    std::fs::write(&cfg, config).unwrap();
    let (program, rest) = prefix.split_first().unwrap_or((&"nix-build", &[]));
    let mut cmd = Command::new(program);
    cmd.args(rest);
    if !prefix.is_empty() {
        cmd.arg("nix-build");
    }
    cmd.args(["--no-out-link", "-E", &expr(tag)])
        .args(["--max-jobs", "0", "--option", "build-hook", &hook()])
        .args(["--option", "builders", "", "--option", "substituters", ""])
        .env("NIXDOCK_CONFIG", &cfg)
        .env("NIXDOCK_STATE_DIR", dir.join("state"))
        .env("HOME", dir.join("roothome"))
        .env_remove("DOCKER_HOST")
        .env_remove("SUDO_USER")
        .env_remove("SUDO_UID")
        .env_remove("NIX_REMOTE");
    std::fs::create_dir_all(dir.join("roothome")).unwrap();
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_timeout(cmd, Duration::from_secs(300)).expect("nix-build ran")
}

/// The shell prefix that runs a command in a private mount namespace where the system
/// sockets (/var/run/docker.sock, /run/podman/podman.sock) are an empty file: no engine
/// answers there, as when the system engine is down.
fn hidden_system_sockets(empty: &Path) -> Vec<String> {
    let script = format!(
        "set -e; for s in /var/run/docker.sock /run/podman/podman.sock; do \
           if [ -e \"$s\" ]; then mount --bind '{}' \"$(readlink -f \"$s\")\"; fi; \
         done; \
         [ ! -S /var/run/docker.sock ] || {{ echo 'system socket not hidden' >&2; exit 99; }}; \
         exec \"$@\"",
        empty.display()
    );
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        &script,
        "sh",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Finding 1: as root, with the system engine not answering, the hook must not take an
/// engine from a user's home. A fake engine owned by an unprivileged user sits at
/// `/home/<user>/.docker/run/docker.sock`; the real hook, run by the real nix-build in a
/// namespace where the system socket is hidden, never connects to it, and its error names
/// what it tried. Before the fix it created the builder there (the fake engine was asked).
#[test]
fn root_hook_never_uses_an_engine_in_a_users_home() {
    if !require_bed() {
        return;
    }
    if !is_root() || !can_unshare() {
        eprintln!(
            "!! root_hook_never_uses_an_engine_in_a_users_home: SKIPPED: needs root and unshare"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    let user = UserHome::new();
    let prefix = hidden_system_sockets(&empty);
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();

    let out = nix_build_with_hook(&prefix, dir.path(), "", &[], "home");
    let text = output_text(&out);
    eprintln!("{text}");
    assert_eq!(
        user.engine.connections(),
        0,
        "the root hook connected to the engine in {}:\n{text}",
        user.home.display()
    );
    assert!(!out.status.success(), "built without an engine?\n{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Docker engine answered"), "{text}");
    // It names what it tried, and why each failed: the hidden system socket is not one.
    assert!(
        err.contains("unix:///var/run/docker.sock (system socket)") && err.contains("not a socket"),
        "{text}"
    );
    assert!(err.contains("/run/podman/podman.sock"), "{text}");
    assert!(!err.contains(&user.home.display().to_string()), "{text}");
    assert!(err.contains("sudo nixdock install"), "{text}");

    // `nixdock install`'s search, run once by the operator, does find that engine (and shows
    // it; see `install_does_not_record_another_users_engine`).
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(prefix[0]);
    cmd.args(&prefix[1..])
        .arg(exe)
        .args([
            "--exact",
            "helper_install_search",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NIXDOCK_TEST_INSTALL_SEARCH", &user.socket)
        .env("HOME", dir.path())
        .env_remove("DOCKER_HOST")
        .env_remove("SUDO_USER")
        .env_remove("SUDO_UID");
    let out = run_with_timeout(cmd, Duration::from_secs(60)).expect("helper process");
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("INSTALL-SEARCH-OK"), "{text}");
    assert!(user.engine.connections() > 0, "{text}");
}

/// Helper for `root_hook_never_uses_an_engine_in_a_users_home`; does nothing on its own.
#[tokio::test]
async fn helper_install_search() {
    let Some(socket) = std::env::var_os("NIXDOCK_TEST_INSTALL_SEARCH") else {
        return;
    };
    let (found, tried) = Engine::search_at_install().await;
    let e = found.unwrap_or_else(|| panic!("install's search found nothing: {tried:?}"));
    assert_eq!(
        e.addr,
        format!("unix://{}", PathBuf::from(socket).display())
    );
    assert_eq!(e.how_found, HowFound::DockerDesktop);
    assert_eq!(
        nixdock::builder::engine::socket_owner(&e.addr),
        Some(OTHER_UID)
    );
    println!("INSTALL-SEARCH-OK");
}

/// A socket that refuses connections: the file exists, nobody listens.
fn refused_socket(dir: &Path) -> PathBuf {
    let p = dir.join("down.sock");
    drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
    p
}

/// The container and volume names of one state directory's instance.
fn instance_of(state: &Path) -> String {
    nixdock::state::StateDir::open(state.to_path_buf())
        .unwrap()
        .instance_id()
        .unwrap()
}

fn instance_containers(id: &str) -> String {
    docker_ok([
        "ps",
        "-aq",
        "--filter",
        &format!("label={LABEL_INSTANCE}={id}"),
    ])
}

/// A configured `docker-host` that does not answer is an error naming it, and no other engine
/// is tried — although the system socket answers here and the config names a builder image
/// it has. The same for `DOCKER_HOST` in the hook's environment. Before the fix the hook fell
/// through to the system socket and created its builder there.
#[test]
fn a_named_engine_that_is_down_is_an_error_not_a_fallback() {
    if !require_bed() {
        return;
    }
    if !is_root() {
        eprintln!("!! a_named_engine_that_is_down_is_an_error_not_a_fallback: SKIPPED: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let down = refused_socket(dir.path());
    let down_addr = format!("unix://{}", down.display());
    let id = instance_of(&dir.path().join("state"));
    let _cleanup = InstanceCleanup(id.clone());
    let (nix_system, image) = match nixdock::builder::systems::host_arch() {
        "aarch64" => ("aarch64-linux", common::image("bookworm-arm64")),
        _ => ("x86_64-linux", common::image("bookworm-amd64")),
    };
    let builders = format!("[builders.\"{nix_system}\"]\nimage = \"{image}\"\nidle-timeout = 60\n");

    let config = format!("docker-host = \"{down_addr}\"\n{builders}");
    let out = nix_build_with_hook(&[], dir.path(), &config, &[], "config");
    let text = output_text(&out);
    eprintln!("{text}");
    assert!(
        !out.status.success(),
        "built through another engine:\n{text}"
    );
    assert_eq!(
        instance_containers(&id),
        "",
        "a builder was created:\n{text}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("docker-host = \"{down_addr}\"")),
        "the error names the configured engine:\n{text}"
    );
    assert!(
        err.contains("tries no other engine") && err.contains("change docker-host"),
        "{text}"
    );

    // DOCKER_HOST in the hook's own environment is honoured the same way.
    let out = nix_build_with_hook(
        &[],
        dir.path(),
        &builders,
        &[("DOCKER_HOST", &down_addr)],
        "env",
    );
    let text = output_text(&out);
    eprintln!("{text}");
    assert!(
        !out.status.success(),
        "built through another engine:\n{text}"
    );
    assert_eq!(
        instance_containers(&id),
        "",
        "a builder was created:\n{text}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("DOCKER_HOST={down_addr}")) && err.contains("unset DOCKER_HOST"),
        "{text}"
    );
}

/// `nixdock install --docker-host` records the engine in the config it writes, keeps one the
/// user set, and `uninstall` restores the config byte for byte.
#[test]
fn install_records_docker_host_and_keeps_the_users() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    std::fs::create_dir_all(root.join("etc/nix")).unwrap();
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixdock"));
        cmd.args(args)
            .env("NIXDOCK_STATE_DIR", t.path().join("state"))
            .env("NIXDOCK_CONFIG", t.path().join("unused.toml"))
            .env_remove("NIXDOCK_LOG");
        let o = run_with_timeout(cmd, Duration::from_secs(60)).unwrap();
        assert!(o.status.success(), "{}", output_text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let root_s = root.to_str().unwrap();
    let install = [
        "install",
        "--root",
        root_s,
        "--nix-version",
        "2.8",
        "--service-manager",
        "none",
    ];
    let cfg = root.join("etc/nixdock/nixdock.toml");
    let addr = "unix:///Users/alice/.docker/run/docker.sock";

    // No config yet: the commented one, with docker-host filled in.
    let mut args = install.to_vec();
    args.extend(["--docker-host", addr]);
    let out = run(&args);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let parsed = nixdock::config::Config::parse(&text, &cfg).unwrap();
    assert_eq!(parsed.docker_host.as_deref(), Some(addr), "{text}");
    assert!(out.contains(addr), "{out}");
    // Installing again keeps it, even without --docker-host.
    let out = run(&install);
    assert!(out.contains("keeping docker-host"), "{out}");
    let again = std::fs::read_to_string(&cfg).unwrap();
    assert_eq!(again, text);
    run(&["uninstall"]);
    assert!(!cfg.exists());

    // A config of the user's without docker-host gets it added; one with docker-host keeps it.
    let mine = "offload-local = false\n\n[builders.\"aarch64-linux\"]\nmax-jobs = 2\n";
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(&cfg, mine).unwrap();
    run(&args);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let parsed = nixdock::config::Config::parse(&text, &cfg).unwrap();
    assert_eq!(parsed.docker_host.as_deref(), Some(addr), "{text}");
    assert_eq!(parsed.builders["aarch64-linux"].max_jobs, Some(2), "{text}");
    run(&["uninstall"]);
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), mine);

    let users = format!("docker-host = \"unix:///srv/docker.sock\"\n{mine}");
    std::fs::write(&cfg, &users).unwrap();
    let out = run(&args);
    assert!(out.contains("keeping docker-host"), "{out}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), users);
    run(&["uninstall"]);
}
