//! The engines of the pool, connected on demand: the top-level engine and each
//! `[engines.<name>]`. A remote engine that does not answer within [`CONNECT_DEADLINE`] is
//! skipped with a warning naming it, and every hook skips it for [`BACKOFF`] after that
//! (a file in the state dir says until when), so a host that dropped off the network costs one
//! hook a few seconds, not every build a connect timeout. What an engine answered, and when it
//! last served a hook, is remembered beside that ([`known_engines`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;
use crate::state::StateDir;

use super::engine::{CandidateError, Engine, EngineError, EngineSettings, HowFound};
use super::known_engines;
use super::lifecycle::{BuilderError, Builders};
use super::provision::BuilderSpec;

/// How long one engine may take to answer its first `/version` (TCP, TLS or SSH included).
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// How long every hook skips an engine that did not answer.
pub const BACKOFF: Duration = Duration::from_secs(60);

/// Why an engine of the pool is not used now.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("engine {name} is skipped: it did not answer {ago} s ago; tried again after {left} s")]
    BackingOff { name: String, ago: u64, left: u64 },
    #[error("engine {name} did not answer within {} s; skipped for {} s", CONNECT_DEADLINE.as_secs(), BACKOFF.as_secs())]
    TimedOut { name: String },
    #[error("engine {name}: {source}; skipped for {} s", BACKOFF.as_secs())]
    Failed {
        name: String,
        #[source]
        source: EngineError,
    },
    /// The local default engine (no back-off: nothing else would serve its builders).
    #[error(transparent)]
    Engine(EngineError),
    #[error(transparent)]
    Builders(#[from] BuilderError),
}

/// The engines a hook process has connected, their builders, and those still to ask.
pub struct Pool {
    config: Config,
    state: StateDir,
    instance: String,
    /// Every builder known so far: the local default engine's from the start (known without
    /// asking it), a remote engine's once it answered.
    pub served: Vec<BuilderSpec>,
    connected: BTreeMap<String, Builders>,
    /// Engines not asked yet, by name (the local default engine is asked when first used).
    pending: Vec<EngineSettings>,
    settings: Vec<EngineSettings>,
}

impl Pool {
    pub fn new(config: Config, state: StateDir, instance: String) -> Pool {
        let settings = EngineSettings::pool(&config);
        let (local, pending): (Vec<_>, Vec<_>) =
            settings.iter().cloned().partition(|s| s.is_local_default());
        let served = if local.is_empty() {
            Vec::new()
        } else {
            BuilderSpec::served(&config, &instance)
        };
        Pool {
            config,
            state,
            instance,
            served,
            connected: BTreeMap::new(),
            pending,
            settings,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether `engine` is the local default engine (its emulation is checked on this host).
    pub fn is_local(&self, engine: &str) -> bool {
        self.settings
            .iter()
            .any(|s| s.name == engine && s.is_local_default())
    }

    /// Whether some engine has not been asked yet (its builders are not in `served`).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Asks every engine not asked yet, at once, each within [`CONNECT_DEADLINE`]; those that
    /// answer add their builders to `served`. Returns why the others are not used (one warning
    /// each for the user).
    pub async fn connect_pending(&mut self) -> Vec<Unavailable> {
        let pending = std::mem::take(&mut self.pending);
        let backoff_dir = self.state.private_subdir("engines").ok();
        let tries = pending.into_iter().map(|s| {
            let dir = backoff_dir.clone();
            async move {
                if let Some(why) = dir.as_deref().and_then(|d| backing_off(d, &s.name)) {
                    return (s, Err(why));
                }
                let known = dir.as_deref().and_then(|d| {
                    known_engines::read(d, &s.name, s.host.as_deref().unwrap_or_default())
                });
                let r = ask(&s, known.as_ref()).await;
                if let Some(d) = dir.as_deref() {
                    record(d, &s.name, r.is_ok());
                    match &r {
                        // Taking it as known renews nothing: only an answer, or a builder
                        // made ready through it (`engine_served`), does.
                        Ok((e, true)) => known_engines::write(d, &s.name, &e.known()),
                        Ok((_, false)) => {}
                        Err(_) => known_engines::forget(d, &s.name),
                    }
                }
                (s, r.map(|(e, _)| e))
            }
        });
        let mut unavailable = Vec::new();
        for (s, r) in futures_util::future::join_all(tries).await {
            match r {
                Ok(engine) => {
                    let place = engine.place(&self.config);
                    tracing::info!(engine = %s.name, arch = %engine.arch, publish = ?place.publish, "pool engine answered");
                    self.served.extend(BuilderSpec::on_engine(
                        &self.config,
                        &self.instance,
                        &place,
                    ));
                    match Builders::new(engine, self.state.clone()) {
                        Ok(b) => {
                            let b = b.with_ssh_persist(self.config.ssh_persist());
                            self.connected.insert(s.name.clone(), b);
                        }
                        Err(e) => unavailable.push(e.into()),
                    }
                }
                Err(why) => unavailable.push(why),
            }
        }
        unavailable
    }

    /// Before a hook's `# accept`: whether engine `name` can be used. The local default engine
    /// on a Unix socket need only be listening ([`Engine::listening`]: a connect, no request,
    /// so the builds Nix's worker starts one after another do not each wait for the engine's
    /// answer); anything else is connected to (and asked) as [`builders`](Self::builders) does.
    pub async fn usable(&mut self, name: &str) -> Result<(), Unavailable> {
        if !self.connected.contains_key(name)
            && let Some(s) = self
                .settings
                .iter()
                .find(|s| s.name == name && s.is_local_default())
            && Engine::listening(s).await
        {
            return Ok(());
        }
        self.builders(name).await.map(|_| ())
    }

    /// After engine `name` got a builder ready: the next hooks may accept without asking it
    /// for a moment ([`known_engines`]). Only for an engine that is asked before accepting.
    pub fn engine_served(&self, name: &str) {
        let Some(b) = self.connected.get(name) else {
            return;
        };
        if self.is_local(name) {
            return;
        }
        if let Ok(dir) = self.state.private_subdir("engines") {
            known_engines::write(&dir, name, &b.engine.known());
        }
    }

    /// After engine `name` failed to get a builder ready: its remembered answer is not trusted
    /// any more, so the next hook asks it before accepting ([`known_engines`]).
    pub fn distrust(&self, name: &str) {
        if let Ok(dir) = self.state.private_subdir("engines") {
            known_engines::forget(&dir, name);
        }
    }

    /// The builders of engine `name`, connecting to it first if need be (the local default
    /// engine is asked only when a build goes there).
    pub async fn builders(&mut self, name: &str) -> Result<&Builders, Unavailable> {
        use std::collections::btree_map::Entry;
        match self.connected.entry(name.to_string()) {
            Entry::Occupied(o) => Ok(o.into_mut()),
            Entry::Vacant(v) => {
                let settings = self
                    .settings
                    .iter()
                    .find(|s| s.name == name)
                    .or(self.settings.first())
                    .cloned()
                    .unwrap_or_else(|| EngineSettings::pool(&self.config).remove(0));
                let engine = Engine::discover(&settings)
                    .await
                    .map_err(Unavailable::Engine)?;
                let b = Builders::new(engine, self.state.clone())?
                    .with_ssh_persist(self.config.ssh_persist());
                Ok(v.insert(b))
            }
        }
    }
}

/// Engine `s` as it answers now (`true`) or, when it served a hook a moment ago (`known`) and
/// still accepts a connection, as it answered then (`false`; [`known_engines`]).
async fn ask(
    s: &EngineSettings,
    known: Option<&known_engines::Known>,
) -> Result<(Engine, bool), Unavailable> {
    let failed = |source| Unavailable::Failed {
        name: s.name.clone(),
        source,
    };
    if let Some(k) = known.filter(|k| k.fresh()) {
        match tokio::time::timeout(CONNECT_DEADLINE, Engine::from_known(s, k)).await {
            Ok(Ok(e)) => {
                tracing::debug!(engine = %s.name, ago_ms = known_engines::now_ms().saturating_sub(k.at), "the engine served a moment ago; not asked again before accepting");
                return Ok((e, false));
            }
            // An `ssh://` engine: its route is its SSH session, asked below.
            Ok(Err(CandidateError::Unsupported)) => {}
            // Nothing listens where it answered: asking would fail the same way, later.
            Ok(Err(why)) => {
                return Err(failed(EngineError::Explicit {
                    addr: k.addr.clone(),
                    how: HowFound::ConfigDockerHost,
                    why,
                }));
            }
            Err(_) => {
                return Err(Unavailable::TimedOut {
                    name: s.name.clone(),
                });
            }
        }
    }
    let hint = known.map(|k| k.api.as_str());
    match tokio::time::timeout(CONNECT_DEADLINE, Engine::discover_hinted(s, hint)).await {
        Ok(Ok(e)) => Ok((e, true)),
        Ok(Err(source)) => Err(failed(source)),
        Err(_) => Err(Unavailable::TimedOut {
            name: s.name.clone(),
        }),
    }
}

fn now_secs() -> u64 {
    known_engines::now_ms() / 1000
}

fn backoff_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.down"))
}

/// Why engine `name` is skipped now: it failed less than [`BACKOFF`] ago.
fn backing_off(dir: &Path, name: &str) -> Option<Unavailable> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(backoff_file(dir, name))
        .ok()?
        .take(64)
        .read_to_string(&mut text)
        .ok()?;
    let since: u64 = text.trim().parse().ok()?;
    // A failure in the future (a clock set back since) says nothing about now.
    let ago = now_secs().checked_sub(since)?;
    (ago < BACKOFF.as_secs()).then(|| Unavailable::BackingOff {
        name: name.to_string(),
        ago,
        left: BACKOFF.as_secs() - ago,
    })
}

/// Remembers (for every hook) when engine `name` failed, or forgets it once it answers.
fn record(dir: &Path, name: &str, answered: bool) {
    let f = backoff_file(dir, name);
    let r = if answered {
        match std::fs::remove_file(&f) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    } else {
        crate::state::write_private(&f, now_secs().to_string().as_bytes(), 0o600)
    };
    if let Err(e) = r {
        tracing::warn!(engine = %name, "cannot record the engine's state in {}: {e}", f.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::engine::Access;

    /// A fresh answer from an engine whose address now refuses connections is a failure at
    /// once (backed off as any), not a wait for the whole connect deadline, nor an engine.
    #[tokio::test]
    async fn a_fresh_answer_from_an_engine_that_is_gone_fails_at_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("tcp://{}", listener.local_addr().unwrap());
        drop(listener);
        let s = EngineSettings {
            name: "gone".into(),
            host: Some(addr.clone()),
            access: Access::default(),
        };
        let known = known_engines::Known {
            addr,
            at: known_engines::now_ms(),
            api: "1.41".into(),
            arch: "x86_64".into(),
            os: "linux".into(),
            podman: false,
        };
        let t = std::time::Instant::now();
        let r = ask(&s, Some(&known)).await;
        assert!(
            matches!(&r, Err(Unavailable::Failed { name, .. }) if name == "gone"),
            "{:?}",
            r.map(|(e, fresh)| (e.addr, fresh))
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[test]
    fn a_failed_engine_is_skipped_until_its_backoff_ends_and_forgotten_once_it_answers() {
        let dir = tempfile::tempdir().unwrap();
        assert!(backing_off(dir.path(), "arm").is_none());
        record(dir.path(), "arm", false);
        let why = backing_off(dir.path(), "arm").map(|w| w.to_string());
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("engine arm is skipped")),
            "{why:?}"
        );
        // An old failure no longer counts.
        std::fs::write(
            backoff_file(dir.path(), "arm"),
            (now_secs() - BACKOFF.as_secs() - 1).to_string(),
        )
        .unwrap();
        assert!(backing_off(dir.path(), "arm").is_none());
        // Nor one in the future (the clock set back since): it would back off for hours.
        std::fs::write(
            backoff_file(dir.path(), "arm"),
            (now_secs() + 3600).to_string(),
        )
        .unwrap();
        assert!(backing_off(dir.path(), "arm").is_none());
        record(dir.path(), "arm", false);
        record(dir.path(), "arm", true);
        assert!(backing_off(dir.path(), "arm").is_none());
        assert!(!backoff_file(dir.path(), "arm").exists());
    }
}
