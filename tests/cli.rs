//! The operator CLI `nixdock`, run as a program (`CARGO_BIN_EXE_nixdock`) against real files,
//! the real Nix and the real Docker engine.
//!
//! `install`/`uninstall` work in a temporary root and state directory and need nothing else
//! (the real `nix` is used, when present, to prove the written settings take effect).
//! `status`, `doctor` and `stop` need the test bed (Docker and the `nixdock-test/*` images):
//! without it they skip loudly, or fail when `CI` is set (see `common::require_bed`). Each of
//! those uses its own state directory, so its own instance id, and removes that instance's
//! containers and volumes when done.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{
    ENGINE2_TLS, ENGINE2_TLS_CA, ENGINE2_TLS_CERT, ENGINE2_TLS_KEY, ENGINE2_UNIX, docker_ok,
    docker_on, docker_on_ok, require_bed, require_second_engine, run_with_timeout,
};
use nixdock::builder::engine::EngineSettings;
use nixdock::builder::provision::LABEL_INSTANCE;
use nixdock::builder::{BuilderSpec, Builders, Engine};
use nixdock::config::{BuilderConfig, Config};
use nixdock::state::StateDir;

const CLI_TIMEOUT: Duration = Duration::from_secs(180);

fn nixdock_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nixdock"))
}

/// The hook `install` wires in by default: the one built next to the CLI.
fn hook_bin() -> PathBuf {
    let p = nixdock_bin().with_file_name("nixdock-hook");
    std::fs::canonicalize(&p).unwrap_or(p)
}

/// Runs the CLI with its config and state dir pointing at `dir`.
fn run_cli(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(nixdock_bin());
    cmd.args(args)
        .env("NIXDOCK_STATE_DIR", dir.join("state"))
        .env("NIXDOCK_CONFIG", dir.join("nixdock.toml"))
        .env_remove("NIXDOCK_LOG");
    run_with_timeout(cmd, CLI_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", show(&o));
    o
}

/// Every file, directory and symlink under `root`: kind, mode, owner and content.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (String, u32, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let mode = m.permissions().mode();
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.insert(
                    rel,
                    (
                        "link".into(),
                        mode,
                        m.uid(),
                        t.into_os_string().into_encoded_bytes(),
                    ),
                );
            } else if m.is_dir() {
                out.insert(rel, ("dir".into(), mode, m.uid(), Vec::new()));
                stack.push(p);
            } else {
                out.insert(
                    rel,
                    ("file".into(), mode, m.uid(), std::fs::read(&p).unwrap()),
                );
            }
        }
    }
    out
}

fn write_mode(p: &Path, content: &[u8], mode: u32) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The real `nix` on this machine, if any.
fn real_nix() -> Option<PathBuf> {
    [
        "/usr/bin/nix",
        "/nix/var/nix/profiles/default/bin/nix",
        "/run/current-system/sw/bin/nix",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// `build-hook` as the real Nix reads it with the given environment (config locations).
fn nix_sees_build_hook(envs: &[(&str, &Path)]) -> Option<String> {
    let nix = real_nix()?;
    let mut cmd = Command::new(nix);
    cmd.args([
        "--extra-experimental-features",
        "nix-command",
        "show-config",
    ]);
    // Nothing of the caller's own configuration may leak in.
    cmd.env_remove("NIX_CONFIG")
        .env("NIX_USER_CONF_FILES", "/nonexistent/nix.conf");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = run_with_timeout(cmd, Duration::from_secs(60)).ok()?;
    text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("build-hook = ").map(str::to_string))
}

#[test]
fn install_for_nix_2_8_writes_nix_conf_and_uninstall_restores_it_byte_for_byte() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    // A nix.conf with content, an odd mode and no final newline; no nixdock config yet.
    let original =
        b"# see https://nixos.org/nix/manual/#sec-conf-file\nsandbox = false\nsubstituters =";
    write_mode(&root.join("etc/nix/nix.conf"), original, 0o640);
    write_mode(&root.join("etc/other.conf"), b"untouched\n", 0o644);
    let before = snapshot(&root);
    let root_s = root.to_str().unwrap();

    let o = ok(run_cli(
        t.path(),
        &[
            "install",
            "--root",
            root_s,
            "--nix-version",
            "2.8",
            "--service-manager",
            "systemd",
        ],
    ));
    let out = text(&o.stdout);
    let hook = hook_bin();
    let conf = std::fs::read_to_string(root.join("etc/nix/nix.conf")).unwrap();
    assert!(
        conf.starts_with(std::str::from_utf8(original).unwrap()),
        "the existing settings stay: {conf}"
    );
    assert!(
        conf.ends_with(&format!("build-hook = {}\n", hook.display())),
        "{conf}"
    );
    assert_eq!(
        std::fs::metadata(root.join("etc/nix/nix.conf"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640,
        "mode kept"
    );
    assert!(
        out.contains(&format!("+ build-hook = {}", hook.display())),
        "prints the change:\n{out}"
    );
    assert!(root.join("etc/nixdock/nixdock.toml").is_file());
    assert!(
        out.contains("created") && out.contains("nixdock.toml"),
        "{out}"
    );
    assert!(!root.join("etc/systemd").exists(), "no drop-in for 2.8");
    assert!(!root.join("root/.config").exists(), "no user conf for 2.8");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.path().join("state/install-manifest.json")).unwrap(),
    )
    .unwrap();
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{manifest}");
    assert_eq!(
        files[0]["original"]["text"],
        std::str::from_utf8(original).unwrap()
    );
    assert_eq!(files[1]["original"], "absent");
    // The real Nix 2.8 reads the line we wrote.
    if let Some(seen) = nix_sees_build_hook(&[("NIX_CONF_DIR", &root.join("etc/nix"))]) {
        assert_eq!(seen, hook.display().to_string());
    }

    let o = ok(run_cli(t.path(), &["uninstall", "--root", root_s]));
    let out = text(&o.stdout);
    assert!(out.contains("restored") && out.contains("deleted"), "{out}");
    assert_eq!(
        snapshot(&root),
        before,
        "uninstall restores every file exactly"
    );
    assert!(!t.path().join("state/install-manifest.json").exists());
    // Nothing left to undo.
    let o = run_cli(t.path(), &["uninstall", "--root", root_s]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("nothing to uninstall"),
        "{}",
        show(&o)
    );
}

#[test]
fn install_for_nix_2_26_uses_the_daemon_environment_and_root_user_conf() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    // The system nix.conf (ignored by 2.26 for build-hook) must not change; nothing else exists.
    write_mode(&root.join("etc/nix/nix.conf"), b"sandbox = false\n", 0o644);
    std::fs::create_dir_all(root.join("root")).unwrap();
    let before = snapshot(&root);
    let root_s = root.to_str().unwrap();
    let hook = hook_bin();

    let o = ok(run_cli(
        t.path(),
        &[
            "install",
            "--root",
            root_s,
            "--nix-version",
            "2.26",
            "--service-manager",
            "systemd",
        ],
    ));
    let out = text(&o.stdout);
    assert!(
        out.contains("ignores build-hook in /etc/nix/nix.conf"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(root.join("etc/nix/nix.conf")).unwrap(),
        b"sandbox = false\n",
        "the system nix.conf is left alone"
    );
    let dropin =
        std::fs::read_to_string(root.join("etc/systemd/system/nix-daemon.service.d/nixdock.conf"))
            .unwrap();
    assert!(
        dropin.contains(&format!(
            "[Service]\nEnvironment=\"NIX_CONFIG=build-hook = {}\"\n",
            hook.display()
        )),
        "{dropin}"
    );
    let user_conf = root.join("root/.config/nix/nix.conf");
    let uc = std::fs::read_to_string(&user_conf).unwrap();
    assert!(
        uc.contains(&format!("build-hook = {}\n", hook.display())),
        "{uc}"
    );
    for p in ["nixdock.conf", ".config/nix/nix.conf", "nixdock.toml"] {
        assert!(out.contains(p), "prints {p}:\n{out}");
    }
    // The real Nix reads root's user conf we wrote (the syntax is right).
    if let Some(seen) = nix_sees_build_hook(&[
        ("NIX_CONF_DIR", &root.join("etc/nix")),
        ("NIX_USER_CONF_FILES", &user_conf),
    ]) {
        assert_eq!(seen, hook.display().to_string());
    }

    // Installing again (here: for another version) first undoes the previous install, so the
    // manifest still holds the true originals.
    let o = ok(run_cli(
        t.path(),
        &[
            "install",
            "--root",
            root_s,
            "--nix-version",
            "2.34",
            "--service-manager",
            "systemd",
        ],
    ));
    assert!(
        text(&o.stdout).contains("undoing the previous install"),
        "{}",
        show(&o)
    );
    assert!(!root.join("etc/systemd").exists(), "2.34 needs no drop-in");
    assert!(!user_conf.exists());
    assert!(
        std::fs::read_to_string(root.join("etc/nix/nix.conf"))
            .unwrap()
            .contains("build-hook = ")
    );

    ok(run_cli(t.path(), &["uninstall"]));
    assert_eq!(
        snapshot(&root),
        before,
        "uninstall restores every file exactly"
    );
}

#[test]
fn install_for_nix_2_26_keeps_an_existing_root_user_conf() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let user_conf = root.join("root/.config/nix/nix.conf");
    write_mode(
        &user_conf,
        b"experimental-features = nix-command\nbuild-hook = /old/hook\n",
        0o600,
    );
    std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    let before = snapshot(&root);
    let root_s = root.to_str().unwrap();
    ok(run_cli(
        t.path(),
        &[
            "install",
            "--root",
            root_s,
            "--nix-version",
            "2.30",
            "--service-manager",
            "systemd",
        ],
    ));
    let uc = std::fs::read_to_string(&user_conf).unwrap();
    assert_eq!(
        uc,
        format!(
            "experimental-features = nix-command\nbuild-hook = {}\n",
            hook_bin().display()
        )
    );
    assert_eq!(
        std::fs::metadata(&user_conf).unwrap().permissions().mode() & 0o777,
        0o600
    );
    ok(run_cli(t.path(), &["uninstall", "--root", root_s]));
    assert_eq!(snapshot(&root), before);
}

#[test]
fn logs_hook_prints_the_hook_log() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let o = run_cli(t.path(), &["logs", "--hook"]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("no hook log"), "{}", show(&o));

    let log: String = (1..=30).map(|i| format!("line {i}\n")).collect();
    std::fs::write(state.join("hook.log"), &log).unwrap();
    let o = ok(run_cli(t.path(), &["logs", "--hook"]));
    assert_eq!(text(&o.stdout), log);
    let o = ok(run_cli(t.path(), &["logs", "--hook", "-n", "3"]));
    assert_eq!(text(&o.stdout), "line 28\nline 29\nline 30\n");
    // More lines than the file holds reach back into the rotated log.
    std::fs::write(state.join("hook.log.1"), "old 1\nold 2\n").unwrap();
    let o = ok(run_cli(t.path(), &["logs", "--hook", "--lines", "31"]));
    assert_eq!(text(&o.stdout), format!("old 2\n{log}"));
}

#[test]
fn every_command_has_complete_help() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--help"],
            &[
                "status",
                "stop",
                "gc",
                "logs",
                "doctor",
                "install",
                "uninstall",
                "serve",
                "demo",
                "image",
                "NIXDOCK_STATE_DIR",
            ],
        ),
        (
            &["status", "--help"],
            &["--json", "--no-size", "STORE", "BUILDS"],
        ),
        (
            &["stop", "--help"],
            &["--all", "--force", "[SYSTEM]", "--engine"],
        ),
        (
            &["gc", "--help"],
            &["--volumes", "nix-collect-garbage", "--engine"],
        ),
        (
            &["logs", "--help"],
            &["--hook", "--lines", "--follow", "hook.log", "--engine"],
        ),
        (
            &["doctor", "--help"],
            &["--json", "build-hook", "SSH", "[engines.NAME]"],
        ),
        (
            &["install", "--help"],
            &[
                "--root",
                "--restart-daemon",
                "--hook",
                "--nix-version",
                "--service-manager",
                "--docker-host",
                "--serve",
                "2.25",
                "install-manifest.json",
            ],
        ),
        (&["uninstall", "--help"], &["--root", "--restart-daemon"]),
        (&["shell", "--help"], &["--engine", "SYSTEM"]),
        (
            &["serve", "--help"],
            &[
                "--listen",
                "--authorize",
                "--machines-line",
                "--key",
                "--slot-wait",
                "authorized_keys",
                "serve-shares-builders",
                "2.31",
            ],
        ),
        (
            &["demo", "--help"],
            &[
                "--system",
                "--cold",
                "pulled by the first build",
                "--max-jobs 0",
            ],
        ),
        (
            &["image", "build", "--help"],
            &[
                "--from-debian",
                "--system",
                "--suite",
                "--mirror",
                "--tag",
                "--engine",
                "nixos/nix",
            ],
        ),
    ];
    let t = tempfile::tempdir().unwrap();
    for (args, want) in cases {
        let o = ok(run_cli(t.path(), args));
        let help = text(&o.stdout);
        for w in *want {
            assert!(
                help.contains(w),
                "`nixdock {}` lacks {w:?}:\n{help}",
                args.join(" ")
            );
        }
        for line in help.lines() {
            assert!(
                line.chars().count() <= 80,
                "over 80 columns in {args:?}: {line}"
            );
        }
    }
    let o = run_cli(t.path(), &["stop"]);
    assert!(!o.status.success(), "stop needs SYSTEM or --all");
}

// --- with the test bed ------------------------------------------------------------------

/// A temporary installation whose config serves x86_64-linux and aarch64-linux from the
/// test-bed images.
struct TempInstall {
    dir: tempfile::TempDir,
    id: String,
    _cleanup: common::InstanceCleanup,
}

impl TempInstall {
    fn new() -> TempInstall {
        TempInstall::with_engines("")
    }

    /// The same two builders, with `engines` (`[engines.<name>]` tables) added to the config.
    fn with_engines(engines: &str) -> TempInstall {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nixdock.toml"),
            format!(
                "[builders.\"x86_64-linux\"]\nimage = \"nixdock-test/bookworm-amd64\"\nidle-timeout = 600\n\n\
                 [builders.\"aarch64-linux\"]\nimage = \"nixdock-test/bookworm-arm64\"\nemulation = \"container\"\n\n{engines}"
            ),
        )
        .unwrap();
        let state = StateDir::open(dir.path().join("state")).unwrap();
        let id = state.instance_id().unwrap();
        TempInstall {
            dir,
            _cleanup: common::InstanceCleanup(id.clone()),
            id,
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        run_cli(self.dir.path(), args)
    }

    fn container(&self, system: &str) -> String {
        format!("nixdock-{}-{system}", self.id)
    }

    /// Starts the x86_64-linux builder through the library, as the hook would.
    fn start_x86_64(&self) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let engine =
                Engine::discover(&nixdock::builder::engine::EngineSettings::top_level(None))
                    .await
                    .expect("a docker engine");
            let arch = engine.arch.clone();
            let state = StateDir::open(self.dir.path().join("state")).unwrap();
            let builders = Builders::new(engine, state).unwrap();
            let spec = BuilderSpec::from_config(
                &self.id,
                "x86_64-linux",
                &BuilderConfig {
                    image: Some("nixdock-test/bookworm-amd64".into()),
                    idle_timeout: Some(600),
                    ..Default::default()
                },
                &arch,
            );
            assert_eq!(spec.container_name(), self.container("x86_64-linux"));
            let ready =
                tokio::time::timeout(Duration::from_secs(120), builders.ensure_ready(&spec, None))
                    .await
                    .expect("ensure_ready in time")
                    .expect("builder ready");
            let _ = ready.link.close().await;
        });
    }

    /// Starts the x86_64-linux builder on the pool's engine `e2` through the library, as the
    /// hook does: its spec from the engine's place, its container named with the engine.
    fn start_x86_64_on_e2(&self) -> String {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let cfg = Config::load(&self.dir.path().join("nixdock.toml")).unwrap();
            let settings = EngineSettings::pool(&cfg)
                .into_iter()
                .find(|s| s.name == "e2")
                .expect("engine e2 in the config");
            let engine = Engine::discover(&settings).await.expect("engine 2 answers");
            let place = engine.place(&cfg);
            let spec = BuilderSpec::on_engine(&cfg, &self.id, &place)
                .into_iter()
                .find(|s| s.system == "x86_64-linux")
                .expect("x86_64-linux on e2");
            let name = spec.container_name();
            assert_eq!(name, format!("nixdock-{}-e2-x86_64-linux", self.id));
            let state = StateDir::open(self.dir.path().join("state")).unwrap();
            let builders = Builders::new(engine, state).unwrap();
            let ready =
                tokio::time::timeout(Duration::from_secs(120), builders.ensure_ready(&spec, None))
                    .await
                    .expect("ensure_ready on e2 in time")
                    .expect("builder on e2 ready");
            let _ = ready.link.close().await;
            name
        })
    }

    fn state_of(&self, system: &str) -> String {
        docker_ok([
            "inspect",
            "-f",
            "{{.State.Status}}",
            &self.container(system),
        ])
        .trim()
        .to_string()
    }
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", show(o)))
}

#[test]
fn status_json_lists_configured_systems() {
    if !require_bed() {
        return;
    }
    let inst = TempInstall::new();
    let o = ok(inst.cli(&["status", "--json"]));
    let v = json(&o);
    assert_eq!(v["instance"], inst.id.as_str());
    assert!(
        v["engine"]["addr"].as_str().is_some_and(|a| !a.is_empty()),
        "{v}"
    );
    let builders = v["builders"].as_array().unwrap();
    let systems: Vec<&str> = builders
        .iter()
        .map(|b| b["system"].as_str().unwrap())
        .collect();
    assert_eq!(systems, ["aarch64-linux", "x86_64-linux"]);
    for b in builders {
        assert_eq!(b["configured"], true);
        assert_eq!(b["state"], "absent", "{b}");
        assert_eq!(b["builds_running"], 0);
        assert_eq!(b["slots"], 8);
    }
    assert_eq!(builders[1]["image"], "nixdock-test/bookworm-amd64");
    // The table fits 80 columns.
    let o = ok(inst.cli(&["status"]));
    let table = text(&o.stdout);
    assert!(
        table.contains("x86_64-linux") && table.contains("absent"),
        "{table}"
    );
    for l in table.lines() {
        assert!(l.chars().count() <= 80, "over 80 columns: {l:?}");
    }
}

#[test]
fn doctor_json_reports_the_engine() {
    if !require_bed() {
        return;
    }
    let inst = TempInstall::new();
    let o = inst.cli(&["doctor", "--json"]);
    let v = json(&o);
    let addr = v["engine"]["addr"].as_str().unwrap_or_default();
    assert!(!addr.is_empty(), "{v}");
    let checks = v["checks"].as_array().unwrap();
    let find = |name: &'static str| checks.iter().filter(move |c| c["name"] == name);
    // The top-level engine's check names it, as every engine of a pool is named.
    assert!(find("engine default").any(|c| c["status"] == "ok"), "{v}");
    assert!(find("state dir").any(|c| c["status"] == "ok"), "{v}");
    for system in ["x86_64-linux", "aarch64-linux"] {
        let mine: Vec<_> = find(system).collect();
        assert!(
            mine.iter().any(|c| c["detail"]
                .as_str()
                .unwrap_or("")
                .contains("image nixdock-test/")),
            "{system}: {mine:?}"
        );
        assert!(
            mine.iter().all(|c| c["status"] != "fail"),
            "{system}: {mine:?}"
        );
    }
    // Every failed check carries a fix, and the exit status says whether any failed.
    for c in checks {
        if c["status"] == "fail" || c["status"] == "warn" {
            assert!(c["fix"].as_str().is_some_and(|f| !f.is_empty()), "{c}");
        }
    }
    let failed = checks.iter().any(|c| c["status"] == "fail");
    assert_eq!(v["ok"], !failed);
    assert_eq!(o.status.success(), !failed, "{}", show(&o));
}

#[test]
fn stop_all_stops_a_running_builder_and_gc_volumes_removes_it() {
    if !require_bed() {
        return;
    }
    let inst = TempInstall::new();
    inst.start_x86_64();
    assert_eq!(inst.state_of("x86_64-linux"), "running");

    let v = json(&ok(inst.cli(&["status", "--json"])));
    let b = v["builders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["system"] == "x86_64-linux")
        .unwrap()
        .clone();
    assert_eq!(b["state"], "running", "{b}");
    assert!(b["port"].as_u64().is_some(), "{b}");
    assert!(b["store_bytes"].as_u64().is_some_and(|n| n > 0), "{b}");

    // The SSH check of doctor reaches the running builder.
    let d = json(&inst.cli(&["doctor", "--json"]));
    let ssh: Vec<_> = d["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == "ssh x86_64-linux")
        .collect();
    assert!(ssh.len() == 1 && ssh[0]["status"] == "ok", "{ssh:?}");

    let o = ok(inst.cli(&["stop", "--all"]));
    assert!(
        text(&o.stdout).contains(&format!("stopped {}", inst.container("x86_64-linux"))),
        "{}",
        show(&o)
    );
    assert_eq!(inst.state_of("x86_64-linux"), "exited");
    let v = json(&ok(inst.cli(&["status", "--json"])));
    assert!(
        v["builders"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["system"] == "x86_64-linux" && b["state"] == "exited"),
        "{v}"
    );

    // gc --volumes removes the container and its /nix volume.
    let filter = format!("label={LABEL_INSTANCE}={}", inst.id);
    assert!(
        !docker_ok(["volume", "ls", "-q", "--filter", &filter])
            .trim()
            .is_empty()
    );
    let o = ok(inst.cli(&["gc", "--volumes", "x86_64-linux"]));
    assert!(
        text(&o.stdout).contains("removed container"),
        "{}",
        show(&o)
    );
    assert!(
        docker_ok(["ps", "-aq", "--filter", &filter])
            .trim()
            .is_empty()
    );
    assert!(
        docker_ok(["volume", "ls", "-q", "--filter", &filter])
            .trim()
            .is_empty()
    );
}

#[test]
fn gc_collects_garbage_in_a_running_builder() {
    if !require_bed() {
        return;
    }
    let inst = TempInstall::new();
    inst.start_x86_64();
    let o = ok(inst.cli(&["gc", "x86_64-linux"]));
    let out = text(&o.stdout);
    assert!(out.contains("collecting garbage"), "{}", show(&o));
    assert!(
        out.contains("freed") || out.contains("deleted"),
        "{}",
        show(&o)
    );
    // An unknown system is an error naming the known ones.
    let o = inst.cli(&["gc", "sparc-linux"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("known: aarch64-linux, x86_64-linux"),
        "{}",
        show(&o)
    );
}

#[test]
fn demo_builds_through_the_real_nix_on_both_systems() {
    if !require_bed() {
        return;
    }
    let inst = TempInstall::new();
    let o = inst.cli(&[
        "demo",
        "--system",
        "x86_64-linux",
        "--system",
        "aarch64-linux",
    ]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", show(&o));
    // Each system built twice, on its builder, with the right `uname -m`.
    for (system, machine) in [("x86_64-linux", "x86_64"), ("aarch64-linux", "aarch64")] {
        let ran = format!("ran on nixdock-{system}, uname -m = {machine}");
        assert_eq!(out.matches(&ran).count(), 2, "{system}:\n{out}");
    }
    assert!(
        out.contains("(cold: includes starting the builder)"),
        "{out}"
    );
    assert!(out.contains("(warm)"), "{out}");
    assert!(out.contains("native, built with --max-jobs 0"), "{out}");
}

// --- a pool of engines (engine 2 of the test bed) ---------------------------------------

/// `[engines.e2]`: engine 2 over TCP with TLS.
fn e2_table() -> String {
    format!(
        "[engines.e2]\ndocker-host = \"{ENGINE2_TLS}\"\ntls-ca = \"{ENGINE2_TLS_CA}\"\n\
         tls-cert = \"{ENGINE2_TLS_CERT}\"\ntls-key = \"{ENGINE2_TLS_KEY}\"\n"
    )
}

/// Removes an instance's containers and volumes on engine 2 when dropped (also on panic).
struct Engine2Cleanup(String);

impl Drop for Engine2Cleanup {
    fn drop(&mut self) {
        let by_label = format!("label={LABEL_INSTANCE}={}", self.0);
        for (list, remove) in [
            (&["ps", "-aq"][..], &["rm", "-f", "-v"][..]),
            (&["volume", "ls", "-q"][..], &["volume", "rm", "-f"][..]),
        ] {
            let mut args: Vec<&str> = list.to_vec();
            args.extend(["--filter", &by_label]);
            let ids = text(&docker_on(ENGINE2_UNIX, &args).stdout);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args: Vec<&str> = remove.to_vec();
                args.extend(ids);
                docker_on(ENGINE2_UNIX, &args);
            }
        }
    }
}

fn state_on_e2(container: &str) -> String {
    docker_on_ok(
        ENGINE2_UNIX,
        ["inspect", "-f", "{{.State.Status}}", container],
    )
    .trim()
    .to_string()
}

#[test]
fn status_logs_doctor_stop_and_gc_cover_both_engines_of_a_pool() {
    if !require_bed() || !require_second_engine() {
        return;
    }
    let inst = TempInstall::with_engines(&e2_table());
    let _e2_cleanup = Engine2Cleanup(inst.id.clone());
    inst.start_x86_64();
    let on_e2 = inst.start_x86_64_on_e2();
    let on_default = inst.container("x86_64-linux");
    assert_eq!(state_on_e2(&on_e2), "running");

    // status: each engine's builders, named by engine; the old fields stay.
    let v = json(&ok(inst.cli(&["status", "--json"])));
    assert!(v["engine"]["addr"].as_str().is_some(), "{v}");
    assert!(v["engine_error"].is_null(), "{v}");
    let engines: Vec<(&str, &str)> = v["engines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["addr"].as_str().unwrap()))
        .collect();
    assert_eq!(engines.len(), 2, "{v}");
    assert_eq!(engines[0].0, "default");
    assert_eq!(engines[1], ("e2", ENGINE2_TLS));
    let builders = v["builders"].as_array().unwrap();
    let row = |engine: &str, system: &str| {
        builders
            .iter()
            .find(|b| b["engine"] == engine && b["system"] == system)
            .unwrap_or_else(|| panic!("no {system} on {engine}: {v}"))
            .clone()
    };
    for (engine, container) in [("default", &on_default), ("e2", &on_e2)] {
        let b = row(engine, "x86_64-linux");
        assert_eq!(b["state"], "running", "{b}");
        assert_eq!(b["container"], container.as_str(), "{b}");
        assert_eq!(row(engine, "aarch64-linux")["state"], "absent");
    }
    // Engine 2's volume is not on this host: its store is measured inside the builder.
    assert_eq!(row("e2", "x86_64-linux")["store_measured_by"], "du");
    let table = text(&ok(inst.cli(&["status"])).stdout);
    assert!(
        table.contains("engine default: ") && table.contains(&format!("engine e2: {ENGINE2_TLS}")),
        "{table}"
    );
    for l in table.lines() {
        assert!(l.chars().count() <= 80, "over 80 columns: {l:?}");
    }

    // logs: one section per engine, each under a header naming it; --engine picks one.
    let o = ok(inst.cli(&["logs", "x86_64-linux"]));
    let out = text(&o.stdout);
    assert!(
        out.contains("==> x86_64-linux on engine default ("),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "==> x86_64-linux on engine e2 ({ENGINE2_TLS}): {on_e2} <=="
        )),
        "{out}"
    );
    let o = ok(inst.cli(&["logs", "--engine", "e2", "x86_64-linux"]));
    let out = text(&o.stdout);
    assert!(
        out.contains("on engine e2") && !out.contains("on engine default"),
        "{out}"
    );

    // doctor: each engine named; the builder on engine 2 answers through the engine's exec.
    let d = json(&inst.cli(&["doctor", "--json"]));
    let checks = d["checks"].as_array().unwrap();
    let check = |name: &str| -> Vec<serde_json::Value> {
        checks
            .iter()
            .filter(|c| c["name"] == name)
            .cloned()
            .collect()
    };
    assert!(
        check("engine default").iter().any(|c| c["status"] == "ok"),
        "{d}"
    );
    let e2 = check("engine e2");
    assert!(
        e2.len() == 1
            && e2[0]["status"] == "ok"
            && e2[0]["detail"].as_str().unwrap().contains(ENGINE2_TLS)
            && e2[0]["detail"].as_str().unwrap().contains("TLS"),
        "{e2:?}"
    );
    let ssh = check("ssh x86_64-linux");
    assert!(ssh.len() == 1 && ssh[0]["status"] == "ok", "{ssh:?}");
    let on = check("builder x86_64-linux on e2");
    assert!(on.len() == 1 && on[0]["status"] == "ok", "{on:?}\n{d}");

    // stop --all: both engines' builders, under the hook's slot locks (a held slot refuses).
    let state = StateDir::open(inst.dir.path().join("state")).unwrap();
    let (slot, _) = nixdock::builder::slots::try_acquire(&state.load_dir(), &on_e2, 8).unwrap();
    let slot = slot.expect("a free slot");
    let o = inst.cli(&["stop", "--all"]);
    assert!(!o.status.success(), "{}", show(&o));
    assert!(
        text(&o.stderr).contains(&format!("1 build(s) running on {on_e2}")),
        "{}",
        show(&o)
    );
    assert!(
        text(&o.stdout).contains(&format!("x86_64-linux on default: stopped {on_default}")),
        "{}",
        show(&o)
    );
    assert_eq!(state_on_e2(&on_e2), "running");
    drop(slot);
    let o = ok(inst.cli(&["stop", "--all"]));
    assert!(
        text(&o.stdout).contains(&format!("x86_64-linux on e2: stopped {on_e2}")),
        "{}",
        show(&o)
    );
    assert_eq!(inst.state_of("x86_64-linux"), "exited");
    assert_eq!(state_on_e2(&on_e2), "exited");

    // gc --volumes: the containers and volumes on both engines.
    let filter = format!("label={LABEL_INSTANCE}={}", inst.id);
    assert!(
        !docker_on_ok(ENGINE2_UNIX, ["volume", "ls", "-q", "--filter", &filter])
            .trim()
            .is_empty()
    );
    let o = ok(inst.cli(&["gc", "--volumes"]));
    assert!(
        text(&o.stdout).contains(&format!("x86_64-linux on e2: removed container {on_e2}")),
        "{}",
        show(&o)
    );
    for host in [None, Some(ENGINE2_UNIX)] {
        for list in [&["ps", "-aq"][..], &["volume", "ls", "-q"][..]] {
            let mut args = list.to_vec();
            args.extend(["--filter", &filter]);
            let left = match host {
                None => docker_ok(&args),
                Some(h) => docker_on_ok(h, &args),
            };
            assert!(left.trim().is_empty(), "{host:?} {args:?}: {left}");
        }
    }
}

#[test]
fn doctor_and_status_on_a_pool_name_an_unreachable_engine_within_seconds() {
    if !require_bed() || !require_second_engine() {
        return;
    }
    // Nothing answers at 10.231.0.99 (engine 2's network, no such host).
    let gone = format!(
        "[engines.gone]\ndocker-host = \"tcp://10.231.0.99:2376\"\ntls-ca = \"{ENGINE2_TLS_CA}\"\n\
         tls-cert = \"{ENGINE2_TLS_CERT}\"\ntls-key = \"{ENGINE2_TLS_KEY}\"\n"
    );
    let inst = TempInstall::with_engines(&format!("{}\n{gone}", e2_table()));
    let _e2_cleanup = Engine2Cleanup(inst.id.clone());

    let t = std::time::Instant::now();
    let o = inst.cli(&["doctor", "--json"]);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(20), "doctor took {took:?}");
    assert!(!o.status.success(), "{}", show(&o));
    let d = json(&o);
    assert_eq!(d["ok"], false);
    let checks = d["checks"].as_array().unwrap();
    let check = |name: &str| -> Vec<serde_json::Value> {
        checks
            .iter()
            .filter(|c| c["name"] == name)
            .cloned()
            .collect()
    };
    assert!(
        check("engine default").iter().any(|c| c["status"] == "ok"),
        "{d}"
    );
    // Engine 2 answers, and its architecture is not a warning (placement handles it).
    let e2 = check("engine e2");
    assert!(
        e2.iter().all(|c| c["status"] == "ok") && !e2.is_empty(),
        "{e2:?}"
    );
    // Its systems are checked on it.
    assert!(
        check("x86_64-linux on e2")
            .iter()
            .any(|c| c["status"] == "ok"
                && c["detail"]
                    .as_str()
                    .unwrap()
                    .contains("image nixdock-test/")),
        "{d}"
    );
    let g = check("engine gone");
    assert_eq!(g.len(), 1, "{d}");
    assert_eq!(g[0]["status"], "fail", "{g:?}");
    assert!(
        g[0]["detail"]
            .as_str()
            .unwrap()
            .contains("10.231.0.99:2376"),
        "{g:?}"
    );
    let fix = g[0]["fix"].as_str().unwrap();
    assert!(
        fix.contains("engine gone") && fix.contains("[engines.gone]"),
        "{fix}"
    );
    let names: Vec<&str> = d["engines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "e2", "gone"]);
    let text_out = text(&inst.cli(&["doctor"]).stdout);
    assert!(text_out.contains("[FAIL] engine gone: "), "{text_out}");

    // status still lists the engines that answered, and says which did not.
    let t = std::time::Instant::now();
    let o = inst.cli(&["status", "--json"]);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "status took {:?}",
        t.elapsed()
    );
    assert!(
        !o.status.success(),
        "an unreachable engine fails status: {}",
        show(&o)
    );
    let v = json(&o);
    assert!(
        v["engine_error"]
            .as_str()
            .is_some_and(|e| e.contains("engine gone")),
        "{v}"
    );
    let on_e2: Vec<_> = v["builders"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["engine"] == "e2")
        .collect();
    assert_eq!(on_e2.len(), 2, "{v}");
    let gone_row = v["engines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "gone")
        .cloned()
        .unwrap();
    assert!(gone_row["error"].as_str().is_some(), "{gone_row}");

    // stop names the unreachable engine and fails, after acting on the others.
    let o = inst.cli(&["stop", "--all"]);
    assert!(!o.status.success(), "{}", show(&o));
    assert!(text(&o.stderr).contains("engine gone: "), "{}", show(&o));
    assert!(
        text(&o.stdout).contains("x86_64-linux on e2: no container"),
        "{}",
        show(&o)
    );
}

/// `install --serve ADDR`: a service running `nixdock serve --listen ADDR` (systemd unit or
/// launchd plist), recorded like every other file, so uninstall removes it again.
#[test]
fn install_serve_writes_a_service_and_uninstall_removes_it() {
    for (manager, path, wanted) in [
        (
            "systemd",
            "etc/systemd/system/nixdock-serve.service",
            format!(
                "\nExecStart={} serve --listen 127.0.0.2:22\n",
                std::fs::canonicalize(nixdock_bin()).unwrap().display()
            ),
        ),
        (
            "launchd",
            "Library/LaunchDaemons/org.nixdock.serve.plist",
            "<string>serve</string>\n\t\t<string>--listen</string>\n\t\t<string>127.0.0.2:22</string>"
                .to_string(),
        ),
    ] {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        write_mode(&root.join("etc/nix/nix.conf"), b"sandbox = false\n", 0o644);
        let before = snapshot(&root);
        let root_s = root.to_str().unwrap();
        let o = ok(run_cli(
            t.path(),
            &[
                "install",
                "--root",
                root_s,
                "--nix-version",
                "2.8",
                "--service-manager",
                manager,
                "--serve",
                "127.0.0.2:22",
            ],
        ));
        let unit = std::fs::read_to_string(root.join(path))
            .unwrap_or_else(|e| panic!("{manager}: {e}\n{}", show(&o)));
        assert!(unit.contains(&wanted), "{manager}: {unit}");
        ok(run_cli(t.path(), &["uninstall", "--root", root_s]));
        assert_eq!(snapshot(&root), before, "{manager}: uninstall removes it");
    }
}
