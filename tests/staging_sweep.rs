//! A hook SIGKILLed while it copies a large output back leaves its `.nixdock-tmp-*` staging
//! directory in `/nix/store`; the next build through the hook sweeps it, because its owner's
//! lock is gone with the process, and leaves a live importer's staging directory alone. Real
//! `nix-build` (the host's Nix 2.8), the real hook binary, a real builder container.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nixdock::local_store::STAGING_PREFIX;
use nixdock::local_store::staging::{LOCK_PREFIX, StagingDir};

const HOOK: &str = env!("CARGO_BIN_EXE_nixdock-hook");
const STORE: &str = "/nix/store";

/// The e2e installation (its builders are shared with hook_e2e and build_log).
fn install() -> &'static common::SuiteInstall {
    static I: OnceLock<common::SuiteInstall> = OnceLock::new();
    I.get_or_init(|| common::SuiteInstall::new("e2e", &common::e2e_config()))
}

fn drv_expr(name: &str, script: &str) -> String {
    format!(
        "derivation {{ name = \"{name}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
         args = [\"-c\" {script:?}]; nonce = \"{}\"; }}",
        common::unique_name("n")
    )
}

fn nix_build(expr: &str, mark: &str) -> Command {
    let i = install();
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "-E", expr])
        .args(["--option", "build-hook", HOOK, "--max-jobs", "0"])
        .env("NIXDOCK_CONFIG", &i.config)
        .env("NIXDOCK_STATE_DIR", &i.state)
        // Lets the test find this build's hook among the machine's processes.
        .env("NIXDOCK_TEST_MARK", mark);
    cmd
}

fn lock_of(dir: &Path) -> PathBuf {
    let name = dir.file_name().unwrap().to_str().unwrap();
    let suffix = name.strip_prefix(STAGING_PREFIX).unwrap();
    dir.with_file_name(format!("{LOCK_PREFIX}{suffix}"))
}

/// Bytes of the regular files under `dir` (no symlink followed; vanishing entries skipped).
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                total += md.size();
            }
        }
    }
    total
}

/// The staging directory process `pid` is writing into (it has a file in it open).
fn staging_dir_of(pid: i32) -> Option<PathBuf> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .find_map(|target| {
            let rel = target.strip_prefix(STORE).ok()?;
            let first = rel.components().next()?.as_os_str().to_str()?;
            (first.starts_with(STAGING_PREFIX) && rel.components().count() > 1)
                .then(|| Path::new(STORE).join(first))
        })
}

/// Pids of running `nixdock-hook` processes whose environment holds `NIXDOCK_TEST_MARK=mark`.
fn hooks_with_mark(mark: &str) -> Vec<i32> {
    let want = format!("NIXDOCK_TEST_MARK={mark}");
    let hook = fs::canonicalize(HOOK).unwrap();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == hook)
                && fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == want.as_bytes()))
        })
        .collect()
}

#[test]
fn staging_left_by_a_killed_hook_is_swept_by_the_next_import() {
    if !common::require_bed() {
        return;
    }
    // Warm the builder first, so the copy back starts soon and nothing else is slow.
    let warm = nix_build(&drv_expr("sweep-warm", "echo > $out"), "warm");
    common::out_path(&common::run_with_timeout(warm, Duration::from_secs(600)).unwrap());

    let mark = common::unique_name("sweep");
    // 400 MB the builder writes: its copy back takes long enough to be caught midway.
    let mut build = nix_build(
        &drv_expr("sweep-big", "/usr/bin/head -c 400M /dev/urandom > $out"),
        &mark,
    );
    let mut child = build
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = common::drain(child.stderr.take());

    // Kill the hook once its staging directory exists and is filling up.
    let deadline = Instant::now() + Duration::from_secs(480);
    let (killed, leftover) = loop {
        assert!(
            Instant::now() < deadline,
            "the copy back never started within 8 minutes"
        );
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "nix-build ended ({status}) before the hook could be killed mid-copy:\n{}",
                String::from_utf8_lossy(&stderr.join().unwrap())
            );
        }
        // Other test runs may be importing into the same store: this hook's staging directory
        // is the one whose lock file it holds open.
        // (Nix may have started more than one hook; only the one building has a staging
        // directory.)
        let importing = hooks_with_mark(&mark)
            .into_iter()
            .find_map(|pid| Some((pid, staging_dir_of(pid)?)));
        if let Some((pid, dir)) = importing
            && tree_size(&dir) > 16 << 20
        {
            // SAFETY: kill(2) on a pid we found; no memory is involved.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
            break (pid, dir);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = common::wait_timeout(&mut child, Duration::from_secs(120))
        .expect("nix-build ends after its hook is killed");
    let err = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
    assert!(
        !status.success(),
        "the build succeeded without its hook:\n{err}"
    );
    while Path::new(&format!("/proc/{killed}")).exists()
        && !fs::read_to_string(format!("/proc/{killed}/stat")).is_ok_and(|s| s.contains(") Z"))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    // What the killed hook left: its staging directory, part of the output, and its lock file.
    assert!(leftover.is_dir(), "{} vanished", leftover.display());
    assert!(lock_of(&leftover).is_file());
    let left_size = tree_size(&leftover);
    assert!(left_size > 16 << 20, "{left_size} bytes left");

    // A live importer's staging directory (the test holds its lock) with something in it.
    let live = StagingDir::create(Path::new(STORE), &common::unique_name("live")).unwrap();
    fs::write(live.path().join("partial"), b"still being written").unwrap();

    // The next build through the hook imports an output, and sweeps first.
    let next = nix_build(&drv_expr("sweep-next", "echo next > $out"), "next");
    let out = common::out_path(&common::run_with_timeout(next, Duration::from_secs(600)).unwrap());
    assert_eq!(fs::read_to_string(&out).unwrap(), "next\n");
    assert!(
        !leftover.exists(),
        "{} ({left_size} bytes) is still there after the next import",
        leftover.display()
    );
    assert!(!lock_of(&leftover).exists());
    assert!(
        live.path().join("partial").is_file(),
        "a live importer's directory was swept"
    );
    assert!(lock_of(live.path()).is_file());
    let live_path = live.path().to_owned();
    drop(live);
    assert!(!live_path.exists() && !lock_of(&live_path).exists());
}
