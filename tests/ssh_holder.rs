//! The SSH connection holder (issue 19): with `transport = "ssh"`, the first hook that reaches a
//! builder starts a holder process keeping one authenticated session; later hooks open their
//! channels on it instead of connecting. Real nix-build, hook, builder container and sshd; each
//! test its own installation (config, state dir, instance, container).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{InstanceCleanup, docker, image, output_text as text};
use nixdock::state::StateDir;

const HOOK: &str = env!("CARGO_BIN_EXE_nixdock-hook");

struct Install {
    _cleanup: InstanceCleanup,
    _dir: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
    container: String,
}

fn config_text(transport: &str, persist: u64, idle_timeout: u64, extra: &str) -> String {
    format!(
        "transport = \"{transport}\"\nssh-persist = {persist}\n[builders.\"x86_64-linux\"]\nimage = \"{}\"\n\
         idle-timeout = {idle_timeout}\n{extra}",
        image("bookworm-amd64")
    )
}

impl Install {
    fn new(persist: u64) -> Install {
        Install::with(persist, 600)
    }

    fn with(persist: u64, idle_timeout: u64) -> Install {
        Install::over("ssh", persist, idle_timeout)
    }

    fn over(transport: &str, persist: u64, idle_timeout: u64) -> Install {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("nixdock.toml");
        std::fs::write(&config, config_text(transport, persist, idle_timeout, "")).unwrap();
        let state = dir.path().join("state");
        let id = StateDir::open(&state).unwrap().instance_id().unwrap();
        Install {
            _cleanup: InstanceCleanup(id.clone()),
            container: format!("nixdock-{id}-x86_64-linux"),
            _dir: dir,
            config,
            state,
        }
    }

    fn holders_dir(&self) -> PathBuf {
        self.state.join("ssh-holders")
    }

    /// One derivation per script, built in one nix-build; returns the .drv paths too.
    fn build_many(&self, scripts: &[&str]) -> (Output, Vec<String>) {
        let drvs: Vec<String> = scripts
            .iter()
            .map(|s| {
                format!(
                    "(derivation {{ name = \"holder\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
                     args = [\"-c\" {s:?}]; nonce = \"{}\"; }})",
                    common::unique_name("n")
                )
            })
            .collect();
        let expr = format!("[ {} ]", drvs.join(" "));
        let o = Command::new("nix-instantiate")
            .args(["-E", &expr])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let drv_paths = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        let mut cmd = Command::new("nix-build");
        cmd.args(["--no-out-link", "-E", &expr])
            .args(["--option", "build-hook", HOOK, "--max-jobs", "0"])
            .env("NIXDOCK_CONFIG", &self.config)
            .env("NIXDOCK_STATE_DIR", &self.state)
            .env_remove("NIXDOCK_LOG");
        let o = common::run_with_timeout(cmd, Duration::from_secs(600)).expect("nix-build ran");
        (o, drv_paths)
    }

    /// One build that must succeed; returns how the hook reached the builder (`via` of its
    /// "builder ready" line).
    fn build(&self) -> String {
        let (o, drvs) = self.build_many(&["echo built-remotely; echo ok > $out"]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("built-remotely"),
            "{}",
            text(&o)
        );
        self.via(&drvs[0])
    }

    /// One build of `script` (which must run `/usr/bin/sleep`), `during` done while its sleep
    /// runs in the builder, the build's connections by then set up.
    fn build_and_during_sleep(&self, script: &str, during: impl FnOnce()) -> (Output, Vec<String>) {
        let readies = || self.log().matches("builder ready").count();
        let before = readies();
        std::thread::scope(|s| {
            let build = s.spawn(|| self.build_many(&[script]));
            assert!(
                wait_until(Duration::from_secs(60), || readies() > before),
                "the build never got its builder ready:\n{}",
                self.log()
            );
            assert!(
                wait_until(Duration::from_secs(30), || sleeping(&self.container)),
                "the build's sleep never ran:\n{}",
                self.log()
            );
            during();
            build.join().unwrap()
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("hook.log")).unwrap_or_default()
    }

    /// The `via` of the hook's "builder ready" line for `drv`.
    fn via(&self, drv: &str) -> String {
        let vias = self.vias(drv);
        vias.into_iter()
            .next()
            .unwrap_or_else(|| panic!("no 'builder ready' line for {drv}:\n{}", self.log()))
    }

    /// The `via` of every "builder ready" line for `drv`, in order.
    fn vias(&self, drv: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("builder ready") && l.contains(drv))
            .map(|line| {
                let via = line
                    .split("via=")
                    .nth(1)
                    .unwrap_or_else(|| panic!("{line}"));
                via.strip_prefix('"')
                    .and_then(|v| v.split('"').next())
                    .unwrap_or_else(|| via.split_whitespace().next().unwrap_or(""))
                    .to_string()
            })
            .collect()
    }

    /// The live holder processes serving this installation: `nixdock-hook --ssh-holder` whose
    /// working directory is its holders directory.
    fn holders(&self) -> Vec<u32> {
        let dir = self.holders_dir();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args.get(1) != Some(&&b"--ssh-holder"[..]) {
                continue;
            }
            if std::fs::read_link(e.path().join("cwd")).is_ok_and(|c| c == dir) {
                pids.push(pid);
            }
        }
        pids
    }

    fn sockets(&self) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(self.holders_dir()) else {
            return Vec::new();
        };
        let mut v: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
            .collect();
        v.sort();
        v
    }

    /// The one holder, once it is up (its socket in place).
    fn wait_for_holder(&self) -> (u32, PathBuf) {
        let ok = wait_until(Duration::from_secs(20), || {
            self.holders().len() == 1 && self.sockets().len() == 1
        });
        assert!(
            ok,
            "holders {:?}, sockets {:?}; hook log:\n{}",
            self.holders(),
            self.sockets(),
            self.log()
        );
        (self.holders()[0], self.sockets()[0].clone())
    }

    /// How many times the builder's sshd accepted our key (sshd logs to the container's log).
    fn ssh_logins(&self) -> usize {
        let o = docker(["logs", &self.container]);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        all.matches("Accepted publickey").count()
    }
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// Whether a build's `/usr/bin/sleep` runs in `container` (the bracket keeps the search from
/// finding itself).
fn sleeping(container: &str) -> bool {
    docker([
        "exec",
        container,
        "sh",
        "-c",
        "grep -qs '/usr/bin/slee[p]' /proc/[0-9]*/cmdline",
    ])
    .status
    .success()
}

fn alive(pid: u32) -> bool {
    // A zombie has no working directory left; only a running holder counts.
    Path::new(&format!("/proc/{pid}/cwd")).read_link().is_ok()
}

fn kill(pid: u32, signal: &str) {
    let s = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(s.success());
}

/// Peak resident set of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{status}"))
}

#[test]
fn later_builds_go_through_the_holder_over_one_ssh_session() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(60);
    // The first build starts the builder and connects itself; it leaves a holder behind.
    assert_eq!(i.build(), "ssh, cold");
    let (pid, socket) = i.wait_for_holder();
    // Private: the directory is the state's (0700), the socket 0600, both ours.
    let d = std::fs::metadata(i.holders_dir()).unwrap();
    assert_eq!(d.permissions().mode() & 0o777, 0o700);
    let m = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert_eq!(m.uid(), unsafe { libc::geteuid() });
    let logins = i.ssh_logins();
    assert!(logins >= 2, "the hook's and the holder's logins: {logins}");

    for _ in 0..3 {
        assert_eq!(i.build(), "ssh holder", "{}", i.log());
    }
    // No new SSH login for those builds, and the same holder.
    assert_eq!(i.ssh_logins(), logins);
    assert_eq!(i.holders(), vec![pid]);
    let rss = peak_rss_kib(pid);
    eprintln!("holder peak RSS {rss} KiB");
    assert!(rss <= 32 * 1024, "holder peak RSS {rss} KiB");
    assert_eq!(
        i.log().matches("SSH holder serving").count(),
        1,
        "{}",
        i.log()
    );
}

/// Through the engine's exec (here `transport = "engine-exec"` on this host's engine, the way
/// to a remote engine's builders): the holder keeps one SSH session with the builder's sshd run
/// by an exec (`sshd -i`), so a warm build's daemon connection and its log's commands are
/// channels of it (no `nix-daemon --stdio`, no exec of their own); a stopped holder's sshd ends
/// by its keepalives, a killed holder leaves the hooks their own way, and an idle one ends with
/// its sshd gone from the container.
#[test]
fn engine_exec_builds_go_through_one_sshd_the_holder_runs_by_exec() {
    if !common::require_bed() {
        return;
    }
    let i = Install::over("engine-exec", 3, 600);
    let processes = || {
        let o = docker([
            "exec",
            &i.container,
            "sh",
            "-c",
            "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done",
        ]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // Held sessions: one authenticated sshd each, titled `sshd: root` (`sshd-session: root`
    // from OpenSSH 9.8), `…@notty` while a channel runs a command.
    let sessions = || {
        processes()
            .lines()
            .filter(|l| l.starts_with("sshd: root") || l.starts_with("sshd-session: root"))
            .count()
    };
    let stdio_daemons = || {
        processes()
            .lines()
            .filter(|l| l.contains("nix-daemon") && l.contains("--stdio"))
            .count()
    };
    assert_eq!(i.build(), "engine exec, cold");
    let (pid, _) = i.wait_for_holder();
    assert!(
        wait_until(Duration::from_secs(10), || sessions() == 1),
        "not one SSH session held in the container: {}\n{}",
        processes(),
        i.log()
    );
    for _ in 0..2 {
        assert_eq!(i.build(), "engine exec holder", "{}", i.log());
        assert_eq!(sessions(), 1, "{}", processes());
        // The build's daemon connection was a channel to the daemon's socket, and the cold
        // build's own `nix-daemon --stdio` has ended.
        assert!(
            wait_until(Duration::from_secs(5), || stdio_daemons() == 0),
            "{}",
            processes()
        );
    }
    // Large outputs come around the holder, over an exec of their own (no SSH inside the
    // engine connection's TLS), still checked and registered as any.
    let (o, drvs) = i.build_many(&["/usr/bin/head -c 70000000 /dev/urandom > $out"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(i.via(&drvs[0]), "engine exec holder");
    assert!(i.log().contains("around the holder"), "{}", i.log());
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 70_000_000);
    assert!(
        Command::new("nix-store")
            .args(["--verify-path", &out])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(i.holders(), vec![pid]);

    // A holder that stops answering (stopped here; lost with its engine connection in the
    // wild, the exec's input left open) loses its session: sshd's keepalives (three
    // unanswered, ~8 s) end it.
    kill(pid, "STOP");
    assert!(
        wait_until(Duration::from_secs(15), || sessions() == 0),
        "an SSH session left in the container with its holder stopped: {}",
        processes()
    );
    kill(pid, "KILL");
    assert_eq!(i.build(), "engine exec", "{}", i.log());
    // The build started a new holder, which exits idle after 3 s and takes its sshd with it.
    let (pid2, socket2) = i.wait_for_holder();
    assert_ne!(pid2, pid);
    assert!(
        wait_until(Duration::from_secs(20), || !alive(pid2)
            && !socket2.exists()
            && sessions() == 0
            && !processes().contains("sshd -i")),
        "holder {pid2} alive {}, socket there {}, in the container: {}",
        alive(pid2),
        socket2.exists(),
        processes()
    );
}

#[test]
fn an_idle_holder_exits_and_removes_its_socket() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(2);
    i.build();
    let (pid, socket) = i.wait_for_holder();
    assert!(
        wait_until(Duration::from_secs(15), || !alive(pid) && !socket.exists()),
        "holder {pid} alive {}, socket there {}",
        alive(pid),
        socket.exists()
    );
    assert!(i.log().contains("SSH holder exits: idle"), "{}", i.log());
    // The next build connects itself again, and starts a new holder.
    assert_eq!(i.build(), "ssh");
    let (pid2, _) = i.wait_for_holder();
    assert_ne!(pid2, pid);
}

#[test]
fn ssh_persist_zero_starts_no_holder() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(0);
    i.build();
    assert_eq!(i.build(), "ssh");
    std::thread::sleep(Duration::from_secs(1));
    assert!(i.holders().is_empty() && i.sockets().is_empty());
}

#[test]
fn a_recreated_container_never_reaches_the_old_holder() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(60);
    i.build();
    let (old_pid, old_socket) = i.wait_for_holder();
    let old_id = common::docker_ok(["inspect", "-f", "{{.Id}}", &i.container]);
    // A configuration change recreates the container (new id, new host key, new port).
    std::fs::write(&i.config, config_text("ssh", 60, 600, "cpus = 1.5\n")).unwrap();
    assert_eq!(i.build(), "ssh, cold");
    assert_ne!(
        common::docker_ok(["inspect", "-f", "{{.Id}}", &i.container]),
        old_id
    );
    // The old holder lost its session with its container and went away with its socket.
    assert!(
        wait_until(Duration::from_secs(20), || !alive(old_pid)
            && !old_socket.exists()),
        "old holder {old_pid} alive {}, {:?}",
        alive(old_pid),
        i.sockets()
    );
    let (new_pid, new_socket) = i.wait_for_holder();
    assert_ne!(new_pid, old_pid);
    assert_ne!(new_socket, old_socket);
    assert_eq!(i.build(), "ssh holder");
}

#[test]
fn a_killed_holder_leaves_a_stale_socket_that_the_next_hook_replaces() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(60);
    i.build();
    let (pid, socket) = i.wait_for_holder();
    // A new socket file: inode and change time together (an unlinked socket's inode number
    // is often given to the next file at once).
    let identity = |p: &std::path::Path| {
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.ino(), m.ctime(), m.ctime_nsec())
    };
    let old = identity(&socket);
    kill(pid, "KILL");
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)));
    assert!(socket.exists(), "SIGKILL leaves the socket behind");
    // The next hook finds nobody there, connects itself and succeeds; it removes the stale
    // socket and starts a new holder, which the build after uses.
    assert_eq!(i.build(), "ssh");
    let (pid2, socket2) = i.wait_for_holder();
    assert_ne!(pid2, pid);
    assert_eq!(socket2, socket, "same builder, same socket name");
    assert_ne!(identity(&socket2), old);
    assert_eq!(i.build(), "ssh holder");
}

/// A holder that ends during a build while the builder runs on (killed here; in the wild also
/// one that went with the container of the Nix client that started it, which other clients
/// sharing the state directory were using): the hook builds again over a connection of its
/// own, says so, and the build succeeds; the next build starts a new holder. Both ways a
/// holder reaches a builder.
#[test]
fn a_build_outlives_its_holder() {
    if !common::require_bed() {
        return;
    }
    for (transport, held, own) in [
        ("ssh", "ssh holder", "ssh"),
        ("engine-exec", "engine exec holder", "engine exec"),
    ] {
        let i = Install::over(transport, 60, 600);
        i.build();
        let (pid, _) = i.wait_for_holder();
        // Inside the build's sleep: its connections go through the holder.
        let (o, drvs) = i.build_and_during_sleep(
            "echo attempt; /usr/bin/sleep 3; echo built-remotely; echo ok > $out",
            || kill(pid, "KILL"),
        );
        let t = text(&o);
        assert!(o.status.success(), "{transport}: {t}\n{}", i.log());
        assert!(
            t.contains("ended during the build") && t.contains("building it again"),
            "{transport}: {t}"
        );
        assert_eq!(t.matches("attempt").count(), 2, "{transport}: {t}");
        let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "ok\n");
        assert_eq!(
            i.vias(&drvs[0]),
            vec![held.to_string(), own.to_string()],
            "{transport}: {}",
            i.log()
        );
        let (pid2, _) = i.wait_for_holder();
        assert_ne!(pid2, pid);
        assert_eq!(i.build(), held, "{}", i.log());
    }
}

/// The other side of the above: a builder killed under a build through its holder takes the
/// holder with it, and that failure is the builder's — no second try, the cause named.
#[test]
fn a_builder_killed_under_a_held_build_is_not_built_again() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(60);
    i.build();
    i.wait_for_holder();
    let (o, drvs) =
        i.build_and_during_sleep("echo attempt; /usr/bin/sleep 5; echo ok > $out", || {
            common::docker_ok(["kill", &i.container]);
        });
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("is no longer running"), "{t}");
    assert!(!t.contains("building it again"), "{t}");
    assert_eq!(t.matches("attempt").count(), 1, "{t}");
    assert_eq!(
        i.vias(&drvs[0]),
        vec!["ssh holder".to_string()],
        "{}",
        i.log()
    );
}

#[test]
fn a_holder_ends_with_its_builder_and_the_next_build_restarts_it() {
    if !common::require_bed() {
        return;
    }
    let i = Install::new(60);
    i.build();
    let (pid, socket) = i.wait_for_holder();
    common::docker_ok(["kill", &i.container]);
    assert!(
        wait_until(Duration::from_secs(15), || !alive(pid) && !socket.exists()),
        "holder {pid} alive {} after its builder was killed; socket there {}",
        alive(pid),
        socket.exists()
    );
    assert!(
        i.log().contains("SSH holder exits: its SSH session ended"),
        "{}",
        i.log()
    );
    assert_eq!(i.build(), "ssh, cold");
    i.wait_for_holder();
}

/// The holder's idle session is not a running build: the builder still stops after its idle
/// timeout, and the holder goes with it.
#[test]
fn the_builder_still_idles_out_under_a_holder() {
    if !common::require_bed() {
        return;
    }
    let i = Install::with(600, 6);
    i.build();
    let (pid, socket) = i.wait_for_holder();
    let running =
        || common::docker_ok(["inspect", "-f", "{{.State.Running}}", &i.container]) == "true";
    assert!(
        wait_until(Duration::from_secs(40), || !running()),
        "builder still running under holder {pid}"
    );
    assert!(
        wait_until(Duration::from_secs(15), || !alive(pid) && !socket.exists()),
        "holder {pid} outlived its builder"
    );
}

#[test]
fn eight_simultaneous_builds_start_one_holder() {
    if !common::require_bed() {
        return;
    }
    // A warm builder with no holder: start it with persist off, then turn persist on.
    let i = Install::new(0);
    i.build();
    std::fs::write(&i.config, config_text("ssh", 60, 600, "")).unwrap();
    assert!(i.holders().is_empty());
    let scripts: Vec<String> = (0..8)
        .map(|n| format!("echo par-{n}; sleep 1; echo {n} > $out"))
        .collect();
    let scripts: Vec<&str> = scripts.iter().map(String::as_str).collect();
    let (o, drvs) = i.build_many(&scripts);
    assert!(o.status.success(), "{}", text(&o));
    let outs = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with("/nix/store/"))
        .count();
    assert_eq!(outs, 8, "{}", text(&o));
    let (pid, _) = i.wait_for_holder();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(i.holders(), vec![pid]);
    let log = i.log();
    assert_eq!(log.matches("started an SSH holder").count(), 1, "{log}");
    assert_eq!(log.matches("SSH holder serving").count(), 1, "{log}");
    // None of them waited for it: all connected themselves (or, last, through it).
    for d in &drvs {
        let via = i.via(d);
        assert!(via == "ssh" || via == "ssh holder", "{d}: {via}");
    }
}

/// A hook that goes away while the builder keeps its channel open and silent (here a command
/// that ignores its input and never ends; a hostile builder's sshd can do that with any
/// channel) no longer holds its task in the holder, which then exits when idle as always.
#[test]
fn a_channel_the_builder_never_closes_does_not_keep_the_holder() {
    use nixdock::transport::holder::protocol::{self, Reply, Request};
    if !common::require_bed() {
        return;
    }
    let i = Install::new(3);
    i.build();
    let (pid, socket) = i.wait_for_holder();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
        protocol::read_frame(&mut s).await.unwrap();
        let never = Request::Exec("exec /usr/bin/sleep 300 </dev/null".into());
        protocol::write_frame(&mut s, &never.fields())
            .await
            .unwrap();
        let reply = protocol::read_frame(&mut s).await.unwrap();
        assert!(matches!(Reply::parse(reply).unwrap(), Reply::Ok));
        assert!(
            wait_until(Duration::from_secs(20), || sleeping(&i.container)),
            "the channel's command never ran"
        );
        // The hook's connection closes here, the channel's command runs on.
    });
    assert!(sleeping(&i.container));
    assert!(
        wait_until(Duration::from_secs(30), || !alive(pid) && !socket.exists()),
        "holder {pid} alive {}, socket there {}; hook log:\n{}",
        alive(pid),
        socket.exists(),
        i.log()
    );
    assert!(i.log().contains("SSH holder exits: idle"), "{}", i.log());
    assert!(
        i.log()
            .contains("the hook went away and the builder kept its channel open"),
        "{}",
        i.log()
    );
}
