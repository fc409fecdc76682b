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

use common::{docker_ok, require_bed, run_with_timeout};
use nixdock::builder::provision::LABEL_INSTANCE;
use nixdock::builder::{BuilderSpec, Builders, Engine};
use nixdock::config::BuilderConfig;
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
                "demo",
                "image",
                "NIXDOCK_STATE_DIR",
            ],
        ),
        (
            &["status", "--help"],
            &["--json", "--no-size", "STORE", "BUILDS"],
        ),
        (&["stop", "--help"], &["--all", "--force", "[SYSTEM]"]),
        (&["gc", "--help"], &["--volumes", "nix-collect-garbage"]),
        (
            &["logs", "--help"],
            &["--hook", "--lines", "--follow", "hook.log"],
        ),
        (&["doctor", "--help"], &["--json", "build-hook", "SSH"]),
        (
            &["install", "--help"],
            &[
                "--root",
                "--restart-daemon",
                "--hook",
                "--nix-version",
                "--service-manager",
                "--docker-host",
                "2.25",
                "install-manifest.json",
            ],
        ),
        (&["uninstall", "--help"], &["--root", "--restart-daemon"]),
        (
            &["demo", "--help"],
            &["--system", "--cold", "--build-images", "--max-jobs 0"],
        ),
        (
            &["image", "build", "--help"],
            &[
                "--from-debian",
                "--system",
                "--suite",
                "--mirror",
                "--tag",
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
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nixdock.toml"),
            "[builders.\"x86_64-linux\"]\nimage = \"nixdock-test/bookworm-amd64\"\nidle-timeout = 600\n\n\
             [builders.\"aarch64-linux\"]\nimage = \"nixdock-test/bookworm-arm64\"\n",
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
    assert!(find("engine").any(|c| c["status"] == "ok"), "{v}");
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
