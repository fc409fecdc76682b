//! The state directory as the real `nixdock-hook` binary makes and checks it: private modes
//! under a permissive umask, a directory other users can enter (or own) refused with the path
//! and the fix, and a non-root hook without a home declining instead of falling back to /tmp.
//! No test bed needed: each try is for a system no builder serves, so no engine is touched.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use hook_protocol::hook::{Settings, TryRequest};
use nixdock::state::{FileLock, StateDir};

const HOOK: &str = env!("CARGO_BIN_EXE_nixdock-hook");
/// An unprivileged uid no account on a test machine has.
const OTHER_UID: u32 = 64124;

/// The parent's preamble and one `try` for a system nothing serves (so the hook must load its
/// config and state, then declines without touching an engine), then EOF.
fn hook_stdin() -> Vec<u8> {
    let mut buf = BytesMut::new();
    Settings::from_iter([
        ("system", "x86_64-linux"),
        ("max-jobs", "1"),
        ("builders", ""),
    ])
    .write(&mut buf);
    TryRequest {
        am_willing: true,
        needed_system: "s390x-linux".into(),
        drv_path: "/nix/store/00000000000000000000000000000000-state-dir-test.drv"
            .parse()
            .unwrap(),
        required_features: Default::default(),
    }
    .write(&mut buf);
    buf.to_vec()
}

/// A config that serves only riscv64-linux, so the `try` above is declined by policy.
fn write_config(dir: &Path) -> PathBuf {
    let p = dir.join("nixdock.toml");
    fs::write(
        &p,
        "[builders.\"riscv64-linux\"]\nimage = \"nixdock-test/none\"\n",
    )
    .unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    p
}

/// Runs `cmd` with the hook's stdin from a file, with a time limit.
fn run_with_stdin(mut cmd: Command, dir: &Path) -> Output {
    let input = dir.join("hook-stdin.bin");
    fs::write(&input, hook_stdin()).unwrap();
    fs::set_permissions(&input, fs::Permissions::from_mode(0o644)).unwrap();
    cmd.stdin(fs::File::open(&input).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let out = common::drain(child.stdout.take());
    let err = common::drain(child.stderr.take());
    let status = common::wait_timeout(&mut child, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("{cmd:?} did not finish within a minute"));
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The hook, run by `sh` with umask 022 (the usual default, which turned 0777 into 0755 and
/// 0666 into 0644 before).
fn run_hook(dir: &Path, state: &Path) -> Output {
    let config = write_config(dir);
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 022; exec \"$0\" 3", HOOK])
        .env("NIXDOCK_STATE_DIR", state)
        .env("NIXDOCK_CONFIG", &config)
        .env_remove("NIXDOCK_LOG");
    run_with_stdin(cmd, dir)
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

fn text(o: &Output) -> String {
    common::output_text(o)
}

#[test]
fn hook_makes_a_private_state_dir_under_umask_022() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let out = run_hook(d.path(), &state);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", text(&out));
    assert!(err.contains("# decline"), "{}", text(&out));
    assert!(!err.contains("refusing"), "{}", text(&out));

    for dir in [
        state.clone(),
        state.join("locks"),
        state.join("current-load"),
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for file in [
        state.join("hook.log"),
        state.join("instance-id"),
        state.join("locks/instance-id.lock"),
    ] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    // Every entry, not only the ones named above.
    for dir in [
        state.clone(),
        state.join("locks"),
        state.join("current-load"),
    ] {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            assert_eq!(mode(&p) & 0o077, 0, "{} is open to others", p.display());
        }
    }
    // A second start accepts what the first made.
    let again = run_hook(d.path(), &state);
    assert!(
        !String::from_utf8_lossy(&again.stderr).contains("refusing"),
        "{}",
        text(&again)
    );
}

/// The library's other files (the SSH client key, lock files, the instance id) are private
/// too, whatever the umask: this binary again, under umask 022 and 000 (which would leave
/// every bit the code asks for), runs `helper_private_files`.
#[test]
fn client_key_and_locks_are_private_whatever_the_umask() {
    for umask in ["022", "000"] {
        let d = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("umask {umask}; exec \"$0\" --exact helper_private_files --nocapture"),
        ])
        .arg(std::env::current_exe().unwrap())
        .env("NIXDOCK_TEST_HELPER_STATE", d.path().join("state"));
        let out = common::run_with_timeout(cmd, Duration::from_secs(60)).unwrap();
        assert!(out.status.success(), "umask {umask}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("helper done"),
            "umask {umask}: the helper did not run: {}",
            text(&out)
        );
    }
}

/// Does nothing unless started by `client_key_and_locks_are_private_whatever_the_umask`.
#[test]
fn helper_private_files() {
    let Some(dir) = std::env::var_os("NIXDOCK_TEST_HELPER_STATE") else {
        return;
    };
    let state = StateDir::open(PathBuf::from(dir)).unwrap();
    nixdock::transport::keys::load_or_create_client_key(state.path()).unwrap();
    let lock = FileLock::exclusive(&state.lock_path("x")).unwrap();
    state.instance_id().unwrap();
    nixdock::logfile::init(&state.log_path(), "info");
    assert_eq!(mode(&state.path().join("client_ed25519")), 0o600);
    assert_eq!(mode(lock.path()), 0o600);
    assert_eq!(mode(&state.path().join("instance-id")), 0o600);
    assert_eq!(mode(&state.log_path()), 0o600);
    for dir in [
        state.path().to_owned(),
        state.load_dir(),
        state.path().join("locks"),
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    // And the whole directory passes its own check.
    StateDir::open(state.path()).unwrap();
    println!("helper done");
}

/// A state directory other users can enter, one another user owns, or a file in it that is
/// not private: refused with the path and the fix, as an `@nix` message to Nix, and the hook
/// declines without writing its log there.
#[test]
fn hook_refuses_a_state_dir_that_is_not_private() {
    type Make = fn(&Path);
    let cases: [(&str, Make); 4] = [
        ("0755 directory", |s| {
            fs::create_dir(s).unwrap();
            fs::set_permissions(s, fs::Permissions::from_mode(0o755)).unwrap();
        }),
        ("directory owned by another user", |s| {
            fs::create_dir(s).unwrap();
            fs::set_permissions(s, fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(s, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
        }),
        ("world-readable instance id", |s| {
            fs::create_dir(s).unwrap();
            fs::set_permissions(s, fs::Permissions::from_mode(0o700)).unwrap();
            fs::write(s.join("instance-id"), "abcd1234\n").unwrap();
            fs::set_permissions(s.join("instance-id"), fs::Permissions::from_mode(0o644)).unwrap();
        }),
        ("symlink planted as the log", |s| {
            fs::create_dir(s).unwrap();
            fs::set_permissions(s, fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::symlink("/etc/nixdock-state-dir-test-trap", s.join("hook.log"))
                .unwrap();
        }),
    ];
    for (what, make) in cases {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        make(&state);
        let before: Vec<_> = fs::read_dir(&state)
            .map(|r| r.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        let out = run_hook(d.path(), &state);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {}", text(&out));
        assert!(err.contains("# decline"), "{what}: {}", text(&out));
        // An @nix message (a warning Nix shows), naming the path and the fix.
        let msg = err
            .lines()
            .find(|l| l.starts_with("@nix ") && l.contains("refusing to use"))
            .unwrap_or_else(|| panic!("{what}: no @nix message refusing it:\n{}", text(&out)));
        assert!(msg.contains(&*state.to_string_lossy()), "{what}: {msg}");
        let fix = match what {
            "0755 directory" => format!("chmod 700 {}", state.display()),
            "directory owned by another user" => format!("chown -R 0 {}", state.display()),
            "world-readable instance id" => format!("chmod 600 {}/instance-id", state.display()),
            _ => format!("rm {}/hook.log", state.display()),
        };
        assert!(msg.contains(&fix), "{what}: no `{fix}` in {msg}");
        // Nothing was written into the refused directory.
        let after: Vec<_> = fs::read_dir(&state)
            .map(|r| r.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert_eq!(before, after, "{what}: the hook wrote into it");
        assert!(!Path::new("/etc/nixdock-state-dir-test-trap").exists());
    }
}

/// A parent of the state directory that others can write (and is not sticky) is refused too:
/// its owner could swap the whole state directory.
#[test]
fn state_dir_under_a_parent_others_can_write_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let open = d.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let e = StateDir::open(open.join("state")).unwrap_err().to_string();
    assert!(e.contains(&*open.to_string_lossy()), "{e}");
    assert!(e.contains("chmod go-w"), "{e}");
    assert!(!open.join("state").exists(), "made the state dir anyway");
    // Sticky (like /tmp) is fine.
    fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
    StateDir::open(open.join("state")).unwrap();
}

/// A non-root hook with no HOME (nor XDG_STATE_HOME or NIXDOCK_STATE_DIR) declines with a
/// warning instead of keeping its state in /tmp, where another user can pre-create it. Run
/// as an unprivileged uid in a private mount namespace with its own /tmp, so a regression
/// cannot leave anything in the machine's /tmp.
#[test]
fn non_root_hook_without_home_declines() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root to switch to an unprivileged uid");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let config = write_config(d.path());
    let script = format!(
        // The hook is opened before the tmpfs hides /tmp: the checkout may itself be under /tmp.
        "set -e; exec 9<{hook}; mount -t tmpfs -o mode=1777 nixdock-test /tmp; \
         cp /proc/self/fd/9 /tmp/hook; exec 9<&-; \
         chmod 755 /tmp/hook; \
         setpriv --reuid {OTHER_UID} --regid {OTHER_UID} --clear-groups -- \
           env -i PATH=/usr/bin:/bin NIXDOCK_CONFIG={config} /tmp/hook 3 || echo HOOK-FAILED; \
         if [ -e /tmp/.local ]; then echo LEFT-STATE-IN-TMP; ls -laR /tmp/.local; fi",
        hook = HOOK,
        config = config.display(),
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let out = run_with_stdin(cmd, d.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!stdout.contains("HOOK-FAILED"), "{}", text(&out));
    assert!(!stdout.contains("LEFT-STATE-IN-TMP"), "{}", text(&out));
    assert!(err.contains("# decline"), "{}", text(&out));
    let warning = err
        .lines()
        .find(|l| l.starts_with("@nix ") && l.contains("HOME is not set"))
        .unwrap_or_else(|| panic!("no warning about the missing home:\n{}", text(&out)));
    assert!(warning.contains("NIXDOCK_STATE_DIR"), "{warning}");
    assert!(warning.contains(&format!("uid {OTHER_UID}")), "{warning}");
}
