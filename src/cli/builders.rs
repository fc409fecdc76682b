//! The builders a command works on: those this installation serves on each engine of the pool
//! merged with its existing containers there, selected by system (and engine), and the locks
//! that keep the hook off them meanwhile.

use anyhow::Context as _;
use std::collections::BTreeMap;

use crate::builder::{BuilderSpec, Engine, slots};
use crate::config::Config;
use crate::state::{FileLock, StateDir};

use super::containers::{Existing, list_existing};
use super::engines::{PoolEngine, connect_all, report_unreachable};

/// The builders the hook serves with this config: exactly what the hook computes.
pub fn served(cfg: &Config, instance: &str) -> Vec<BuilderSpec> {
    BuilderSpec::served(cfg, instance)
}

/// The top-level engine alone (`nixdock image`, `nixdock demo`: they work on this host's).
pub async fn engine(cfg: &Config) -> anyhow::Result<Engine> {
    let first = crate::builder::engine::EngineSettings::pool(cfg).remove(0);
    Ok(Engine::discover(&first).await?)
}

/// One builder on one engine: configured (a spec), existing (a container), or both.
#[derive(Debug, Clone)]
pub struct Row {
    /// The engine's name in the pool (`default`, or its `[engines.<name>]`).
    pub engine: String,
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

    /// The system its container and volumes are labelled with: the native builder's for an
    /// emulated system it serves.
    pub fn container_system(&self) -> String {
        match (&self.existing, &self.spec) {
            (Some(e), _) if !e.system.is_empty() => e.system.clone(),
            (_, Some(s)) => s.container_system().to_string(),
            _ => self.system.clone(),
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

    /// How output names it: the system, and in a pool also its engine.
    pub fn label(&self, pool: bool) -> String {
        if pool {
            format!("{} on {}", self.system, self.engine)
        } else {
            self.system.clone()
        }
    }

    pub fn running(&self) -> bool {
        self.existing.as_ref().is_some_and(Existing::running)
    }

    /// Whether its builds are sandboxed (`None`: decided when its container is created), and
    /// why: an existing container's recorded decision, else what its configuration says.
    pub fn sandbox(&self) -> (Option<bool>, String) {
        use crate::config::Sandbox;
        if let Some(e) = &self.existing {
            let (on, why) = e.sandbox();
            return (Some(on), why);
        }
        let Some(s) = &self.spec else {
            return (None, String::new());
        };
        if let Some(why) =
            crate::builder::sandbox::refusal(s.sandbox, s.runs_under_emulation(), &s.system)
        {
            return (Some(false), why);
        }
        match s.sandbox {
            Sandbox::On => (Some(true), "sandbox = true".into()),
            Sandbox::Off => (Some(false), "sandbox = false".into()),
            Sandbox::Auto => (
                None,
                "auto: decided when the builder is created, from what its engine reports".into(),
            ),
        }
    }
}

/// One engine's configured builders and existing containers, merged by system, sorted by
/// system. An emulated system served by the native builder gets that builder's container; the
/// container has no row of its own when its system is not served itself (it is not an
/// orphan).
pub fn merge(engine: &str, specs: Vec<BuilderSpec>, existing: Vec<Existing>) -> Vec<Row> {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let all = existing.clone();
    let mut existing = existing;
    for s in specs.iter().filter(|s| s.served_by.is_some()) {
        let name = s.container_name();
        let Some(e) = all.iter().find(|e| e.name == name).cloned() else {
            continue;
        };
        if !specs.iter().any(|o| o.system == e.system) {
            existing.retain(|x| x.name != name);
        }
        rows.insert(
            s.system.clone(),
            Row {
                engine: engine.to_string(),
                system: s.system.clone(),
                spec: Some(s.clone()),
                existing: Some(e),
            },
        );
    }
    for s in specs {
        if rows.contains_key(&s.system) {
            continue;
        }
        rows.insert(
            s.system.clone(),
            Row {
                engine: engine.to_string(),
                system: s.system.clone(),
                spec: Some(s),
                existing: None,
            },
        );
    }
    for e in existing {
        // A container of a system the native builder now serves (one made with
        // `emulation = "container"` before) is not that system's builder any more: it gets a
        // row of its own, by name, unconfigured, so it can be seen and removed.
        let superseded = rows
            .get(&e.system)
            .and_then(|r| r.spec.as_ref())
            .is_some_and(|s| s.served_by.is_some() && s.container_name() != e.name);
        let key = if e.system.is_empty() || superseded {
            e.name.clone()
        } else {
            e.system.clone()
        };
        let row = rows.entry(key.clone()).or_insert_with(|| Row {
            engine: engine.to_string(),
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
        return Ok(one_per_container(rows));
    }
    // A system may have a builder on several engines: name it once.
    let known: Vec<String> = rows
        .iter()
        .map(|r| r.system.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
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
    Ok(one_per_container(
        rows.into_iter()
            .filter(|r| systems.contains(&r.system))
            .collect(),
    ))
}

/// Rows that name the same container (an emulated system served by the native builder, and
/// the native system itself) are acted on once, as the native system's row when it is there.
fn one_per_container(rows: Vec<Row>) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    for r in rows {
        let same = |o: &Row| o.engine == r.engine && o.container_name() == r.container_name();
        match out.iter().position(same) {
            None => out.push(r),
            Some(i) if out[i].spec.as_ref().is_some_and(|s| s.served_by.is_some()) => out[i] = r,
            Some(_) => {}
        }
    }
    out
}

/// Config, state, the pool's engines, and on each answering engine its served builders merged
/// with its existing containers (engine by engine, in the pool's order).
pub struct Loaded {
    pub config: Config,
    pub state: StateDir,
    pub instance: String,
    pub engines: Vec<PoolEngine>,
    pub rows: Vec<Row>,
    /// Engines that did not answer, or whose containers could not be listed (each reported
    /// on stderr already).
    pub failed_engines: usize,
}

impl Loaded {
    /// The connected engine named `name`, or why there is none.
    pub fn engine(&self, name: &str) -> anyhow::Result<&Engine> {
        match self.engines.iter().find(|e| e.name() == name) {
            Some(PoolEngine { engine: Ok(e), .. }) => Ok(e),
            Some(PoolEngine { engine: Err(e), .. }) => Err(anyhow::anyhow!("{e:#}")),
            None => Err(anyhow::anyhow!("no engine {name} in the config")),
        }
    }

    /// The connected engine a row lives on.
    pub fn engine_of(&self, row: &Row) -> anyhow::Result<&Engine> {
        self.engine(&row.engine)
    }

    /// Whether the config names more than one engine (output then names each).
    pub fn is_pool(&self) -> bool {
        !self.config.engines.is_empty()
    }
}

/// Loads everything for a command on the pool's engines (`only`: just that one). Engines that
/// do not answer are reported and left out; the others are loaded.
pub async fn load(env: &super::Env, only: Option<&str>) -> anyhow::Result<Loaded> {
    let config = env.config()?;
    let (state, instance) = env.instance()?;
    let engines = connect_all(&config, only).await?;
    let mut failed_engines = report_unreachable(&engines);
    let mut rows = Vec::new();
    for pe in &engines {
        let Ok(engine) = &pe.engine else { continue };
        match list_existing(engine, &instance).await {
            Ok(existing) => rows.extend(merge(pe.name(), pe.served(&config, &instance), existing)),
            Err(e) => {
                eprintln!(
                    "nixdock: engine {}: {e:#}; its builders are left out",
                    pe.name()
                );
                failed_engines += 1;
            }
        }
    }
    Ok(Loaded {
        config,
        state,
        instance,
        engines,
        rows,
        failed_engines,
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
