//! A build's log through nixdock is what the calling Nix makes of the same builder output in a
//! local build: the same stored log (`nix-store --read-log`), and the same build-log lines,
//! phases, builder activities and builder messages in `--log-format internal-json`.
//!
//! One derivation prints tricky bytes (`\r`, `@nix` lines valid and not, behind a `\r`, of
//! activity types a builder may and may not start, invalid UTF-8, a partial last line); it is
//! built once on the host (Nix 2.8, no hook) and once for aarch64-linux through nixdock-hook,
//! over each transport. Only `system` differs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::output_text as text;

const HOOK: &str = env!("CARGO_BIN_EXE_nixdock-hook");

/// Each `printf` is one case; the script runs under /bin/sh (dash) on the host and in the
/// builder alike.
const SCRIPT: &str = r#"echo ok > $out
printf 'plain line\n'
printf 'a\rb\n'
printf 'a long line\rshort\n'
printf 'progress 10%%\rprogress 100%%\r\n'
printf 'x\r@nix {"action":"msg","level":0,"msg":"injected after cr"}\n'
printf '@nix {"action":"msg","level":0,"msg":"injected msg"}\n'
printf '@nix {"action":"start","id":7,"level":0,"type":105,"text":"fake build","fields":["/nix/store/x","m",1,1]}\n'
printf '@nix {"action":"start","id":8,"level":0,"type":101,"text":"builder download","fields":["u"]}\n'
printf '@nix {"action":"result","id":8,"type":101,"fields":["line in a builder activity"]}\n'
printf '@nix {"action":"stop","id":8}\n'
printf '@nix {"action":"setPhase","phase":"myPhase"}\n'
printf '@nix { "action": "setPhase", "phase": "spacedPhase" }\n'
printf '@nix {not json at all\n'
printf '@nix {"action":"msg","level":0,"msg":"two"}\r@nix {"action":"msg","level":0,"msg":"one"}\n'
printf '@nixnot a message\n'
printf 'bad utf8 \377\376 end\n'
printf 'crlf line\r\n'
printf 'no newline at the end'"#;

struct Install {
    state: PathBuf,
    config: PathBuf,
    ssh_config: PathBuf,
    /// An installation of its own (its builders publish no port, so they are other
    /// containers): every command through the engine's exec.
    exec_config: PathBuf,
    exec_state: PathBuf,
}

/// The same installation as `hook_e2e`, so a warm builder is reused.
fn install() -> &'static Install {
    static I: OnceLock<Install> = OnceLock::new();
    I.get_or_init(|| {
        let base = common::SuiteInstall::new("e2e", &common::e2e_config());
        let ssh_config = base.root.join("nixdock-ssh.toml");
        std::fs::write(
            &ssh_config,
            format!("transport = \"ssh\"\n{}", common::e2e_config()),
        )
        .unwrap();
        let exec = common::SuiteInstall::new(
            "build-log-exec",
            &format!("transport = \"engine-exec\"\n{}", common::e2e_config()),
        );
        Install {
            state: base.state,
            config: base.config,
            ssh_config,
            exec_config: exec.config,
            exec_state: exec.state,
        }
    })
}

fn expr(system: &str, nonce: &str) -> String {
    format!(
        "derivation {{ name = \"tricky-log\"; system = \"{system}\"; builder = \"/bin/sh\"; \
         args = [\"-c\" {SCRIPT:?}]; nonce = \"{nonce}\"; }}"
    )
}

fn instantiate(e: &str) -> String {
    let o = Command::new("nix-instantiate")
        .args(["-E", e])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn nix_build(e: &str, extra: &[&str], config: &Path) -> Output {
    let i = install();
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "--log-format", "internal-json", "-E", e])
        .args(extra)
        .env("NIXDOCK_CONFIG", config)
        .env(
            "NIXDOCK_STATE_DIR",
            if config == i.exec_config {
                &i.exec_state
            } else {
                &i.state
            },
        );
    common::run_with_timeout(cmd, Duration::from_secs(600)).expect("nix-build ran")
}

fn read_log(drv: &str) -> Vec<u8> {
    let o = Command::new("nix-store")
        .args(["--read-log", drv])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    o.stdout
}

/// What of the internal-json stream stems from the builder's output, ids dropped: the build
/// activity's log lines and phases, activities started under it (Nix 2.8 writes no `parent`,
/// and neither Nix nor nixdock starts a type-101 activity of its own here) and their results,
/// and messages about or from the builder's `@nix` lines.
fn from_builder(stderr: &[u8], drv: &str) -> Vec<String> {
    let mut build_act = None;
    let mut builder_acts = Vec::new();
    let mut out = Vec::new();
    for line in String::from_utf8_lossy(stderr).lines() {
        let Some(json) = line.strip_prefix("@nix ") else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(json).expect("nix writes JSON");
        let id = v["id"].as_u64();
        match v["action"].as_str().unwrap_or_default() {
            "start" if v["type"] == 105 && v["fields"][0] == drv => build_act = id,
            "start" if v["type"] == 101 || (v["type"] == 105 && v["fields"][0] != drv) => {
                builder_acts.push(id);
                out.push(format!(
                    "start type={} level={} text={} fields={}",
                    v["type"], v["level"], v["text"], v["fields"]
                ));
            }
            "result" if id.is_some() && id == build_act => {
                out.push(format!("result type={} {}", v["type"], v["fields"]));
            }
            "result" if builder_acts.contains(&id) => {
                out.push(format!(
                    "activity result type={} {}",
                    v["type"], v["fields"]
                ));
            }
            "stop" if builder_acts.contains(&id) => out.push("activity stop".into()),
            "msg" => {
                let m = v["msg"].as_str().unwrap_or_default();
                if m.contains("injected") || m.contains("JSON") || m == "one" || m == "two" {
                    out.push(format!("msg level={} {m}", v["level"]));
                }
            }
            _ => {}
        }
    }
    assert!(build_act.is_some(), "no build activity for {drv}");
    out
}

#[test]
fn remote_log_is_what_a_local_build_logs() {
    if !common::require_bed() {
        return;
    }
    let i = install();
    let nonce = common::unique_name("n");

    // The host builds it itself: the stock hook declines with no builders.
    let local_expr = expr("x86_64-linux", &nonce);
    let local_drv = instantiate(&local_expr);
    let o = nix_build(
        &local_expr,
        &["--builders", "", "--max-jobs", "1"],
        &i.config,
    );
    common::out_path(&o);
    let local_log = read_log(&local_drv);
    let local_events = from_builder(&o.stderr, &local_drv);
    // The case list really exercises the parent's handling.
    assert!(
        local_events.iter().any(|e| e.contains("injected after cr")),
        "{local_events:#?}"
    );
    assert!(
        local_events.iter().any(|e| e.contains("builder download")),
        "{local_events:#?}"
    );

    for (via, config) in [
        ("local socket", &i.config),
        ("ssh", &i.ssh_config),
        // The end read started beside the build, waiting for its offset.
        ("engine exec", &i.exec_config),
        // Warm again: the local socket after the SSH start.
        ("local socket, warm", &i.config),
    ] {
        let remote_expr = expr("aarch64-linux", &format!("{nonce}-{via}"));
        let remote_drv = instantiate(&remote_expr);
        let o = nix_build(
            &remote_expr,
            &[
                "--option",
                "build-hook",
                HOOK,
                "--builders",
                "",
                "--max-jobs",
                "1",
            ],
            config,
        );
        common::out_path(&o);
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("on 'nixdock aarch64-linux builder'"),
            "{via}: not built by nixdock: {}",
            text(&o)
        );
        let remote_events = from_builder(&o.stderr, &remote_drv);
        assert_eq!(remote_events, local_events, "{via}: builder events differ");
        let remote_log = read_log(&remote_drv);
        assert_eq!(
            String::from_utf8_lossy(&remote_log),
            String::from_utf8_lossy(&local_log),
            "{via}: stored log differs"
        );
        assert_eq!(remote_log, local_log, "{via}: stored log bytes differ");
    }
}

/// Over 64 KiB of lines (the builder's Nix writes its log file through a 32 KiB buffer), a
/// pause, then the rest.
const LIVE_SCRIPT: &str = r#"i=0
while [ $i -lt 1500 ]; do
  echo "early line $i: the first part of the log, shown while the build still runs"
  i=$((i+1))
done
/bin/sleep 8
printf 'late line\r\nlast line'
echo ok > $out"#;

fn live_expr(system: &str, nonce: &str) -> String {
    format!(
        "derivation {{ name = \"live-log\"; system = \"{system}\"; builder = \"/bin/sh\"; \
         args = [\"-c\" {LIVE_SCRIPT:?}]; nonce = \"{nonce}\"; }}"
    )
}

/// Runs nix-build and notes when the first line with `marker` reached its stderr, and when it
/// exited.
fn timed_build(
    e: &str,
    extra: &[&str],
    config: &Path,
    marker: &str,
) -> (Output, Option<Instant>, Instant) {
    use std::io::BufRead;
    let i = install();
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "--log-format", "internal-json", "-E", e])
        .args(extra)
        .env("NIXDOCK_CONFIG", config)
        .env("NIXDOCK_STATE_DIR", &i.state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("nix-build starts");
    let out = common::drain(child.stdout.take());
    let stderr = child.stderr.take().expect("piped");
    let marker = marker.to_owned();
    let err = std::thread::spawn(move || {
        let mut seen = None;
        let mut all = Vec::new();
        for line in std::io::BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            if seen.is_none() && String::from_utf8_lossy(&line).contains(&marker) {
                seen = Some(Instant::now());
            }
            all.extend_from_slice(&line);
            all.push(b'\n');
        }
        (seen, all)
    });
    let status =
        common::wait_timeout(&mut child, Duration::from_secs(600)).expect("nix-build ends");
    let exited = Instant::now();
    let (seen, stderr) = err.join().expect("stderr reader");
    let o = Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr,
    };
    (o, seen, exited)
}

/// The log of a remote build reaches the calling Nix while the build runs (over each
/// transport), and what it stores is still exactly a local build's log.
#[test]
fn remote_log_arrives_while_the_build_runs() {
    if !common::require_bed() {
        return;
    }
    let i = install();
    let nonce = common::unique_name("live");
    let marker = "early line 0:";

    let local_expr = live_expr("x86_64-linux", &nonce);
    let local_drv = instantiate(&local_expr);
    let o = nix_build(
        &local_expr,
        &["--builders", "", "--max-jobs", "1"],
        &i.config,
    );
    common::out_path(&o);
    let local_log = read_log(&local_drv);
    assert!(local_log.len() > 64 * 1024, "{}", local_log.len());

    for (via, config) in [("local socket", &i.config), ("ssh", &i.ssh_config)] {
        let remote_expr = live_expr("aarch64-linux", &format!("{nonce}-{via}"));
        let remote_drv = instantiate(&remote_expr);
        let (o, seen, exited) = timed_build(
            &remote_expr,
            &[
                "--option",
                "build-hook",
                HOOK,
                "--builders",
                "",
                "--max-jobs",
                "1",
            ],
            config,
            marker,
        );
        common::out_path(&o);
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("on 'nixdock aarch64-linux builder'"),
            "{via}: not built by nixdock: {}",
            text(&o)
        );
        let seen = seen.unwrap_or_else(|| panic!("{via}: '{marker}' never shown: {}", text(&o)));
        // The builder sleeps 8 s after the first part: shown live, it came well before the end.
        let ahead = exited.saturating_duration_since(seen);
        eprintln!("{via}: the first part was shown {ahead:?} before nix-build ended");
        assert!(
            ahead >= Duration::from_secs(5),
            "{via}: the first part of the log was shown only {ahead:?} before nix-build ended"
        );
        let remote_log = read_log(&remote_drv);
        assert_eq!(
            remote_log.len(),
            local_log.len(),
            "{via}: stored log length differs"
        );
        assert_eq!(remote_log, local_log, "{via}: stored log bytes differ");
    }
}
