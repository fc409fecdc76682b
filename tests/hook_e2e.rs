//! nixdock-hook end to end: real `nix-build` (Nix 2.8 on the host, 2.26 in a trixie and 2.34
//! in a sid container), the real hook binary, real builder containers over real SSH.
//!
//! The suite shares one nixdock installation (state dir under the target dir), so its builders
//! are reused across tests as they would be on a user's machine; they stop themselves after
//! their idle timeout.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const HOOK: &str = env!("CARGO_BIN_EXE_nixdock-hook");
const NIXDOCK: &str = env!("CARGO_BIN_EXE_nixdock");

/// The suite's nixdock installation: amd64 and emulated arm64 builders from the test bed.
fn install() -> &'static common::SuiteInstall {
    static I: OnceLock<common::SuiteInstall> = OnceLock::new();
    I.get_or_init(|| common::SuiteInstall::new("e2e", &common::e2e_config()))
}

fn nonce() -> String {
    common::unique_name("n")
}

/// A nixpkgs-free derivation; `script` runs under /bin/sh in the builder.
fn drv_expr(name: &str, system: &str, script: &str) -> String {
    format!(
        "derivation {{ name = \"{name}\"; system = \"{system}\"; builder = \"/bin/sh\"; \
         args = [\"-c\" {script:?}]; nonce = \"{}\"; }}",
        nonce()
    )
}

fn nix_build(expr: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let i = install();
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "-E", expr])
        .args(extra)
        .env("NIXDOCK_CONFIG", &i.config)
        .env("NIXDOCK_STATE_DIR", &i.state);
    for (k, v) in env {
        cmd.env(k, v);
    }
    common::run_with_timeout(cmd, Duration::from_secs(600)).expect("nix-build ran")
}

fn with_hook(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec!["--option", "build-hook", HOOK];
    v.extend_from_slice(extra);
    v
}

use common::{out_path, output_text as text};

fn nix_store(args: &[&str]) -> String {
    let o = Command::new("nix-store").args(args).output().unwrap();
    assert!(o.status.success(), "nix-store {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn instantiate(expr: &str) -> String {
    let o = Command::new("nix-instantiate")
        .args(["-E", expr])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn is_valid(path: &str) -> bool {
    Command::new("nix-store")
        .args(["--check-validity", path])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn outputs_of(drv: &str) -> Vec<String> {
    nix_store(&["-q", "--outputs", drv])
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn direct_x86_64_build_with_max_jobs_zero() {
    if !common::require_bed() {
        return;
    }
    let expr = drv_expr(
        "direct",
        "x86_64-linux",
        "echo remote-log-line; echo hello > $out",
    );
    let drv = instantiate(&expr);
    let o = nix_build(&expr, &with_hook(&["--max-jobs", "0"]), &[]);
    let out = out_path(&o);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "hello\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("on 'nixdock x86_64-linux builder'"),
        "{}",
        text(&o)
    );
    assert!(err.contains("remote-log-line"), "{}", text(&o));
    // Registered with its deriver and the NAR hash Nix computes itself.
    assert_eq!(nix_store(&["-q", "--deriver", &out]), drv);
    let v = Command::new("nix-store")
        .args(["--verify-path", &out])
        .status()
        .unwrap();
    assert!(v.success());
    // `nix log` finds the remote build's log.
    let log = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command", "log", &drv])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&log.stdout).contains("remote-log-line"),
        "{}",
        text(&log)
    );
}

/// On a local engine with the hook as root, the default transport goes straight to the
/// builder's daemon socket in its volume; `transport = "ssh"` goes over SSH to the same
/// builder. Both build end to end.
#[test]
fn local_socket_and_ssh_transports_both_build() {
    if !common::require_bed() {
        return;
    }
    let i = install();
    let ssh_config = i.config.with_file_name("nixdock-ssh.toml");
    let base = std::fs::read_to_string(&i.config).unwrap();
    std::fs::write(&ssh_config, format!("transport = \"ssh\"\n{base}")).unwrap();
    let log = i.state.join("hook.log");
    // Makes the builder (a cold start, through the local socket too).
    let warm = drv_expr("transport-warm", "x86_64-linux", "echo > $out");
    out_path(&nix_build(&warm, &with_hook(&["--max-jobs", "0"]), &[]));
    for (via, config) in [("local socket", &i.config), ("ssh", &ssh_config)] {
        let expr = drv_expr("transport", "x86_64-linux", "echo hello > $out");
        let drv = instantiate(&expr);
        let o = nix_build(
            &expr,
            &with_hook(&["--max-jobs", "0", "--log-format", "internal-json"]),
            &[("NIXDOCK_CONFIG", config.to_str().unwrap())],
        );
        assert_eq!(std::fs::read_to_string(out_path(&o)).unwrap(), "hello\n");
        // The SSH way shows the builder's start-up as a step in Nix's progress.
        let step =
            String::from_utf8_lossy(&o.stderr).contains("getting the x86_64-linux builder ready");
        assert_eq!(step, via == "ssh", "{}", text(&o));
        let line = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .find(|l| l.contains("builder ready") && l.contains(&drv))
            .map(String::from)
            .unwrap_or_else(|| panic!("no 'builder ready' line for {drv}"));
        // Over SSH, a holder left by an earlier build of the suite may carry it.
        assert!(
            line.contains(&format!("via=\"{via}\""))
                || line.contains(&format!("via={via}"))
                || (via == "ssh" && line.contains("via=\"ssh holder\"")),
            "expected {via}: {line}"
        );
    }
}

#[test]
fn aarch64_build_with_no_flags_runs_emulated_with_build_users() {
    if !common::require_bed() {
        return;
    }
    // No command-line flags: the hook comes from NIX_CONFIG, the way a config file would set it.
    let expr = drv_expr(
        "emulated",
        "aarch64-linux",
        "read a < /proc/self/auxv || true; while read l; do case $l in *aarch64*|*AArch64*|*CPU\\ arch*) echo \"$l\" > $out;; esac; done < /proc/cpuinfo; /usr/bin/id -un >> $out; echo ok >> $out",
    );
    let conf = format!("build-hook = {HOOK}");
    let o = nix_build(&expr, &[], &[("NIX_CONFIG", &conf)]);
    let out = out_path(&o);
    let content = std::fs::read_to_string(&out).unwrap();
    assert!(content.ends_with("ok\n"), "{content}");
    // Built as one of nixdock's build users (uids apart from the host's), which is where the
    // seccomp failure would have struck.
    assert!(content.contains("nixdockbld"), "{content}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("on 'nixdock aarch64-linux builder'"),
        "{}",
        text(&o)
    );
}

#[test]
fn chain_with_multiple_outputs_keeps_derivers_and_references() {
    if !common::require_bed() {
        return;
    }
    let n = nonce();
    let expr = format!(
        r#"let
          a = derivation {{ name = "multi"; system = "aarch64-linux"; builder = "/bin/sh";
                outputs = [ "out" "dev" ]; nonce = "{n}";
                args = [ "-c" "echo lib > $out; echo $out > $dev" ]; }};
          b = derivation {{ name = "user"; system = "aarch64-linux"; builder = "/bin/sh";
                nonce = "{n}"; dev = a.dev;
                args = [ "-c" "read p < $dev; echo \"uses $p\" > $out" ]; }};
        in b"#
    );
    let o = nix_build(&expr, &with_hook(&[]), &[]);
    let out = out_path(&o);
    let content = std::fs::read_to_string(&out).unwrap();
    assert!(content.starts_with("uses /nix/store/"), "{content}");
    let refs = nix_store(&["-q", "--references", &out]);
    let deriver = nix_store(&["-q", "--deriver", &out]);
    assert!(deriver.ends_with("-user.drv"), "{deriver}");
    // The multi-output input: both outputs came back, each with its deriver; dev refers to out.
    let a_drv = nix_store(&["-q", "--references", &deriver])
        .lines()
        .find(|l| l.ends_with("-multi.drv"))
        .expect("input drv")
        .to_string();
    let outs = outputs_of(&a_drv);
    assert_eq!(outs.len(), 2);
    for p in &outs {
        assert!(is_valid(p), "{p} not valid");
        assert_eq!(nix_store(&["-q", "--deriver", p]), a_drv);
    }
    let dev = outs.iter().find(|p| p.ends_with("-multi-dev")).unwrap();
    let lib = outs.iter().find(|p| p.ends_with("-multi")).unwrap();
    assert_eq!(nix_store(&["-q", "--references", dev]), *lib);
    // b's output names a's out path, so the builder's scan found that reference.
    assert_eq!(refs, *lib, "references of {out}");
    assert_eq!(content.trim(), format!("uses {lib}"));
}

#[test]
fn failing_build_shows_the_log_and_registers_nothing() {
    if !common::require_bed() {
        return;
    }
    let expr = drv_expr(
        "failing",
        "x86_64-linux",
        "echo about-to-fail-7f3; echo partial > $out; exit 3",
    );
    let drv = instantiate(&expr);
    let o = nix_build(&expr, &with_hook(&["--max-jobs", "0"]), &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("about-to-fail-7f3"), "{}", text(&o));
    assert!(
        err.contains("on 'nixdock x86_64-linux builder'"),
        "{}",
        text(&o)
    );
    assert!(err.contains("exit code 3"), "{}", text(&o));
    for p in outputs_of(&drv) {
        assert!(!is_valid(&p), "{p} registered after a failed build");
        assert!(!Path::new(&p).exists(), "{p} left on disk");
    }
}

/// Nix strings are bytes, and so are a `.drv`'s environment values: `substring` cuts "ÿ" after
/// its first byte (0xc3), which is not UTF-8. Such a derivation is built on the aarch64
/// builder like any other, the byte reaching the build unchanged (nixdock used to refuse to
/// parse its `.drv` and decline it, so the build failed).
#[test]
fn derivation_with_non_utf8_env_value_builds() {
    if !common::require_bed() {
        return;
    }
    let expr = format!(
        r#"derivation {{ name = "non-utf8"; system = "aarch64-linux"; builder = "/bin/sh";
           args = ["-c" "printf %s \"$x\" > $out"]; x = builtins.substring 0 1 "ÿ";
           nonce = "{}"; }}"#,
        nonce()
    );
    let drv = instantiate(&expr);
    let bytes = std::fs::read(&drv).unwrap();
    assert!(std::str::from_utf8(&bytes).is_err(), "{drv} is UTF-8");
    let o = nix_build(&expr, &with_hook(&[]), &[]);
    let out = out_path(&o);
    assert_eq!(std::fs::read(&out).unwrap(), b"\xc3");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("on 'nixdock aarch64-linux builder'"),
        "{}",
        text(&o)
    );
}

/// The hook as a fake parent drives it: a bad store path among the inputs Nix sends after
/// `# accept` is an error naming it, at once (the builder is not even started), not a path
/// silently left out of the build's inputs and allowed references.
#[test]
fn bad_input_path_after_accept_is_an_error_naming_it() {
    use std::io::{BufRead, BufReader, Write};
    if !common::require_bed() {
        return;
    }
    let i = install();
    let drv = instantiate(&drv_expr("bad-input", "aarch64-linux", "echo > $out"));
    let mut child = Command::new(HOOK)
        .arg("3")
        .env("NIXDOCK_CONFIG", &i.config)
        .env("NIXDOCK_STATE_DIR", &i.state)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Every wait below ends: the hook is killed after two minutes whatever happens.
    // (It is not yet reaped then, so the pid is still its own.)
    let pid = child.id();
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            done_rx.recv_timeout(Duration::from_secs(120))
        {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    });
    let mut stdin = child.stdin.take().unwrap();
    let mut buf = bytes::BytesMut::new();
    hook_protocol::hook::Settings(
        [("system", "x86_64-linux"), ("max-jobs", "0")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
    .write(&mut buf);
    hook_protocol::hook::TryRequest {
        am_willing: false,
        needed_system: "aarch64-linux".into(),
        drv_path: drv.parse().unwrap(),
        required_features: Default::default(),
    }
    .write(&mut buf);
    stdin.write_all(&buf).unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "no reply: {seen}");
        seen.push_str(&line);
        if line == "# accept\n" {
            break;
        }
    }
    let bad = "/nix/store/not-a-store-path";
    let mut buf = bytes::BytesMut::new();
    hook_protocol::wire::put_u64(&mut buf, 1);
    hook_protocol::wire::put_str(&mut buf, bad);
    hook_protocol::wire::put_strings(&mut buf, ["out"]);
    stdin.write_all(&buf).unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    drop(done);
    assert_eq!(status.code(), Some(1), "{seen}{rest}");
    assert!(rest.contains(bad), "{seen}{rest}");
    assert!(rest.contains("input path"), "{seen}{rest}");
}

#[test]
fn feature_no_builder_has_is_declined_with_a_reason() {
    if !common::require_bed() {
        return;
    }
    let expr = format!(
        "derivation {{ name = \"needs-kvm\"; system = \"aarch64-linux\"; builder = \"/bin/sh\"; \
         args = [\"-c\" \"echo > $out\"]; requiredSystemFeatures = [\"kvm\"]; nonce = \"{}\"; }}",
        nonce()
    );
    let o = nix_build(&expr, &with_hook(&[]), &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("lacks the system features {kvm}"),
        "{}",
        text(&o)
    );
}

/// An x86_64-linux derivation needing `kvm` with `--max-jobs 0`: this host has the feature but
/// builds nothing, and no builder offers it, so Nix says only "unable to start any build". The
/// hook's warning names the missing feature and what the builder offers, once.
#[test]
fn feature_only_the_idle_host_has_is_explained() {
    if !common::require_bed() {
        return;
    }
    let expr = format!(
        "derivation {{ name = \"host-kvm\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
         args = [\"-c\" \"echo > $out\"]; requiredSystemFeatures = [\"kvm\"]; nonce = \"{}\"; }}",
        nonce()
    );
    let o = nix_build(
        &expr,
        &with_hook(&[
            "--max-jobs",
            "0",
            "--option",
            "system-features",
            "kvm big-parallel",
        ]),
        &[],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let warning = "nixdock's x86_64-linux builder lacks the system features {kvm}";
    assert_eq!(err.matches(warning).count(), 1, "{}", text(&o));
    assert!(err.contains("(it offers {"), "{}", text(&o));
    assert!(err.contains("max-jobs = 0"), "{}", text(&o));
}

/// `nixdock shell` runs a command in the system's builder (the emulated aarch64 one here, so
/// not on this host), with stdin, stdout and the command's exit status passed through.
#[test]
fn shell_runs_a_command_in_the_builder_and_returns_its_exit_code() {
    if !common::require_bed() {
        return;
    }
    let i = install();
    let shell = |args: &[&str], stdin: &[u8]| {
        let mut cmd = Command::new(NIXDOCK);
        cmd.args(["--config", i.config.to_str().unwrap()])
            .args(["--state-dir", i.state.to_str().unwrap()])
            .arg("shell")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = common::drain(child.stdout.take());
        let err = common::drain(child.stderr.take());
        let status =
            common::wait_timeout(&mut child, Duration::from_secs(300)).expect("shell ended");
        let (out, err) = (out.join().unwrap(), err.join().unwrap());
        (
            status,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&err).into_owned(),
        )
    };
    let (status, out, err) = shell(
        &[
            "aarch64-linux",
            "--",
            "sh",
            "-c",
            "uname -m; nix-store --version >/dev/null && echo has-nix; cat; exit 42",
        ],
        b"from-stdin\n",
    );
    assert_eq!(status.code(), Some(42), "{out}{err}");
    assert_eq!(out, "aarch64\nhas-nix\nfrom-stdin\n", "{err}");
    let (status, _, err) = shell(&["aarch64-linux", "--", "no-such-command-here"], b"");
    assert_eq!(status.code(), Some(127), "{err}");
    let (status, _, err) = shell(&["riscv64-linux", "--", "true"], b"");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("no builder for riscv64-linux"), "{err}");
}

/// `-K`: the failed build's directory stays in the builder; the hook says which builder and
/// the `nixdock shell` command that reaches it, and that command (run as printed, without the
/// test's environment) shows the directory's files. Nothing is copied to this host.
#[test]
fn keep_failed_names_the_builder_and_a_command_that_reaches_the_directory() {
    if !common::require_bed() {
        return;
    }
    let name = format!("kept-{}", nonce());
    let expr = drv_expr(&name, "x86_64-linux", "echo kept > marker-5d1; exit 4");
    let o = nix_build(&expr, &with_hook(&["--max-jobs", "0", "-K"]), &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let id = std::fs::read_to_string(install().state.join("instance-id")).unwrap();
    let container = format!(
        "container nixdock-{}-x86_64-linux on engine default",
        id.trim()
    );
    assert!(err.contains(&container), "{}", text(&o));
    let dir = format!("/tmp/nix-build-{name}.drv-");
    assert!(
        err.contains(&format!("not on this machine: {dir}")),
        "{}",
        text(&o)
    );
    assert!(
        !Path::new(&format!("{dir}0")).exists(),
        "the build directory is on the host"
    );
    let command = err
        .lines()
        .find_map(|l| l.split_once("look at it with (as root): ").map(|(_, c)| c))
        .unwrap_or_else(|| panic!("no command in:\n{}", text(&o)));
    assert!(command.starts_with("nixdock "), "{command}");
    let bin_dir = Path::new(NIXDOCK).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", command])
        .env("PATH", path)
        .env_remove("NIXDOCK_CONFIG")
        .env_remove("NIXDOCK_STATE_DIR");
    let ran = common::run_with_timeout(cmd, Duration::from_secs(300)).unwrap();
    assert!(ran.status.success(), "{command}: {}", text(&ran));
    assert!(
        String::from_utf8_lossy(&ran.stdout).contains("marker-5d1"),
        "{command}: {}",
        text(&ran)
    );
}

#[test]
fn large_input_closure_is_copied_once() {
    if !common::require_bed() {
        return;
    }
    // 300 MB of incompressible data in 300 files, new for this run.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(nonce());
    std::fs::create_dir_all(&dir).unwrap();
    let mut seed = std::process::id() as u64 ^ 0x9e3779b97f4a7c15;
    let mut buf = vec![0u8; 1 << 20];
    for f in 0..300 {
        for chunk in buf.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes());
        }
        std::fs::write(dir.join(format!("f{f:03}")), &buf).unwrap();
    }
    let input = nix_store(&["--add", dir.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    let build = |tag: &str| {
        let expr = format!(
            "derivation {{ name = \"big-{tag}\"; system = \"aarch64-linux\"; builder = \"/bin/sh\"; \
             input = builtins.storePath \"{input}\"; nonce = \"{}\"; \
             args = [\"-c\" \"n=0; for f in $input/*; do n=$((n+1)); done; echo $n > $out\"]; }}",
            nonce()
        );
        let t = Instant::now();
        let o = nix_build(&expr, &with_hook(&[]), &[]);
        let out = out_path(&o);
        assert_eq!(std::fs::read_to_string(out).unwrap(), "300\n");
        t.elapsed()
    };
    let log = install().state.join("hook.log");
    let copies_before = count_copies(&log, &input);
    let first = build("1");
    let second = build("2");
    let copies = count_copies(&log, &input) - copies_before;
    assert_eq!(copies, 1, "the closure was copied {copies} times");
    eprintln!("300 MB closure: first build {first:?}, second {second:?}");
}

/// How many times the hook log says it copied `path` to a builder.
fn count_copies(log: &Path, path: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("copying input") && l.contains(path))
        .count()
}

#[test]
fn eight_builds_run_in_builders_at_once() {
    if !common::require_bed() {
        return;
    }
    // Measure parallelism on a running builder (the cold start is covered elsewhere).
    let warm = drv_expr("par-warm", "x86_64-linux", "echo > $out");
    out_path(&nix_build(&warm, &with_hook(&["--max-jobs", "0"]), &[]));
    let n = nonce();
    // Each build records when it ran (the builder's uptime) and sleeps 4 s.
    let expr = format!(
        r#"builtins.genList (i: derivation {{
             name = "par-${{toString i}}"; system = "x86_64-linux"; builder = "/bin/sh";
             nonce = "{n}";
             args = [ "-c" "read s _ < /proc/uptime; echo $s > $out; /bin/sleep 4; read e _ < /proc/uptime; echo $e >> $out" ];
           }}) 8"#
    );
    let t = Instant::now();
    let o = nix_build(&expr, &with_hook(&["--max-jobs", "0"]), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let outs: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(outs.len(), 8, "{}", text(&o));
    let spans: Vec<(f64, f64)> = outs
        .iter()
        .map(|p| {
            let s = std::fs::read_to_string(p).unwrap();
            let v: Vec<f64> = s.lines().map(|l| l.parse().unwrap()).collect();
            (v[0], v[1])
        })
        .collect();
    let latest_start = spans.iter().map(|s| s.0).fold(f64::MIN, f64::max);
    let earliest_end = spans.iter().map(|s| s.1).fold(f64::MAX, f64::min);
    assert!(
        latest_start < earliest_end,
        "not all 8 builds ran at once: {spans:?} (total {:?})",
        t.elapsed()
    );
}

/// The host's Nix kills every process of a build user's uid around each of its own builds, and
/// the host sees the containers' processes: builders must not share uids with host build users
/// (a host build used to SIGKILL the first build in a builder).
#[test]
fn host_builds_do_not_kill_builds_in_builders() {
    if !common::require_bed() {
        return;
    }
    let remote = drv_expr(
        "survives-host-builds",
        "x86_64-linux",
        "/bin/sleep 6; echo ok > $out",
    );
    let remote =
        std::thread::spawn(move || nix_build(&remote, &with_hook(&["--max-jobs", "0"]), &[]));
    // Host builds (declined by the hook, built here as host build users) while it sleeps.
    let t = Instant::now();
    let mut local_builds = 0;
    while !remote.is_finished() && t.elapsed() < Duration::from_secs(60) {
        let local = drv_expr("host-local", "x86_64-linux", "echo > $out");
        let o = nix_build(&local, &with_hook(&[]), &[]);
        assert!(o.status.success(), "{}", text(&o));
        local_builds += 1;
    }
    let o = remote.join().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(out_path(&o)).unwrap(), "ok\n");
    assert!(
        local_builds >= 2,
        "only {local_builds} host builds ran meanwhile"
    );
}

/// Copies show up in Nix's own progress (`nix build`'s bar, nix-output-monitor) exactly as
/// Nix's copies do: an actCopyPaths activity expecting the bytes, one actCopyPath per path whose
/// progress reaches its NAR size, inputs from "local" and outputs to "local".
#[test]
fn copies_show_as_nix_activities() {
    if !common::require_bed() {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(nonce());
    std::fs::create_dir_all(&dir).unwrap();
    let blob = dir.join("blob");
    // Unique per run, so the builder never has it yet.
    let mut data = nonce().into_bytes();
    data.extend((0..3_000_000usize).map(|i| (i * 7919 % 251) as u8));
    std::fs::write(&blob, &data).unwrap();
    let input = nix_store(&["--add", blob.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    let expr = format!(
        "derivation {{ name = \"activities\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
         input = builtins.storePath \"{input}\"; nonce = \"{}\"; \
         args = [\"-c\" \"/usr/bin/head -c 2500000 /dev/urandom > $out\"]; }}",
        nonce()
    );
    let o = nix_build(
        &expr,
        &with_hook(&["--max-jobs", "0", "--log-format", "internal-json"]),
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = out_path(&o);
    let input_size: u64 = nix_store(&["-q", "--size", &input]).trim().parse().unwrap();
    let out_size: u64 = nix_store(&["-q", "--size", &out]).trim().parse().unwrap();

    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter_map(|l| l.strip_prefix("@nix "))
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    let is = |e: &serde_json::Value, action: &str, typ: u64| {
        e["action"] == action && e["type"].as_u64() == Some(typ)
    };
    // One actCopyPath (100) per path, with the store URIs Nix's own copies use.
    let copy_of = |path: &str| {
        events
            .iter()
            .find(|e| is(e, "start", 100) && e["fields"][0] == path)
            .unwrap_or_else(|| panic!("no copy activity for {path}:\n{}", text(&o)))
            .clone()
    };
    let (cin, cout) = (copy_of(&input), copy_of(&out));
    assert_eq!(cin["fields"][1], "local", "{cin}");
    assert_eq!(cout["fields"][2], "local", "{cout}");
    // The builder is named as the user knows it, not as a store URI that does not exist.
    assert_eq!(cin["fields"][2], "nixdock x86_64-linux builder", "{cin}");
    assert_eq!(cout["fields"][1], "nixdock x86_64-linux builder", "{cout}");
    assert!(!text(&o).contains("ssh-ng://nixdock"), "{}", text(&o));
    // Each path's byte progress reaches its NAR size.
    let last_progress = |id: &serde_json::Value| {
        events
            .iter()
            .rfind(|e| is(e, "result", 105) && &e["id"] == id)
            .map(|e| e["fields"].clone())
    };
    assert_eq!(
        last_progress(&cin["id"]),
        Some(serde_json::json!([input_size, input_size, 0, 0]))
    );
    assert_eq!(
        last_progress(&cout["id"]),
        Some(serde_json::json!([out_size, out_size, 0, 0]))
    );
    // The enclosing actCopyPaths (103) expects the bytes (setExpected 106 on type 100) and
    // counts paths.
    for bytes in [input_size, out_size] {
        let copy = events
            .iter()
            .find(|e| {
                is(e, "result", 106)
                    && e["fields"] == serde_json::json!([100, bytes])
                    && events
                        .iter()
                        .any(|s| is(s, "start", 103) && s["id"] == e["id"])
            })
            .unwrap_or_else(|| panic!("no copy of {bytes} bytes expected:\n{}", text(&o)));
        assert_eq!(
            last_progress(&copy["id"]),
            Some(serde_json::json!([1, 1, 0, 0]))
        );
    }
}

#[test]
fn interrupted_client_stops_the_remote_build() {
    if !common::require_bed() {
        return;
    }
    let marker = nonce();
    let expr = drv_expr(
        "interrupted",
        "x86_64-linux",
        &format!("echo {marker}; while :; do :; done"),
    );
    let drv = instantiate(&expr);
    let i = install();
    let mut child = Command::new("nix-build")
        .args([
            "--no-out-link",
            "--max-jobs",
            "0",
            "--option",
            "build-hook",
            HOOK,
            &drv,
        ])
        .env("NIXDOCK_CONFIG", &i.config)
        .env("NIXDOCK_STATE_DIR", &i.state)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let container = format!(
        "nixdock-{}-x86_64-linux",
        std::fs::read_to_string(i.state.join("instance-id"))
            .unwrap_or_default()
            .trim()
    );
    let running = |c: &str| {
        let o = common::docker([
            "exec",
            c,
            "sh",
            "-c",
            "cat /proc/[0-9]*/cmdline | tr '\\0' ' '",
        ]);
        String::from_utf8_lossy(&o.stdout).contains(&marker)
    };
    let t = Instant::now();
    while !running(&container) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the build never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // SIGINT, as Ctrl-C would.
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status =
        common::wait_timeout(&mut child, Duration::from_secs(30)).expect("nix-build exited");
    assert!(!status.success());
    let t = Instant::now();
    while running(&container) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the remote build kept running"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for p in outputs_of(&drv) {
        assert!(!is_valid(&p), "{p} registered after an interrupted build");
    }
}

#[test]
fn through_a_nix_daemon_with_the_hook_option() {
    if !common::require_bed() {
        return;
    }
    let i = install();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(nonce());
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("daemon.sock");
    let mut daemon = Command::new("nix-daemon")
        .args(["--option", "build-hook", HOOK])
        .env("NIX_DAEMON_SOCKET_PATH", &socket)
        .env("NIXDOCK_CONFIG", &i.config)
        .env("NIXDOCK_STATE_DIR", &i.state)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !socket.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let expr = drv_expr("via-daemon", "aarch64-linux", "echo daemon-path > $out");
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "-E", &expr, "--store", "daemon"])
        .env("NIX_DAEMON_SOCKET_PATH", &socket);
    let o = common::run_with_timeout(cmd, Duration::from_secs(300)).unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let out = out_path(&o);
    assert_eq!(std::fs::read_to_string(out).unwrap(), "daemon-path\n");
}

#[test]
fn nix_2_26_client_in_a_trixie_container() {
    if !common::require_bed() {
        return;
    }
    let expr = drv_expr("from-226", "aarch64-linux", "echo from-2.26 > $out");
    let o = client_container(
        "trixie-amd64",
        &format!(
            "nix-build --version && out=$(nix-build --no-out-link --option build-users-group '' \
             --option substituters '' --option build-hook /usr/local/bin/nixdock-hook -E '{expr}') \
             && cat $out && nix-store -q --deriver $out"
        ),
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("2.26"), "{t}");
    assert!(stdout.contains("from-2.26"), "{t}");
    // Nix 2.26 shows the machine name the hook accepted with.
    assert!(t.contains("on 'nixdock aarch64-linux builder'"), "{t}");
    assert!(stdout.contains("-from-226.drv"), "{t}");
}

/// A Nix client container with this suite's installation (see `common::client_container`).
fn client_container(img: &str, script: &str) -> Output {
    let i = install();
    common::client_container(img, HOOK, &i.state, &i.config, script)
}

/// Nix 2.34 reads `build-hook` from /etc/nix/nix.conf again (2.25–2.33 ignore it there), so
/// a 2.34 client with nothing but nix.conf builds a foreign-system derivation through the hook.
#[test]
fn nix_2_34_client_in_a_sid_container() {
    if !common::require_bed() {
        return;
    }
    let expr = drv_expr(
        "from-234",
        "aarch64-linux",
        "echo from-2.34 > $out; /bin/uname -m >> $out",
    );
    let o = client_container(
        "sid-amd64",
        &format!(
            "set -e; nix-build --version; \
             printf 'build-hook = /usr/local/bin/nixdock-hook\\nsubstituters =\\nbuild-users-group =\\n' \
             >> /etc/nix/nix.conf; \
             out=$(nix-build --no-out-link -E '{expr}'); \
             cat $out; nix-store -q --deriver $out"
        ),
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains("(Nix) 2.34."), "{t}");
    assert_eq!(lines[1..3], ["from-2.34", "aarch64"], "{t}");
    assert!(t.contains("on 'nixdock aarch64-linux builder'"), "{t}");
    assert!(
        lines[3].starts_with("/nix/store/") && lines[3].ends_with("-from-234.drv"),
        "{t}"
    );
}

/// Multi-user Nix 2.34: nix-daemon (root) in the container with the hook in nix.conf, the
/// client an unprivileged user in `nix-users`; a user outside that group cannot connect.
#[test]
fn nix_2_34_multi_user_client_in_a_sid_container() {
    if !common::require_bed() {
        return;
    }
    let expr = drv_expr(
        "from-234-mu",
        "aarch64-linux",
        "echo from-2.34-multi-user > $out; /bin/uname -m >> $out",
    );
    let o = client_container(
        "sid-amd64",
        &format!(
            "set -e; \
             printf 'build-hook = /usr/local/bin/nixdock-hook\\nsubstituters =\\n' >> /etc/nix/nix.conf; \
             nix-daemon --daemon > /tmp/daemon.log 2>&1 & \
             i=0; while [ ! -S /nix/var/nix/daemon-socket/socket ]; do \
               i=$((i+1)); [ $i -lt 200 ] || {{ cat /tmp/daemon.log; exit 1; }}; sleep 0.05; done; \
             useradd -m -G nix-users alice; useradd -m bob; \
             if runuser -u bob -- nix-store --store daemon --check-validity --print-invalid \
                  /nix/store/00000000000000000000000000000000-probe 2>/tmp/bob; then \
               echo 'bob (not in nix-users) reached the daemon'; exit 1; fi; \
             grep -q 'Permission denied' /tmp/bob || {{ cat /tmp/bob; exit 1; }}; \
             echo bob-refused; \
             out=$(runuser -u alice -- env NIX_REMOTE=daemon nix-build --no-out-link -E '{expr}') \
               || {{ cat /tmp/daemon.log; exit 1; }}; \
             cat $out; runuser -u alice -- nix-store --store daemon -q --deriver $out; \
             stat -c %U $out"
        ),
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..3],
        ["bob-refused", "from-2.34-multi-user", "aarch64"],
        "{t}"
    );
    assert!(lines[3].ends_with("-from-234-mu.drv"), "{t}");
    // Registered by the root daemon, as any multi-user store path.
    assert_eq!(lines[4], "root", "{t}");
}

/// Debian sid's Nix 2.34 as a *builder* image: the host's Nix builds an x86_64-linux
/// derivation in a builder made from nixdock-test/sid-amd64, as one of its build users.
#[test]
fn sid_amd64_builder_builds() {
    if !common::require_bed() {
        return;
    }
    // An installation of its own: the suite's x86_64 builder is bookworm's.
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-sid");
    std::fs::create_dir_all(&root).unwrap();
    let config = root.join("nixdock.toml");
    std::fs::write(
        &config,
        format!(
            "[builders.\"x86_64-linux\"]\nimage = \"{}\"\nidle-timeout = 120\n",
            common::image("sid-amd64")
        ),
    )
    .unwrap();
    let expr = drv_expr(
        "on-sid",
        "x86_64-linux",
        "echo on-sid > $out; /usr/bin/nix --version >> $out; /usr/bin/id -u >> $out",
    );
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "-E", &expr])
        .args(with_hook(&["--max-jobs", "0"]))
        .env("NIXDOCK_CONFIG", &config)
        .env("NIXDOCK_STATE_DIR", root.join("state"));
    let o = common::run_with_timeout(cmd, Duration::from_secs(600)).expect("nix-build ran");
    let out = out_path(&o);
    let content = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = content.lines().collect();
    assert_eq!(lines.len(), 3, "{content:?}");
    assert_eq!(lines[0], "on-sid");
    assert!(lines[1].contains("(Nix) 2.34."), "{content:?}");
    let uid: u32 = lines[2].parse().expect("uid");
    assert_ne!(uid, 0, "built as root although the image has build users");
    assert!(
        nix_store(&["-q", "--deriver", &out]).ends_with("-on-sid.drv"),
        "{out}"
    );
}
