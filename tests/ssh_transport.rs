//! The SSH transport against a real OpenSSH sshd (no mocks).
//!
//! Each test starts its own sshd on 127.0.0.1 with a host key from
//! `generate_host_key()` and an authorized_keys holding a client key from
//! `load_or_create_client_key()`. Needs root and `/usr/sbin/sshd` (Debian's
//! `openssh-server`, installed by scripts/testbed): without it the tests fail
//! when `CI` is set and are skipped otherwise.
//!
//! Timings are printed, not asserted: run with `--release -- --nocapture` to see them.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixdock::transport::keys::fingerprint;
use nixdock::transport::{
    ClientKey, ConnectPhase, ExecChannel, ExitStatus, HostKey, PublicKey, SshError, SshSession,
    connect, generate_host_key, load_or_create_client_key,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SSHD: &str = "/usr/sbin/sshd";
const TIMEOUT: Duration = Duration::from_secs(10);

/// A private sshd for one test; killed on drop.
struct Sshd {
    child: Child,
    addr: SocketAddr,
    host_key: HostKey,
    client_key: ClientKey,
    dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an sshd, or returns `None` (test skipped) when the bed lacks one and CI is unset.
fn sshd() -> Option<Sshd> {
    let missing = if !Path::new(SSHD).exists() {
        Some(format!("{SSHD} not found (package openssh-server)"))
    } else if !is_root() {
        Some("these tests must run as root (sshd logs in as root)".to_owned())
    } else {
        None
    };
    if let Some(why) = missing {
        if std::env::var_os("CI").is_some() {
            panic!("test bed missing: run scripts/testbed ({why})");
        }
        eprintln!("SKIPPED: {why}; run scripts/testbed");
        return None;
    }

    // Debian's sshd refuses to start without its privilege separation directory.
    std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");

    let dir = tempfile::tempdir().unwrap();
    let host_key = generate_host_key().unwrap();
    let client_key = load_or_create_client_key(&dir.path().join("state")).unwrap();
    let host_key_file = dir.path().join("host_ed25519");
    write_private(&host_key_file, host_key.private_openssh());
    let authorized = dir.path().join("authorized_keys");
    std::fs::write(&authorized, format!("{}\n", client_key.public_openssh())).unwrap();

    let port = free_port();
    let config = dir.path().join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {}\n\
             AuthorizedKeysFile {}\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             PidFile none\n\
             LogLevel ERROR\n",
            host_key_file.display(),
            authorized.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("sshd.log")).unwrap();
    let child = Command::new(SSHD)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start sshd");
    let mut sshd = Sshd {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        host_key,
        client_key,
        dir,
    };
    let start = Instant::now();
    loop {
        if std::net::TcpStream::connect(sshd.addr).is_ok() {
            break;
        }
        if let Some(status) = sshd.child.try_wait().unwrap() {
            panic!("sshd exited ({status}): {}", sshd.log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sshd did not listen: {}",
            sshd.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(sshd)
}

impl Sshd {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    fn pinned(&self) -> &PublicKey {
        self.host_key.public_key()
    }

    async fn connect(&self) -> SshSession {
        match connect(self.addr, "root", &self.client_key, self.pinned(), TIMEOUT).await {
            Ok(s) => s,
            Err(e) => panic!("connect: {e}\nsshd log:\n{}", self.log()),
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Deterministic pseudo-random bytes (xorshift64*), fast enough for hundreds of MB.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Runs a command with no input; returns (stdout, stderr, exit status).
async fn run(session: &SshSession, command: &str) -> (Vec<u8>, Vec<u8>, ExitStatus) {
    let ExecChannel {
        mut stdin,
        mut stdout,
        mut stderr,
        exit,
    } = session.exec(command).await.expect("exec");
    stdin.shutdown().await.unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (a, b) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
    a.unwrap();
    b.unwrap();
    (out, err, exit.wait().await.expect("exit status"))
}

/// Pipes `data` through remote `cat`, writing and reading concurrently; returns the sha of what came back.
async fn cat_round_trip(session: &SshSession, data: std::sync::Arc<Vec<u8>>) -> (usize, String) {
    let ExecChannel {
        mut stdin,
        mut stdout,
        stderr: _,
        exit,
    } = session.exec("cat").await.expect("exec cat");
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(1 << 20) {
            stdin.write_all(chunk).await.unwrap();
        }
        stdin.shutdown().await.unwrap();
    });
    let mut hasher = Sha256::new();
    let mut total = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stdout.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n;
    }
    writer.await.unwrap();
    assert_eq!(exit.wait().await.unwrap(), ExitStatus::Exited(0));
    (total, format!("{:x}", hasher.finalize()))
}

#[tokio::test]
async fn echo_hi_and_connect_latency() {
    let Some(sshd) = sshd() else { return };
    let t = Instant::now();
    let session = sshd.connect().await;
    let connect_time = t.elapsed();
    let t = Instant::now();
    let (out, err, status) = run(&session, "echo hi").await;
    let exec_time = t.elapsed();
    assert_eq!(out, b"hi\n");
    assert_eq!(err, b"");
    assert_eq!(status, ExitStatus::Exited(0));
    assert!(status.success());

    // A second connection, warm, for a steadier figure.
    let t = Instant::now();
    let again = sshd.connect().await;
    let connect_again = t.elapsed();
    let t = Instant::now();
    let (out, _, _) = run(&again, "true").await;
    let exec_again = t.elapsed();
    assert!(out.is_empty());
    println!(
        "MEASURE connect (tcp+kex+auth): {:.1} ms, then {:.1} ms; exec `echo hi` to exit: {:.1} ms, `true`: {:.1} ms",
        connect_time.as_secs_f64() * 1e3,
        connect_again.as_secs_f64() * 1e3,
        exec_time.as_secs_f64() * 1e3,
        exec_again.as_secs_f64() * 1e3
    );
    session.close().await.unwrap();
}

#[tokio::test]
async fn cat_round_trips_50_mb() {
    let Some(sshd) = sshd() else { return };
    let session = sshd.connect().await;
    let data = std::sync::Arc::new(random_bytes(50 * 1000 * 1000, 0x5eed));
    let want = sha(&data);
    let t = Instant::now();
    let (len, got) = cat_round_trip(&session, data.clone()).await;
    let elapsed = t.elapsed();
    assert_eq!(len, data.len());
    assert_eq!(got, want);
    println!(
        "MEASURE cat round trip 50 MB: {:.2} s ({:.0} MB/s each way)",
        elapsed.as_secs_f64(),
        50.0 / elapsed.as_secs_f64()
    );
}

#[tokio::test]
async fn stderr_and_exit_code_come_through() {
    let Some(sshd) = sshd() else { return };
    let session = sshd.connect().await;
    let (out, err, status) = run(&session, "sh -c 'echo out; echo oops >&2; exit 3'").await;
    assert_eq!(out, b"out\n");
    assert_eq!(err, b"oops\n");
    assert_eq!(status, ExitStatus::Exited(3));
    assert_eq!(status.code(), Some(3));
    assert!(!status.success());
}

#[tokio::test]
async fn signal_is_reported() {
    let Some(sshd) = sshd() else { return };
    let session = sshd.connect().await;
    let (_, _, status) = run(&session, "sh -c 'kill -KILL $$'").await;
    match status {
        ExitStatus::Signaled { signal, .. } => assert_eq!(signal, "KILL"),
        other => panic!("expected a signal, got {other:?}"),
    }
}

#[tokio::test]
async fn wrong_host_key_is_refused_before_anything_runs() {
    let Some(sshd) = sshd() else { return };
    let marker = sshd.dir.path().join("ran");
    let wrong = generate_host_key().unwrap();
    let err = connect(
        sshd.addr,
        "root",
        &sshd.client_key,
        wrong.public_key(),
        TIMEOUT,
    )
    .await
    .expect_err("must not connect with a wrong pinned key");
    match &err {
        SshError::HostKeyMismatch { expected, got, .. } => {
            assert_eq!(*expected, fingerprint(wrong.public_key()));
            assert_eq!(*got, fingerprint(sshd.pinned()));
        }
        other => panic!("expected HostKeyMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("re-provision"), "{err}");
    // Nothing could have been executed: no session exists; and the right key still works.
    assert!(!marker.exists());
    let session = sshd.connect().await;
    let (_, _, status) = run(&session, &format!("touch {}", marker.display())).await;
    assert!(status.success());
    assert!(marker.exists());
}

#[tokio::test]
async fn unauthorized_client_key_fails_auth_naming_the_key_file() {
    let Some(sshd) = sshd() else { return };
    let other_dir = sshd.dir.path().join("other-state");
    let stranger = load_or_create_client_key(&other_dir).unwrap();
    let err = connect(sshd.addr, "root", &stranger, sshd.pinned(), TIMEOUT)
        .await
        .expect_err("unauthorized key must fail");
    assert!(matches!(err, SshError::AuthFailed { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&other_dir.join("client_ed25519").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("authorized_keys"), "{msg}");
}

#[tokio::test]
async fn refused_port_fails_fast_and_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let key = load_or_create_client_key(dir.path()).unwrap();
    let host = generate_host_key().unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let t = Instant::now();
    let err = connect(addr, "root", &key, host.public_key(), TIMEOUT)
        .await
        .expect_err("nothing listens");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(err, SshError::ConnectionRefused { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("is the builder running?"), "{msg}");
    assert!(msg.contains(&addr.port().to_string()), "{msg}");
}

#[tokio::test]
async fn silent_server_times_out_in_key_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let key = load_or_create_client_key(dir.path()).unwrap();
    let host = generate_host_key().unwrap();
    // Accepts, never speaks (like a wedged container behind a published port).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let t = Instant::now();
    let err = connect(
        addr,
        "root",
        &key,
        host.public_key(),
        Duration::from_millis(300),
    )
    .await
    .expect_err("must time out");
    assert!(t.elapsed() < Duration::from_secs(2));
    match err {
        SshError::Timeout { phase, .. } => assert_eq!(phase, ConnectPhase::KeyExchange),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn server_hanging_up_during_handshake_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let key = load_or_create_client_key(dir.path()).unwrap();
    let host = generate_host_key().unwrap();
    // Accepts and closes at once, as docker-proxy does when the container's sshd is not up.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    let err = connect(addr, "root", &key, host.public_key(), TIMEOUT)
        .await
        .expect_err("must fail");
    assert!(
        matches!(err, SshError::ClosedDuringHandshake { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn two_concurrent_exec_channels_on_one_session() {
    let Some(sshd) = sshd() else { return };
    let session = std::sync::Arc::new(sshd.connect().await);
    let a = std::sync::Arc::new(random_bytes(8 << 20, 1));
    let b = std::sync::Arc::new(random_bytes(8 << 20, 2));
    let (want_a, want_b) = (sha(&a), sha(&b));
    let (s1, s2) = (session.clone(), session.clone());
    let (ra, rb) = tokio::join!(
        tokio::spawn(async move { cat_round_trip(&s1, a).await }),
        tokio::spawn(async move { cat_round_trip(&s2, b).await }),
    );
    assert_eq!(ra.unwrap().1, want_a);
    assert_eq!(rb.unwrap().1, want_b);

    // A slow command does not hold up a fast one on the same session: the fast one
    // finishes first (ordering, not absolute times, which a loaded machine stretches).
    let t = Instant::now();
    let slow = async {
        let r = run(&session, "sh -c 'sleep 3; echo slow'").await;
        (r, t.elapsed())
    };
    let fast = async {
        let r = run(&session, "echo fast").await;
        (r, t.elapsed())
    };
    let (((slow_out, _, _), slow_time), ((fast_out, _, _), fast_time)) = tokio::join!(slow, fast);
    assert_eq!(slow_out, b"slow\n");
    assert_eq!(fast_out, b"fast\n");
    assert!(
        fast_time < slow_time,
        "fast command took {fast_time:?}, slow one {slow_time:?}"
    );
}

#[tokio::test]
async fn dropping_stdin_sends_eof() {
    let Some(sshd) = sshd() else { return };
    let session = sshd.connect().await;
    let ExecChannel {
        mut stdin,
        mut stdout,
        exit,
        ..
    } = session.exec("cat").await.unwrap();
    stdin.write_all(b"bye").await.unwrap();
    drop(stdin);
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stdout.read_to_end(&mut out))
        .await
        .expect("EOF reached the remote cat")
        .unwrap();
    assert_eq!(out, b"bye");
    assert!(exit.wait().await.unwrap().success());
}

#[tokio::test]
async fn a_running_channel_outlives_its_dropped_session() {
    let Some(sshd) = sshd() else { return };
    let session = sshd.connect().await;
    let ExecChannel {
        stdin,
        mut stdout,
        exit,
        ..
    } = session.exec("sh -c 'sleep 0.5; echo late'").await.unwrap();
    drop(session);
    drop(stdin);
    let mut out = Vec::new();
    stdout.read_to_end(&mut out).await.unwrap();
    assert_eq!(out, b"late\n");
    assert!(exit.wait().await.unwrap().success());
}

#[tokio::test]
async fn writing_to_an_exited_command_fails_instead_of_hanging() {
    let Some(sshd) = sshd() else { return };
    let session = sshd.connect().await;
    let ExecChannel {
        mut stdin,
        stdout,
        exit,
        ..
    } = session.exec("head -c 10 >/dev/null").await.unwrap();
    drop(stdout);
    let data = vec![0u8; 64 << 20];
    let result = tokio::time::timeout(Duration::from_secs(10), stdin.write_all(&data))
        .await
        .expect("the writer must not hang once the channel is closed");
    let err = result.expect_err("the command stopped reading");
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    assert!(exit.wait().await.unwrap().success());
}

#[tokio::test]
async fn throughput_256_mb_into_dev_null() {
    let Some(sshd) = sshd() else { return };
    let session = sshd.connect().await;
    let mb: usize = if cfg!(debug_assertions) { 32 } else { 256 };
    let chunk = random_bytes(1 << 20, 7);
    let ExecChannel {
        mut stdin, exit, ..
    } = session.exec("cat > /dev/null").await.unwrap();
    let t = Instant::now();
    for _ in 0..mb {
        stdin.write_all(&chunk).await.unwrap();
    }
    stdin.shutdown().await.unwrap();
    assert!(exit.wait().await.unwrap().success());
    let elapsed = t.elapsed();
    println!(
        "MEASURE throughput ({} build) {mb} MiB into `cat > /dev/null`: {:.2} s = {:.0} MiB/s",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        elapsed.as_secs_f64(),
        mb as f64 / elapsed.as_secs_f64()
    );
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<ExecChannel>();
    is_send::<SshSession>();
    fn is_sync<T: Sync>() {}
    is_sync::<SshSession>();
}
