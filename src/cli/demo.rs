//! `nixdock demo`: builds a tiny derivation for every system the engine can run, through the
//! real `nix-build` and nixdock-hook, twice (cold, then warm), and shows where it ran.

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::builder::BuilderSpec;
use crate::builder::engine::DEFAULT_ENGINE;
use crate::builder::systems::{self, EmulationSupport};

use super::Env;
use super::{
    builders::{self, Row},
    containers, host, nix_version, timestamps,
};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
For each system it runs, twice with a fresh nonce (so Nix really builds):
  nix-build --no-out-link -E '<derivation>' --option build-hook <hook>
where <hook> is nixdock-hook next to nixdock, adding --max-jobs 0 for this
machine's own system only (else Nix builds it locally; a foreign system needs
nothing but the hook). The derivation records `uname -m` and the host name
where it ran. The first build includes starting the builder if it was not
running (--cold makes sure of that); the second finds it warm.

An image not on the engine yet (the default nixos/nix, or one the config
names) is pulled by the first build, which then includes the pull. Without a
registry, name an image made by `nixdock image build --from-debian` in the
config (scripts/demo uses the test bed's Debian-made images).

Builds by root go straight to the store, with this command's environment
(config, state dir). Other users' builds go through nix-daemon, which takes
--option build-hook only from trusted users and runs the hook with its own
environment.")]
pub struct Args {
    /// Only this system (repeatable) [default: all served]
    #[arg(long = "system", value_name = "SYSTEM")]
    pub systems: Vec<String>,
    /// Stop the builders first: a real cold start
    #[arg(long)]
    pub cold: bool,
    /// Hook [default: nixdock-hook next to nixdock]
    #[arg(long, value_name = "PATH")]
    pub hook: Option<PathBuf>,
}

/// What one system's demo produced.
struct Outcome {
    lines: Vec<String>,
    ok: bool,
}

pub async fn run(env: &Env, args: Args) -> anyhow::Result<i32> {
    let hook = match &args.hook {
        Some(h) => h.clone(),
        None => host::hook_next_to_me()?,
    };
    if !host::is_executable(&hook) {
        anyhow::bail!("{} is missing or not executable", hook.display());
    }
    let nix_build = crate::nix_tools::find("nix-build")?;
    let nix_version = crate::nix_tools::find("nix")
        .ok()
        .and_then(|n| nix_version::nix_version_of(&n))
        .map(|v| v.1)
        .unwrap_or_else(|| "Nix version unknown".into());
    // The demo builds on this host's engine, the pool's top-level one.
    let loaded = builders::load(env, Some(DEFAULT_ENGINE)).await?;
    let engine = loaded.engine(DEFAULT_ENGINE)?.clone();
    let native = format!("{}-linux", host::host_arch());
    let mut specs: Vec<BuilderSpec> = builders::served(&loaded.config, &loaded.instance);
    if !args.systems.is_empty() {
        for s in &args.systems {
            if !specs.iter().any(|x| &x.system == s) {
                anyhow::bail!(
                    "{s} is not served by this installation (served: {})",
                    specs
                        .iter()
                        .map(|x| x.system.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        specs.retain(|x| args.systems.contains(&x.system));
    }
    if specs.is_empty() {
        anyhow::bail!("this installation serves no system (see `nixdock doctor`)");
    }
    println!(
        "nixdock demo: a tiny derivation per system through nix-build, twice (cold, warm)\n  \
         nix-build {} ({nix_version})\n  build-hook {}\n  engine {} ({})",
        nix_build.display(),
        hook.display(),
        engine.addr,
        engine.how_found
    );
    if !host::is_root() {
        println!(
            "  note: as a non-root user these builds go through nix-daemon, which takes \
             --option build-hook only from trusted users"
        );
    }
    let mut all_ok = true;
    for spec in &specs {
        println!();
        let o = demo_one(env, &loaded, &args, spec, &hook, &nix_build, &native).await;
        for l in &o.lines {
            println!("{l}");
        }
        all_ok &= o.ok;
    }
    Ok(if all_ok { 0 } else { 1 })
}

async fn demo_one(
    env: &Env,
    loaded: &builders::Loaded,
    args: &Args,
    spec: &BuilderSpec,
    hook: &Path,
    nix_build: &Path,
    native: &str,
) -> Outcome {
    let system = spec.system.as_str();
    let is_native = system == native;
    let kind = if is_native {
        "native, built with --max-jobs 0".to_string()
    } else if let Some(by) = &spec.served_by {
        format!("emulated in the {by} builder")
    } else if spec.emulated {
        "emulated".to_string()
    } else {
        "foreign".to_string()
    };
    println!("{system} ({kind}), image {}", spec.image);
    let fail = |why: String| Outcome {
        lines: vec![format!("  FAILED: {why}")],
        ok: false,
    };
    if let EmulationSupport::Missing(why) =
        systems::emulation_support(system, host::host_arch(), host::ENGINE_IS_LOCAL)
    {
        return Outcome {
            lines: vec![format!("  skipped: this machine cannot run it: {why}")],
            ok: true,
        };
    }
    let engine = match loaded.engine(DEFAULT_ENGINE) {
        Ok(e) => e,
        Err(e) => return fail(format!("{e:#}")),
    };
    let pull_first = match engine.docker.inspect_image(&spec.local_image()).await {
        Ok(_) => false,
        Err(e) if containers::is_not_found(&e) => true,
        Err(e) => return fail(format!("cannot inspect {}: {e}", spec.image)),
    };
    let row = loaded.rows.iter().find(|r| r.system == system);
    // Asked now, not taken from the rows read at the start: a system served by another
    // system's builder may have started that container a moment ago.
    let mut running = match engine
        .docker
        .inspect_container(&spec.container_name(), None)
        .await
    {
        Ok(c) => c.state.and_then(|s| s.running).unwrap_or(false),
        Err(_) => row.is_some_and(Row::running),
    };
    if args.cold && running {
        let name = spec.container_name();
        let t = Instant::now();
        if let Err(e) = stop_builder(loaded, row, &name).await {
            return fail(format!("cannot stop {name} for a cold start: {e:#}"));
        }
        println!(
            "  stopped {name} for a cold start ({:.1} s)",
            t.elapsed().as_secs_f64()
        );
        running = false;
    }
    let mut lines = Vec::new();
    let mut ok = true;
    for (i, label) in ["first build ", "second build"].iter().enumerate() {
        let nonce = format!(
            "{}-{}",
            timestamps::now(),
            crate::state::random_id(10).unwrap_or_default()
        );
        let t = Instant::now();
        let r = nix_build_once(env, nix_build, hook, system, is_native, &nonce).await;
        let secs = t.elapsed().as_secs_f64();
        let when = if i == 0 {
            if running {
                "builder was already running"
            } else if pull_first {
                "cold: includes pulling the image and starting the builder"
            } else {
                "cold: includes starting the builder"
            }
        } else {
            "warm"
        };
        match r {
            Ok(content) => {
                let field = |k: &str| {
                    content
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix(&format!("{k}=")))
                        .unwrap_or("?")
                        .to_string()
                };
                let host = field("host");
                let machine = field("machine");
                let remote = host.starts_with("nixdock-");
                // The derivation's builder is the container's own /bin/sh: in another system's
                // builder that is a program of that system, whatever this derivation's system.
                let shell = match &spec.served_by {
                    Some(by) => format!("its /bin/sh is the {by} builder's: uname -m = {machine}"),
                    None => format!("uname -m = {machine}"),
                };
                lines.push(format!(
                    "  {label} {secs:5.2} s  ({when}) ran on {host}, {shell}{}",
                    if remote {
                        ""
                    } else {
                        "  <- not a nixdock builder!"
                    }
                ));
                if !remote {
                    ok = false;
                }
            }
            Err(e) => {
                lines.push(format!("  {label} {secs:5.2} s  FAILED:"));
                lines.extend(format!("{e:#}").lines().map(|l| format!("      {l}")));
                ok = false;
                break;
            }
        }
    }
    Outcome { lines, ok }
}

async fn stop_builder(
    loaded: &builders::Loaded,
    row: Option<&Row>,
    name: &str,
) -> anyhow::Result<()> {
    let _lock = builders::lock_builder(&loaded.state, name).await?;
    let _slots = match row {
        Some(r) => Some(builders::hold_idle(&loaded.state, r)?),
        None => None,
    };
    let opts = bollard::query_parameters::StopContainerOptions {
        t: Some(10),
        ..Default::default()
    };
    match loaded
        .engine(DEFAULT_ENGINE)?
        .docker
        .stop_container(name, Some(opts))
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if containers::is_not_found(&e) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn nix_string(s: &str) -> String {
    let mut out = String::from("\"");
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' if chars.peek() == Some(&'{') => out.push_str("\\$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The demo derivation: no nixpkgs, `/bin/sh` as builder (the sandbox is off in builders),
/// writing where it ran.
pub fn demo_expr(system: &str, nonce: &str) -> String {
    let script = "m=unknown; for u in /bin/uname /usr/bin/uname /nix/var/nix/profiles/default/bin/uname; do if [ -x $u ]; then \
                  m=$($u -m); break; fi; done; h=unknown; \
                  if [ -r /proc/sys/kernel/hostname ]; then read h < /proc/sys/kernel/hostname; fi; \
                  echo \"system=$system machine=$m host=$h nonce=$nonce\" > $out";
    format!(
        "derivation {{ name = \"nixdock-demo-{}\"; system = {}; builder = \"/bin/sh\"; \
         args = [ \"-c\" {} ]; nonce = {}; }}",
        system.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"),
        nix_string(system),
        nix_string(script),
        nix_string(nonce)
    )
}

/// One `nix-build` of the demo derivation; returns the output's content.
async fn nix_build_once(
    env: &Env,
    nix_build: &Path,
    hook: &Path,
    system: &str,
    native: bool,
    nonce: &str,
) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(nix_build);
    cmd.arg("--no-out-link")
        .arg("-E")
        .arg(demo_expr(system, nonce))
        .arg("--option")
        .arg("build-hook")
        .arg(hook);
    if native {
        cmd.args(["--max-jobs", "0"]);
    }
    cmd.env("NIXDOCK_CONFIG", &env.config_path)
        .env("NIXDOCK_STATE_DIR", &env.state_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", nix_build.display()))?;
    let out = tokio::time::timeout(Duration::from_secs(600), child.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("nix-build did not finish within 10 minutes"))??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        anyhow::bail!(
            "nix-build failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .rfind(|l| l.starts_with('/'))
        .with_context(|| format!("nix-build printed no output path; stderr:\n{stderr}"))?;
    std::fs::read_to_string(path.trim()).with_context(|| format!("cannot read {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expression_escapes() {
        let e = demo_expr("aarch64-linux", "n1");
        assert!(e.starts_with("derivation { name = \"nixdock-demo-aarch64-linux\";"));
        assert!(e.contains("echo \\\"system=$system"));
        assert_eq!(nix_string("a${b}\"c\\"), "\"a\\${b}\\\"c\\\\\"");
    }
}
