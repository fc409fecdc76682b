//! Builder stores (issue 17): `max-store-size` makes the builder collect garbage once its store
//! holds more, after the build that filled it (never delaying its result), and `nixdock status`
//! shows the store's size, the limit and this host's free space. Real nix-build, hook and
//! builder container.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{InstanceCleanup, docker, image, output_text as text};
use nixdock::state::StateDir;

const HOOK: &str = env!("CARGO_BIN_EXE_nixdock-hook");
const NIXDOCK: &str = env!("CARGO_BIN_EXE_nixdock");

/// The store size (KiB) `du` counts in the builder.
fn store_kib(container: &str) -> u64 {
    let o = docker(["exec", container, "du", "-sk", "/nix/store"]);
    assert!(o.status.success(), "du in {container}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("du said {}", text(&o)))
}

#[test]
fn a_store_over_max_store_size_is_collected_after_the_build() {
    if !common::require_bed() {
        return;
    }
    const LIMIT_MIB: u64 = 20;
    const OUTPUT: u64 = 30_000_000;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nixdock.toml");
    std::fs::write(
        &config,
        format!(
            "[builders.\"x86_64-linux\"]\nimage = \"{}\"\nidle-timeout = 300\n\
             max-store-size = \"{LIMIT_MIB}M\"\n",
            image("bookworm-amd64")
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let id = StateDir::open(&state).unwrap().instance_id().unwrap();
    let _cleanup = InstanceCleanup(id.clone());
    let container = format!("nixdock-{id}-x86_64-linux");

    // One output larger than the limit: it is built and copied back in full, then the builder
    // (which has no root for it) collects it. With an input, which the hook makes a temporary
    // root in the builder before asking whether it is there (the builder collects by itself).
    let input_file = dir.path().join("input");
    std::fs::write(&input_file, common::unique_name("input")).unwrap();
    let o = Command::new("nix-store")
        .args(["--add"])
        .arg(&input_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let input = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let expr = format!(
        "derivation {{ name = \"big\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
         input = builtins.storePath \"{input}\"; \
         args = [\"-c\" \"/usr/bin/head -c {OUTPUT} /dev/urandom > $out\"]; nonce = \"{}\"; }}",
        common::unique_name("n")
    );
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "-E", &expr])
        .args(["--option", "build-hook", HOOK, "--max-jobs", "0"])
        .env("NIXDOCK_CONFIG", &config)
        .env("NIXDOCK_STATE_DIR", &state);
    let o = common::run_with_timeout(cmd, Duration::from_secs(600)).expect("nix-build ran");
    assert!(o.status.success(), "{}", text(&o));
    let out = common::out_path(&o);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), OUTPUT, "{out}");

    let t = Instant::now();
    let limit_kib = LIMIT_MIB * 1024;
    let logs_of = || {
        let l = docker(["logs", &container]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&l.stdout),
            String::from_utf8_lossy(&l.stderr)
        )
    };
    // Until the store is under the limit and the collection has said so (its line comes once
    // `nix-store --gc` has ended, after the paths are gone).
    let mut kib = store_kib(&container);
    let mut logs = logs_of();
    while (kib > limit_kib || !logs.contains("garbage collected"))
        && t.elapsed() < Duration::from_secs(90)
    {
        std::thread::sleep(Duration::from_secs(1));
        kib = store_kib(&container);
        logs = logs_of();
    }
    assert!(
        kib <= limit_kib,
        "the store still holds {kib} KiB after {:?} (limit {limit_kib} KiB); builder log:\n{logs}",
        t.elapsed()
    );
    assert!(
        logs.contains("more than max-store-size") && logs.contains("garbage collected"),
        "{logs}"
    );
    eprintln!("store down to {kib} KiB {:?} after the build", t.elapsed());

    // status: the store's size, the limit, and the host's free space.
    let o = Command::new(NIXDOCK)
        .args(["status", "--json"])
        .env("NIXDOCK_CONFIG", &config)
        .env("NIXDOCK_STATE_DIR", &state)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let b = r["builders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["system"] == "x86_64-linux")
        .unwrap_or_else(|| panic!("{r}"));
    assert_eq!(b["max_store_bytes"], LIMIT_MIB << 20, "{b}");
    let size = b["store_bytes"].as_u64().unwrap_or_else(|| panic!("{b}"));
    assert!(size <= LIMIT_MIB << 20, "{b}");
    let free = r["free"].as_array().unwrap();
    let f = free
        .iter()
        .find(|f| f["path"] == "/nix/store")
        .unwrap_or_else(|| panic!("no free space for /nix/store: {r}"));
    assert!(f["free_bytes"].as_u64().unwrap() > 0, "{f}");
    assert!(
        free.iter().any(|f| f["what"] == "builder volumes"),
        "no free space for the engine's volumes: {r}"
    );
    let table = Command::new(NIXDOCK)
        .arg("status")
        .env("NIXDOCK_CONFIG", &config)
        .env("NIXDOCK_STATE_DIR", &state)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("FREE: ")
            && table.contains("max-store-size (garbage collected above it): x86_64-linux"),
        "{table}"
    );
}

/// This installation's volumes on the host engine.
fn volumes(instance: &str) -> Vec<String> {
    let o = docker([
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=nixdock.instance={instance}"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// When a builder's image changes, its new container gets a new `/nix` volume; the old one
/// stays for the grace period (going back to the image finds its store) and is removed by the
/// first cold start after it, without `nixdock gc`.
#[test]
fn volumes_of_replaced_images_go_after_the_grace_period() {
    if !common::require_bed() {
        return;
    }
    const GRACE_SECS: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nixdock.toml");
    let state = dir.path().join("state");
    let id = StateDir::open(&state).unwrap().instance_id().unwrap();
    let _cleanup = InstanceCleanup(id.clone());
    let container = format!("nixdock-{id}-x86_64-linux");
    let build = |img: &str| {
        std::fs::write(
            &config,
            format!(
                "[builders.\"x86_64-linux\"]\nimage = \"{}\"\nidle-timeout = 300\n",
                image(img)
            ),
        )
        .unwrap();
        let expr = format!(
            "derivation {{ name = \"v\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; \
             args = [\"-c\" \"echo hi > $out\"]; nonce = \"{}\"; }}",
            common::unique_name("n")
        );
        let mut cmd = Command::new("nix-build");
        cmd.args(["--no-out-link", "-E", &expr])
            .args(["--option", "build-hook", HOOK, "--max-jobs", "0"])
            .env("NIXDOCK_CONFIG", &config)
            .env("NIXDOCK_STATE_DIR", &state)
            .env(
                nixdock::builder::lifecycle::REPLACED_VOLUME_GRACE_ENV,
                GRACE_SECS.to_string(),
            );
        let o = common::run_with_timeout(cmd, Duration::from_secs(600)).expect("nix-build ran");
        assert!(o.status.success(), "{img}: {}", text(&o));
    };
    build("bookworm-amd64");
    let first = volumes(&id);
    assert_eq!(first.len(), 1, "{first:?}");
    // A new image: a new container on a new volume; the old volume is kept for now.
    build("bookworm-amd64-nobld");
    let both = volumes(&id);
    assert_eq!(both.len(), 2, "{both:?}");
    assert!(both.contains(&first[0]), "{both:?}");
    // After the grace period, the next cold start removes it.
    std::thread::sleep(Duration::from_secs(GRACE_SECS + 1));
    docker(["stop", "-t", "5", &container]);
    build("bookworm-amd64-nobld");
    let after = volumes(&id);
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(!after.contains(&first[0]), "{after:?}");
}
