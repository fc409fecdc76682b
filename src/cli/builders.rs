//! The builders a command works on: those this installation serves merged with its existing
//! containers, selected by system, and the locks that keep the hook off them meanwhile.

use anyhow::Context as _;
use std::collections::BTreeMap;

use crate::builder::{BuilderSpec, Engine, slots};
use crate::config::Config;
use crate::state::{FileLock, StateDir};

use super::containers::{Existing, list_existing};

/// The builders the hook serves with this config: exactly what the hook computes.
pub fn served(cfg: &Config, instance: &str) -> Vec<BuilderSpec> {
    BuilderSpec::served(cfg, instance)
}

pub async fn engine(cfg: &Config) -> anyhow::Result<Engine> {
    let first = crate::builder::engine::EngineSettings::pool(cfg).remove(0);
    Ok(Engine::discover(&first).await?)
}

/// One builder: configured (a spec), existing (a container), or both.
#[derive(Debug, Clone)]
pub struct Row {
    pub system: String,
    pub spec: Option<BuilderSpec>,
    pub existing: Option<Existing>,
}

impl Row {
    pub fn container_name(&self) -> String {
        match (&self.existing, &self.spec) {
            (Some(e), _) => e.name.clone(),
            (None, Some(s)) => s.container_name(),
            (None, None) => String::new(),
        }
    }

    /// Build slots: the running container's, else the configured number.
    pub fn max_jobs(&self) -> u32 {
        self.existing
            .as_ref()
            .and_then(Existing::max_jobs)
            .or(self.spec.as_ref().map(|s| s.max_jobs))
            .unwrap_or(crate::config::DEFAULT_MAX_JOBS)
    }

    pub fn running(&self) -> bool {
        self.existing.as_ref().is_some_and(Existing::running)
    }
}

/// Configured builders and existing containers, merged by system, sorted by system.
pub fn merge(specs: Vec<BuilderSpec>, existing: Vec<Existing>) -> Vec<Row> {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for s in specs {
        rows.insert(
            s.system.clone(),
            Row {
                system: s.system.clone(),
                spec: Some(s),
                existing: None,
            },
        );
    }
    for e in existing {
        let key = if e.system.is_empty() {
            e.name.clone()
        } else {
            e.system.clone()
        };
        let row = rows.entry(key.clone()).or_insert_with(|| Row {
            system: key,
            spec: None,
            existing: None,
        });
        // Two containers for one system (a renamed instance?): keep the one named as the
        // spec names it, else the first.
        let keep_old = row.existing.is_some()
            && row
                .spec
                .as_ref()
                .is_none_or(|s| s.container_name() != e.name);
        if !keep_old {
            row.existing = Some(e);
        }
    }
    rows.into_values().collect()
}

/// The rows named by `systems` (all of them when `systems` is empty); an unknown name is an
/// error that lists the known ones.
pub fn select(rows: Vec<Row>, systems: &[String]) -> anyhow::Result<Vec<Row>> {
    if systems.is_empty() {
        return Ok(rows);
    }
    let known: Vec<String> = rows.iter().map(|r| r.system.clone()).collect();
    for s in systems {
        if !known.contains(s) {
            anyhow::bail!(
                "no builder for {s} in this installation (known: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        }
    }
    Ok(rows
        .into_iter()
        .filter(|r| systems.contains(&r.system))
        .collect())
}

/// Loads config, state and engine, and merges served builders with existing containers.
pub struct Loaded {
    pub config: Config,
    pub state: StateDir,
    pub instance: String,
    pub engine: Engine,
    pub rows: Vec<Row>,
}

pub async fn load(env: &super::Env) -> anyhow::Result<Loaded> {
    let config = env.config()?;
    let (state, instance) = env.instance()?;
    let engine = engine(&config).await?;
    let existing = list_existing(&engine, &instance).await?;
    let rows = merge(served(&config, &instance), existing);
    Ok(Loaded {
        config,
        state,
        instance,
        engine,
        rows,
    })
}

/// Takes the per-builder lock the hook takes while it creates or starts a container, so
/// nothing starts the builder under us.
pub async fn lock_builder(state: &StateDir, container: &str) -> anyhow::Result<FileLock> {
    let path = state.lock_path(&format!("builder-{container}"));
    tokio::task::spawn_blocking(move || FileLock::exclusive(&path))
        .await
        .context("lock task failed")?
        .map_err(Into::into)
}

/// Holds every build slot of a builder, so no build starts on it meanwhile; an error names
/// how many builds run.
pub fn hold_idle(state: &StateDir, row: &Row) -> anyhow::Result<Vec<FileLock>> {
    let name = row.container_name();
    let max = row.max_jobs();
    match slots::try_acquire_all(&state.load_dir(), &name, max)? {
        Some(all) => Ok(all),
        None => {
            let busy = slots::busy_count(&state.load_dir(), &name, max).unwrap_or(0);
            Err(anyhow::anyhow!(
                "{busy} build(s) running on {name}; wait for them, or pass --force (they fail)"
            ))
        }
    }
}
