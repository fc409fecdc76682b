//! The worker-protocol client against real daemons:
//! - Nix 2.8 on the host (`nix-daemon --stdio` as a child process, protocol 1.34),
//! - Nix 2.26 in the `nixdock-test/trixie-amd64` image (`docker run -i … nix-daemon --stdio`,
//!   protocol 1.38).
//!
//! Bed-missing policy: if `nix-daemon`, docker or the image is absent, the test fails with
//! "test bed missing: run scripts/testbed" when `CI` is set, and prints a note and passes
//! otherwise.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};

use hook_protocol::derivation::{BasicDerivation, Derivation};
use hook_protocol::hash::{Hash, HashAlgo};
use hook_protocol::store_path::{
    ContentAddressMethod, StorePath, make_fixed_output_path, make_store_path,
};
use hook_protocol::worker::{
    BuildMode, BuildStatus, ClientSettings, DerivedPath, LogEvent, NarSource, OutputsSpec,
    ProtocolVersion, ValidPathInfo, WorkerClient, WorkerErrorKind, discard_logs,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const IMAGE: &str = "nixdock-test/trixie-amd64";

type Client = WorkerClient<ChildStdout, ChildStdin>;

// ---------------------------------------------------------------------------------------------
// Test bed

fn bed_missing(what: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("test bed missing: run scripts/testbed ({what})");
    }
    eprintln!("SKIPPED: test bed missing ({what}); run scripts/testbed");
}

fn have_cmd(cmd: &str, arg: &str) -> bool {
    std::process::Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn host_bed() -> bool {
    for c in ["nix-daemon", "nix-store", "nix-instantiate"] {
        if !have_cmd(c, "--version") {
            bed_missing(&format!("{c} is not on PATH (apt-get install nix-bin)"));
            return false;
        }
    }
    true
}

fn container_bed() -> bool {
    if !have_cmd("nix-store", "--version") {
        bed_missing("nix-store is not on PATH (apt-get install nix-bin)");
        return false;
    }
    let ok = std::process::Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        bed_missing(&format!("docker or the image {IMAGE} is not available"));
    }
    ok
}

/// Options for a daemon that builds without sandbox, build users or substituters.
const DAEMON_OPTS: &[&str] = &[
    "--option",
    "build-users-group",
    "",
    "--option",
    "sandbox",
    "false",
    "--option",
    "substituters",
    "",
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bed {
    Host,
    Container,
}

struct Daemon {
    child: Child,
}

impl Daemon {
    fn spawn(bed: Bed) -> (Daemon, ChildStdout, ChildStdin) {
        let mut cmd = match bed {
            Bed::Host => {
                let mut c = Command::new("nix-daemon");
                c.arg("--stdio").args(DAEMON_OPTS);
                c
            }
            Bed::Container => {
                let mut c = Command::new("docker");
                c.args([
                    "run",
                    "--rm",
                    "-i",
                    "--network",
                    "none",
                    IMAGE,
                    "nix-daemon",
                    "--stdio",
                ])
                .args(DAEMON_OPTS);
                c
            }
        };
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn the daemon");
        let out = child.stdout.take().expect("stdout");
        let inp = child.stdin.take().expect("stdin");
        (Daemon { child }, out, inp)
    }

    /// Closes the connection (EOF on the daemon's stdin) and waits for it to exit.
    async fn shutdown(mut self, client: Client) {
        drop(client);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(20), self.child.wait()).await;
    }
}

async fn connect(bed: Bed, version: ProtocolVersion) -> (Daemon, Client) {
    let (d, out, inp) = Daemon::spawn(bed);
    let mut startup = Vec::new();
    let c = WorkerClient::handshake_with(out, inp, version, &mut |e| startup.push(e))
        .await
        .unwrap_or_else(|e| panic!("handshake with the {bed:?} daemon: {e}"));
    (d, c)
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn nonce() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        t,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn run(cmd: &str, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `nix-store --dump` of a file system object.
fn dump(path: &Path) -> Vec<u8> {
    run("nix-store", &["--dump", path.to_str().expect("utf-8 path")])
}

fn sha256(data: &[u8]) -> Hash {
    Hash::sha256_of(data)
}

/// A temporary tree with a regular file, an executable and a symlink, plus `extra` as a file.
fn make_tree(extra: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("hello.txt"), format!("hello {}\n", nonce())).unwrap();
    std::fs::write(dir.path().join("extra"), extra).unwrap();
    let exe = dir.path().join("run.sh");
    std::fs::write(&exe, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("hello.txt", dir.path().join("link")).unwrap();
    dir
}

/// A content-addressed (`fixed:r:sha256`) path for the NAR of `tree`, as `nix-store --add`
/// would make it.
fn ca_path_info(nar: &[u8], name: &str) -> ValidPathInfo {
    let h = sha256(nar);
    let path = make_fixed_output_path(ContentAddressMethod::Nar, &h, name).expect("path");
    let mut info = ValidPathInfo::new(path, h, nar.len() as u64);
    info.ca = Some(format!("fixed:r:sha256:{}", h.to_nix32()));
    info
}

fn collect(events: &[LogEvent]) -> String {
    events
        .iter()
        .filter_map(|e| e.log_line().map(str::to_string))
        .collect::<Vec<_>>()
        .join("\n")
}

struct MemNars(Vec<(StorePath, Vec<u8>)>);

impl NarSource for MemNars {
    async fn write_nar<W: AsyncWrite + Unpin + Send>(
        &mut self,
        info: &ValidPathInfo,
        out: &mut W,
    ) -> std::io::Result<()> {
        let nar = self
            .0
            .iter()
            .find(|(p, _)| *p == info.path)
            .map(|(_, n)| n.clone())
            .ok_or_else(|| std::io::Error::other("no NAR for this path"))?;
        // Several writes, to exercise framing across writes.
        for chunk in nar.chunks(1000) {
            out.write_all(chunk).await?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake

#[tokio::test]
async fn host_handshake_1_38_negotiates_1_34() {
    if !host_bed() {
        return;
    }
    let (d, c) = connect(Bed::Host, ProtocolVersion::LATEST).await;
    assert_eq!(c.daemon_version(), ProtocolVersion::new(1, 34));
    assert_eq!(c.version(), ProtocolVersion::new(1, 34));
    let v = c
        .daemon_nix_version()
        .expect("2.8 sends its version at 1.34");
    assert!(v.starts_with("2.8"), "{v}");
    assert_eq!(c.trusted(), None, "the trust flag needs 1.35");
    d.shutdown(c).await;
}

#[tokio::test]
async fn host_handshake_at_older_versions() {
    if !host_bed() {
        return;
    }
    for minor in [21, 22, 23, 32, 33, 34] {
        let (d, mut c) = connect(Bed::Host, ProtocolVersion::new(1, minor)).await;
        assert_eq!(c.version(), ProtocolVersion::new(1, minor));
        assert_eq!(c.daemon_nix_version().is_some(), minor >= 33);
        // The connection works at that version.
        let p = make_store_path("source", &sha256(nonce().as_bytes()), "nixdock-nonexistent");
        assert!(!c.is_valid_path(&p, &mut discard_logs).await.unwrap());
        d.shutdown(c).await;
    }
}

#[tokio::test]
async fn container_handshake_1_38_and_1_34() {
    if !container_bed() {
        return;
    }
    let (d, c) = connect(Bed::Container, ProtocolVersion::LATEST).await;
    assert_eq!(c.version(), ProtocolVersion::new(1, 38));
    assert_eq!(c.daemon_nix_version(), Some("2.26.3"));
    assert_eq!(c.trusted(), Some(true), "--stdio trusts its client");
    assert!(c.daemon_features().is_empty(), "2.26 offers no features");
    d.shutdown(c).await;

    let (d, c) = connect(Bed::Container, ProtocolVersion::new(1, 34)).await;
    assert_eq!(c.version(), ProtocolVersion::new(1, 34));
    assert_eq!(c.daemon_version(), ProtocolVersion::new(1, 38));
    assert_eq!(c.daemon_nix_version(), Some("2.26.3"));
    assert_eq!(c.trusted(), None);
    d.shutdown(c).await;
}

#[tokio::test]
async fn container_reports_untrusted_client() {
    if !container_bed() {
        return;
    }
    let (mut d, out, inp) = {
        let mut cmd = Command::new("docker");
        cmd.args([
            "run",
            "--rm",
            "-i",
            "--network",
            "none",
            IMAGE,
            "nix-daemon",
            "--stdio",
        ])
        .args([
            "--extra-experimental-features",
            "daemon-trust-override",
            "--force-untrusted",
        ])
        .args(DAEMON_OPTS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn");
        let out = child.stdout.take().unwrap();
        let inp = child.stdin.take().unwrap();
        (Daemon { child }, out, inp)
    };
    let c = WorkerClient::handshake(out, inp).await.expect("handshake");
    assert_eq!(c.trusted(), Some(false));
    drop(c);
    let _ = d.child.wait().await;
}

// ---------------------------------------------------------------------------------------------
// Queries, AddToStoreNar, NarFromPath

async fn add_and_read_back(bed: Bed, version: ProtocolVersion) {
    let (d, mut c) = connect(bed, version).await;
    let mut logs = Vec::new();
    c.set_options(&ClientSettings::default(), &mut |e| logs.push(e))
        .await
        .expect("SetOptions");

    let tree = make_tree(&format!("add {bed:?} {version} {}", nonce()));
    let nar = dump(tree.path());
    let info = ca_path_info(&nar, "nixdock-test-add");
    let p = info.path.clone();

    assert!(!c.is_valid_path(&p, &mut discard_logs).await.unwrap());
    assert_eq!(
        c.query_path_info(&p, &mut discard_logs).await.unwrap(),
        None
    );

    // A reader that hands out the NAR in small pieces.
    let mut reader = std::io::Cursor::new(nar.clone());
    c.add_to_store_nar(&info, &mut reader, false, true, &mut |e| logs.push(e))
        .await
        .unwrap_or_else(|e| panic!("AddToStoreNar at {version}: {e}"));

    assert!(c.is_valid_path(&p, &mut discard_logs).await.unwrap());
    let valid = c
        .query_valid_paths(&BTreeSet::from([p.clone()]), false, &mut discard_logs)
        .await
        .unwrap();
    assert_eq!(valid, BTreeSet::from([p.clone()]));

    let got = c
        .query_path_info(&p, &mut discard_logs)
        .await
        .unwrap()
        .expect("valid now");
    assert_eq!(got.nar_hash, info.nar_hash);
    assert_eq!(got.nar_size, nar.len() as u64);
    assert_eq!(got.ca, info.ca);
    assert!(got.references.is_empty());
    assert!(got.registration_time > 0);

    // NarFromPath gives back exactly the NAR.
    let mut back = Vec::new();
    let summary = c
        .nar_from_path(&p, &mut back, &mut discard_logs)
        .await
        .expect("NarFromPath");
    assert_eq!(back, nar);
    assert_eq!(summary.nar_size, nar.len() as u64);
    assert_eq!(Hash::sha256(summary.nar_sha256), sha256(&nar));

    // The connection is still in step after the streamed NAR.
    c.add_temp_root(&p, &mut discard_logs).await.unwrap();
    assert!(c.is_valid_path(&p, &mut discard_logs).await.unwrap());

    if bed == Bed::Host {
        // The daemon's store really has it: nix-store agrees on the path and the NAR.
        let added = run("nix-store", &["--add", tree.path().to_str().unwrap()]);
        let added = String::from_utf8(added).unwrap();
        let dir_name = tree
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        // `nix-store --add` names the path after the directory; compare hash and NAR instead.
        let expect =
            make_fixed_output_path(ContentAddressMethod::Nar, &sha256(&nar), &dir_name).unwrap();
        assert_eq!(added.trim(), expect.to_string());
        let dumped = dump(Path::new(&p.to_string()));
        assert_eq!(
            sha256(&dumped),
            sha256(&nar),
            "nix-store --dump {p} | sha256sum"
        );
    }
    d.shutdown(c).await;
}

#[tokio::test]
async fn host_add_to_store_nar_framed_1_34() {
    if host_bed() {
        add_and_read_back(Bed::Host, ProtocolVersion::LATEST).await;
    }
}

#[tokio::test]
async fn host_add_to_store_nar_via_stderr_read_1_22() {
    if host_bed() {
        add_and_read_back(Bed::Host, ProtocolVersion::new(1, 22)).await;
    }
}

#[tokio::test]
async fn container_add_to_store_nar_1_38() {
    if container_bed() {
        add_and_read_back(Bed::Container, ProtocolVersion::LATEST).await;
    }
}

#[tokio::test]
async fn host_nar_from_path_matches_nix_store_dump() {
    if !host_bed() {
        return;
    }
    // A path that nix-store itself put there.
    let tree = make_tree(&format!("dump {}", nonce()));
    let added =
        String::from_utf8(run("nix-store", &["--add", tree.path().to_str().unwrap()])).unwrap();
    let p = StorePath::from_absolute(added.trim()).unwrap();
    let (d, mut c) = connect(Bed::Host, ProtocolVersion::LATEST).await;
    let mut nar = Vec::new();
    let s = c
        .nar_from_path(&p, &mut nar, &mut discard_logs)
        .await
        .unwrap();
    let expect = dump(Path::new(&p.to_string()));
    // Equal to `nix-store --dump <path> | sha256sum`.
    assert_eq!(s.sha256_base16(), sha256(&expect).to_base16());
    assert_eq!(s.sha256_base16(), sha256(&nar).to_base16());
    assert_eq!(nar, expect);
    let info = c
        .query_path_info(&p, &mut discard_logs)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.nar_hash, Hash::sha256(s.nar_sha256));
    assert_eq!(info.nar_hash.algo(), HashAlgo::Sha256);
    d.shutdown(c).await;
}

// ---------------------------------------------------------------------------------------------
// AddMultipleToStore

async fn add_multiple(bed: Bed) {
    let (d, mut c) = connect(bed, ProtocolVersion::LATEST).await;
    let n = nonce();
    // A: content-addressed, no references.
    let tree_a = make_tree(&format!("multi A {n}"));
    let nar_a = dump(tree_a.path());
    let a = ca_path_info(&nar_a, "nixdock-test-multi-a");
    // B: input-addressed (trusted connection, no signature check), mentions and references A.
    let tree_b = make_tree(&format!("multi B {n} uses {}", a.path));
    let nar_b = dump(tree_b.path());
    let b_path = make_store_path("output:out", &sha256(n.as_bytes()), "nixdock-test-multi-b");
    let mut b = ValidPathInfo::new(b_path.clone(), sha256(&nar_b), nar_b.len() as u64);
    b.references.insert(a.path.clone());

    let mut src = MemNars(vec![
        (a.path.clone(), nar_a.clone()),
        (b_path.clone(), nar_b.clone()),
    ]);
    let mut logs = Vec::new();
    c.add_multiple_to_store(&[a.clone(), b.clone()], &mut src, false, true, &mut |e| {
        logs.push(e)
    })
    .await
    .unwrap_or_else(|e| panic!("AddMultipleToStore: {e}"));

    let valid = c
        .query_valid_paths(
            &BTreeSet::from([a.path.clone(), b_path.clone()]),
            false,
            &mut discard_logs,
        )
        .await
        .unwrap();
    assert_eq!(valid.len(), 2);
    let got_b = c
        .query_path_info(&b_path, &mut discard_logs)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got_b.references, BTreeSet::from([a.path.clone()]));
    assert_eq!(got_b.nar_hash, sha256(&nar_b));
    assert_eq!(got_b.ca, None);
    let mut back = Vec::new();
    c.nar_from_path(&b_path, &mut back, &mut discard_logs)
        .await
        .unwrap();
    assert_eq!(back, nar_b);
    d.shutdown(c).await;
}

#[tokio::test]
async fn host_add_multiple_to_store() {
    if host_bed() {
        add_multiple(Bed::Host).await;
    }
}

#[tokio::test]
async fn container_add_multiple_to_store() {
    if container_bed() {
        add_multiple(Bed::Container).await;
    }
}

#[tokio::test]
async fn add_multiple_rejects_a_wrong_nar_size_and_stays_usable() {
    if !host_bed() {
        return;
    }
    let (d, mut c) = connect(Bed::Host, ProtocolVersion::LATEST).await;
    let tree = make_tree(&format!("bad size {}", nonce()));
    let nar = dump(tree.path());
    let mut info = ca_path_info(&nar, "nixdock-test-bad-size");
    info.nar_size += 8;
    let mut src = MemNars(vec![(info.path.clone(), nar)]);
    let err = c
        .add_multiple_to_store(
            std::slice::from_ref(&info),
            &mut src,
            false,
            true,
            &mut discard_logs,
        )
        .await
        .unwrap_err();
    assert!(matches!(err.kind(), WorkerErrorKind::Local { .. }), "{err}");
    assert!(err.to_string().contains("AddMultipleToStore"), "{err}");
    assert!(!c.is_broken(), "{err}");
    assert!(
        !c.is_valid_path(&info.path, &mut discard_logs)
            .await
            .unwrap()
    );
    d.shutdown(c).await;
}

// ---------------------------------------------------------------------------------------------
// Errors from the daemon

async fn remote_error_keeps_connection(bed: Bed) {
    let (d, mut c) = connect(bed, ProtocolVersion::LATEST).await;
    let p = make_store_path("source", &sha256(nonce().as_bytes()), "nixdock-missing");

    // Building a path nobody can produce fails with STDERR_ERROR; the connection stays usable.
    let err = c
        .build_paths(
            &[DerivedPath::Opaque(p.clone())],
            BuildMode::Normal,
            &mut discard_logs,
        )
        .await
        .unwrap_err();
    let ctx = err.ctx();
    match err.kind() {
        WorkerErrorKind::Remote { message, .. } => {
            assert!(message.contains(&p.to_string()), "{message}");
            assert_eq!(ctx.op, Some("BuildPaths"));
        }
        other => panic!("expected a remote error, got {other}"),
    }
    assert!(!c.is_broken());
    assert!(!c.is_valid_path(&p, &mut discard_logs).await.unwrap());

    // A NAR whose hash does not match narHash: the daemon rejects it after reading it all.
    let tree = make_tree(&format!("mismatch {}", nonce()));
    let nar = dump(tree.path());
    let mut info = ca_path_info(&nar, "nixdock-test-mismatch");
    info.nar_hash = sha256(b"something else");
    let err = c
        .add_to_store_nar(&info, &mut &nar[..], false, true, &mut discard_logs)
        .await
        .unwrap_err();
    assert!(err.is_remote(), "{err}");
    assert_eq!(
        err.ctx().path.as_deref(),
        Some(info.path.to_string().as_str())
    );
    assert!(!c.is_broken());
    assert!(
        !c.is_valid_path(&info.path, &mut discard_logs)
            .await
            .unwrap()
    );

    // NarFromPath of a path that is not there: the daemon has already sent STDERR_LAST, so the
    // error arrives where the NAR should be, and then the daemon hangs up.
    let mut sink = Vec::new();
    let err = c
        .nar_from_path(&p, &mut sink, &mut discard_logs)
        .await
        .unwrap_err();
    let ctx = err.ctx();
    match err.kind() {
        WorkerErrorKind::Remote { message, .. } => {
            assert!(message.contains(&p.to_string()), "{message}");
            assert_eq!(ctx.op, Some("NarFromPath"));
            assert_eq!(ctx.path.as_deref(), Some(p.to_string().as_str()));
        }
        other => panic!("expected a remote error, got {other}"),
    }
    assert!(sink.is_empty());
    assert!(c.is_broken());
    d.shutdown(c).await;
}

#[tokio::test]
async fn host_remote_error_keeps_connection() {
    if host_bed() {
        remote_error_keeps_connection(Bed::Host).await;
    }
}

#[tokio::test]
async fn container_remote_error_keeps_connection() {
    if container_bed() {
        remote_error_keeps_connection(Bed::Container).await;
    }
}

#[tokio::test]
async fn host_daemon_killed_mid_connection_is_connection_closed() {
    if !host_bed() {
        return;
    }
    let (mut d, mut c) = connect(Bed::Host, ProtocolVersion::LATEST).await;
    d.child.kill().await.unwrap();
    let p = make_store_path("source", &sha256(b"x"), "x");
    let err = c.is_valid_path(&p, &mut discard_logs).await.unwrap_err();
    assert!(err.is_connection_closed(), "{err}");
    assert!(c.is_broken());
    let err = c.is_valid_path(&p, &mut discard_logs).await.unwrap_err();
    assert!(matches!(err.kind(), WorkerErrorKind::Broken), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Building

/// Instantiates a trivial derivation on the host; returns its path and parsed form.
fn instantiate(tag: &str) -> (StorePath, Derivation) {
    let n = nonce();
    let expr = format!(
        r#"derivation {{
            name = "nixdock-test-{tag}";
            system = "x86_64-linux";
            builder = "/bin/sh";
            args = [ "-c" "echo hello-from-build; echo hi > $out" ];
            nonce = "{n}";
        }}"#
    );
    let out = run("nix-instantiate", &["-E", &expr]);
    let drv_path = String::from_utf8(out).unwrap();
    let drv_path = drv_path.trim();
    // nix-instantiate may append "!out"-less paths only; strip anything after '!'.
    let drv_path = drv_path.split('!').next().unwrap();
    let bytes = std::fs::read(drv_path).expect("read .drv");
    let drv = Derivation::parse(&bytes).expect("parse .drv");
    (StorePath::from_absolute(drv_path).unwrap(), drv)
}

async fn build_derivation(bed: Bed, version: ProtocolVersion) {
    let (drv_path, drv) = instantiate(&format!("bd-{}", version.minor()));
    let basic: BasicDerivation = drv.to_basic(None);
    let out = StorePath::from_absolute(&basic.outputs["out"].path).unwrap();
    let (d, mut c) = connect(bed, version).await;
    let mut logs = Vec::new();
    c.set_options(&ClientSettings::default(), &mut |e| logs.push(e))
        .await
        .unwrap();
    let res = c
        .build_derivation(&drv_path, &basic, BuildMode::Normal, &mut |e| logs.push(e))
        .await
        .unwrap_or_else(|e| panic!("BuildDerivation: {e}"));
    assert_eq!(res.status, BuildStatus::Built, "{res:?}\nlogs: {logs:#?}");
    assert!(res.is_success());
    let text = collect(&logs);
    assert!(
        text.contains("hello-from-build"),
        "no build log line in {logs:#?}"
    );
    if version.minor() >= 29 {
        assert_eq!(res.times_built, 1);
        assert!(
            res.start_time > 0 && res.stop_time >= res.start_time,
            "{res:?}"
        );
    }
    if version.minor() >= 28 {
        let real = res.built_outputs.get("out").expect("builtOutputs has out");
        assert_eq!(real.out_path, out);
    }
    assert!(c.is_valid_path(&out, &mut discard_logs).await.unwrap());
    let mut nar = Vec::new();
    c.nar_from_path(&out, &mut nar, &mut discard_logs)
        .await
        .unwrap();
    // A regular file containing "hi\n".
    assert!(nar.windows(3).any(|w| w == b"hi\n"));
    d.shutdown(c).await;
}

#[tokio::test]
async fn host_build_derivation() {
    if host_bed() {
        build_derivation(Bed::Host, ProtocolVersion::LATEST).await;
    }
}

#[tokio::test]
async fn host_build_derivation_1_27_has_no_times() {
    if host_bed() {
        build_derivation(Bed::Host, ProtocolVersion::new(1, 27)).await;
    }
}

#[tokio::test]
async fn container_build_derivation() {
    if host_bed() && container_bed() {
        build_derivation(Bed::Container, ProtocolVersion::LATEST).await;
    }
}

/// The untrusted-remote route: copy the .drv into the store, then BuildPathsWithResults.
async fn build_paths_with_results(bed: Bed) {
    let (drv_path, drv) = instantiate("bpwr");
    let out = StorePath::from_absolute(&drv.outputs["out"].path).unwrap();
    let (d, mut c) = connect(bed, ProtocolVersion::LATEST).await;
    if bed == Bed::Container {
        // The container's store lacks the .drv: add it (text-hashed, no references).
        let nar = dump(Path::new(&drv_path.to_string()));
        let file = std::fs::read(drv_path.to_string()).unwrap();
        let mut info = ValidPathInfo::new(drv_path.clone(), sha256(&nar), nar.len() as u64);
        info.ca = Some(format!("text:sha256:{}", sha256(&file).to_nix32()));
        c.add_to_store_nar(&info, &mut &nar[..], false, false, &mut discard_logs)
            .await
            .unwrap_or_else(|e| panic!("adding the .drv: {e}"));
    }
    let want = vec![DerivedPath::Built {
        drv_path: drv_path.clone(),
        outputs: OutputsSpec::All,
    }];
    let missing = c.query_missing(&want, &mut discard_logs).await.unwrap();
    assert!(missing.will_build.contains(&drv_path), "{missing:?}");

    let mut logs = Vec::new();
    let results = c
        .build_paths_with_results(&want, BuildMode::Normal, &mut |e| logs.push(e))
        .await
        .unwrap_or_else(|e| panic!("BuildPathsWithResults: {e}"));
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].path, want[0]);
    assert_eq!(results[0].result.status, BuildStatus::Built, "{results:?}");
    assert_eq!(results[0].result.built_outputs["out"].out_path, out);
    assert!(collect(&logs).contains("hello-from-build"), "{logs:#?}");

    let again = c
        .build_paths_with_results(&want, BuildMode::Normal, &mut discard_logs)
        .await
        .unwrap();
    assert_eq!(again[0].result.status, BuildStatus::AlreadyValid);
    c.build_paths(
        &[DerivedPath::Opaque(out.clone())],
        BuildMode::Normal,
        &mut discard_logs,
    )
    .await
    .unwrap();
    d.shutdown(c).await;
}

#[tokio::test]
async fn host_build_paths_with_results() {
    if host_bed() {
        build_paths_with_results(Bed::Host).await;
    }
}

#[tokio::test]
async fn container_build_paths_with_results() {
    if host_bed() && container_bed() {
        build_paths_with_results(Bed::Container).await;
    }
}

#[tokio::test]
async fn container_failed_build_is_a_result_not_an_error() {
    if !(host_bed() && container_bed()) {
        return;
    }
    let (drv_path, drv) = instantiate("fail");
    let mut basic = drv.to_basic(None);
    basic.args = vec!["-c".into(), "echo about-to-fail; exit 3".into()];
    let (d, mut c) = connect(Bed::Container, ProtocolVersion::LATEST).await;
    let mut logs = Vec::new();
    let res = c
        .build_derivation(&drv_path, &basic, BuildMode::Normal, &mut |e| logs.push(e))
        .await
        .unwrap();
    assert!(!res.is_success(), "{res:?}");
    assert!(res.error_msg.contains("exit code 3"), "{res:?}");
    assert!(collect(&logs).contains("about-to-fail"));
    // Still usable.
    assert!(
        !c.is_valid_path(
            &StorePath::from_absolute(&basic.outputs["out"].path).unwrap(),
            &mut discard_logs
        )
        .await
        .unwrap()
    );
    d.shutdown(c).await;
}
