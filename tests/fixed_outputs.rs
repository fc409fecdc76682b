//! Fixed outputs and references through the hook, end to end (issue 12, findings 4 and 5):
//! real Nix clients (2.8 on the host, 2.26 in the trixie image, 2.34 in the sid image), the
//! real hook binary and a real emulated aarch64 builder.
//!
//! - a builder whose store holds a wrong-content copy of a fixed-output path cannot get it
//!   imported: the build fails naming the hash mismatch and nothing is registered;
//! - flat and recursive fixed outputs (sha256, sha1, sha512) are registered with the content
//!   address stock Nix gives them, visible in `nix path-info --json` directly and through a
//!   daemon, and self-certifying (`nix store verify --sigs-needed 1`);
//! - a reference the builder claims outside the build's input closure is refused.
//!
//! Every expected hash and content address here is computed independently of nixdock's code
//! (sha1/sha2/md5 crates, `hook_protocol::hash` for nix32), and the `ca` format is checked against
//! what the host's Nix registers for a fixed output it builds itself.

mod common;

use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use common::{out_path, output_text as text};
use hook_protocol::hash::{Hash, HashAlgo};
use hook_protocol::nar::{DumpOptions, dump_path};

const HOOK: &str = env!("CARGO_BIN_EXE_nixdock-hook");

/// This suite's nixdock installation: an emulated arm64 builder from the test bed.
fn install() -> &'static common::SuiteInstall {
    static I: OnceLock<common::SuiteInstall> = OnceLock::new();
    I.get_or_init(|| {
        common::SuiteInstall::new(
            "fixed-outputs",
            &format!(
                "[builders.\"aarch64-linux\"]\nimage = \"{}\"\nidle-timeout = 900\nmax-jobs = 8\n\
                 emulation = \"container\"\n",
                common::image("bookworm-arm64")
            ),
        )
    })
}

/// The builder container of this installation (after a first build).
fn builder_container() -> String {
    let id = std::fs::read_to_string(install().state.join("instance-id")).unwrap();
    format!("nixdock-{}-aarch64-linux", id.trim())
}

fn builder_sh(script: &str) -> Output {
    common::docker(["exec", &builder_container(), "sh", "-c", script])
}

fn builder_sh_ok(script: &str) -> String {
    let o = builder_sh(script);
    assert!(o.status.success(), "in the builder: {script}\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn nix_build(expr: &str, extra: &[&str]) -> Output {
    let i = install();
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "-E", expr])
        .args(["--option", "build-hook", HOOK])
        .args(extra)
        .env("NIXDOCK_CONFIG", &i.config)
        .env("NIXDOCK_STATE_DIR", &i.state);
    common::run_with_timeout(cmd, Duration::from_secs(900)).expect("nix-build ran")
}

fn run(program: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    common::run_with_timeout(cmd, Duration::from_secs(600)).expect("ran")
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    assert!(o.status.success(), "{program} {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn is_valid(path: &str) -> bool {
    run("nix-store", &["--check-validity", path])
        .status
        .success()
}

fn nonce() -> String {
    common::unique_name("fo")
}

fn digest(algo: HashAlgo, data: &[u8]) -> Hash {
    let d: Vec<u8> = match algo {
        HashAlgo::Md5 => md5::compute(data).0.to_vec(),
        HashAlgo::Sha1 => <sha1::Sha1 as sha1::Digest>::digest(data).to_vec(),
        HashAlgo::Sha256 => <sha2::Sha256 as sha2::Digest>::digest(data).to_vec(),
        HashAlgo::Sha512 => <sha2::Sha512 as sha2::Digest>::digest(data).to_vec(),
    };
    Hash::new(algo, &d).unwrap()
}

/// One fixed-output derivation and what the local store must say about its output.
struct Fixed {
    expr: String,
    /// `ValidPaths.ca` as stock Nix renders it.
    ca: String,
}

/// A fixed-output derivation for aarch64-linux (so the host does not build it): flat writes
/// `content` to `$out`; recursive makes `$out/f` with it.
async fn fixed(name: &str, recursive: bool, algo: HashAlgo, system: &str) -> Fixed {
    let content = format!("{name} {}\n", nonce());
    let hash = if recursive {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("out");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("f"), &content).unwrap();
        let mut nar = Vec::new();
        dump_path(&d, &mut nar, DumpOptions::default())
            .await
            .unwrap();
        digest(algo, &nar)
    } else {
        digest(algo, content.as_bytes())
    };
    let (mode, script) = if recursive {
        (
            "recursive",
            format!("/bin/mkdir $out && printf %s \"{content}\" > $out/f"),
        )
    } else {
        ("flat", format!("printf %s \"{content}\" > $out"))
    };
    Fixed {
        expr: format!(
            "derivation {{ name = \"{name}\"; system = \"{system}\"; builder = \"/bin/sh\"; \
             args = [\"-c\" {script:?}]; outputHashMode = \"{mode}\"; \
             outputHashAlgo = \"{algo}\"; outputHash = \"{}\"; }}",
            hash.to_base16()
        ),
        ca: format!(
            "fixed:{}{algo}:{}",
            if recursive { "r:" } else { "" },
            hash.to_nix32()
        ),
    }
}

/// The six variants of finding 5.
async fn variants(tag: &str) -> Vec<Fixed> {
    let mut v = Vec::new();
    for recursive in [false, true] {
        for algo in [HashAlgo::Sha256, HashAlgo::Sha1, HashAlgo::Sha512] {
            let name = format!("fo-{tag}-{}-{algo}", if recursive { "r" } else { "flat" });
            v.push(fixed(&name, recursive, algo, "aarch64-linux").await);
        }
    }
    v
}

/// `nix path-info --json` output as (path, ca) pairs: a list of objects up to Nix 2.18, an
/// object keyed by path from 2.19.
fn path_info_cas(json: &str) -> Vec<(String, Option<String>)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let ca = |o: &serde_json::Value| o["ca"].as_str().map(String::from);
    match v {
        serde_json::Value::Array(items) => items
            .iter()
            .map(|o| (o["path"].as_str().unwrap_or_default().to_string(), ca(o)))
            .collect(),
        serde_json::Value::Object(m) => m.iter().map(|(p, o)| (p.clone(), ca(o))).collect(),
        _ => panic!("unexpected path-info JSON: {json}"),
    }
}

fn assert_cas(what: &str, json: &str, expected: &[(String, String)]) {
    let got = path_info_cas(json);
    for (path, ca) in expected {
        let found = got
            .iter()
            .find(|(p, _)| p == path)
            .unwrap_or_else(|| panic!("{what}: {path} missing from {json}"));
        assert_eq!(
            found.1.as_deref(),
            Some(ca.as_str()),
            "{what}: ca of {path}"
        );
    }
}

/// Stock Nix's `ca` for a fixed output it builds itself has the form the tests expect.
#[tokio::test]
async fn the_expected_ca_is_what_stock_nix_registers() {
    if !common::require_bed() {
        return;
    }
    let f = fixed("fo-local-r-sha1", true, HashAlgo::Sha1, "x86_64-linux").await;
    let g = fixed(
        "fo-local-flat-sha512",
        false,
        HashAlgo::Sha512,
        "x86_64-linux",
    )
    .await;
    for f in [f, g] {
        // No hook: the host builds it.
        let mut cmd = Command::new("nix-build");
        cmd.args(["--no-out-link", "-E", &f.expr]);
        let o = common::run_with_timeout(cmd, Duration::from_secs(300)).unwrap();
        let p = out_path(&o);
        let json = run_ok(
            "nix",
            &[
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--json",
                &p,
            ],
        );
        assert_cas("host-built", &json, &[(p, f.ca)]);
    }
}

/// Finding 5 on the host's Nix 2.8: flat and recursive, three algorithms, `ca` directly and
/// through the daemon, and self-certifying.
#[tokio::test]
async fn fixed_outputs_carry_ca_on_nix_2_8() {
    if !common::require_bed() {
        return;
    }
    let vs = variants("28").await;
    let list = format!(
        "[ {} ]",
        vs.iter()
            .map(|v| format!("({})", v.expr))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let o = nix_build(&list, &["-j", "6"]);
    assert!(o.status.success(), "{}", text(&o));
    let paths: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(paths.len(), 6, "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("on 'nixdock aarch64-linux builder'"),
        "not built through the hook: {}",
        text(&o)
    );
    let expected: Vec<(String, String)> = paths
        .iter()
        .cloned()
        .zip(vs.iter().map(|v| v.ca.clone()))
        .collect();
    let mut args = vec![
        "--extra-experimental-features",
        "nix-command",
        "path-info",
        "--json",
    ];
    args.extend(paths.iter().map(String::as_str));
    assert_cas("direct", &run_ok("nix", &args), &expected);
    let mut daemon_args = vec!["--store", "daemon"];
    daemon_args.extend(args.iter().copied());
    assert_cas("daemon", &run_ok("nix", &daemon_args), &expected);
    let mut verify = vec![
        "--extra-experimental-features",
        "nix-command",
        "store",
        "verify",
        "--sigs-needed",
        "1",
    ];
    verify.extend(paths.iter().map(String::as_str));
    run_ok("nix", &verify);
    verify.splice(0..0, ["--store", "daemon"]);
    run_ok("nix", &verify);
    for p in &paths {
        run_ok("nix-store", &["--verify-path", p]);
    }
}

/// Finding 5 with a Nix client in a container (its own store and database): builds the six
/// variants through the hook, then checks `ca` directly and through a `nix-daemon` started in
/// the container, and `nix store verify --sigs-needed 1`.
async fn fixed_outputs_carry_ca_in(image: &str, version: &str) {
    if !common::require_bed() {
        return;
    }
    let exists = common::docker(["image", "inspect", &common::image(image)]);
    assert!(
        exists.status.success(),
        "test-bed image {} is missing: run scripts/testbed",
        common::image(image)
    );
    let i = install();
    // The builder must exist before a container client can use it (same instance id).
    let warm = fixed("fo-warm", false, HashAlgo::Sha256, "aarch64-linux").await;
    out_path(&nix_build(&warm.expr, &[]));
    let vs = variants(image).await;
    let list = format!(
        "[ {} ]",
        vs.iter()
            .map(|v| format!("({})", v.expr))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let nixc = "nix --extra-experimental-features nix-command";
    let script = format!(
        "set -e; nix-build --version; \
         paths=$(nix-build --no-out-link -j 6 --option build-users-group '' \
           --option substituters '' --option build-hook /usr/local/bin/nixdock-hook -E '{list}'); \
         echo \"PATHS $paths\" | tr '\\n' ' '; echo; \
         echo \"DIRECT $({nixc} path-info --json $paths)\"; \
         {nixc} store verify --sigs-needed 1 $paths; \
         nix-daemon --option build-users-group '' >/dev/null 2>&1 & \
         for i in $(seq 100); do [ -S /nix/var/nix/daemon-socket/socket ] && break; sleep 0.1; done; \
         echo \"DAEMON $({nixc} --store daemon path-info --json $paths)\"; \
         {nixc} --store daemon store verify --sigs-needed 1 $paths; echo VERIFIED"
    );
    let o = common::client_container(image, HOOK, &i.state, &i.config, &script);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains(version), "{t}");
    assert!(stdout.contains("VERIFIED"), "{t}");
    let line = |tag: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag} line: {t}"))
            .trim()
            .to_string()
    };
    let paths: Vec<String> = line("PATHS ")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(paths.len(), 6, "{t}");
    let expected: Vec<(String, String)> = paths
        .into_iter()
        .zip(vs.iter().map(|v| v.ca.clone()))
        .collect();
    assert_cas(&format!("{image} direct"), &line("DIRECT "), &expected);
    assert_cas(&format!("{image} daemon"), &line("DAEMON "), &expected);
}

#[tokio::test]
async fn fixed_outputs_carry_ca_on_nix_2_26() {
    fixed_outputs_carry_ca_in("trixie-amd64", "2.26").await;
}

#[tokio::test]
async fn fixed_outputs_carry_ca_on_nix_2_34() {
    fixed_outputs_carry_ca_in("sid-amd64", "2.34").await;
}

/// Finding 4: the builder's store holds a wrong-content copy of a fixed-output path, valid
/// there with a NAR hash that matches the wrong content. Building it again through the hook
/// must fail naming the hash mismatch, with nothing registered or left on the host.
#[tokio::test]
async fn a_tampered_fixed_output_in_the_builder_is_refused() {
    if !common::require_bed() {
        return;
    }
    let f = fixed("fo-tamper", false, HashAlgo::Sha256, "aarch64-linux").await;
    let p = out_path(&nix_build(&f.expr, &[]));
    // In the builder: replace the path by one with other content, registered valid (its
    // daemon computes the NAR hash of the new content). Then drop the host's copy.
    builder_sh_ok(&format!(
        "nix-store --delete {p} >/dev/null 2>&1; printf 'tampered\\n' > {p} && \
         printf '{p}\\n\\n0\\n' | nix-store --register-validity && nix-store --verify-path {p}"
    ));
    run_ok("nix-store", &["--delete", &p]);
    assert!(!is_valid(&p));

    let o = nix_build(&f.expr, &[]);
    let t = text(&o);
    assert!(!o.status.success(), "the tampered output was accepted: {t}");
    assert!(t.contains("hash mismatch"), "{t}");
    assert!(t.contains(&p), "{t}");
    assert!(!is_valid(&p), "{p} registered: {t}");
    assert!(
        std::fs::symlink_metadata(&p).is_err(),
        "{p} left on disk: {t}"
    );
    let v = run("nix-store", &["--verify", "--check-contents"]);
    assert!(v.status.success(), "{}", text(&v));
    assert!(!text(&v).contains(&p), "{}", text(&v));
    // Leave the builder's store honest again.
    let _ = builder_sh(&format!("nix-store --delete {p}"));
}

/// Finding 4, references: the builder's store claims that an input references a path X that
/// is valid on the host but not in the build's input closure there; the builder's daemon then
/// scans the output for X and reports it. The hook must refuse the output, naming X.
#[tokio::test]
async fn a_reference_outside_the_input_closure_is_refused() {
    if !common::require_bed() {
        return;
    }
    let n = nonce();
    // X: valid on the host and in the builder.
    let x = out_path(&nix_build(
        &format!(
            "derivation {{ name = \"ref-x\"; system = \"aarch64-linux\"; builder = \"/bin/sh\"; \
             args = [\"-c\" \"echo {n} > $out\"]; }}"
        ),
        &[],
    ));
    // I: an input source on the host with no references…
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("ref-input");
    std::fs::write(&src, format!("input {n}\n")).unwrap();
    let i = run_ok("nix-store", &["--add", src.to_str().unwrap()]);
    // …which the builder's store holds with a made-up reference to X.
    builder_sh_ok(&format!(
        "printf 'input {n}\\n' > {i} && printf '{i}\\n\\n1\\n{x}\\n' | nix-store --register-validity \
         && nix-store -q --references {i} | grep -qx {x}"
    ));
    // The output mentions X (a plain string, no context: X is no input).
    let expr = format!(
        "derivation {{ name = \"ref-user\"; system = \"aarch64-linux\"; builder = \"/bin/sh\"; \
         input = builtins.storePath \"{i}\"; args = [\"-c\" \"cat $input > $out; echo {x} >> $out\"]; }}"
    );
    let drv = run_ok("nix-instantiate", &["-E", &expr]);
    let outs = run_ok("nix-store", &["-q", "--outputs", &drv]);
    let o = nix_build(&expr, &[]);
    let t = text(&o);
    assert!(
        !o.status.success(),
        "an out-of-closure reference was accepted: {t}"
    );
    assert!(t.contains(&x), "the error does not name {x}: {t}");
    assert!(t.contains("input closure"), "{t}");
    for out in outs.lines() {
        assert!(!is_valid(out), "{out} registered: {t}");
        assert!(
            std::fs::symlink_metadata(out).is_err(),
            "{out} left on disk"
        );
    }
    let _ = builder_sh(&format!("nix-store --delete {i}"));
}
