//! A builder's `/nix` volume is the container's: its root can plant symlinks anywhere in it, and
//! the root hook and `nixdock status` read that volume on the host (issue 12, findings 3 and 8).
//! Each test runs a throwaway installation with its own x86_64-linux builder, turns part of
//! the builder's `/nix` into a symlink to a host directory (as the container's root, with
//! `docker exec`), and checks that nothing on the host side follows it.

mod common;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{docker_ok, output_text as text};
use nixdock::builder::{BuilderSpec, Builders, Engine};
use nixdock::config::BuilderConfig;
use nixdock::state::StateDir;

const HOOK: &str = env!("CARGO_BIN_EXE_nixdock-hook");
const CLI: &str = env!("CARGO_BIN_EXE_nixdock");

/// A throwaway installation serving x86_64-linux, with its builder running.
struct Throwaway {
    dir: tempfile::TempDir,
    id: String,
    _cleanup: common::InstanceCleanup,
}

impl Throwaway {
    fn start() -> Throwaway {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nixdock.toml"),
            format!(
                "[builders.\"x86_64-linux\"]\nimage = \"{}\"\nidle-timeout = 600\n",
                common::image("bookworm-amd64")
            ),
        )
        .unwrap();
        let state = StateDir::open(dir.path().join("state")).unwrap();
        let id = state.instance_id().unwrap();
        let t = Throwaway {
            dir,
            _cleanup: common::InstanceCleanup(id.clone()),
            id,
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (builders, spec) = t.builders(state).await;
            let ready =
                tokio::time::timeout(Duration::from_secs(180), builders.ensure_ready(&spec, None))
                    .await
                    .expect("builder ready in time")
                    .expect("builder ready");
            let _ = ready.link.close().await;
        });
        t
    }

    /// The installation's builders and its x86_64-linux spec, through the library as the hook
    /// has them.
    async fn builders(&self, state: StateDir) -> (Builders, BuilderSpec) {
        let engine = Engine::discover(&nixdock::builder::engine::EngineSettings::top_level(None))
            .await
            .expect("a docker engine");
        let arch = engine.arch.clone();
        let builders = Builders::new(engine, state).unwrap();
        let spec = BuilderSpec::from_config(
            &self.id,
            "x86_64-linux",
            &BuilderConfig {
                image: Some(common::image("bookworm-amd64")),
                idle_timeout: Some(600),
                ..Default::default()
            },
            &arch,
        );
        (builders, spec)
    }

    fn container(&self) -> String {
        format!("nixdock-{}-x86_64-linux", self.id)
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("NIXDOCK_CONFIG", self.dir.path().join("nixdock.toml"))
            .env("NIXDOCK_STATE_DIR", self.dir.path().join("state"))
            .env_remove("NIXDOCK_LOG");
    }

    /// Runs `script` in the builder as the container's root.
    fn exec_root(&self, script: &str) {
        docker_ok(["exec", "-u", "0", &self.container(), "sh", "-c", script]);
    }

    /// The host directory of the builder's `/nix` volume.
    fn volume_dir(&self) -> PathBuf {
        let src = docker_ok([
            "inspect",
            "-f",
            "{{range .Mounts}}{{if eq .Destination \"/nix\"}}{{.Source}}{{end}}{{end}}",
            &self.container(),
        ]);
        PathBuf::from(src.trim())
    }
}

/// A host directory outside every volume but on the same file system as `volume` (so a walk
/// that follows a symlink into it is not stopped by the file-system check).
fn host_dir_beside(volume: &Path) -> tempfile::TempDir {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(volume).unwrap().dev();
    for base in [
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        PathBuf::from("/var/tmp"),
        std::env::temp_dir(),
    ] {
        if std::fs::metadata(&base).is_ok_and(|m| m.dev() == dev) {
            return tempfile::tempdir_in(base).unwrap();
        }
    }
    panic!(
        "no host directory on the file system of {}; this test cannot show a walk out of the volume",
        volume.display()
    );
}

fn nix_build(t: &Throwaway, expr: &str) -> Output {
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "-E", expr]).args([
        "--option",
        "build-hook",
        HOOK,
        "--max-jobs",
        "0",
    ]);
    t.env(&mut cmd);
    common::run_with_timeout(cmd, Duration::from_secs(600)).expect("nix-build ran")
}

/// Finding 3: `/nix/var/nix/daemon-socket` in the builder becomes a symlink to a host
/// directory holding a socket owned by root (a stand-in for the host's nix-daemon or the
/// Docker socket). The root hook's fast path must not connect to it; the build goes the SSH
/// way and succeeds.
#[test]
fn a_socket_symlink_planted_in_the_volume_leads_the_hook_nowhere() {
    if !common::require_bed() {
        return;
    }
    let t = Throwaway::start();
    let trap_dir = host_dir_beside(&t.volume_dir());
    let listener = UnixListener::bind(trap_dir.path().join("socket")).unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    {
        let hits = hits.clone();
        // Accept and hang up at once, so a hook that did connect fails its handshake quickly.
        std::thread::spawn(move || {
            for c in listener.incoming() {
                hits.fetch_add(1, Ordering::SeqCst);
                drop(c);
            }
        });
    }
    t.exec_root(&format!(
        "mv /nix/var/nix/daemon-socket /nix/var/nix/daemon-socket.real && \
         ln -s {} /nix/var/nix/daemon-socket",
        trap_dir.path().display()
    ));
    let expr = format!(
        "derivation {{ name = \"trap\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
         args = [\"-c\" \"echo hello > $out\"]; nonce = \"{}\"; }}",
        common::unique_name("n")
    );
    let o = nix_build(&t, &expr);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the hook connected to the host socket the builder's symlink pointed at\n{}",
        text(&o)
    );
    // Not through the local socket, so over SSH, and the build still works.
    assert_eq!(
        std::fs::read_to_string(common::out_path(&o)).unwrap(),
        "hello\n"
    );
    let log = std::fs::read_to_string(t.dir.path().join("state/hook.log")).unwrap_or_default();
    let ready = log
        .lines()
        .rfind(|l| l.contains("builder ready"))
        .unwrap_or_else(|| panic!("no 'builder ready' line in the hook log:\n{log}"));
    assert!(!ready.contains("local socket"), "{ready}");
}

/// Finding 8: the builder's `/nix/store` becomes a symlink to a host directory holding a large
/// file. `nixdock status` (as root) must not walk it: the store size it reports is the
/// builder's own, measured without following the link.
#[test]
fn status_does_not_walk_a_store_symlink_out_of_the_volume() {
    if !common::require_bed() {
        return;
    }
    const BIG: u64 = 64 << 20;
    let t = Throwaway::start();
    let volume = t.volume_dir();
    let host = host_dir_beside(&volume);
    std::fs::write(host.path().join("big"), vec![7u8; BIG as usize]).unwrap();
    // Before: the store is sized on the volume, through descriptors.
    let b = status_of(&t);
    assert_eq!(b["store_measured_by"], "volume", "{b}");
    assert!(b["store_bytes"].as_u64().is_some_and(|n| n > 0), "{b}");
    t.exec_root(&format!(
        "mv /nix/store /nix/store.real && ln -s {} /nix/store",
        host.path().display()
    ));
    let b = status_of(&t);
    assert_eq!(b["state"], "running", "{b}");
    let size = b["store_bytes"].as_u64().unwrap_or(0);
    assert!(
        size < BIG,
        "status counted the host directory the store symlink points at: {b}"
    );
}

/// The fast path itself: it connects through the descriptor it checked (the path it hands out
/// for further connections is that descriptor's), a second connection through it works, and
/// once the socket's directory is a symlink — even one that stays inside the volume — the fast
/// path is refused while the descriptor checked before still leads to the real socket.
#[test]
fn the_fast_path_connects_through_the_checked_descriptor() {
    if !common::require_bed() {
        return;
    }
    let t = Throwaway::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let state = StateDir::open(t.dir.path().join("state")).unwrap();
        let (builders, spec) = t.builders(state).await;
        let path = builders
            .connect_local(&spec)
            .await
            .expect("the fast path to a running builder")
            .socket;
        assert!(path.starts_with("/proc/self/fd"), "{}", path.display());
        nixdock::builder::lifecycle::open_local_daemon(&path, &t.container())
            .await
            .expect("a second connection through the same descriptor");
        t.exec_root(
            "mv /nix/var/nix/daemon-socket /nix/var/nix/daemon-socket.real && \
             ln -s daemon-socket.real /nix/var/nix/daemon-socket",
        );
        assert!(
            builders.connect_local(&spec).await.is_none(),
            "the fast path went through a symlink"
        );
        nixdock::builder::lifecycle::open_local_daemon(&path, &t.container())
            .await
            .expect("the checked descriptor still reaches the daemon");
    });
}

/// A cold start on a local engine (the builder stopped, as its idle timeout does) is ready
/// through the daemon socket beneath the volume, not over SSH (issue 19: no wait for sshd);
/// eight builds at once right after it all succeed — those that found the container already
/// started wait for the socket too (or for sshd), never fail on an sshd still starting.
#[test]
fn a_cold_start_is_ready_through_the_local_socket() {
    if !common::require_bed() {
        return;
    }
    let t = Throwaway::start();
    docker_ok(["stop", "-t", "5", &t.container()]);
    let expr = format!(
        "builtins.genList (i: derivation {{ name = \"cold-${{toString i}}\"; \
         system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
         args = [\"-c\" \"echo hello > $out\"]; nonce = \"{}\"; }}) 8",
        common::unique_name("n")
    );
    let o = nix_build(&t, &expr);
    assert!(o.status.success(), "{}", text(&o));
    let log = std::fs::read_to_string(t.dir.path().join("state/hook.log")).unwrap_or_default();
    let ready: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("builder ready") && l.contains("via="))
        .collect();
    assert!(
        ready.iter().any(|l| l.contains("local socket, cold")),
        "no cold start through the local socket in the hook log:\n{log}"
    );
}

/// `nixdock status --json`'s entry for the x86_64-linux builder.
fn status_of(t: &Throwaway) -> serde_json::Value {
    let mut cmd = Command::new(CLI);
    cmd.args(["status", "--json"]);
    t.env(&mut cmd);
    let o = common::run_with_timeout(cmd, Duration::from_secs(180)).unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["builders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["system"] == "x86_64-linux")
        .unwrap_or_else(|| panic!("no x86_64-linux builder: {v}"))
        .clone()
}
