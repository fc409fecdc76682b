//! `nixdock status`: one line per builder (configured systems plus any container of this
//! installation), fitting an 80-column terminal, or JSON.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::builder::{Engine, slots};

use super::Env;
use super::engines::{self, EngineRow};
use super::{
    builders::{self, Row},
    containers::{self, Existing},
    format, timestamps,
};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Columns:
  STATE   the container's state: running, exited, created, … or absent
          (none yet: the first build for the system creates it)
  UPTIME  time since the container started
  PORT    the loopback port the engine published for the builder's sshd
  STORE   disk usage of /nix/store on the builder's /nix volume, counted on
          the volume's directory when this machine can read it (a local
          engine, as root; no symlink in the volume is followed), else with
          `du -sk /nix/store` inside a running builder; `-` when neither is
          possible
          (a builder with max-store-size collects garbage above it; the
          limits follow the table, with this host's free space: where the
          engine keeps its volumes, for a local engine, and in /nix/store)
  BUILDS  builds running now / build slots (max-jobs)
  SANDBOX whether builds run in Nix's sandbox (`?`: decided when the
          container is created); the reasons follow the table
A `*` after the system marks a container that the config no longer names.")]
pub struct Args {
    /// Print JSON instead of the table
    #[arg(long)]
    pub json: bool,
    /// Don't measure store sizes (slow for big stores)
    #[arg(long)]
    pub no_size: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    instance: String,
    state_dir: String,
    config: String,
    /// The top-level (default) engine, when it answered.
    engine: Option<EngineInfo>,
    /// Set when any engine of the pool did not answer or could not list its containers.
    engine_error: Option<String>,
    /// Every engine of the pool, the top-level one first.
    engines: Vec<EngineRow>,
    builders: Vec<BuilderInfo>,
    /// This host's free space where things land: the local engine's data root (its volumes),
    /// and the local store.
    free: Vec<FreeSpace>,
}

#[derive(Debug, Serialize)]
struct FreeSpace {
    /// What lives there ("builder volumes", "/nix/store").
    what: String,
    path: String,
    free_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct EngineInfo {
    pub addr: String,
    pub how_found: String,
    pub arch: String,
    pub os: String,
}

impl EngineInfo {
    pub fn of(e: &Engine) -> EngineInfo {
        EngineInfo {
            addr: e.addr.clone(),
            how_found: e.how_found.to_string(),
            arch: e.arch.clone(),
            os: e.os.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
struct BuilderInfo {
    /// The engine it is on: `default`, or its `[engines.<name>]`.
    engine: String,
    system: String,
    configured: bool,
    container: String,
    image: Option<String>,
    image_id: Option<String>,
    emulated: Option<bool>,
    /// The native system whose builder (`container`) builds this emulated one through
    /// `extra-platforms`; null: a container of its own.
    served_by: Option<String>,
    state: String,
    uptime_secs: Option<u64>,
    port: Option<u16>,
    volume: Option<String>,
    store_bytes: Option<u64>,
    /// How `store_bytes` was measured: "volume" (walked on the host) or "du" (in the
    /// container).
    store_measured_by: Option<&'static str>,
    /// `max-store-size`: garbage is collected in the builder above it.
    max_store_bytes: Option<u64>,
    builds_running: u32,
    slots: u32,
    /// Whether builds run in Nix's sandbox; null until the container decides ("auto").
    sandboxed: Option<bool>,
    sandbox_why: String,
}

pub async fn run(env: &Env, args: Args) -> anyhow::Result<i32> {
    let config = env.config()?;
    let (state, instance) = env.instance()?;
    let pool = engines::connect_all(&config, None).await?;
    let now = timestamps::now();
    let mut rows_out = Vec::new();
    let mut engine_rows = Vec::new();
    for pe in &pool {
        let mut row = EngineRow::of(pe);
        let engine = pe.engine.as_ref().ok();
        let existing = match engine {
            Some(e) => match containers::list_existing(e, &instance).await {
                Ok(x) => x,
                Err(err) => {
                    row.error = Some(format!("{err:#}"));
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        for r in builders::merge(pe.name(), pe.served(&config, &instance), existing) {
            let mut b = describe(&r, engine, &state, now, !args.no_size).await;
            if engine.is_none() {
                b.state = "unknown".into();
            }
            rows_out.push(b);
        }
        engine_rows.push(row);
    }
    let errors: Vec<String> = engine_rows
        .iter()
        .filter_map(|r| r.error.as_ref().map(|e| format!("engine {}: {e}", r.name)))
        .collect();
    let mut free = Vec::new();
    // Only a local engine's data root is on this host's file systems.
    if let Some(e) = pool.first().and_then(|pe| pe.engine.as_ref().ok())
        && cfg!(target_os = "linux")
        && e.addr.starts_with("unix://")
        && let Ok(info) = e.docker.info().await
        && let Some(root) = info.docker_root_dir
        && let Some(n) = free_bytes(Path::new(&root))
    {
        free.push(FreeSpace {
            what: "builder volumes".into(),
            path: root,
            free_bytes: n,
        });
    }
    if let Some(n) = free_bytes(Path::new("/nix/store")) {
        free.push(FreeSpace {
            what: "outputs".into(),
            path: "/nix/store".into(),
            free_bytes: n,
        });
    }
    let report = Report {
        free,
        instance,
        state_dir: state.path().display().to_string(),
        config: env.config_path.display().to_string(),
        engine: pool
            .first()
            .and_then(|pe| pe.engine.as_ref().ok())
            .map(EngineInfo::of),
        engine_error: (!errors.is_empty()).then(|| errors.join("; ")),
        engines: engine_rows,
        builders: rows_out,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if config.engines.is_empty() {
        print_table(&report);
    } else {
        print_pool(&report);
    }
    Ok(if report.engine_error.is_some() { 1 } else { 0 })
}

async fn describe(
    row: &Row,
    engine: Option<&Engine>,
    state: &crate::state::StateDir,
    now: i64,
    measure: bool,
) -> BuilderInfo {
    let ex = row.existing.as_ref();
    let slots_n = row.max_jobs();
    let builds_running =
        slots::busy_count(&state.load_dir(), &row.container_name(), slots_n).unwrap_or(0);
    let (store_bytes, store_measured_by) = match (ex, engine, measure) {
        (Some(ex), Some(engine), true) => match store_size(engine, ex).await {
            Some((n, how)) => (Some(n), Some(how)),
            None => (None, None),
        },
        _ => (None, None),
    };
    let (sandboxed, sandbox_why) = row.sandbox();
    BuilderInfo {
        sandboxed,
        sandbox_why,
        engine: row.engine.clone(),
        system: row.system.clone(),
        configured: row.spec.is_some(),
        container: row.container_name(),
        image: row.spec.as_ref().map(|s| s.image.clone()),
        image_id: ex.and_then(|e| e.image_id().map(str::to_string)),
        emulated: row.spec.as_ref().map(|s| s.emulated),
        served_by: row.spec.as_ref().and_then(|s| s.served_by.clone()),
        state: ex.map_or_else(|| "absent".to_string(), Existing::state_name),
        uptime_secs: ex.and_then(|e| e.uptime_secs(now)),
        port: ex.filter(|e| e.running()).and_then(Existing::port),
        volume: ex.and_then(|e| e.volume().map(str::to_string)),
        store_bytes,
        store_measured_by,
        max_store_bytes: row.spec.as_ref().and_then(|s| s.max_store_bytes),
        builds_running,
        slots: slots_n,
    }
}

/// Disk usage of the builder's `/nix/store`: walked on the volume's directory when it is
/// readable here, else `du` inside the running container.
pub async fn store_size(engine: &Engine, ex: &Existing) -> Option<(u64, &'static str)> {
    // A remote engine's volume path names a directory on its host, not on this one.
    if engine.is_local_socket()
        && let Some(vol) = ex.volume()
        && let Ok(v) = engine.docker.inspect_volume(vol).await
    {
        let mountpoint = std::path::PathBuf::from(&v.mountpoint);
        let usage = tokio::task::spawn_blocking(move || volume_store_usage(&mountpoint))
            .await
            .ok()
            .and_then(|r| {
                r.map_err(|e| tracing::debug!("not sizing the store on the volume: {e}"))
                    .ok()
            });
        if let Some(n) = usage {
            return Some((n, "volume"));
        }
    }
    if !ex.running() {
        return None;
    }
    let mut out = Vec::new();
    let code = containers::exec(
        &engine.docker,
        &ex.name,
        &["du", "-sk", "/nix/store"],
        Duration::from_secs(60),
        |is_err, b| {
            if !is_err {
                out.extend_from_slice(b)
            }
        },
    )
    .await
    .ok()?;
    if code != 0 {
        return None;
    }
    let kib: u64 = String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((kib * 1024, "du"))
}

/// Disk usage of `store` beneath a volume's mount point. The volume's contents are the
/// container's (its root can plant symlinks anywhere in it) and this runs as root: `store` is
/// opened without following any symlink, and the walk never follows one, never leaves the
/// volume's file system, and is bounded in depth and entries.
fn volume_store_usage(mountpoint: &Path) -> std::io::Result<u64> {
    use crate::fs_beneath::{self, Want};
    use std::os::fd::AsFd;
    /// Deeper than any real store (a NAR nests at most 1024 directories below its root).
    const MAX_DEPTH: usize = 1100;
    /// Far more than any real store holds; a walk past it is a hostile volume, not a store.
    const MAX_ENTRIES: u64 = 100_000_000;
    let root = fs_beneath::open_root(mountpoint)?;
    let store = fs_beneath::open_beneath(root.as_fd(), Path::new("store"), Want::Dir)?;
    fs_beneath::disk_usage_fd(store, MAX_DEPTH, MAX_ENTRIES)
}

fn print_table(r: &Report) {
    match &r.engine {
        Some(e) => println!(
            "instance {}   engine {} ({}, {})",
            r.instance, e.addr, e.how_found, e.arch
        ),
        None => println!("instance {}   engine: none answered", r.instance),
    }
    println!("state {}   config {}", r.state_dir, r.config);
    if let Some(err) = &r.engine_error {
        eprintln!("nixdock: {err}");
    }
    println!();
    if r.builders.is_empty() {
        println!(
            "No builders: the config names none, and this machine can run no Linux system in a container."
        );
        return;
    }
    print_rows(&r.builders);
    print_store_note(&r.builders);
    print_served_notes(&r.builders);
    print_free(r);
    print_sandbox_notes(&r.builders);
}

/// Free bytes (for an unprivileged user) on the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes one struct to the pointer it is given; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The host's free space, a line per file system (within 80 columns).
fn print_free(r: &Report) {
    for (i, f) in r.free.iter().enumerate() {
        let line = format!(
            "{} {} free for {} ({})",
            if i == 0 { "FREE:" } else { "     " },
            format::human_bytes(f.free_bytes),
            f.what,
            f.path
        );
        println!("{}", format::fit(&line, 80));
    }
}

/// A pool: each engine's line, then its builders.
fn print_pool(r: &Report) {
    println!("instance {}   state {}", r.instance, r.state_dir);
    println!("config {}", r.config);
    for e in &r.engines {
        println!();
        println!("{}", format::fit(&e.line(), 80));
        if let Some(err) = &e.error {
            eprintln!("nixdock: engine {}: {err}", e.name);
        }
        let mine: Vec<&BuilderInfo> = r.builders.iter().filter(|b| b.engine == e.name).collect();
        if mine.is_empty() {
            if e.error.is_some() {
                println!("  its builders are unknown while it does not answer");
            } else {
                println!("  no builders");
            }
            continue;
        }
        print_rows(&mine);
    }
    let all: Vec<&BuilderInfo> = r.builders.iter().collect();
    print_store_note(&all);
    print_served_notes(&all);
    print_free(r);
    print_sandbox_notes(&all);
}

/// Which container builds each emulated system the native builder serves (its row shows that
/// container's state, store and slots).
fn print_served_notes<B: std::borrow::Borrow<BuilderInfo>>(builders: &[B]) {
    let notes: Vec<&BuilderInfo> = builders
        .iter()
        .map(|b| b.borrow())
        .filter(|b| b.served_by.is_some())
        .collect();
    if notes.is_empty() {
        return;
    }
    println!("\nEMULATED IN THE NATIVE BUILDER (extra-platforms, binfmt_misc qemu):");
    for b in notes {
        println!(
            "  {}: built in {} (the {} builder; shared slots)",
            b.system,
            b.container,
            b.served_by.as_deref().unwrap_or("?")
        );
    }
}

/// Why each builder is sandboxed or not (too long for a column).
fn print_sandbox_notes<B: std::borrow::Borrow<BuilderInfo>>(builders: &[B]) {
    let notes: Vec<&BuilderInfo> = builders
        .iter()
        .map(|b| b.borrow())
        .filter(|b| !b.sandbox_why.is_empty())
        .collect();
    if notes.is_empty() {
        return;
    }
    println!("\nSANDBOX:");
    for b in notes {
        let who = if b.engine == crate::builder::engine::DEFAULT_ENGINE {
            b.system.clone()
        } else {
            format!("{} on {}", b.system, b.engine)
        };
        for line in wrap(&format!("{who}: {}", b.sandbox_why), 80 - 4) {
            println!("  {line}");
        }
    }
}

/// Word-wrapped lines of at most `width` characters (a longer word stays whole), continuation
/// lines indented by two spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    // Whether `cur` holds a word yet (it may hold only the continuation indent).
    let mut has_word = false;
    for word in text.split_whitespace() {
        if has_word && cur.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::replace(&mut cur, "  ".to_string()));
            has_word = false;
        }
        if has_word {
            cur.push(' ');
        }
        cur.push_str(word);
        has_word = true;
    }
    if has_word {
        lines.push(cur);
    }
    lines
}

fn print_rows<B: std::borrow::Borrow<BuilderInfo>>(builders: &[B]) {
    // 14+1 + 7+1 + 6+1 + 5+1 + 7+1 + 6+1 + 7+2 = 60 columns before the image, which gets the
    // rest of 80.
    println!(
        "{:<14} {:<7} {:>6} {:>5} {:>7} {:>6} {:<7}  IMAGE",
        "SYSTEM", "STATE", "UPTIME", "PORT", "STORE", "BUILDS", "SANDBOX"
    );
    for b in builders {
        let b = b.borrow();
        let system = if b.configured {
            b.system.clone()
        } else {
            format!("{}*", b.system)
        };
        let image = b
            .image
            .clone()
            .or_else(|| {
                b.image_id
                    .as_ref()
                    .map(|i| i.trim_start_matches("sha256:").chars().take(12).collect())
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:<7} {:>6} {:>5} {:>7} {:>6} {:<7}  {}",
            format::fit(&system, 14),
            format::fit(&b.state, 7),
            b.uptime_secs
                .map(format::human_duration)
                .unwrap_or_else(|| "-".into()),
            b.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            b.store_bytes
                .map(format::human_bytes)
                .unwrap_or_else(|| "-".into()),
            format!("{}/{}", b.builds_running, b.slots),
            match b.sandboxed {
                Some(true) => "on",
                Some(false) => "off",
                None => "?",
            },
            format::fit(&image, 80 - 60),
        );
    }
}

fn print_store_note<B: std::borrow::Borrow<BuilderInfo>>(builders: &[B]) {
    if builders.iter().any(|b| b.borrow().store_bytes.is_some()) {
        let how: Vec<&str> = builders
            .iter()
            .filter_map(|b| b.borrow().store_measured_by)
            .collect();
        let note = if how.iter().all(|h| *h == "volume") {
            "STORE: disk usage of /nix/store, counted on each builder's volume"
        } else if how.iter().all(|h| *h == "du") {
            "STORE: disk usage of /nix/store (`du -sk` inside each running builder)"
        } else {
            "STORE: disk usage of /nix/store (on the volume, or `du` in the builder)"
        };
        println!("\n{note}");
    }
    let limits: Vec<String> = builders
        .iter()
        .filter_map(|b| {
            let b = b.borrow();
            b.max_store_bytes
                .map(|m| format!("{} {}", b.system, format::human_bytes(m)))
        })
        .collect();
    if !limits.is_empty() {
        let text = format!(
            "max-store-size (garbage collected above it): {}",
            limits.join(", ")
        );
        for l in wrap(&text, 80) {
            println!("{l}");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrap_keeps_lines_within_the_width() {
        let w = super::wrap(
            "x86_64-linux: auto: a rootful engine on its host: the sandbox needs an unmasked /proc",
            30,
        );
        assert!(w.len() > 2, "{w:?}");
        assert!(w.iter().all(|l| l.chars().count() <= 30), "{w:?}");
        assert!(w[1].starts_with("  ") && !w[1].starts_with("   "), "{w:?}");
        assert_eq!(
            w.join(" ").split_whitespace().collect::<Vec<_>>().join(" "),
            "x86_64-linux: auto: a rootful engine on its host: the sandbox needs an unmasked /proc"
        );
    }
}
