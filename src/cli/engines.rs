//! Every engine of the pool (the top-level one, then each `[engines.<name>]`), connected at
//! once, each within the hook's connect deadline, so one engine that dropped off the network
//! costs a command a few seconds and the others are still shown and acted on.

use crate::builder::engine::{DEFAULT_ENGINE, EngineSettings};
use crate::builder::pool::CONNECT_DEADLINE;
use crate::builder::provision::EnginePlace;
use crate::builder::{BuilderSpec, Engine, EngineError};
use crate::config::Config;

/// One engine of the pool as the config names it, and whether it answered.
pub struct PoolEngine {
    pub settings: EngineSettings,
    pub engine: Result<Engine, anyhow::Error>,
}

impl PoolEngine {
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// Where it is: the connected address, else the configured one, else "discovery".
    pub fn addr(&self) -> String {
        match (&self.engine, &self.settings.host) {
            (Ok(e), _) => e.addr.clone(),
            (Err(_), Some(h)) => h.clone(),
            (Err(_), None) => "(discovery)".into(),
        }
    }

    /// The builders it serves: exactly what the hook computes for it.
    pub fn served(&self, cfg: &Config, instance: &str) -> Vec<BuilderSpec> {
        match &self.engine {
            // The hook decides the local default engine's builders from this host, without
            // asking the engine (see `builder::pool`).
            _ if self.settings.is_local_default() => BuilderSpec::served(cfg, instance),
            Ok(e) => BuilderSpec::on_engine(cfg, instance, &e.place(cfg)),
            Err(_) => Vec::new(),
        }
    }

    /// What the hook takes from the engine for its builders (the local default without asking).
    pub fn place(&self, cfg: &Config) -> Option<EnginePlace> {
        match &self.engine {
            _ if self.settings.is_local_default() => Some(EnginePlace::local_default(cfg)),
            Ok(e) => Some(e.place(cfg)),
            Err(_) => None,
        }
    }

    /// `TLS …` / `SSH …` for an engine reached that way, for the operator.
    pub fn access_note(&self) -> Option<String> {
        if let Some(tls) = &self.settings.access.tls {
            return Some(format!(
                "TLS with a client certificate, trusting only {}",
                tls.ca.display()
            ));
        }
        self.settings
            .access
            .ssh
            .as_ref()
            .map(|s| format!("SSH with {}, host key pinned", s.key.display()))
    }
}

/// An engine of the pool as `status --json` and `doctor --json` report it.
#[derive(Debug, serde::Serialize)]
pub struct EngineRow {
    pub name: String,
    pub addr: String,
    /// How it was found (the default engine), or the config table naming it.
    pub how_found: String,
    pub arch: Option<String>,
    pub os: Option<String>,
    /// TLS or SSH, when it is reached that way.
    pub access: Option<String>,
    /// Why it is not used now.
    pub error: Option<String>,
}

impl EngineRow {
    pub fn of(pe: &PoolEngine) -> EngineRow {
        let ok = pe.engine.as_ref().ok();
        EngineRow {
            name: pe.name().to_string(),
            addr: pe.addr(),
            how_found: match ok {
                Some(e) if e.name == DEFAULT_ENGINE => e.how_found.to_string(),
                _ if pe.name() == DEFAULT_ENGINE && pe.settings.host.is_none() => {
                    "discovery".into()
                }
                _ if pe.name() == DEFAULT_ENGINE => "config docker-host".into(),
                _ => format!("[engines.{}]", pe.name()),
            },
            arch: ok.map(|e| e.arch.clone()),
            os: ok.map(|e| e.os.clone()),
            access: pe.access_note(),
            error: pe.engine.as_ref().err().map(|e| format!("{e:#}")),
        }
    }

    /// `engine e2: tcp://10.231.0.2:2376 ([engines.e2], x86_64, TLS)`, or why it is out.
    pub fn line(&self) -> String {
        match &self.error {
            Some(err) => format!("engine {}: {err}", self.name),
            None => {
                let mut what = vec![self.how_found.clone()];
                what.extend(self.arch.clone());
                // Just the kind here (the table has 80 columns); doctor says the rest.
                what.extend(
                    self.access
                        .as_deref()
                        .and_then(|a| a.split_whitespace().next())
                        .map(str::to_string),
                );
                format!("engine {}: {} ({})", self.name, self.addr, what.join(", "))
            }
        }
    }
}

/// The pool's engines (`only`: just that one), all connected at once.
pub async fn connect_all(cfg: &Config, only: Option<&str>) -> anyhow::Result<Vec<PoolEngine>> {
    let settings = select(EngineSettings::pool(cfg), only)?;
    let tries = settings.into_iter().map(|s| async move {
        let engine = match tokio::time::timeout(CONNECT_DEADLINE, Engine::discover(&s)).await {
            Ok(Ok(e)) => Ok(e),
            // The message for the top-level engine tells how to change `docker-host`; a pool
            // engine's own reason is what its doctor check and warnings need.
            Ok(Err(EngineError::Explicit { addr, why, .. })) if s.name != DEFAULT_ENGINE => {
                Err(anyhow::anyhow!("{addr} does not answer: {why}"))
            }
            Ok(Err(e)) => Err(anyhow::Error::new(e)),
            Err(_) => Err(anyhow::anyhow!(
                "{} did not answer within {} s",
                s.host.as_deref().unwrap_or("no engine found by discovery"),
                CONNECT_DEADLINE.as_secs()
            )),
        };
        PoolEngine {
            settings: s,
            engine,
        }
    });
    Ok(futures_util::future::join_all(tries).await)
}

/// The engine named `only` (all when `None`); an unknown name is an error listing the known.
fn select(all: Vec<EngineSettings>, only: Option<&str>) -> anyhow::Result<Vec<EngineSettings>> {
    let Some(want) = only else { return Ok(all) };
    let known: Vec<String> = all.iter().map(|s| s.name.clone()).collect();
    let picked: Vec<EngineSettings> = all.into_iter().filter(|s| s.name == want).collect();
    if picked.is_empty() {
        anyhow::bail!(
            "no engine {want} in the config (engines: {})",
            known.join(", ")
        );
    }
    Ok(picked)
}

/// Prints why each engine that did not answer is left out; returns how many.
pub fn report_unreachable(engines: &[PoolEngine]) -> usize {
    let mut n = 0;
    for e in engines {
        if let Err(err) = &e.engine {
            eprintln!(
                "nixdock: engine {}: {err:#}; its builders are left out",
                e.name()
            );
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_an_engine_by_name_or_names_the_known_ones() {
        let all = vec![
            EngineSettings::top_level(None),
            EngineSettings {
                name: "arm".into(),
                host: Some("tcp://10.0.0.1:2376".into()),
                access: Default::default(),
            },
        ];
        assert_eq!(select(all.clone(), None).unwrap().len(), 2);
        let one = select(all.clone(), Some("arm")).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name, "arm");
        let err = select(all, Some("x86")).unwrap_err().to_string();
        assert!(
            err.contains("no engine x86") && err.contains("default, arm"),
            "{err}"
        );
    }
}
