//! `nixdock stop`: stop builder containers. They keep their /nix volume, so the next build
//! for the system starts the same container again with a warm store.

use bollard::query_parameters::StopContainerOptions;

use super::Env;
use super::{
    builders::{self, Row},
    containers,
};

#[derive(Debug, clap::Args)]
#[command(after_help = "\
A builder with builds running is left alone unless --force is given. Builders
also stop by themselves after their idle-timeout (30 min by default).
`nixdock status` lists the systems. A system may have a builder on several
engines of the pool: each is stopped (only one engine's with --engine). An
engine that does not answer is named, and the exit status is 1.")]
pub struct Args {
    /// Systems whose builders to stop, e.g. aarch64-linux
    #[arg(
        value_name = "SYSTEM",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub systems: Vec<String>,
    /// Stop every builder of this installation
    #[arg(long)]
    pub all: bool,
    /// Stop even while builds run on them (they fail)
    #[arg(long)]
    pub force: bool,
    /// Only this engine's builders (`default`, [engines.NAME])
    #[arg(long, value_name = "NAME")]
    pub engine: Option<String>,
}

pub async fn run(env: &Env, args: Args) -> anyhow::Result<i32> {
    let loaded = builders::load(env, args.engine.as_deref()).await?;
    let rows = builders::select(loaded.rows.clone(), &args.systems)?;
    let mut failed = loaded.failed_engines;
    for row in &rows {
        let label = row.label(loaded.is_pool());
        let result = match loaded.engine_of(row) {
            Ok(engine) => stop_one(engine, &loaded.state, row, args.force).await,
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
    Ok(if failed > 0 { 1 } else { 0 })
}

async fn stop_one(
    engine: &crate::builder::Engine,
    state: &crate::state::StateDir,
    row: &Row,
    force: bool,
) -> anyhow::Result<String> {
    let Some(ex) = &row.existing else {
        return Ok("no container".into());
    };
    if !ex.running() {
        return Ok(format!("{} is not running ({})", ex.name, ex.state_name()));
    }
    let _lock = builders::lock_builder(state, &ex.name).await?;
    let _slots = if force {
        None
    } else {
        Some(builders::hold_idle(state, row)?)
    };
    let opts = StopContainerOptions {
        t: Some(10),
        ..Default::default()
    };
    match engine.docker.stop_container(&ex.name, Some(opts)).await {
        Ok(()) => Ok(format!("stopped {}", ex.name)),
        Err(e) if containers::is_not_found(&e) => Ok(format!("{} is gone", ex.name)),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(format!("{} was already stopped", ex.name)),
        Err(e) => Err(anyhow::anyhow!("cannot stop {}: {e}", ex.name)),
    }
}
