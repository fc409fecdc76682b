//! The default builder image (issue 17): with no image configured, the hook uses the official
//! `nixos/nix` image, pulling it through the engine on the first build and showing the pull as
//! Nix progress. Tested against the test bed's local registry with an image laid out like
//! nixos/nix (`nixdock-test/nixos-nix`), pointed to through `NIXDOCK_DEFAULT_IMAGE`: a real
//! `nix-build`, the real hook, a real pull.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{InstanceCleanup, REGISTRY, docker, docker_ok, image, output_text as text};
use nixdock::builder::provision::DEFAULT_IMAGE_ENV;
use nixdock::state::StateDir;

const HOOK: &str = env!("CARGO_BIN_EXE_nixdock-hook");

/// A nixdock installation of its own (config without an image, state dir), removed with its
/// builders and volumes when dropped.
struct Install {
    dir: tempfile::TempDir,
    _cleanup: InstanceCleanup,
}

impl Install {
    fn new() -> Install {
        Install::with_config("[builders.\"x86_64-linux\"]\nidle-timeout = 120\n")
    }

    fn with_config(config: &str) -> Install {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nixdock.toml"), config).unwrap();
        let id = StateDir::open(dir.path().join("state"))
            .unwrap()
            .instance_id()
            .unwrap();
        Install {
            dir,
            _cleanup: InstanceCleanup(id),
        }
    }

    /// `nix-build` of a trivial x86_64-linux derivation through the hook (`--max-jobs 0`, so the
    /// hook gets it), with `default_image` as the default image and Nix's JSON log on stderr.
    fn build(&self, default_image: &str, limit: Duration) -> Output {
        self.build_for("x86_64-linux", "echo pulled > $out", default_image, limit)
    }

    /// The same for `system`, with `script` as the builder's.
    fn build_for(
        &self,
        system: &str,
        script: &str,
        default_image: &str,
        limit: Duration,
    ) -> Output {
        let expr = format!(
            "derivation {{ name = \"default-image\"; system = \"{system}\"; \
             builder = \"/bin/sh\"; args = [\"-c\" {script:?}]; nonce = \"{}\"; }}",
            common::unique_name("n")
        );
        let mut cmd = Command::new("nix-build");
        cmd.args(["--no-out-link", "-E", &expr])
            .args(["--option", "build-hook", HOOK, "--max-jobs", "0"])
            .args(["--log-format", "internal-json"])
            .env("NIXDOCK_CONFIG", self.dir.path().join("nixdock.toml"))
            .env("NIXDOCK_STATE_DIR", self.dir.path().join("state"))
            .env(DEFAULT_IMAGE_ENV, default_image);
        common::run_with_timeout(cmd, limit).expect("nix-build ran")
    }
}

/// Removes an image tag this test made (`docker rmi`) when dropped, and the tags nixdock keeps
/// it under per platform.
struct ImageGuard(String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        docker(["rmi", "-f", &self.0]);
        for p in ["linux-amd64", "linux-arm64"] {
            docker(["rmi", &format!("{}-nixdock-{p}", self.0)]);
        }
    }
}

/// Nix's `@nix` events from a `--log-format internal-json` run's stderr.
fn events(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter_map(|l| l.strip_prefix("@nix "))
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect()
}

/// The first build with no image configured pulls the default image from its registry for
/// linux/amd64, builds in it, and shows the pull as an `actFileTransfer` (101) activity whose
/// progress counts the bytes over the layers (what `nix build`'s bar sums as "MiB DL").
#[test]
fn first_build_pulls_the_default_image_and_shows_the_pull() {
    if !common::require_bed() {
        return;
    }
    // An image laid out like nixos/nix with a layer of its own (random, so incompressible) that
    // no image on the engine has: its bytes must come over from the registry.
    const PAYLOAD: u64 = 6_000_000;
    let reference = format!(
        "{REGISTRY}/nixdock-test/{}:pull",
        common::unique_name("pull")
    );
    let _image = ImageGuard(reference.clone());
    let dockerfile = format!(
        "FROM {}\nRUN head -c {PAYLOAD} /dev/urandom > /pull-payload\n",
        image("nixos-nix")
    );
    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("Dockerfile"), dockerfile).unwrap();
    let mut build = Command::new("docker");
    build
        .args(["build", "-q", "-t", &reference])
        .arg(context.path())
        .env("DOCKER_BUILDKIT", "0");
    let o = common::run_with_timeout(build, Duration::from_secs(300)).expect("docker build ran");
    assert!(o.status.success(), "docker build: {}", text(&o));
    docker_ok(["push", &reference]);
    docker_ok(["rmi", &reference]);
    assert!(
        !docker(["image", "inspect", &reference]).status.success(),
        "{reference} is still on the engine"
    );

    let install = Install::new();
    let t = Instant::now();
    let o = install.build(&reference, Duration::from_secs(600));
    let took = t.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    eprintln!("first build with a pull: {took:?}");
    // Pulled, for the system's platform.
    let arch = docker_ok([
        "image",
        "inspect",
        "-f",
        "{{.Os}}/{{.Architecture}}",
        &reference,
    ]);
    assert_eq!(arch.trim(), "linux/amd64");

    let ev = events(&o);
    let start = ev
        .iter()
        .find(|e| {
            e["action"] == "start" && e["type"] == 101 && e["fields"][0] == reference.as_str()
        })
        .unwrap_or_else(|| panic!("no download activity for {reference}:\n{}", text(&o)));
    let text_of = start["text"].as_str().unwrap_or("");
    assert!(
        text_of.contains("pulling builder image") && text_of.contains("linux/amd64"),
        "{start}"
    );
    let progress: Vec<(u64, u64)> = ev
        .iter()
        .filter(|e| e["action"] == "result" && e["type"] == 105 && e["id"] == start["id"])
        .map(|e| {
            (
                e["fields"][0].as_u64().unwrap(),
                e["fields"][1].as_u64().unwrap(),
            )
        })
        .collect();
    let (done, expected) = *progress
        .last()
        .unwrap_or_else(|| panic!("no progress on the pull:\n{}", text(&o)));
    eprintln!(
        "pull progress: {} updates, last {done}/{expected} bytes",
        progress.len()
    );
    // The registry stores the layer gzipped; random bytes do not shrink.
    assert!(
        expected >= PAYLOAD,
        "expected {expected} bytes: {progress:?}"
    );
    assert_eq!(done, expected, "{progress:?}");
    assert!(
        ev.iter()
            .any(|e| e["action"] == "stop" && e["id"] == start["id"]),
        "the pull's activity never stopped"
    );
}

/// A pull that cannot succeed fails the build at once with a message naming the image and
/// the registry: a tag the registry does not have, and a registry that does not answer.
#[test]
fn a_failed_pull_fails_the_build_naming_image_and_registry() {
    if !common::require_bed() {
        return;
    }
    // A loopback port nobody listens on.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cases = [
        (
            format!("{REGISTRY}/nixos/nix:no-such-tag-{}", std::process::id()),
            REGISTRY.to_string(),
        ),
        (
            format!("127.0.0.1:{down}/nixos/nix:2.28.3"),
            format!("127.0.0.1:{down}"),
        ),
    ];
    for (reference, registry) in cases {
        let install = Install::new();
        let t = Instant::now();
        let o = install.build(&reference, Duration::from_secs(180));
        let took = t.elapsed();
        assert!(!o.status.success(), "{reference}: {}", text(&o));
        assert!(
            took < Duration::from_secs(60),
            "{reference}: failed only after {took:?}"
        );
        let all = text(&o);
        let wanted = format!(
            "cannot pull the builder image {reference} for x86_64-linux (linux/amd64) from registry {registry}:"
        );
        assert!(
            all.contains(&wanted),
            "{reference}: no {wanted:?} in\n{all}"
        );
        eprintln!("{reference}: failed in {took:?}");
    }
}

/// One multi-platform default image (a manifest list, as nixos/nix is) serves an x86_64-linux
/// and an aarch64-linux builder on one engine: each is pulled for its own platform and kept
/// under a local tag of its own, so neither builder takes the other's architecture.
#[test]
fn one_multi_platform_default_image_serves_each_system_its_architecture() {
    if !common::require_bed() {
        return;
    }
    let repo = format!("{REGISTRY}/nixdock-test/{}", common::unique_name("multi"));
    let (amd, arm, list) = (
        format!("{repo}:amd64"),
        format!("{repo}:arm64"),
        format!("{repo}:multi"),
    );
    let _guards = [
        ImageGuard(amd.clone()),
        ImageGuard(arm.clone()),
        ImageGuard(list.clone()),
    ];
    docker_ok(["tag", &image("nixos-nix"), &amd]);
    docker_ok(["tag", &image("bookworm-arm64"), &arm]);
    docker_ok(["push", &amd]);
    docker_ok(["push", &arm]);
    // `docker import` labels the arm64 image amd64: the list says what each entry is for.
    docker_ok(["manifest", "create", "--insecure", &list, &amd, &arm]);
    docker_ok([
        "manifest", "annotate", "--os", "linux", "--arch", "amd64", &list, &amd,
    ]);
    docker_ok([
        "manifest", "annotate", "--os", "linux", "--arch", "arm64", &list, &arm,
    ]);
    docker_ok(["manifest", "push", "--insecure", "--purge", &list]);
    docker_ok(["rmi", &amd, &arm]);

    let install = Install::with_config(
        "[builders.\"x86_64-linux\"]\nidle-timeout = 120\n\
         [builders.\"aarch64-linux\"]\nidle-timeout = 120\nemulation = \"container\"\n",
    );
    let script = "PATH=/bin:/usr/bin:/nix/var/nix/profiles/default/bin; uname -m > $out";
    let id_of = |r: &str| {
        docker_ok(["image", "inspect", "-f", "{{.Id}}", r])
            .trim()
            .to_string()
    };
    for (system, machine, platform, from) in [
        ("aarch64-linux", "aarch64", "linux-arm64", "bookworm-arm64"),
        ("x86_64-linux", "x86_64", "linux-amd64", "nixos-nix"),
    ] {
        let o = install.build_for(system, script, &list, Duration::from_secs(600));
        assert!(o.status.success(), "{system}: {}", text(&o));
        let out = common::out_path(&o);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            machine,
            "{system}"
        );
        assert_eq!(
            id_of(&format!("{list}-nixdock-{platform}")),
            id_of(&image(from)),
            "{system}: the image kept for {platform}"
        );
    }
    // Both builders still run their own architecture's image.
    let o = install.build_for("aarch64-linux", script, &list, Duration::from_secs(600));
    assert!(o.status.success(), "{}", text(&o));
    let out = common::out_path(&o);
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "aarch64");
}
