//! `nixdock gc`: reclaim builder space. Runs `nix-collect-garbage` inside running builders
//! (through the Engine API), removes this installation's volumes that no container uses any
//! more, and with `--volumes` removes the builders and their volumes altogether.

use anyhow::Context as _;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bollard::query_parameters::{ListVolumesOptions, RemoveContainerOptions, RemoveVolumeOptions};

use crate::builder::Engine;
use crate::builder::provision::{LABEL_INSTANCE, LABEL_SYSTEM};
use crate::state::StateDir;

use super::Env;
use super::{
    builders::{self, Row},
    containers,
};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Without --volumes: runs `nix-collect-garbage` in each selected builder that
is running (a stopped one is skipped: its store is only reachable while it
runs), and removes this installation's /nix volumes that no container uses
(left behind when a builder's image changed; the hook also removes them by
itself at a builder's cold start a day after the change).

With --volumes: removes the selected builder containers and all their /nix
volumes; the next build for the system starts from its image again.

Every engine of the pool is covered (only one with --engine); an engine that
does not answer is named, and the exit status is 1.")]
pub struct Args {
    /// Systems to collect garbage for [default: all]
    #[arg(value_name = "SYSTEM")]
    pub systems: Vec<String>,
    /// Remove the builders and their /nix volumes instead
    #[arg(long)]
    pub volumes: bool,
    /// With --volumes: remove even while builds run
    #[arg(long, requires = "volumes")]
    pub force: bool,
    /// Only this engine's builders (`default`, [engines.NAME])
    #[arg(long, value_name = "NAME")]
    pub engine: Option<String>,
}

pub async fn run(env: &Env, args: Args) -> anyhow::Result<i32> {
    let loaded = builders::load(env, args.engine.as_deref()).await?;
    let rows = builders::select(loaded.rows.clone(), &args.systems)?;
    let pool = loaded.is_pool();
    let mut failed = loaded.failed_engines;
    for row in &rows {
        let label = row.label(pool);
        let result = match loaded.engine_of(row) {
            Ok(engine) if args.volumes => {
                remove_builder(engine, &loaded.state, &loaded.instance, row, args.force).await
            }
            Ok(engine) => collect(engine, row, &label).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(msg) => println!("{label}: {msg}"),
            Err(e) => {
                eprintln!("{label}: {e:#}");
                failed += 1;
            }
        }
    }
    // Volumes of this instance that no container mounts (their builder was recreated on a
    // new image, or removed above), engine by engine: each engine has its own volumes.
    for pe in &loaded.engines {
        let Ok(engine) = &pe.engine else { continue };
        let mine: Vec<Row> = rows
            .iter()
            .filter(|r| r.engine == pe.name())
            .cloned()
            .collect();
        match remove_unused_volumes(engine, &loaded.state, &loaded.instance, &mine).await {
            Ok(removed) => {
                for (row, vol) in removed {
                    println!("{}: removed unused volume {vol}", row.label(pool));
                }
            }
            Err(e) => {
                eprintln!("nixdock: engine {}: {e:#}", pe.name());
                failed += 1;
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

async fn collect(engine: &Engine, row: &Row, label: &str) -> anyhow::Result<String> {
    let Some(ex) = &row.existing else {
        return Ok("no container; nothing to collect".into());
    };
    if !ex.running() {
        return Ok(format!(
            "not running ({}), skipped; `nixdock gc --volumes {}` removes it",
            ex.state_name(),
            row.system
        ));
    }
    println!("{label}: collecting garbage in {} …", ex.name);
    // The entry script links the image's nix-collect-garbage here; fall back to PATH.
    let script = "if [ -x /etc/nixdock/bin/nix-collect-garbage ]; then \
                  exec /etc/nixdock/bin/nix-collect-garbage; else exec nix-collect-garbage; fi";
    // The summary ("N store paths deleted, X MiB freed") comes on stdout; notes on stderr
    // may arrive after it.
    let mut last = String::new();
    let mut summary = String::new();
    let mut all = String::new();
    let code = containers::exec(
        &engine.docker,
        &ex.name,
        &["/bin/sh", "-c", script],
        Duration::from_secs(3600),
        |_, b| {
            let text = String::from_utf8_lossy(b);
            all.push_str(&text);
            if let Some(l) = text.lines().rfind(|l| !l.trim().is_empty()) {
                last = l.trim().to_string();
            }
            if let Some(l) = text.lines().rfind(|l| l.contains(" freed")) {
                summary = l.trim().to_string();
            }
        },
    )
    .await?;
    if code != 0 {
        let tail: Vec<&str> = all.lines().rev().take(10).collect();
        anyhow::bail!(
            "nix-collect-garbage failed (exit code {code}):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(if !summary.is_empty() {
        summary
    } else if !last.is_empty() {
        last
    } else {
        "garbage collected".into()
    })
}

async fn remove_builder(
    engine: &Engine,
    state: &StateDir,
    instance: &str,
    row: &Row,
    force: bool,
) -> anyhow::Result<String> {
    let name = row.container_name();
    let _lock = builders::lock_builder(state, &name).await?;
    let _slots = if force {
        None
    } else {
        Some(builders::hold_idle(state, row)?)
    };
    let mut done = Vec::new();
    if let Some(ex) = &row.existing {
        let opts = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match engine.docker.remove_container(&ex.name, Some(opts)).await {
            Ok(()) => done.push(format!("removed container {}", ex.name)),
            Err(e) if containers::is_not_found(&e) => {}
            Err(e) => anyhow::bail!("cannot remove {}: {e}", ex.name),
        }
    }
    for vol in volumes_of(engine, instance, Some(&row.container_system())).await? {
        match engine
            .docker
            .remove_volume(&vol, None::<RemoveVolumeOptions>)
            .await
        {
            Ok(()) => done.push(format!("removed volume {vol}")),
            Err(e) if containers::is_not_found(&e) => {}
            Err(e) => anyhow::bail!("cannot remove volume {vol}: {e}"),
        }
    }
    Ok(if done.is_empty() {
        "nothing to remove".into()
    } else {
        done.join("; ")
    })
}

/// Names of this instance's volumes (of one system, or all).
async fn volumes_of(
    engine: &Engine,
    instance: &str,
    system: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    Ok(labelled_volumes(engine, instance)
        .await?
        .into_iter()
        .filter(|(_, s)| system.is_none_or(|want| s == want))
        .map(|(v, _)| v)
        .collect())
}

/// (volume, system) for every volume labelled with this instance.
async fn labelled_volumes(
    engine: &Engine,
    instance: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let opts = ListVolumesOptions {
        filters: Some(HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_INSTANCE}={instance}")],
        )])),
    };
    let list = engine
        .docker
        .list_volumes(Some(opts))
        .await
        .with_context(|| format!("Docker engine at {}", engine.addr))?;
    let mut out: Vec<(String, String)> = list
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| {
            let system = v.labels.get(LABEL_SYSTEM).cloned().unwrap_or_default();
            (v.name, system)
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Removes the selected builders' volumes that no container of this instance mounts, each
/// under its builder's lock (a starting builder creates its volume just before its
/// container).
async fn remove_unused_volumes(
    engine: &Engine,
    state: &StateDir,
    instance: &str,
    rows: &[Row],
) -> anyhow::Result<Vec<(Row, String)>> {
    let mut removed = Vec::new();
    let volumes = labelled_volumes(engine, instance).await?;
    for row in rows {
        let vols: Vec<&String> = volumes
            .iter()
            .filter(|(_, s)| *s == row.system || *s == row.container_system())
            .map(|(v, _)| v)
            .collect();
        if vols.is_empty() {
            continue;
        }
        let _lock = builders::lock_builder(state, &row.container_name()).await?;
        let in_use: HashSet<String> = containers::list_existing(engine, instance)
            .await?
            .iter()
            .filter_map(|e| e.volume().map(str::to_string))
            .collect();
        for v in vols {
            if in_use.contains(v) {
                continue;
            }
            match engine
                .docker
                .remove_volume(v, None::<RemoveVolumeOptions>)
                .await
            {
                Ok(()) => removed.push((row.clone(), v.clone())),
                // In use after all (by a container outside our labels), or gone: leave it.
                Err(e) => tracing::debug!(volume = %v, "not removed: {e}"),
            }
        }
    }
    Ok(removed)
}
