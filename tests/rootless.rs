//! Rootless Podman (issue 15), end to end: the test bed's user `nixdock-rootless` runs
//! `podman system service` as itself (its containers' root is its own uid, their other uids its
//! 65536 subordinate ones), as a single-user install's engine would be.
//!
//! - A single-user install: Nix and the hook run as that user, with a store it owns (a directory
//!   of its own bind-mounted on /nix in a private mount namespace, so its /nix is what a
//!   single-user install's is). The hook finds the engine itself (no `docker-host`), "auto"
//!   turns Nix's sandbox on there (the engine is user-namespaced), the build runs sandboxed as a
//!   build user whose uid the container maps, and a warm build reaches the builder's daemon
//!   through its socket in the volume, which belongs to the hook's own uid.
//! - A root hook pointed at that user's socket: builds as a build user inside the map; the
//!   socket in the volume is not root's, so the fast path stays off.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{ROOTLESS_HOME, ROOTLESS_USER, output_text as text};

const HOOK: &str = env!("CARGO_BIN_EXE_nixdock-hook");
const NIXDOCK: &str = env!("CARGO_BIN_EXE_nixdock");

/// The rootless user's ids and its engine's address.
struct Rootless {
    uid: u32,
    gid: u32,
    engine: String,
}

fn rootless() -> Option<Rootless> {
    if !common::require_rootless() {
        return None;
    }
    let md = std::fs::metadata(ROOTLESS_HOME).expect("the rootless user's home");
    let (uid, gid) = (md.uid(), md.gid());
    Some(Rootless {
        uid,
        gid,
        engine: format!("unix:///run/user/{uid}/podman/podman.sock"),
    })
}

/// A directory of the test's own — for the rootless user's installation under its home (so it
/// can reach it) and owned by it, for root's in the target's temporary directory (a root hook
/// refuses a state dir below a directory another user owns) — and the installation's
/// containers and volumes on the rootless engine, all removed when dropped (also on panic).
struct Scratch {
    dir: PathBuf,
    engine: String,
    state: PathBuf,
    owner: Option<(u32, u32)>,
}

impl Scratch {
    fn new(r: &Rootless, tag: &str, for_user: bool) -> Scratch {
        let name = common::unique_name(tag);
        let dir = if for_user {
            Path::new(ROOTLESS_HOME).join("tests").join(name)
        } else {
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
        };
        std::fs::create_dir_all(&dir).unwrap();
        let owner = for_user.then_some((r.uid, r.gid));
        if let Some((uid, gid)) = owner {
            for d in [dir.parent().unwrap(), &dir] {
                std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
            }
        }
        Scratch {
            // The user's: where its hook puts it by default, under XDG_STATE_HOME (below).
            state: if for_user {
                dir.join("xdg-state/nixdock")
            } else {
                dir.join("state")
            },
            dir,
            engine: r.engine.clone(),
            owner,
        }
    }

    /// Writes `name` in the directory, owned by the directory's owner.
    fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, content).unwrap();
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        }
        p
    }

    fn instance(&self) -> String {
        std::fs::read_to_string(self.state.join("instance-id"))
            .expect("an instance id after a build")
            .trim()
            .to_string()
    }

    /// This installation's one container on the rootless engine.
    fn container(&self) -> String {
        let label = format!(
            "label={}={}",
            nixdock::builder::provision::LABEL_INSTANCE,
            self.instance()
        );
        let names = common::docker_on_ok(
            &self.engine,
            ["ps", "-a", "--filter", &label, "--format", "{{.Names}}"],
        );
        let names: Vec<&str> = names.split_whitespace().collect();
        assert_eq!(
            names.len(),
            1,
            "one builder on the rootless engine: {names:?}"
        );
        names[0].to_string()
    }

    fn label(&self, container: &str, key: &str) -> String {
        common::docker_on_ok(
            &self.engine,
            [
                "inspect",
                "-f",
                &format!("{{{{index .Config.Labels \"{key}\"}}}}"),
                container,
            ],
        )
        .trim()
        .to_string()
    }

    fn hook_log(&self) -> String {
        std::fs::read_to_string(self.state.join("hook.log")).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(id) = std::fs::read_to_string(self.state.join("instance-id")) {
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
        // Root removes the store's read-only directories too.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A derivation whose output records the uid map its build ran under, whether it saw the host's
/// /usr/bin, and a nonce (so every test builds anew).
fn probe_expr(name: &str) -> String {
    let nonce = common::unique_name(name);
    format!(
        "derivation {{ name = \"{name}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
         args = [\"-c\" \"while read -r a b c; do echo uidmap $a $b $c; done < /proc/self/uid_map > $out; \
         while read -r k v rest; do case $k in Uid:) echo uid $v >> $out;; esac; done < /proc/self/status; \
         if [ -e /usr/bin ]; then echo usr-bin-present >> $out; else echo usr-bin-absent >> $out; fi\"]; \
         nonce = \"{nonce}\"; }}"
    )
}

fn trivial_expr(name: &str) -> String {
    let nonce = common::unique_name(name);
    format!(
        "derivation {{ name = \"{name}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
         args = [\"-c\" \"echo {nonce} > $out\"]; }}"
    )
}

/// `nixdock-hook` and `nixdock` as the rootless user can run them: the test binaries where
/// that user may execute them, else copies side by side in the scratch directory (a target dir
/// under /root is closed to it).
fn programs_for(r: &Rootless, s: &Scratch) -> (PathBuf, PathBuf) {
    let reachable = |p: &str| {
        Command::new("setpriv")
            .args([
                &format!("--reuid={}", r.uid),
                &format!("--regid={}", r.gid),
                "--clear-groups",
                "test",
                "-x",
                p,
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    if reachable(HOOK) && reachable(NIXDOCK) {
        return (PathBuf::from(HOOK), PathBuf::from(NIXDOCK));
    }
    let copy = |from: &str, name: &str| {
        let to = s.dir.join(name);
        std::fs::copy(from, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        to
    };
    (copy(HOOK, "nixdock-hook"), copy(NIXDOCK, "nixdock"))
}

/// `PROGRAM ARGS...` as the rootless user with a single-user Nix install of its own: `nix`
/// (owned by it) bind-mounted on /nix in a private mount namespace; only its own environment
/// (HOME, XDG_RUNTIME_DIR as a login gives them), its nix.conf `config/nix/nix.conf` in the
/// scratch directory (XDG_CONFIG_HOME), the nixdock config `nixdock.toml` there, and nixdock's
/// state in its default place under XDG_STATE_HOME (`xdg-state` there).
fn as_single_user(r: &Rootless, s: &Scratch, program: &str, args: &[&str]) -> Output {
    let nix = s.dir.join("nix");
    if !nix.exists() {
        std::fs::create_dir(&nix).unwrap();
        std::os::unix::fs::chown(&nix, Some(r.uid), Some(r.gid)).unwrap();
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$1\" /nix && shift && exec \"$@\"")
        .arg("sh")
        .arg(&nix)
        .args([
            "setpriv",
            &format!("--reuid={}", r.uid),
            &format!("--regid={}", r.gid),
            "--init-groups",
            "env",
            "-i",
            "-C",
            "/",
            "PATH=/usr/bin:/bin",
            &format!("HOME={ROOTLESS_HOME}"),
            &format!("USER={ROOTLESS_USER}"),
            &format!("XDG_RUNTIME_DIR=/run/user/{}", r.uid),
        ])
        .arg(format!(
            "XDG_CONFIG_HOME={}",
            s.dir.join("config").display()
        ))
        .arg(format!(
            "NIXDOCK_CONFIG={}",
            s.dir.join("nixdock.toml").display()
        ))
        .arg(format!(
            "XDG_STATE_HOME={}",
            s.dir.join("xdg-state").display()
        ))
        .arg(program)
        .args(args);
    common::run_with_timeout(cmd, Duration::from_secs(600)).expect("the command ran")
}

fn single_user_build(r: &Rootless, s: &Scratch, expr: &str) -> Output {
    as_single_user(
        r,
        s,
        "nix-build",
        &["--no-out-link", "--max-jobs", "0", "-E", expr],
    )
}

/// The single-user store's file for a store path nix-build printed.
fn in_user_store(s: &Scratch, o: &Output) -> String {
    let out = common::out_path(o);
    let rel = out.strip_prefix("/nix/").expect("a store path");
    std::fs::read_to_string(s.dir.join("nix").join(rel)).expect("the output in the user's store")
}

/// The uid (as the container sees it) the build ran as: its own uid when unsandboxed, or in
/// Nix's sandbox (a user namespace of its own) the uid its uid is mapped from, per the build's
/// `uidmap` lines ("inside outside count").
fn build_uid(out: &str, sandboxed: bool) -> u64 {
    let uid: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("uid "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no uid line in {out}"));
    if !sandboxed {
        return uid;
    }
    out.lines()
        .filter_map(|l| l.strip_prefix("uidmap "))
        .find_map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (v.len() == 3 && v[0] <= uid && uid < v[0] + v[2]).then(|| v[1] + (uid - v[0]))
        })
        .unwrap_or_else(|| panic!("uid {uid} not in the build's uid map: {out}"))
}

#[test]
fn a_single_user_hook_builds_sandboxed_on_its_own_rootless_podman() {
    let Some(r) = rootless() else { return };
    let s = Scratch::new(&r, "single-user", true);
    // No docker-host: a non-root hook finds its own user's engine (/run/user/<uid>/podman).
    // trixie's Nix names a static shell for the sandbox's /bin/sh.
    s.file(
        "nixdock.toml",
        &format!(
            "[builders.\"x86_64-linux\"]\nimage = \"{}\"\nidle-timeout = 300\n",
            common::image("trixie-amd64")
        ),
    );
    // The user's own nix.conf names the hook, as a single-user install's would.
    let (hook, nixdock) = programs_for(&r, &s);
    for d in ["config", "config/nix"] {
        std::fs::create_dir(s.dir.join(d)).unwrap();
        std::os::unix::fs::chown(s.dir.join(d), Some(r.uid), Some(r.gid)).unwrap();
    }
    s.file(
        "config/nix/nix.conf",
        &format!("build-hook = {}\n", hook.display()),
    );
    let o = single_user_build(&r, &s, &probe_expr("rootless-sandboxed"));
    assert!(
        o.status.success(),
        "{}\nhook log:\n{}",
        text(&o),
        s.hook_log()
    );
    let out = in_user_store(&s, &o);
    let log = s.hook_log();
    assert!(
        log.contains("how=Podman (rootless)"),
        "the hook found the user's rootless Podman itself: {log}"
    );

    // "auto" decided on the sandbox for this engine, and the build ran in it.
    let c = s.container();
    assert_eq!(s.label(&c, nixdock::builder::sandbox::LABEL_SANDBOX), "on");
    let why = s.label(&c, nixdock::builder::sandbox::LABEL_SANDBOX_WHY);
    assert!(why.contains("user-namespaced"), "{why}");
    assert!(
        out.contains("usr-bin-absent"),
        "sandboxed: no /usr/bin\n{out}"
    );
    // As a build user whose uid the container's user namespace maps (65536 uids here), not
    // nixdock's default 700000001.
    let uid = build_uid(&out, true);
    assert!(
        (10001..u64::from(common::ROOTLESS_SUBID_COUNT)).contains(&uid),
        "build uid {uid}\n{out}"
    );
    let passwd = common::docker_on_ok(&r.engine, ["exec", &c, "cat", "/etc/passwd"]);
    let user = passwd
        .lines()
        .find(|l| l.split(':').nth(2) == Some(&uid.to_string()))
        .unwrap_or_else(|| panic!("uid {uid} in the builder's /etc/passwd:\n{passwd}"));
    assert!(user.starts_with("nixdockbld"), "{user}");

    // Warm: the builder's daemon socket in the volume belongs to the hook's own uid (the
    // engine's root is this user), so the hook connects to it directly.
    let o = single_user_build(&r, &s, &trivial_expr("rootless-warm"));
    assert!(o.status.success(), "{}", text(&o));
    let log = s.hook_log();
    let last = log
        .lines()
        .rfind(|l| l.contains("builder ready system="))
        .unwrap_or_default();
    assert!(last.contains("via=\"local socket\""), "{last}\n{log}");

    // doctor, as that user, knows a single-user install: the hook is the user's own setting,
    // no nix-daemon is involved, and the engine in /run/user is the one its hook finds.
    let o = as_single_user(&r, &s, nixdock.to_str().unwrap(), &["doctor"]);
    let report = text(&o);
    assert!(o.status.success(), "{report}");
    assert!(report.contains("single-user Nix"), "{report}");
    assert!(!report.contains("[WARN]"), "{report}");
    assert!(report.contains(&r.engine), "{report}");
    // status, as that user, shows its builder on that engine with the sandbox on.
    let o = as_single_user(&r, &s, nixdock.to_str().unwrap(), &["status", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status JSON");
    let rows = status.to_string();
    assert!(rows.contains(&c), "{status:#}");
    assert!(rows.contains("\"sandboxed\":true"), "{status:#}");
}

#[test]
fn a_root_hook_builds_on_a_users_rootless_podman_socket() {
    let Some(r) = rootless() else { return };
    let s = Scratch::new(&r, "root-hook", false);
    let config = s.file(
        "nixdock.toml",
        &format!(
            "docker-host = \"{}\"\n[builders.\"x86_64-linux\"]\nimage = \"{}\"\n\
             idle-timeout = 300\nsandbox = false\n",
            r.engine,
            common::image("bookworm-amd64")
        ),
    );
    let build = |expr: &str| {
        let mut cmd = Command::new("nix-build");
        cmd.args([
            "--no-out-link",
            "--max-jobs",
            "0",
            "--option",
            "build-hook",
            HOOK,
        ])
        .args(["-E", expr])
        .env("NIXDOCK_CONFIG", &config)
        .env("NIXDOCK_STATE_DIR", &s.state);
        common::run_with_timeout(cmd, Duration::from_secs(600)).expect("nix-build ran")
    };
    let o = build(&probe_expr("rootless-root-hook"));
    assert!(
        o.status.success(),
        "{}\nhook log:\n{}",
        text(&o),
        s.hook_log()
    );
    let out = std::fs::read_to_string(common::out_path(&o)).unwrap();
    assert!(out.contains("usr-bin-present"), "unsandboxed\n{out}");
    let uid = build_uid(&out, false);
    assert!(
        (10001..u64::from(common::ROOTLESS_SUBID_COUNT)).contains(&uid),
        "build uid {uid}\n{out}"
    );
    let c = s.container();
    assert_eq!(s.label(&c, nixdock::builder::sandbox::LABEL_SANDBOX), "off");

    // Warm: the socket in the volume belongs to the rootless user, not to this root hook
    // (whom the builder's daemon would not know as its root): reached over SSH instead.
    let o = build(&trivial_expr("rootless-root-warm"));
    assert!(o.status.success(), "{}", text(&o));
    let log = s.hook_log();
    let last = log
        .lines()
        .rfind(|l| l.contains("builder ready system="))
        .unwrap_or_default();
    // Its own connection, or the SSH holder the cold build left.
    assert!(
        last.contains("via=\"ssh\"") || last.contains("via=\"ssh holder\""),
        "{last}\n{log}"
    );
}

/// entry.sh's own choice of the build users' first uid, for an engine nixdock could not tell is
/// user-namespaced (it then passes the default base, 700000000): run in a container of the
/// rootless engine, whose uid map has no such uid, it falls back to 10000 and says so; on the
/// host's rootful engine (the identity map) it keeps the default.
#[test]
fn entry_script_keeps_build_users_inside_the_containers_uid_map() {
    let Some(r) = rootless() else { return };
    let script = nixdock::builder::provision::ENTRY_SCRIPT;
    let log = script
        .lines()
        .find(|l| l.starts_with("log() {"))
        .expect("entry.sh defines log");
    let conf_value = {
        let a = script
            .find("conf_value() {")
            .expect("entry.sh has conf_value");
        let b = script[a..].find("\n}\n").expect("conf_value ends") + a + 3;
        &script[a..b]
    };
    let start = script
        .find("ids_mapped() {")
        .expect("entry.sh has ids_mapped");
    let end = script[start..]
        .find("\npick_uid_base\n")
        .map(|e| start + e)
        .expect("entry.sh calls pick_uid_base");
    let probe = format!(
        "set -eu\nND=$(mktemp -d)\necho 'max-jobs = 4' > \"$ND/nix.conf.in\"\n\
         NIXDOCK_BUILD_UID_BASE=700000000\n{log}\n{conf_value}\n{}\npick_uid_base\n\
         echo base=$NIXDOCK_BUILD_UID_BASE\n",
        &script[start..end]
    );
    let run = |engine: &str| {
        common::docker_on(
            engine,
            [
                "run",
                "--rm",
                &common::image("bookworm-amd64"),
                "sh",
                "-c",
                &probe,
            ],
        )
    };
    let o = run(&r.engine);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("base=10000"), "{}", text(&o));
    assert!(
        text(&o).contains("does not map 700000000 and up"),
        "{}",
        text(&o)
    );
    let o = run("unix:///var/run/docker.sock");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("base=700000000"), "{}", text(&o));
}
